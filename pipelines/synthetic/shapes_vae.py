"""`python -m pipelines.synthetic.shapes_vae out=<folder>`: train the shapes autoencoder that `models=tiny` ships.

A diffusers `AutoencoderKL` with the SD3 VAE's interface (16 latent channels, 8x downsampling, no quant convs) and
small widths, trained on freshly generated shapes images (L1 + MSE on pixels, a small KL term, as the SD VAEs were
trained without their GAN and LPIPS terms), then given `shift_factor` and `scaling_factor` from its own latent
statistics (mean and 1/std of the latents of held-out images), as SD3's VAE was. Held-out PSNR and the GenEval-shapes
score of round-trip images (encode, decode, detect) are written to `<out>/training.json`.

The repository ships the weights this command wrote with its defaults (`SHIPPED`) and with other `latent_channels`
(`shipped(n)`, `conf.shapes.AUTOENCODER_CHANNELS`); a test checks it still trains.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from conf.shapes import AUTOENCODER_CHANNELS
from pipelines.synthetic.shapes import generate, make_sample

SHIPPED = Path(__file__).with_name("weights") / "shapes-vae"


def shipped(latent_channels: int = 16) -> Path:
    """The folder of the shipped autoencoder with `latent_channels` (16: `SHIPPED`, else `shapes-vae-c<n>`)."""
    if latent_channels not in AUTOENCODER_CHANNELS:
        raise ValueError(f"shapes autoencoders ship with {list(AUTOENCODER_CHANNELS)} latent channels, got "
                         f"{latent_channels}")
    return SHIPPED if latent_channels == 16 else SHIPPED.with_name(f"shapes-vae-c{latent_channels}")
_TRAIN_SEED, _HELD_OUT_SEED = 1_000, 2_000  # image seeds: training draws, and the held-out images


@dataclass
class ShapesVAEConf:
    out: str = MISSING
    steps: int = 2400
    batch_size: int = 16
    size: int = 64  # training image side; the network is convolutional and runs at any multiple of 8
    lr: float = 1e-3
    kl_weight: float = 1e-6
    seed: int = 0
    eval_images: int = 256
    threads: int = 2
    init_from: str | None = None  # continue from a saved autoencoder (its folder) instead of fresh weights
    latent_channels: int = 16  # SD3's 16; the paper's Table 3 compares 4, 8 and 16


def build(seed: int = 0, latent_channels: int = 16) -> AutoencoderKL:
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def to_tensor(images) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] from PIL images."""
    array = np.stack([np.asarray(i, dtype=np.float32) for i in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8 from (N, 3, H, W) in [-1, 1]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255.0**2 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images) -> np.ndarray:
    x = to_tensor(images)
    return to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, n: int, size: int) -> tuple[float, float]:
    """(mean, std) of the latents of `n` held-out images: the shift and 1/scale of SD3's normalisation."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.cat([vae.encode(to_tensor([s.image for s in chunk])).latent_dist.sample(generator)
                         for chunk in _chunks(list(generate(n, _HELD_OUT_SEED + 1, size)), 32)])
    return float(latents.mean()), float(latents.std())


def _chunks(items: list, k: int) -> list[list]:
    return [items[i:i + k] for i in range(0, len(items), k)]


@dataclass
class HeldOut:
    """Held-out shapes images and their round trip through an autoencoder, as uint8 (N, H, W, 3)."""

    samples: list  # the shapes samples (`pipelines.synthetic.shapes.Sample`), their GenEval metadata with them
    original: np.ndarray
    decoded: np.ndarray


def held_out(vae: AutoencoderKL, n: int, size: int) -> HeldOut:
    """The `n` held-out images at `size` (the same for every autoencoder) and their round trip through `vae`."""
    samples = list(generate(n, _HELD_OUT_SEED, size))
    decoded = np.concatenate([round_trip(vae, [s.image for s in chunk]) for chunk in _chunks(samples, 32)])
    return HeldOut(samples, np.stack([np.asarray(s.image) for s in samples]), decoded)


def round_trip_geneval(images: HeldOut) -> dict:
    """The GenEval-shapes summary of the round-trip images, each scored against its own sample's prompt."""
    from pipelines.geneval.detect import ShapesDetector
    from pipelines.geneval.scoring import score_image, summarize

    detector = ShapesDetector()
    return summarize([{"tag": s.metadata["tag"], "prompt_index": i, "correct": score_image(s.metadata, detector(d))[0]}
                      for i, (s, d) in enumerate(zip(images.samples, images.decoded, strict=True))])


def evaluate(vae: AutoencoderKL, n: int, size: int) -> dict:
    """Held-out PSNR and the GenEval-shapes score of the round-trip images at `size`."""
    images = held_out(vae, n, size)
    return {"size": size, "psnr": psnr(images.original, images.decoded), "geneval": round_trip_geneval(images)}


def train(cfg: ShapesVAEConf) -> dict:
    """Train, normalise and save the autoencoder to `cfg.out`; returns the figures it writes to training.json."""
    torch.set_num_threads(cfg.threads)
    vae = (load(cfg.init_from) if cfg.init_from else build(cfg.seed, cfg.latent_channels)).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    start, losses = time.monotonic(), []
    for step in range(cfg.steps):
        x = to_tensor([make_sample(_TRAIN_SEED + cfg.seed, step * cfg.batch_size + i, cfg.size).image
                       for i in range(cfg.batch_size)])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        loss = (y - x).abs().mean() + ((y - x) ** 2).mean() + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            print(f"[shapes_vae] step {step + 1}/{cfg.steps} loss {np.mean(losses[-100:]):.4f} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
    vae.eval()
    mean, std = latent_stats(vae, cfg.eval_images, cfg.size)
    vae.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1.0 / std, 4))
    out = Path(cfg.out)
    vae.save_pretrained(out)
    earlier = Path(cfg.init_from, "training.json") if cfg.init_from else None
    figures = {"config": asdict(cfg) | {"out": None},
               "earlier": json.loads(earlier.read_text()) if earlier and earlier.is_file() else None,
               "train_seconds": round(time.monotonic() - start, 1),
               "first_loss": float(np.mean(losses[:10])),
               "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),  # the last tenth of the steps
               "shift_factor": vae.config.shift_factor,
               "scaling_factor": vae.config.scaling_factor,
               "held_out": [evaluate(vae, cfg.eval_images, s) for s in (cfg.size, 2 * cfg.size)]}
    (out / "training.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def load(path: str | Path = SHIPPED) -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(str(path)).eval()


ConfigStore.instance().store(name="shapes_vae", node=ShapesVAEConf)


def main() -> None:
    from pipelines.runtime import cli

    cli("shapes_vae", lambda cfg: print(json.dumps(train(cfg)["held_out"], indent=1)), doc=__doc__)


if __name__ == "__main__":
    main()
