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


def test_synthetic_captions_choose_the_captioner_or_the_input():
    from workloads.runtime import compose, one_line

    base = ["input=/in", "output=/out"]
    assert compose("preprocess", base).models.synthetic_captions == "model"
    chosen = compose("preprocess", [*base, "models=sd3", "models.synthetic_captions=input"])
    assert chosen.models.synthetic_captions == "input" and chosen.models.kind == "sd3"
    with pytest.raises(Exception) as bad:
        compose("preprocess", [*base, "models.synthetic_captions=vlm"])
    assert "[model, input]" in one_line(bad.value)
    with pytest.raises(Exception) as pairs:  # a pair's synthetic caption is its prompt
        compose("preprocess", [*base, "input_format=pairs", "models.synthetic_captions=input"])
    assert "models.synthetic_captions=input does not apply to input_format=pairs" in one_line(pairs.value)
