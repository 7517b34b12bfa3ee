"""The pure parts of `tools.gpu.gpu_job` (the GPU run itself is checked by running it; see the README's
benchmarks): Table 7 arithmetic, SD3's encoder configs, the random-weight repo through the preprocessing loaders, the
figures file and table, the config, and the wheel slimming that ships Ray to a GPU machine."""

from __future__ import annotations

import importlib.metadata
import json
import re
import zipfile

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from conf.preprocess import ComputeConf, StageConf
from model.conditioning import SD3_TEXT, TINY_TEXT
from pipelines.encoders import TextEncoders, VAEEncoder
from pipelines.preprocess import text_dims
from pipelines.synthetic.tiny_models import build_tiny_models
from tools.gpu.gpu_job_conf import BenchGPUJobConf, register_gpu_job
from tools.gpu.gpu_job_report import Job, format_table, job_rows
from tools.gpu.sd3_encoders import PAPER_MS, paper_ratios, repo_configs, sd3_configs, write_random_repo
from tools.gpu.slim_wheel import slim
from workloads import runtime


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(str(tmp_path_factory.mktemp("tiny")))


def test_ratios_to_table_7_are_ours_over_the_papers():
    ratios = paper_ratios({"vae": 1.225, "t5": 17.46, "captioner": 3.0})
    assert ratios == pytest.approx({"vae": 0.5, "t5": 1.0})  # only Table 7's encoders, below 1 when faster
    assert set(PAPER_MS) == {"vae", "clip_l", "clip_g", "t5"}


def test_sd3_configs_have_sd3s_widths_and_the_tokenizers_ids(tiny):
    configs = sd3_configs(tiny.repo)
    widths = (configs["clip_l"].hidden_size, configs["clip_g"].hidden_size, configs["t5"].d_model)
    assert widths == (SD3_TEXT.clip_l_dim, SD3_TEXT.clip_g_dim, SD3_TEXT.t5_dim)
    assert configs["vae"]["latent_channels"] == 16 and configs["t5"].num_layers == 24
    # CLIP pools at the first end-of-text token: the id its tokenizer writes
    tokenizer = CLIPTokenizer.from_pretrained(tiny.repo, subfolder="tokenizer_2")
    assert configs["clip_g"].eos_token_id == tokenizer.eos_token_id != 2  # 2 would select legacy argmax pooling


def test_a_written_random_repo_loads_through_the_preprocessing_encoders(tiny, tmp_path):
    params = write_random_repo(str(tmp_path), repo_configs(tiny.repo), tiny.repo, torch.device("cpu"), torch.float32)
    assert set(params) == {"vae", "clip_l", "clip_g", "t5"} and min(params.values()) > 0
    latent = VAEEncoder(str(tmp_path), device="cpu", dtype="float32").encode([np.zeros((64, 64, 3), np.uint8)])[0]
    text = TextEncoders(str(tmp_path), device="cpu", dtype="float32").encode(["a red circle"])
    assert latent.shape == (16, 8, 8) and text["t5"].shape == (1, TINY_TEXT.t5_tokens, 64)
    # the full-size job's repo cuts captions at SD3's 77 tokens, not at the tiny tokenizers' 32
    write_random_repo(str(tmp_path), repo_configs(tiny.repo), tiny.repo, torch.device("cpu"), torch.float32,
                      tokens=SD3_TEXT.clip_tokens)
    assert text_dims(str(tmp_path)).clip_tokens == SD3_TEXT.clip_tokens == 77
    assert TextEncoders(str(tmp_path), device="cpu", dtype="float32").dims.text_tokens == SD3_TEXT.text_tokens


def test_the_figures_file_holds_each_stage_with_its_time_and_error(tmp_path):
    job = Job(tmp_path / "out" / "gpu_job.json", {"device": "cpu"})
    assert job.stage("works", lambda: {"images_per_s": 2.0}) == {"images_per_s": 2.0}

    def broken() -> dict:
        raise ValueError("no such file")

    assert job.stage("breaks", broken) is None  # recorded, and the job goes on
    stages = json.loads(job.report.read_text())["stages"]
    assert stages["works"]["images_per_s"] == 2.0 and stages["works"]["error"] is None
    assert stages["breaks"]["error"] == "ValueError: no such file" and stages["breaks"]["seconds"] >= 0


FIGURES = {
    "device": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.0, "seconds": 400.0,
    "stages": {
        "encoders": {"seconds": 9.0, "error": None, "batch": 64, "dtype": "float16",
                     "ms_per_sample": {"vae": 1.225, "t5": 8.73}, "paper_ms": PAPER_MS},
        "preprocess": {"seconds": 60.0, "error": None, "images": 512, "images_per_s": 100.0,
                       "steady_images_per_s": None, "plain_images_per_s": 50.0,
                       "plain_shares": {"vae": 0.25, "text": 0.75}},
        "attention": {"seconds": 1.0, "error": None, "resolution": 1024, "tokens": 4250, "head_dim": 64,
                      "dtype": "bfloat16", "used": ["flash"], "math_fallback": False, "flash_only": "ok",
                      "enabled": {"flash": True, "math": False}},
        "network alone": {"seconds": 60.0, "error": None, "batch": 32, "latent": 32, "ms_per_step": 100.0,
                          "samples_per_s": 320.0, "mfu": 0.56},
        "train": {"seconds": 200.0, "error": None, "batch": 32, "zero_stage": 2, "samples_per_s": 240.0,
                  "mfu": 0.42, "first_step_s": 60.0, "median_step_s": 0.13, "data_wait": 0.01, "source": "summary"},
        "encoder repo": {"seconds": 30.0, "error": "OSError: disk full"},
    },
}


