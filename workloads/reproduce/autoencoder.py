"""The autoencoder finding (the paper's section 5.2.1): how the shipped shapes autoencoders reconstruct against their
latent channels (Table 3), and how generation quality against depth differs between channel counts (Fig. 10), each
claim with a verdict decided by a stated test."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from conf.reproduce import Finding, ReproduceConf
from pipelines.geneval.stats import geneval_se
from workloads.plots import pyplot
from workloads.reproduce import paper
from workloads.reproduce.findings import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Section,
    Verdict,
    difference_verdict,
    images_per_trial,
)
from workloads.sweep import studies

# Table 3's pixel metrics the reconstruction verdict reads, both higher-is-better; FID, when measured, is shown only
RECONSTRUCTION_METRICS = {"psnr": "PSNR", "ssim": "SSIM"}
SSIM_BATCH = 64  # images per torchmetrics update: SSIM's windows hold several copies of each batch


def reconstruction(cfg: ReproduceConf) -> pd.DataFrame:
    """One row per (channels, size): PSNR, SSIM, the round trip's GenEval-shapes and, with `fid_weights`, FID of the
    same `reconstruction_images` held-out shapes images encoded and decoded by each shipped autoencoder."""
    from pipelines.storage import Location
    from pipelines.synthetic import shapes_vae
    from workloads.evaluate.image_metrics import fid

    rows = []
    for channels in sorted(set(cfg.channels)):
        vae = shapes_vae.load(shapes_vae.shipped(channels))
        for size in (cfg.resolution, cfg.high_resolution):
            images = shapes_vae.held_out(vae, cfg.reconstruction_images, size)
            row = {"channels": channels, "size": size, "psnr": shapes_vae.psnr(images.original, images.decoded),
                   "ssim": ssim(images.original, images.decoded),
                   "round_trip_geneval": shapes_vae.round_trip_geneval(images)["overall"]}
            if cfg.fid_weights:
                row["fid"] = fid(images.decoded, images.original, Location.of(cfg.fid_weights, cfg.endpoint_url))
            rows.append(row)
    return pd.DataFrame(rows)


def ssim(original: np.ndarray, decoded: np.ndarray) -> float:
    """torchmetrics' SSIM (Gaussian window 11, sigma 1.5) of two uint8 (N, H, W, 3) image sets, the mean over images."""
    import torch
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    metric = StructuralSimilarityIndexMeasure(data_range=255.0)
    for start in range(0, len(original), SSIM_BATCH):
        chunk = slice(start, start + SSIM_BATCH)
        metric.update(*(torch.from_numpy(a[chunk]).permute(0, 3, 1, 2).float() for a in (decoded, original)))
    return float(metric.compute())


