"""Figures for run reports: loss curves and sample grids (matplotlib, no display needed). Matplotlib is imported
when a figure is drawn: every training worker imports this module, and only rank 0 draws (0.7 s per process)."""

from __future__ import annotations

from pathlib import Path

import torch


def pyplot():
    """matplotlib.pyplot on the Agg back end (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the back end

    return plt


def plot_loss(history: list[dict], path: Path) -> None:
    """Training loss (raw and smoothed) and validation loss against step."""
    steps = [r["step"] for r in history]
    losses = torch.tensor([r["loss"] for r in history])
    window = max(1, len(losses) // 30)
    smooth = torch.nn.functional.avg_pool1d(losses[None, None], window, stride=1).flatten()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.3, label="train loss")
    ax.plot(steps[window - 1:], smooth, label=f"train loss ({window}-step mean)")
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss (fixed t grid, fixed noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_score_curve(rows: list[dict], path: Path) -> None:
    """GenEval-shapes and its count, colour and shape credits against training FLOPs, each beside its chance level
    (the same images scored against shuffled prompts, dashed): rows of a reference card's `curve`."""
    flops = [r["train_flops"] for r in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("geneval", "GenEval-shapes"), ("count", "count credit"), ("colors", "colour credit"),
                       ("shapes", "shape credit")):
        measured = "geneval" if key == "geneval" else f"credit_{key}"
        line, = ax.plot(flops, [r.get(measured) for r in rows], "o-", markersize=3, label=label)
        ax.plot(flops, [r.get(f"chance_{key}") for r in rows], "--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("share of images (dashed: chance under shuffled prompts)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Channels 0-2 of synthetic latents, from [-1, 1] to [0, 1] images: (B, S, S, 3)."""
    return ((latents[:, :3].clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def sample_grid(images: torch.Tensor, row_labels: list[str], path: Path) -> None:
    """(rows * cols, S, S, 3) images in [0, 1], one labelled row per prompt."""
    rows = len(row_labels)
    cols = images.shape[0] // rows
    label_in, width = 2.6, 1.3 * cols + 2.8  # inches: room for the captions on the left, then the images
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(width, 1.3 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r * cols + c].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    # tight_layout ignores horizontal row labels and cuts them off in narrow grids
    fig.subplots_adjust(left=label_in / width, right=0.98, top=0.97, bottom=0.03, wspace=0.05, hspace=0.08)
    fig.savefig(path, dpi=120)
    plt.close(fig)