def test_the_table_sets_each_figure_beside_its_baseline():
    rows = {row.figure: row for row in job_rows(FIGURES, mfu_target=0.5)}
    assert rows["VAE ms/sample (float16, batch 64)"].ratio == "0.50"
    assert rows["T5 ms/sample (float16, batch 64)"].baseline == "paper 17.46 ms"
    assert rows["preprocess images/s (Ray Data job, 512 images)"].ratio == "2.00"
    assert rows["  plain loop time share"].value == "vae 25%, text 75%"
    assert rows["train samples/s (job, batch 32, ZeRO-2)"].ratio == "0.75"
    assert (rows["train MFU (job)"].value, rows["train MFU (job)"].ratio) == ("42.0%", "0.75")
    assert rows["  MFU target of the job"].baseline == "not met"
    assert rows["encoder repo FAILED"].value == "OSError: disk full"
    lines = format_table(job_rows(FIGURES, mfu_target=0.5)).splitlines()
    assert lines[0].split() == ["figure", "value", "baseline", "ratio"] and len(lines) == len(rows) + 1


def test_the_config_names_a_bad_field():
    with pytest.raises(ValueError, match=re.escape("gpu_job.images=8 must be at least 2 * batch_size=64")):
        BenchGPUJobConf(images=8)
    with pytest.raises(ValueError, match=re.escape("gpu_job.gpu_share must be in")):
        BenchGPUJobConf(gpu_share=0.0)
    with pytest.raises(ValueError, match="unknown model flavor"):
        BenchGPUJobConf(flavor="d99x")
    with pytest.raises(ValueError, match=re.escape("compute.text.num_gpus must be > 0")):
        ComputeConf(text=StageConf(num_gpus=0))


def test_scale_tiny_is_a_cpu_sized_run_and_overrides_win():
    register_gpu_job()
    tiny = runtime.compose("bench_gpu_job", ["scale=tiny", "steps=2"])
    full = runtime.compose("bench_gpu_job", [])
    assert (tiny.flavor, tiny.full_size_encoders, tiny.steps) == ("debug", False, 2)
    assert (full.flavor, full.full_size_encoders, int(full.zero_stage), full.resolution) == ("d24", True, 2, 256)


def test_a_checkout_that_is_not_installed_still_has_a_code_version(monkeypatch):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert runtime.code_version().startswith("0+checkout")


def test_a_slimmed_wheel_keeps_a_record_of_exactly_its_files(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = {"pkg/__init__.py": "", "pkg/jars/big.jar": "x" * 1000, "pkg/vendored/dep-1.dist-info/RECORD": "",
             "pkg-1.0.dist-info/METADATA": "Name: pkg\n"}
    record = "".join(f"{name},,\n" for name in files) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, "pkg-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    slim(str(wheel), ["pkg/jars/"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        listed = {line.split(",")[0] for line in z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()}
    assert "pkg/jars/big.jar" not in names and listed == names
    with pytest.raises(ValueError, match="nothing under"):
        slim(str(wheel), ["pkg/jars/"])


def test_a_failed_preprocessing_names_its_first_rejections_and_the_run_keeps_its_records(tmp_path):
    """Rejected rows fail the preprocess stage with their reasons (the shapes never are: an encoder failed); the
    run's records are copied beside the report before the work folder goes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import schema
    from tools.gpu.gpu_job import first_reasons, keep_run_logs

    (tmp_path / "data" / schema.REJECTS_DIR).mkdir(parents=True)
    table = pa.Table.from_pydict({schema.ID: ["a", "b"], schema.SOURCE: ["a.png", "b.png"],
                                  schema.REJECT_STAGE: ["vae", "text"],
                                  schema.REJECT_REASON: ["CUDA out of memory", "dtype"]}, schema=schema.REJECTS_SCHEMA)
    pq.write_table(table, tmp_path / "data" / schema.REJECTS_DIR / "part.parquet")
    assert first_reasons(tmp_path / "data", n=1) == ["vae: CUDA out of memory"]
    run = tmp_path / "run"
    (run / "checkpoint_step=00000004").mkdir(parents=True)
    for name in ("metrics.jsonl", "events.jsonl", "summary.json"):
        (run / name).write_text("{}\n")
    keep_run_logs(run, tmp_path / "out" / "train-run")
    assert sorted(p.name for p in (tmp_path / "out" / "train-run").iterdir()) == ["events.jsonl", "metrics.jsonl",
                                                                                   "summary.json"]
