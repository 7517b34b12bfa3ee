"""GenEval-shapes inside another job (`workloads.evaluate.inline`): the per-image noise, the sampled share of a
prompt set, and scoring in process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model import FLAVORS, MMDiT
from model.conditioning import TINY_TEXT
from pipelines import geneval
from pipelines.synthetic.shapes import generate
from workloads.evaluate.inline import (
    PromptSet,
    Sampling,
    fixed_noise,
    geneval_summary,
    metric_fields,
    sample_prompt_set,
)
from workloads.evaluate.prompts import prompt_set


def random_prompt_set(per_prompt: int) -> PromptSet:
    """The prompt set of one prompt a task with random embeddings at the tiny encoders' widths."""
    t, gen = TINY_TEXT, torch.Generator().manual_seed(0)
    metadata = prompt_set(0, dict.fromkeys(geneval.TAGS, 1))
    n = len(metadata)
    shapes = {"clip_l": (n, t.clip_tokens, t.clip_l_dim), "clip_l_pooled": (n, t.clip_l_dim),
              "clip_g": (n, t.clip_tokens, t.clip_g_dim), "clip_g_pooled": (n, t.clip_g_dim),
              "t5": (n, t.t5_tokens, t.t5_dim)}
    embeddings = {k: torch.randn(s, generator=gen).half().numpy() for k, s in shapes.items()}
    return PromptSet(metadata, embeddings, per_prompt)


def network() -> MMDiT:
    torch.manual_seed(0)
    net = MMDiT(FLAVORS["debug"]).eval()
    with torch.no_grad():  # adaLN-Zero: a fresh network's output is zero whatever its input
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def test_each_image_has_its_own_noise_whatever_the_batch():
    index, k = np.array([0, 0, 3]), np.array([0, 1, 0])
    noise = fixed_noise(index, k, (4, 2, 2), seed=5)
    assert noise.shape == (3, 4, 2, 2) and not torch.equal(noise[0], noise[1])
    torch.testing.assert_close(fixed_noise(index[2:], k[2:], (4, 2, 2), seed=5)[0], noise[2])
    assert not torch.equal(fixed_noise(index, k, (4, 2, 2), seed=6), noise)


def test_the_prompt_set_samples_the_same_latents_in_any_batch_size():
    prompts, net = random_prompt_set(per_prompt=2), network()
    how = Sampling(steps=2, guidance=3.0, shift=1.0)
    latents = sample_prompt_set(net, prompts, TINY_TEXT, (16, 4, 4), how, torch.device("cpu"), batch_size=32)
    assert latents.shape == (12, 16, 4, 4) and torch.isfinite(latents).all()
    index, k = prompts.rows()
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and k.tolist() == [0, 1] * 6
    small = sample_prompt_set(net, prompts, TINY_TEXT, (16, 4, 4), how, torch.device("cpu"), batch_size=5)
    torch.testing.assert_close(small, latents, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(latents[0], latents[1])  # two noises of one prompt


def test_prompts_encoded_over_other_tokens_than_the_data_are_refused_by_name():
    """Data preprocessed with the tiny encoders at 77 tokens (before they said 32) and prompts encoded now."""
    prompts = random_prompt_set(per_prompt=1)
    data_text = dataclasses.replace(TINY_TEXT, clip_tokens=77, t5_tokens=77)
    how = Sampling(steps=1, guidance=1.0, shift=1.0)
    with pytest.raises(ValueError, match=r"32 text tokens and the data over 77: .*preprocess it again"):
        sample_prompt_set(network(), prompts, data_text, (16, 4, 4), how, torch.device("cpu"))


def test_scores_rendered_images_against_their_prompts():
    samples = list(generate(12, seed=3, size=64))
    prompts = PromptSet([s.metadata for s in samples], {}, per_prompt=1)
    images = np.stack([np.asarray(s.image) for s in samples])
    summary = geneval_summary(images, prompts)
    assert summary["overall"] == 1.0 and summary["images"] == 12
    wrong = geneval_summary(images[::-1].copy(), prompts)  # each image under another's prompt
    assert wrong["overall"] < 1.0
    fields = metric_fields(summary)
    assert fields["geneval"] == 1.0 and {"geneval", *(f"geneval_{t}" for t in summary["tasks"])} <= set(fields)
    assert {k for k in fields if k.startswith("geneval")} == {"geneval", *(f"geneval_{t}" for t in summary["tasks"])}


def test_validation_geneval_fields_are_checked():
    from conf.train import ValidationConf

    with pytest.raises(ValueError, match=r"validation\.geneval_every must be >= 0"):
        ValidationConf(geneval_every=-1)
    with pytest.raises(ValueError, match=r"validation\.geneval_prompts_per_task must be >= 1"):
        ValidationConf(geneval_prompts_per_task=0)


def test_a_latent_preview_is_no_image_to_score():
    """Every path that scores decoded images (the evaluation job's Generator, the studies' GenEval columns, pairs)
    asks the decoder for its VAE: without one it fails naming who needed it and why there is none."""
    from workloads.train.validation import LatentDecoder

    with pytest.raises(ValueError, match=r"geneval_prompts_per_task scores decoded images .* no VAE recorded"):
        LatentDecoder(None).for_scoring("geneval_prompts_per_task")
