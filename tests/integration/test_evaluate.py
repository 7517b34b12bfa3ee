"""`python -m workloads.evaluate images=...` on the local Ray: a make_shapes folder scores its own ground truth, and
GenEval's layout on the S3 server marks a wrong image wrong. (Sampling a run: tests/integration/test_train.py.)"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conf.evaluate import EvaluateConf
from pipelines import geneval
from pipelines.make_shapes import MakeShapesConf
from pipelines.make_shapes import run as make_shapes
from pipelines.storage import filesystem, join
from pipelines.synthetic.shapes import make_sample
from workloads.evaluate import driver as evaluate


def test_a_shapes_folder_scores_its_own_ground_truth(ray_local, tmp_path):
    make_shapes(MakeShapesConf(out=str(tmp_path / "shapes"), n=60, seed=4, size=64, formats=["folder"]))
    summary = evaluate.run(EvaluateConf(images=str(tmp_path / "shapes" / "folder"), out=str(tmp_path / "eval"),
                                        batch_size=16))
    assert summary["images"] == 60 and summary["overall"] == 1.0 and set(summary["tasks"]) == set(geneval.TAGS)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert [r["filename"].rsplit("/", 1)[-1] for r in rows] == [f"0004-{i:06d}.png" for i in range(60)]
    with Image.open(tmp_path / "eval" / "grid.png") as grid:
        assert grid.size == (800, 6 * 108)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_genevals_layout_on_s3_marks_a_mirrored_layout_wrong(ray_local, s3):
    sample = next(s for i in range(100) if (s := make_sample(8, i, 64)).metadata["tag"] == "position")
    relation = sample.metadata["include"][1]["position"][0]
    image = np.asarray(sample.image)
    mirrored = np.ascontiguousarray(np.flip(image, axis=1 if relation in ("left of", "right of") else 0))
    fs, root = filesystem(s3.uri("geneval-layout"))
    fs.pipe({join(root, "00000", "metadata.jsonl"): (json.dumps(sample.metadata) + "\n").encode(),
             join(root, "00000", "samples", "0000.png"): png(image),
             join(root, "00000", "samples", "0001.png"): png(mirrored)})
    summary = evaluate.run(EvaluateConf(images=s3.uri("geneval-layout"), out=s3.uri("geneval-report")))
    assert summary["tasks"] == {"position": 0.5} and summary["prompts_any_correct"] == 1.0
    report = filesystem(s3.uri("geneval-report"))
    rows = [json.loads(line) for line in report[0].cat_file(join(report[1], "results.jsonl")).decode().splitlines()]
    assert [r["correct"] for r in rows] == [True, False] and "expected" in rows[1]["reason"]


def test_a_folder_without_prompts_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(FileNotFoundError, match=r"no images with a <key>\.txt prompt"):
        evaluate.run(EvaluateConf(images=str(tmp_path), out=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="one of images="):
        EvaluateConf(out="x")
