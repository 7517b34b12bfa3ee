"""The demo job, the model benchmark and their Hydra configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from conf.bench import BenchModelConf
from conf.demo import DemoConf
from conf.model import ModelConf
from conf.optim import OptimConf
from model import FLAVORS
from model.interop import load_diffusers
from workloads import bench_model, demo
from workloads.synthetic import SyntheticLatents

ROOT = Path(__file__).resolve().parents[1]


def test_model_conf_builds_flavor_with_overrides():
    assert ModelConf("debug").build() == FLAVORS["debug"]
    assert ModelConf("d15", qk_norm="rms").build().qk_norm == "rms"
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConf("debug", hidden_size=100, num_heads=3).build()


def test_synthetic_latents_are_class_dependent_and_deterministic():
    data = SyntheticLatents()
    _, x = data.batch(8, torch.Generator().manual_seed(0))
    _, again = data.batch(8, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert x.shape == (8, 16, 16, 16)
    context, pooled = data.conditioning(torch.tensor([0, 1]))
    assert context.shape == (2, 154, 64) and pooled.shape == (2, 64)
    assert not torch.equal(context[0], context[1])
    red = data.latents(torch.tensor([0]), torch.Generator().manual_seed(0))  # "a red square"
    assert (red[0, 0] == 1.0).any() and not (red[0, 1] == 1.0).any()


def test_demo_trains_samples_and_exports(tmp_path):
    cfg = DemoConf(out_dir=str(tmp_path), steps=40, batch_size=16, val_every=20, val_samples=9,
                   samples_per_class=1, sample_steps=4, optim=OptimConf(lr=2e-3, warmup_steps=5))
    out = demo.run(cfg)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 41))
    assert all(r["loss"] > 0 and r["grad_norm"] >= 0 for r in history)
    figures = json.loads((out / "summary.json").read_text())
    assert figures["val_loss_final"] < figures["val_loss_init"]  # 40 steps already learn the mean colours
    assert f"{figures['val_loss_final']:.4f}" in (out / "summary.md").read_text()
    for name in ("loss.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    theirs = SD3Transformer2DModel.from_pretrained(out / "export" / "transformer")
    assert theirs.config.num_layers == FLAVORS["debug"].depth
    assert load_diffusers(out / "export" / "transformer").config == FLAVORS["debug"]


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
    [("model.flavor=d99", "unknown model flavor 'd99'"), ("steps=many", "steps"),
     ("model.qk_norm=layer", "qk_norm"), ("formulation=rf/foo", "rf/foo"), ("sampler=ddim", "sampler")],
)
def test_bad_cli_overrides_fail_before_work(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "-m", "workloads.demo", override, f"out_dir={tmp_path}/out", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_bench_train_reports_overhead_and_zero_bytes(ray_local, capsys):
    from conf.bench import BenchTrainConf
    from workloads import bench_train

    figures = bench_train.run(BenchTrainConf(rows=64, latent_size=8, batch_size=8, warmup=1, steps=2,
                                             memory_stages=[1, 3]))
    assert figures["stream_s"] > 0 and figures["memory_s"] > 0
    for stage in (1, 3):
        assert figures[f"zero{stage}_bytes"] == pytest.approx(figures[f"zero{stage}_expected"], rel=0.01)
    assert "overhead" in capsys.readouterr().out
