"""The paper's figures the reproduction sets its results beside (`../shared/PAPER.md`); Table 1's global ranks live
with the formulations (`model.formulations.PAPER_GLOBAL_RANK`)."""

from __future__ import annotations

# Table 4: GenEval overall (%) at depth 15 after 250k steps, original captions against the 50/50 synthetic mix.
CAPTIONS_GENEVAL = {"original": 43.27, "mix": 49.78}
# Table 5: GenEval overall of the depth-38 model at 512^2 before and after DPO.
DPO_GENEVAL = {"before": 0.68, "after": 0.71}
# Table 6: CLIP-score loss (%) relative to 50 sampling steps, by depth and steps.
STEPS_CLIP_LOSS = {15: {5: 4.30, 10: 0.86, 20: 0.21},
                   30: {5: 3.59, 10: 0.70, 20: 0.24},
                   38: {5: 2.71, 10: 0.14, 20: 0.08}}
SHIFT_AT_1024 = 3.0  # the shift the paper chose at 1024^2 by human preference


def shift_rule(m_pixels: int, n_pixels: int) -> float:
    """The resolution-dependent shift alpha = sqrt(m / n) for pixel (or token) counts m (target) and n (base)."""
    return (m_pixels / n_pixels) ** 0.5


# Table 3: reconstruction of autoencoders with 8x downsampling, by latent channels (FID and the perceptual similarity
# lower is better, SSIM and PSNR higher).
AUTOENCODER_RECONSTRUCTION = {4: {"fid": 2.41, "perceptual": 0.85, "ssim": 0.75, "psnr": 25.12},
                              8: {"fid": 1.56, "perceptual": 0.68, "ssim": 0.79, "psnr": 26.40},
                              16: {"fid": 1.06, "perceptual": 0.45, "ssim": 0.86, "psnr": 28.62}}
# Fig. 10: sample FID against depth per channel count; the 16-channel latent needs more capacity, and at depth 22 the
# gap between 8 and 16 channels is negligible.
CHANNELS_VS_DEPTH = "16 channels trail at small depth; the 8-16 gap is negligible by depth 22 (sample FID)"
