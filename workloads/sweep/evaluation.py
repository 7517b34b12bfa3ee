"""Sample-quality metrics of a trained run for the shift and steps studies, from its EMA export.

The metric is a Fréchet distance in latent space (LFD): Gaussian fits of per-channel latent statistics (mean and
standard deviation over positions, 2C features) of samples against the same statistics of held-out latents. It
is our stand-in for the paper's image metrics (FID, CLIP score), which need the VAE decoder and an Inception or
CLIP network; it ranks sampling settings on the same data and model, not across datasets.
"""

from __future__ import annotations

import numpy as np
import torch

from model.conditioning import TextConditioningConfig
from model.sampling import sample
from pipelines import schema
from workloads.train.data import choose_captions, to_model_inputs
from workloads.train.validation import ValGroup


def latent_features(latents: torch.Tensor) -> np.ndarray:
    """(B, C, h, w) -> (B, 2C): each channel's mean and standard deviation over positions."""
    flat = latents.double().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2)], dim=1).cpu().numpy()


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) between Gaussian fits of two (n, d) sets."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = np.trace(_sqrtm_psd(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@torch.no_grad()
def sample_metrics(network, group: ValGroup, text: TextConditioningConfig, settings: list[tuple[int, float]],
                   formulation: str, seed: int, device: torch.device, batch_size: int = 64,
                   method: str = "euler") -> dict:
    """For each (steps, shift): the LFD of `method`'s samples for the group's captions (fixed noise, no guidance)
    against the group's latents, and `change` = mean squared distance to the samples of the first setting, relative
    to their mean square (how far fewer steps land from the reference)."""
    real = torch.from_numpy(group.columns[schema.LATENT]).float()
    batch = {k: v.to(device) for k, v in group.tensors(np.arange(len(group))).items()}
    _, context, pooled = to_model_inputs(choose_captions(batch, False), text, drop_prob=0.0)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    out, reference = {}, None
    for steps, shift in settings:
        chunks = [sample(network, noise[i:i + batch_size], context[i:i + batch_size], pooled[i:i + batch_size],
                         steps=steps, shift=shift, method=method, formulation=formulation).float().cpu()
                  for i in range(0, len(real), batch_size)]
        latents = torch.cat(chunks)
        reference = latents if reference is None else reference
        change = float((latents - reference).pow(2).mean() / reference.pow(2).mean())
        out[(steps, shift)] = {"lfd": frechet_distance(latent_features(latents), latent_features(real)),
                               "change": change}
    return out
