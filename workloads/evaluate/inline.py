"""GenEval-shapes inside another job, with a network already in hand: training's `validation.geneval_every` and the
studies' trial evaluation. The prompt set is encoded once (`encode_prompt_set`), sampled with the same per-image
noise as the evaluation job (`fixed_noise`), decoded by the training grids' decoder and scored in process, so a
score logged during training and the evaluation job's score of the same weights and settings agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from model.conditioning import TextConditioningConfig, TextEmbeddings, assemble_conditioning
from model.sampling import SkipLayerGuidance, sample
from pipelines import geneval
from pipelines.geneval.detect import ShapesDetector
from pipelines.geneval.scoring import score_detections, summarize


def noise_seed(seed: int, prompt_index: int, k: int) -> int:
    """The seed of image `k` of prompt `prompt_index`: the same images for a run whatever the batching."""
    return (seed * 1_000_003 + prompt_index) * 1_009 + k


def fixed_noise(prompt_index: np.ndarray, k: np.ndarray, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(B, *shape) standard normal noise, each image's own from `noise_seed`."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, int(i), int(j))))
                        for i, j in zip(prompt_index, k, strict=True)])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) in [0, 1] -> uint8 numpy, as written to PNG."""
    return (images * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class PromptSet:
    """A GenEval prompt set with its text embeddings (float16 arrays keyed as `TextEmbeddings`, one row a prompt)
    and the images to sample of each prompt."""

    metadata: list[dict]
    embeddings: dict[str, np.ndarray]
    per_prompt: int

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt index, k) of every image, prompt by prompt."""
        index = np.repeat(np.arange(len(self.metadata)), self.per_prompt)
        return index, np.tile(np.arange(self.per_prompt), len(self.metadata))


def encode_prompts(models: str, prompts: list[str], device: str = "auto") -> dict[str, np.ndarray]:
    """float16 text embeddings of `prompts` (keyed as `TextEmbeddings`) by the text encoders in `models`."""
    from pipelines.encoders import TextEncoders

    return TextEncoders(models, device=device).encode(prompts)


def encode_prompt_set(models: str, prompts_per_task: int, per_prompt: int, seed: int = 0,
                      device: str = "auto") -> PromptSet:
    """The shapes prompt set (`prompts_per_task` of each of GenEval's six tasks) encoded by the text encoders in
    `models` (an SD3-layout folder)."""
    from workloads.evaluate.prompts import prompt_set

    metadata = prompt_set(seed, dict.fromkeys(geneval.TAGS, prompts_per_task))
    return PromptSet(metadata, encode_prompts(models, [m["prompt"] for m in metadata], device), per_prompt)


@dataclass(frozen=True)
class Sampling:
    """How the prompt set is sampled."""

    steps: int
    guidance: float
    shift: float
    method: str = "euler"
    formulation: str = "rf"
    seed: int = 0
    slg: SkipLayerGuidance | None = None  # skip-layer guidance; None: off
    guidance_below: float = 1.0  # CFG only at t <= this (a guidance interval); 1: every step


@torch.no_grad()
def sample_prompt_set(network, prompts: PromptSet, text: TextConditioningConfig, latent_shape: tuple[int, ...],
                      how: Sampling, device: torch.device, dtype: torch.dtype = torch.float32,
                      batch_size: int = 32) -> torch.Tensor:
    """Latents of every image of the set, (n, C, h, w) float32 on the CPU, on every rank. Under torch.distributed
    each rank samples an equal share (the last one padded; ZeRO-3 needs every rank in every forward) and the
    shares are all-gathered."""
    tokens = prompts.embeddings["clip_l"].shape[1]
    if tokens != text.clip_tokens:  # else a shape error deep in the sampler
        raise ValueError(f"the prompts were encoded over {tokens} text tokens and the data over {text.clip_tokens}: "
                         "its text encoders changed since the data was preprocessed; preprocess it again")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    index, k = prompts.rows()
    n = len(index)
    share = -(-n // world)
    mine = np.minimum(np.arange(rank * share, (rank + 1) * share), n - 1)  # padded with the last image
    chunks = []
    for start in range(0, share, batch_size):
        rows = mine[start:start + batch_size]
        emb = {name: torch.from_numpy(v[index[rows]].astype(np.float32)).to(device)
               for name, v in prompts.embeddings.items()}
        context, pooled = assemble_conditioning(TextEmbeddings(**emb), text)
        noise = fixed_noise(index[rows], k[rows], latent_shape, how.seed).to(device)
        chunks.append(sample(network, noise.to(dtype), context.to(dtype), pooled.to(dtype), steps=how.steps,
                             guidance=how.guidance, shift=how.shift, method=how.method,
                             formulation=how.formulation, slg=how.slg, guidance_below=how.guidance_below).float())
    latents = torch.cat(chunks)  # (share, C, h, w)
    if world > 1:
        gathered = torch.empty((world * share, *latents.shape[1:]), dtype=latents.dtype, device=latents.device)
        dist.all_gather_into_tensor(gathered, latents.contiguous())
        latents = gathered
    return latents[:n].cpu()


def score_images(images: np.ndarray, prompts: PromptSet, detector: ShapesDetector | None = None) -> list[dict]:
    """GenEval's per-image results ({"tag", "prompt", "prompt_index", "k", "metadata", "correct", "reason", "credit",
    "details"}) of uint8 (n, H, W, 3) images sampled from the set in `PromptSet.rows` order."""
    detector = detector or ShapesDetector()
    index, k = prompts.rows()
    results = []
    for pixels, i, j in zip(images, index, k, strict=True):
        meta = prompts.metadata[int(i)]
        results.append({"tag": meta["tag"], "prompt": meta["prompt"], "prompt_index": int(i), "k": int(j),
                        "metadata": meta, **score_detections(meta, detector(pixels))})
    return results


def metric_fields(summary: dict, prefix: str = "geneval") -> dict[str, float]:
    """A summary as flat metric fields: `<prefix>` overall and `<prefix>_<tag>` per task; with partial credits also
    `credit_<field>` overall and `credit_<field>_<tag>` per task, and with chance levels `chance_<prefix>` and
    `chance_<field>` (overall, shuffled prompts)."""
    fields = {prefix: float(summary["overall"]), **{f"{prefix}_{t}": float(v) for t, v in summary["tasks"].items()}}
    if "credit" in summary:
        fields |= {f"credit_{f}": v for f, v in summary["credit"]["overall"].items()}
        fields |= {f"credit_{f}_{t}": v for t, per in summary["credit"]["tasks"].items() for f, v in per.items()}
    if "chance" in summary:
        fields[f"chance_{prefix}"] = summary["chance"]["geneval"]
        fields |= {f"chance_{f}": v for f, v in summary["chance"]["credit"]["overall"].items()}
    return fields


def geneval_summary(images: np.ndarray, prompts: PromptSet) -> dict:
    """The GenEval summary (`scoring.summarize`) of images sampled from the set."""
    return summarize(score_images(images, prompts))
