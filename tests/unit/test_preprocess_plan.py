"""The preprocessing job's checks that run before Ray starts."""

import pytest

from conf.preprocess import PreprocessConf
from pipelines.preprocess import plan


def test_output_that_is_an_existing_file_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out.parquet").write_bytes(b"not a folder")
    cfg = PreprocessConf(input=str(tmp_path / "in"), output=str(tmp_path / "out.parquet"))
    with pytest.raises(FileExistsError, match=r"output='.*out\.parquet' is an existing file"):
        plan(cfg)
    assert (tmp_path / "out.parquet").read_bytes() == b"not a folder"
