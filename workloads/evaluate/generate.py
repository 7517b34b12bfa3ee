"""Images for a prompt set from a trained MM-DiT: text encoding, sampling and VAE decoding as Ray Data batch inference
(one actor holding the models, on a GPU where the cluster has one), written in GenEval's layout
(`<out>/images/<index>/metadata.jsonl`, `<index>/samples/<k>.png`) for the scorer to read.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image

from model.conditioning import TextEmbeddings, assemble_conditioning
from model.interop import load_diffusers
from model.sampling import SkipLayerGuidance, sample
from pipelines.storage import Location
from workloads.evaluate.inline import fixed_noise, to_uint8

ALL_CORES = -1  # a CPU Generator's threads: every core its node lets it use (its judge and PNG writes are light)


def cpu_threads(threads: int) -> int:
    """Torch threads for `threads` (0: leave torch's default, which under Ray is the CPUs the actor holds)."""
    return len(os.sched_getaffinity(0)) if threads == ALL_CORES else threads


class Generator:
    """Holds the network, the text encoders and the VAE; turns rows of (prompt_index, k, prompt) into PNG bytes
    (and with `keep_latents` the sampled latents too, fp16, in the training data's latent space)."""

    def __init__(self, export: str, models: str, resolution: int, steps: int, guidance: float, shift: float,
                 sampler: str, seed: int, use_gpu: bool, threads: int = 0, keep_latents: bool = False,
                 slg: SkipLayerGuidance | None = None, guidance_below: float = 1.0) -> None:
        from pipelines.encoders import TextEncoders, downsample
        from workloads.train.validation import LatentDecoder

        if threads := cpu_threads(threads):
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.network = load_diffusers(export).to(self.device).eval()
        self.text = TextEncoders(models, device=self.device.type)
        self.decoder = LatentDecoder(models)  # the training grids' decoding: (z / scale) + shift, then the VAE
        self.decoder.for_scoring(f"sampling a prompt set with models={models}").to(self.device)
        self.conditioning, net = self.text.dims, self.network.config
        got = (self.conditioning.context_dim, self.conditioning.clip_l_dim + self.conditioning.clip_g_dim)
        if got != (net.context_dim, net.pooled_dim):
            raise ValueError(f"the text encoders in {models} give context and pooled widths {got}, the network takes "
                             f"{(net.context_dim, net.pooled_dim)}: pass the models= its data was preprocessed with")
        self.latent_side = resolution // downsample(self.decoder.vae)
        self.steps, self.guidance, self.shift, self.sampler, self.seed = steps, guidance, shift, sampler, seed
        self.slg, self.guidance_below = slg, guidance_below
        self.keep_latents = keep_latents

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        emb = {k: torch.from_numpy(v.astype(np.float32)).to(self.device) for k, v in self.text.encode(prompts).items()}
        context, pooled = assemble_conditioning(TextEmbeddings(**emb), self.conditioning)
        c = self.network.config.in_channels
        noise = fixed_noise(batch["prompt_index"], batch["k"], (c, self.latent_side, self.latent_side),
                            self.seed).to(self.device)
        latents = sample(self.network, noise, context, pooled, steps=self.steps, guidance=self.guidance,
                         shift=self.shift, method=self.sampler, slg=self.slg,
                         guidance_below=self.guidance_below)
        pixels = to_uint8(self.decoder(latents))  # (B, H, W, 3)
        pngs = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        out = {"prompt_index": batch["prompt_index"], "k": batch["k"], "png": np.array(pngs, dtype=object)}
        if self.keep_latents:
            out["latent"] = latents.float().cpu().numpy().astype(np.float16)
        return out


def generate(prompts: list[dict], per_prompt: int, out: Location, batch_size: int, **generator) -> Location:
    """Sample `per_prompt` images of every prompt and write them in GenEval's layout under `<out>/images`."""
    import ray
    import ray.data

    from workloads.runtime import ensure_ray

    ensure_ray()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    rows = [{"prompt_index": i, "k": k, "prompt": p["prompt"]}
            for i, p in enumerate(prompts) for k in range(per_prompt)]
    dataset = ray.data.from_items(rows).map_batches(
        Generator, fn_constructor_kwargs=generator | {"use_gpu": use_gpu, "threads": 0 if use_gpu else ALL_CORES},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1, batch_format="numpy")
    images = out.child("images")
    for i, meta in enumerate(prompts):
        images.write_bytes(f"{i:05d}/metadata.jsonl", (json.dumps(meta) + "\n").encode())
    for row in dataset.iter_rows():
        images.write_bytes(f"{int(row['prompt_index']):05d}/samples/{int(row['k']):04d}.png", row["png"])
    return images
