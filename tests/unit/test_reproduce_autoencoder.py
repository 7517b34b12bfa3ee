"""The autoencoder finding of `make reproduce` (Table 3, Fig. 10) on hand-made tables (no Ray): each claim's test
says reproduced, not reproduced or inconclusive for the reason it states; the reconstruction metrics on the shipped
autoencoders; the depth series per latent width share the depth study's runs where they can."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conf.reproduce import PRESETS, Finding, ReproduceConf
from workloads.reproduce import autoencoder, findings
from workloads.reproduce.autoencoder import generation_verdicts, reconstruction_verdict

R, N, U = findings.REPRODUCED, findings.NOT_REPRODUCED, findings.INCONCLUSIVE  # U: undecided


def reconstructed(psnr: list[float], ssim: list[float], size: int = 64) -> pd.DataFrame:
    return pd.DataFrame({"channels": [4, 8, 16], "size": size, "psnr": psnr, "ssim": ssim,
                         "round_trip_geneval": 0.5})


@pytest.mark.parametrize(("psnr", "ssim", "status", "reason"), [
    ([25.1, 26.4, 28.6], [0.75, 0.79, 0.86], R, "rise with every step"),  # Table 3's own figures
    ([31.4, 27.5, 30.6], [0.95, 0.93, 0.96], N, "PSNR no higher at 16 channels than at 4"),  # as first measured
    ([25.1, 26.4, 28.6], [0.80, 0.79, 0.80], N, "SSIM no higher"),  # a tie at the ends is no improvement
    ([30.5, 27.8, 31.8], [0.90, 0.92, 0.95], U, "but not at every step up (PSNR)"),  # ends agree, 8 dips
    ([25.1, 26.4, 28.6], [0.75, 0.74, 0.86], U, "not at every step up (SSIM)"),
])
def test_reconstruction_verdict_asks_for_a_rise_at_every_step(psnr, ssim, status, reason):
    verdict = reconstruction_verdict(reconstructed(psnr, ssim), 64)
    assert verdict.status == status and reason in verdict.reason, verdict
    assert verdict.paper == "PSNR 25.12 / 26.40 / 28.62, SSIM 0.75 / 0.79 / 0.86 (4 / 8 / 16 channels)"
    assert verdict.claim.endswith("(64 px)") and verdict.ours.startswith(f"PSNR {psnr[0]:.1f} / ")


def test_reconstruction_verdict_reads_its_own_size_and_sorts_by_channels():
    table = pd.concat([reconstructed([31.4, 27.5, 30.6], [0.95, 0.93, 0.96], 64),
                       reconstructed([25.1, 26.4, 28.6], [0.75, 0.79, 0.86], 128)]).iloc[::-1]
    assert reconstruction_verdict(table, 64).status == N and reconstruction_verdict(table, 128).status == R
    two = reconstructed([25.1, 26.4, 28.6], [0.75, 0.79, 0.86]).iloc[[0, 2]]  # 4 and 16 only
    assert reconstruction_verdict(two, 64).paper == "PSNR 25.12 / 28.62, SSIM 0.75 / 0.86 (4 / 16 channels)"


def series_table(scores: dict[tuple[int, int], float]) -> pd.DataFrame:
    """A generation table from {(channels, depth): GenEval-shapes}."""
    series = {c: pd.DataFrame({"depth": [d for (cc, d) in scores if cc == c], "val_loss": 0.5,
                               "geneval": [v for (cc, _), v in scores.items() if cc == c]})
              for c in sorted({c for c, _ in scores})}
    return autoencoder.generation_table(series)


IMAGES = 480  # a margin of about 0.06 on one difference, 0.09 on a difference of differences


@pytest.mark.parametrize(("scores", "first", "second"), [
    ({(4, 1): 0.40, (16, 1): 0.10, (4, 3): 0.40, (16, 3): 0.40}, R, R),  # the paper's: 16 trails, then catches up
    ({(4, 1): 0.10, (16, 1): 0.40, (4, 3): 0.40, (16, 3): 0.10}, N, N),  # the other way round at both ends
    ({(4, 1): 0.30, (16, 1): 0.31, (4, 3): 0.30, (16, 3): 0.29}, U, U),  # within the sampling error
    ({(4, 1): 0.40, (16, 1): 0.10, (4, 3): 0.40, (16, 3): 0.10}, R, U),  # 16 trails at every depth by as much
])
def test_generation_verdicts_on_the_gap_between_channel_counts(scores, first, second):
    table = series_table(scores | {(8, 1): 0.2, (8, 3): 0.2})
    shallow, catches_up = generation_verdicts(table, 4, 16, IMAGES)
    assert (shallow.status, catches_up.status) == (first, second), (shallow, catches_up)
    assert shallow.ours == f"GenEval-shapes at depth 1: 4 channels {scores[(4, 1)]:.3f}, 16 channels " \
                          f"{scores[(16, 1)]:.3f}"
    assert f"{scores[(16, 3)] - scores[(4, 3)]:+.3f} at depth 3" in catches_up.ours


def test_generation_verdicts_read_the_shallowest_and_deepest_depths():
    scores = {(4, 1): 0.40, (16, 1): 0.10, (4, 2): 0.0, (16, 2): 0.9, (4, 3): 0.40, (16, 3): 0.40}
    shallow, catches_up = generation_verdicts(series_table(scores), 4, 16, IMAGES)
    assert (shallow.status, catches_up.status) == (R, R) and "depth 2" not in catches_up.ours


def test_generation_verdicts_without_scores_are_inconclusive_and_say_why():
    untrained = generation_verdicts(pd.DataFrame(), 4, 16, IMAGES)
    assert [v.status for v in untrained] == [U, U] and "channel_depths is empty" in untrained[0].reason
    unscored = series_table({(4, 1): 0.4, (16, 1): float("nan"), (4, 3): 0.4, (16, 3): 0.4})
    verdicts = generation_verdicts(unscored, 4, 16, IMAGES)
    assert [v.status for v in verdicts] == [U, U] and "16 channels at depth 1" in verdicts[1].reason


def test_difference_verdict_each_way():
    se = 0.02  # a margin of 2 * hypot(se, se) = 0.057
    assert findings.difference_verdict(0.3, 0.4, se, se, "x")[0] == R
    assert findings.difference_verdict(0.4, 0.3, se, se, "x")[0] == N
    status, reason = findings.difference_verdict(0.3, 0.33, se, se, "100 images each")
    assert status == U and reason == "+0.030, within twice the sampling error (0.057, 100 images each)"


def test_the_section_sets_both_parts_beside_the_papers_figures():
    cfg = ReproduceConf(geneval_prompts_per_task=20, geneval_images_per_prompt=4)
    table = pd.concat([reconstructed([31.4, 27.5, 30.6], [0.95, 0.93, 0.96], 64),
                       reconstructed([30.5, 27.8, 31.8], [0.95, 0.93, 0.96], 128)])
    series = {c: pd.DataFrame({"depth": [1, 2, 3], "val_loss": 0.5, "geneval": 0.3}) for c in (4, 8, 16)}
    section = autoencoder.section(cfg, table, series)
    assert section.finding == Finding.autoencoder and len(section.verdicts) == 4
    assert [v.status for v in section.verdicts] == [N, U, U, U]
    assert "| paper psnr | paper ssim |" in section.body and "25.12" in section.body and "no FID" in section.body
    assert "| depth | geneval c4 | val_loss c4 | geneval c8 |" in section.body
    assert section.plots["autoencoder-channels.png"][:4] == b"\x89PNG"
    alone = autoencoder.section(ReproduceConf(channel_depths=[]), table, {})
    assert not alone.plots and "not trained" in alone.body and len(alone.verdicts) == 4


def test_ssim_is_torchmetrics_and_the_psnr_matches_its_class():
    import torch
    from torchmetrics.image import PeakSignalNoiseRatio

    from pipelines.synthetic.shapes_vae import psnr

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (70, 24, 24, 3), dtype=np.uint8)  # more than one SSIM batch
    noisy = np.clip(images.astype(int) + rng.integers(-20, 21, images.shape), 0, 255).astype(np.uint8)
    assert autoencoder.ssim(images, images) == pytest.approx(1.0)
    assert 0 < autoencoder.ssim(images, noisy) < 0.99
    as_float = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    reference = PeakSignalNoiseRatio(data_range=255.0)(as_float(noisy), as_float(images))
    assert psnr(images, noisy) == pytest.approx(float(reference), rel=1e-5)


def test_reconstruction_of_the_shipped_autoencoders_with_fid(tmp_path):
    from pipelines.synthetic.tiny_models import build_tiny_inception

    inception = build_tiny_inception(str(tmp_path / "inception.pt"))
    cfg = ReproduceConf(channels=[4, 16], resolution=32, high_resolution=64, image_size=64, reconstruction_images=6,
                        fid_weights=inception)
    table = autoencoder.reconstruction(cfg)
    assert table[["channels", "size"]].values.tolist() == [[4, 32], [4, 64], [16, 32], [16, 64]]
    assert (table["psnr"] > 20).all() and table["ssim"].between(0.5, 1).all()
    assert table["round_trip_geneval"].between(0, 1).all() and (table["fid"] >= 0).all()


@pytest.mark.parametrize(("overrides", "match"), [
    ({"channels": [16]}, "at least 2 distinct latent widths"),
    ({"channels": [4, 32]}, "shipped shapes autoencoders"),
    ({"channel_depths": [2, 2]}, "channel_depths needs at least 2 distinct"),
    ({"channel_depths": [0, 1]}, "channel_depths"),
])
def test_bad_channel_settings_fail_on_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        ReproduceConf(**overrides)
    ReproduceConf(**overrides, findings=[Finding.depth])  # only checked when the finding is chosen


def test_each_preset_has_a_depth_series_per_channel_count():
    assert ReproduceConf(channel_depths=[]).channel_depths == []  # the reconstruction only
    for preset in PRESETS.values():
        cfg = ReproduceConf(**{k: v for k, v in preset.items() if k != "train"})
        assert len(set(cfg.channel_depths)) >= 2 and set(cfg.channel_depths) <= set(cfg.depths), preset


def test_the_channel_series_train_on_their_own_latents_and_16_shares_the_depth_runs(tmp_path):
    from workloads.reproduce import driver
    from workloads.sweep import driver as sweep_job
    from workloads.sweep import studies

    cfg = ReproduceConf(out_dir=str(tmp_path), depths=[1, 2, 3], channel_depths=[1, 3])
    at = driver.Layout.of(cfg)
    sweeps = driver.sweeps(cfg, at)
    runs = {name: {p["depth"]: sweep_job.trial_train_conf(s, p) for p in studies.trial_params(s)}
            for name, s in sweeps.items()}
    assert driver.channel_variants(cfg) == [4, 8]
    for channels in (4, 8):
        c = runs[f"channels-c{channels}"][1]
        assert c.data == f"{at.data}-c{channels}" and c.model.build().in_channels == channels
        assert driver.preprocess_conf(cfg, at, cfg.resolution, channels).models.latent_channels == channels
    assert {d: c.run.name for d, c in runs["channels-c16"].items()} == {d: runs["depth"][d].run.name for d in (1, 3)}
    assert driver.preprocess_conf(cfg, at, cfg.resolution).output == at.data
    alone = ReproduceConf(out_dir=str(tmp_path), channel_depths=[])
    assert driver.channel_variants(alone) == [] and not any(n.startswith("channels") for n in driver.sweeps(alone, at))
