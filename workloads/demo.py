"""`make demo`: train the debug MM-DiT on synthetic latents, validate, sample a grid, export to diffusers.

Until the preprocessing and Ray Train jobs land, this is the largest real path that runs end to end.
Run: `python -m workloads.demo [steps=... out_dir=...]`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from conf.demo import DemoConf, register
from model import MMDiT, count_params, train_flops
from model.formulations import get_formulation
from model.interop import export_diffusers, load_diffusers
from model.sampling import SAMPLERS, sample
from workloads.local_train import train, validate
from workloads.report import latents_to_rgb, plot_loss, sample_grid
from workloads.synthetic import SyntheticLatents


def sample_classes(network: MMDiT, data: SyntheticLatents, cfg: DemoConf) -> torch.Tensor:
    """`samples_per_class` latents per caption, with classifier-free guidance: (classes * n, C, S, S)."""
    labels = torch.arange(len(data.captions)).repeat_interleave(cfg.samples_per_class)
    context, pooled = data.conditioning(labels)
    noise = torch.randn(len(labels), data.channels, data.size, data.size,
                        generator=torch.Generator().manual_seed(cfg.seed + 20_000))
    network.eval()
    return sample(network, noise, context, pooled, steps=cfg.sample_steps, guidance=cfg.guidance,
                  shift=cfg.shift, method=cfg.sampler, formulation=cfg.formulation)


def write_summary(out: Path, cfg: DemoConf, history: list[dict], val_before: float, val_after: float,
                  params: int, elapsed: float) -> None:
    """summary.json (figures) and summary.md (the same for people)."""
    flops = train_flops(cfg.model.build(), cfg.latent_size, cfg.latent_size, text_tokens=154)
    throughput = cfg.batch_size / (sum(r["step_s"] for r in history) / len(history))
    figures = {"params": params, "steps": cfg.steps, "samples_per_s": throughput,
               "train_flops_per_sample": flops, "val_loss_init": val_before, "val_loss_final": val_after,
               "train_loss_final": sum(r["loss"] for r in history[-50:]) / len(history[-50:]), "seconds": elapsed}
    (out / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    lines = [
        "# Demo run",
        "",
        f"- model: `{cfg.model.flavor}` MM-DiT, {params:,} parameters; formulation `{cfg.formulation}`",
        f"- data: synthetic latents ({cfg.latent_size}x{cfg.latent_size}x16), captions as fixed encoder outputs",
        f"- {cfg.steps} steps at batch {cfg.batch_size}: {throughput:.1f} samples/s, "
        f"{flops * throughput / 1e9:.2f} GFLOP/s by `model.train_flops`, {elapsed:.0f} s in all",
        f"- validation loss (8 fixed timesteps, fixed noise): {val_before:.4f} at init -> {val_after:.4f}",
        f"- final training loss (mean of the last 50 steps): {figures['train_loss_final']:.4f}",
        f"- samples: {cfg.sample_steps} {cfg.sampler} steps, guidance {cfg.guidance}: `samples.png`",
        "- loss curve: `loss.png`; per-step metrics: `metrics.jsonl`",
        "- diffusers export of the trained weights: `export/transformer` (SD3Transformer2DModel)",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def check(cfg: DemoConf) -> None:
    """Fail on an invalid config before any work or output."""
    cfg.model.build()
    get_formulation(cfg.formulation)
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {cfg.sampler!r}")
    for name in ("steps", "batch_size", "latent_size", "val_every", "val_samples", "samples_per_class",
                 "sample_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def run(cfg: DemoConf) -> Path:
    check(cfg)
    start = time.perf_counter()
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    config = cfg.model.build()
    data = SyntheticLatents(channels=config.in_channels, size=cfg.latent_size, seed=cfg.seed)
    network = MMDiT(config)
    params = count_params(config)
    print(f"[demo] {cfg.model.flavor} MM-DiT, {params:,} parameters; {len(data.captions)} synthetic classes")
    val_before = validate(network, data, cfg).mean().item()
    with (out / "metrics.jsonl").open("w") as metrics:
        def log(record: dict) -> None:
            metrics.write(json.dumps(record) + "\n")
            if record["step"] % 50 == 0 or "val_loss" in record:
                extra = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
                print(f"[demo] step {record['step']:5d}/{cfg.steps}  loss {record['loss']:.4f}{extra}", flush=True)

        history = train(network, data, cfg, log)
    val_after = history[-1]["val_loss"]
    plot_loss(history, out / "loss.png")
    print("[demo] sampling", flush=True)
    latents = sample_classes(network, data, cfg)
    sample_grid(latents_to_rgb(latents), data.captions, out / "samples.png")
    export_diffusers(network, out / "export" / "transformer")
    reloaded = load_diffusers(out / "export" / "transformer")
    if not all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), network.state_dict().values(),
                                                 strict=True)):
        raise RuntimeError("the diffusers export did not reload to the same weights")
    write_summary(out, cfg, history, val_before, val_after, params, time.perf_counter() - start)
    print((out / "summary.md").read_text())
    print(f"[demo] report written to {out}")
    return out


register()


@hydra.main(version_base=None, config_name="demo")
def main(cfg: DemoConf) -> None:
    run(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    main()
