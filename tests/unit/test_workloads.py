"""The demo's config checks, the model and training benchmarks and their Hydra configs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conf.bench import BenchModelConf
from conf.demo import DemoConf
from conf.model import ModelConf
from conf.train import TrainConf, TrainerConf
from model import FLAVORS
from workloads.bench import model as bench_model
from workloads.demo import driver as demo

ROOT = Path(__file__).resolve().parents[2]


def test_model_conf_builds_flavor_with_overrides():
    assert ModelConf("debug").build() == FLAVORS["debug"]
    assert ModelConf("d15", qk_norm="rms").build().qk_norm == "rms"
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConf("debug", hidden_size=100, num_heads=3).build()


def test_bench_model_reports_ratio(capsys):
    cfg = BenchModelConf(models=[ModelConf("debug")], batch_size=1, latent_size=8, text_tokens=8,
                         steps=2, warmup=1, device="cpu")
    (result,) = bench_model.run(cfg)
    assert result.ours_s > 0 and result.theirs_s > 0 and result.peak is None
    assert "ratio ours/diffusers" in capsys.readouterr().out


def test_bench_pair_shares_weights():
    config = FLAVORS["debug"]
    ours, theirs = bench_model.build_pair(config, torch.device("cpu"), torch.float32)
    x, t = torch.randn(1, 16, 8, 8), torch.rand(1)
    ctx, pooled = torch.randn(1, 5, 64), torch.randn(1, 64)
    with torch.no_grad():
        a = ours(x, t, ctx, pooled)
        b = theirs(hidden_states=x, timestep=t * 1000, encoder_hidden_states=ctx, pooled_projections=pooled).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a.abs().max() > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [("images=many", "images"), ("depths=[2]", "depths")],
)
def test_bad_cli_overrides_fail_before_work(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "-m", "workloads.demo", override, f"out_dir={tmp_path}/out"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(lambda: {"train": TrainConf(model=ModelConf("d99"))}, "unknown model flavor 'd99'"),
     (lambda: {"train": TrainConf(trainer=TrainerConf(num_workers=3, batch_size=16))}, "divisible"),
     (lambda: {"images": 0}, "images"), (lambda: {"main_depth": 4}, "main_depth"),
     (lambda: {"train": TrainConf(trainer=TrainerConf(max_steps=0))}, "max_steps")],
)
def test_demo_config_checks(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        demo.check(DemoConf(out_dir=str(tmp_path / "out"), **overrides()))
    assert not (tmp_path / "out").exists()


def test_a_local_cluster_runs_without_the_preemption_watcher_unless_the_user_asks(monkeypatch):
    from ray.train.v2._internal.constants import ENABLE_PREEMPTION_WATCHER_ENV_VAR, ENV_VARS_TO_PROPAGATE

    from workloads.runtime import local_train_environment

    monkeypatch.setenv(ENABLE_PREEMPTION_WATCHER_ENV_VAR, "unset")  # so the teardown restores the original
    monkeypatch.delenv(ENABLE_PREEMPTION_WATCHER_ENV_VAR)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    local_train_environment()
    # Ray Train hands the variable from the driver to its controller, which starts the watcher
    assert ENABLE_PREEMPTION_WATCHER_ENV_VAR in ENV_VARS_TO_PROPAGATE
    assert os.environ[ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"  # a variable already set wins
    monkeypatch.setenv(ENABLE_PREEMPTION_WATCHER_ENV_VAR, "1")
    local_train_environment()
    assert os.environ[ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "1"