def _figures(values: pd.Series, digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def _names(metrics: list[str]) -> str:
    return " and ".join(RECONSTRUCTION_METRICS[m] for m in metrics)


def reconstruction_verdict(table: pd.DataFrame, size: int) -> Verdict:
    """Table 3's claim at one image size, tested as: PSNR and SSIM both rise with every step up in channels
    (reproduced); either is no higher at the most channels than at the fewest (not reproduced); else inconclusive."""
    t = table[table["size"] == size].sort_values("channels")
    channels = t["channels"].tolist()
    dips = [m for m in RECONSTRUCTION_METRICS if not (t[m].diff().dropna() > 0).all()]
    behind = [m for m in RECONSTRUCTION_METRICS if t[m].iloc[-1] <= t[m].iloc[0]]
    if not dips:
        status, reason = REPRODUCED, "PSNR and SSIM rise with every step up in channels"
    elif behind:
        status, reason = NOT_REPRODUCED, (f"{_names(behind)} no higher at {channels[-1]} channels than at "
                                          f"{channels[0]}")
    else:
        status, reason = INCONCLUSIVE, (f"{channels[-1]} channels reconstruct better than {channels[0]}, but not at "
                                        f"every step up ({_names(dips)})")
    known = [c for c in channels if c in paper.AUTOENCODER_RECONSTRUCTION]
    figures = {m: " / ".join(f"{paper.AUTOENCODER_RECONSTRUCTION[c][m]:.2f}" for c in known) for m in ("psnr", "ssim")}
    per = " / ".join(map(str, channels))
    return Verdict(f"reconstruction improves with latent channels ({size} px)",
                   f"PSNR {figures['psnr']}, SSIM {figures['ssim']} ({' / '.join(map(str, known))} channels)",
                   f"PSNR {_figures(t['psnr'], 1)} dB, SSIM {_figures(t['ssim'], 4)} ({per} channels)", status, reason)


def generation_table(series: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Depth x channel count: GenEval-shapes and the final validation loss of each channel count's depth series."""
    columns = {}
    for channels, results in sorted(series.items()):
        by_depth = results.set_index("depth")
        columns[f"geneval c{channels}"] = by_depth["geneval"]
        columns[f"val_loss c{channels}"] = by_depth["val_loss"]
    table = pd.DataFrame(columns).sort_index()
    return table.rename_axis("depth").reset_index()


def generation_verdicts(table: pd.DataFrame, few: int, many: int, images: int) -> list[Verdict]:
    """Fig. 10's claims on GenEval-shapes (`images` images a score), `few` against `many` channels, each tested as a
    difference beyond twice its sampling error: at the shallowest depth `few` channels score higher; and `many`
    channels gain on `few` from the shallowest to the deepest depth (the gain many - few grows)."""
    claims = (f"with little capacity, {few} latent channels generate better than {many} (Fig. 10)",
              f"{many} channels gain on {few} as depth grows (Fig. 10)")
    if table.empty:
        return [Verdict(c, paper.CHANNELS_VS_DEPTH, "n/a", INCONCLUSIVE, "not trained (channel_depths is empty)")
                for c in claims]
    by_depth = table.set_index("depth")
    shallow, deep = int(by_depth.index.min()), int(by_depth.index.max())
    score = {(c, d): float(by_depth.loc[d, f"geneval c{c}"]) for c in (few, many) for d in (shallow, deep)}
    missing = [f"{c} channels at depth {d}" for (c, d), v in score.items() if math.isnan(v)]
    if missing:
        return [Verdict(c, paper.CHANNELS_VS_DEPTH, "n/a", INCONCLUSIVE, f"no GenEval-shapes for {', '.join(missing)}")
                for c in claims]
    se = {k: geneval_se(v, images) for k, v in score.items()}
    sampled = f"{images} images a score"
    a, b = score[(many, shallow)], score[(few, shallow)]
    first = Verdict(claims[0], paper.CHANNELS_VS_DEPTH, f"GenEval-shapes at depth {shallow}: {few} channels {b:.3f}, "
                    f"{many} channels {a:.3f}", *difference_verdict(a, b, se[(many, shallow)], se[(few, shallow)],
                                                                   sampled))
    gain = {d: score[(many, d)] - score[(few, d)] for d in (shallow, deep)}
    gain_se = {d: math.hypot(se[(many, d)], se[(few, d)]) for d in (shallow, deep)}
    second = Verdict(claims[1], paper.CHANNELS_VS_DEPTH, f"GenEval-shapes {many} - {few} channels: "
                     f"{gain[shallow]:+.3f} at depth {shallow}, {gain[deep]:+.3f} at depth {deep}",
                     *difference_verdict(gain[shallow], gain[deep], gain_se[shallow], gain_se[deep],
                                         f"four scores of {images} images"))
    return [first, second]


def _plot(table: pd.DataFrame, channels: list[int]) -> bytes:
    """Fig. 10's shape: GenEval-shapes (and the validation loss, in each one's latent space) against depth per
    channel count."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for c in channels:
        axes[0].plot(table["depth"], table[f"geneval c{c}"], "o-", label=f"{c} channels")
        axes[1].plot(table["depth"], table[f"val_loss c{c}"], "o-", label=f"{c} channels")
    for ax, label in zip(axes, ("GenEval-shapes overall", "final EMA validation loss (own latent space)"), strict=True):
        ax.set_xlabel("depth")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    pyplot().close(fig)
    return buffer.getvalue()


def section(cfg: ReproduceConf, reconstructed: pd.DataFrame, series: dict[int, pd.DataFrame]) -> Section:
    """Table 3's and Fig. 10's analogues beside the paper's figures, with their verdicts."""
    shown = reconstructed.copy()
    for metric in ("psnr", "ssim"):
        shown[f"paper {metric}"] = [paper.AUTOENCODER_RECONSTRUCTION.get(c, {}).get(metric, np.nan)
                                    for c in shown["channels"]]
    verdicts = [reconstruction_verdict(reconstructed, size) for size in sorted(reconstructed["size"].unique())]
    channels = sorted(series)
    generated = generation_table(series) if series else pd.DataFrame()
    images = images_per_trial(cfg)
    verdicts += generation_verdicts(generated, min(cfg.channels), max(cfg.channels), images)
    fid = "FID with the Inception of `fid_weights`" if cfg.fid_weights else "no FID (set `fid_weights`)"
    lines = ["### Reconstruction (Table 3)", "", studies.markdown_table(shown), "",
             f"- {cfg.reconstruction_images} held-out shapes images a size, the same for every autoencoder, encoded "
             f"(the posterior's mode) and decoded; PSNR over all pixels, torchmetrics' SSIM, GenEval-shapes of the "
             f"decoded images against their own prompts, {fid}. The paper's are its autoencoders on natural images.",
             "", "### Generation against depth (Fig. 10)", ""]
    plots = {}
    if series:
        lines += [studies.markdown_table(generated), "",
                  f"- each channel count's depth series trains on its own autoencoder's latents with the studies' "
                  f"settings; GenEval-shapes ({images} images a score, decoded by the same autoencoder) stands in "
                  "for the paper's sample FID; validation losses are in different latent spaces and are not compared"]
        plots["autoencoder-channels.png"] = _plot(generated, channels)
    else:
        lines.append("- not trained: `channel_depths` is empty")
    return Section(Finding.autoencoder, "Latent channels of the autoencoder (Table 3, Fig. 10)", "\n".join(lines),
                   verdicts, plots)
