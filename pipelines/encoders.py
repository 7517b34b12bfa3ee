"""The frozen models of preprocessing: the VAE, the three text encoders and an image captioner.

Each class loads its model once in `__init__` with `from_pretrained` (real checkpoints and the tiny models of
`pipelines.synthetic.tiny_models` go through the same call) and then processes lists, so a Ray Data stage can wrap
it as a callable class. Everything runs under `torch.inference_mode()`; outputs are float16 numpy arrays, the precision
the paper stores its pre-encoded data in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from model import precision
from model.conditioning import TextConditioningConfig
from model.precision import resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# diffusers and transformers are imported where a model is loaded, not here: every Ray Data decode and write task
# imports this module through `pipelines.stages`, and the two libraries cost about 9 s and 7 s of CPU per worker
# process that never loads a model.


# A VAE forward over a batch of 32 on the CPU spent 43-54% of its time in the kernel: each full-resolution activation
# of the batch is one block beyond glibc's mmap ceiling (32 MiB), so every layer's output arrives as fresh pages, zeroed
# and faulted in, and goes back to the kernel when freed. Forwards over as many images as keep that activation within
# 8 MiB (heap blocks glibc keeps and reuses) ran 1.1x-2.1x faster on 2 cores, encoding and decoding at 128-512 px
# (the shapes VAE in fp32; `python -m workloads.bench.vae`).
CPU_ACTIVATION_BYTES = 8 * 2**20


def downsample(vae: torch.nn.Module) -> int:
    """Pixels a latent cell of a diffusers VAE spans on each side (8 for SD3's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def images_per_forward(vae: torch.nn.Module, height: int, width: int) -> int | None:
    """Images per forward of a diffusers VAE at height x width pixels: on the CPU as many as keep the full-resolution
    activation (block_out_channels[0] x H x W) within CPU_ACTIVATION_BYTES, at least one; None (the whole batch) on
    an accelerator, whose caching allocator reuses its blocks."""
    if vae.device.type != "cpu":
        return None
    per_image = vae.config.block_out_channels[0] * height * width * vae.dtype.itemsize
    return max(1, CPU_ACTIVATION_BYTES // per_image)


def vae_forward(vae: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, height: int,
                width: int) -> torch.Tensor:
    """fn (an encode or a decode of `vae`) over the batch x of height x width-pixel images, `images_per_forward` at a
    time, concatenated."""
    n = images_per_forward(vae, height, width)
    if n is None or len(x) <= n:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(n)])


def quiet_transformers() -> None:
    """Each actor loads its models once; transformers' per-load "Loading weights" bars would only flood the job log."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Frozen encoders run in half precision on a GPU (`auto` is float16 there), float32 on the CPU."""
    return precision.resolve_dtype(name, device, gpu_default=torch.float16)


class VAEEncoder:
    """Images to normalised VAE latents: `(mean(z) - shift_factor) * scaling_factor`, both from the VAE's config.

    The latent distribution's mean, not a sample, so that pre-encoding is deterministic; the per-sample noise of
    a sample (std about 1e-2 on SD3's VAE) is not worth a non-reproducible dataset.
    """

    def __init__(self, repo: str, subfolder: str | None = "vae", device: str = "auto", dtype: str = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(repo, subfolder=subfolder, torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)  # None in VAEs without a shift (SD1/SDXL)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return downsample(self.vae)

    def _check(self, index: int, image: np.ndarray) -> None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images[{index}] must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        if image.shape[0] % self.downsample or image.shape[1] % self.downsample:
            raise ValueError(f"images[{index}] sides must be multiples of {self.downsample}, got {image.shape[:2]}")

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, C, H/8, W/8) float16 normalised latents."""
        x = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.dtype)  # (B, 3, H, W) in [-1, 1]
        z = self.vae.encode(x).latent_dist.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(torch.float16)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 (H, W, 3) images, sizes may differ -> float16 (C, H/8, W/8) latents in input order."""
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            self._check(i, image)
            by_size[image.shape[:2]].append(i)
        latents: list[np.ndarray] = [np.empty(0)] * len(images)
        for indices in by_size.values():  # a batch per size
            pixels = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device)  # (B, H, W, 3)
            z = vae_forward(self.vae, self._encode, pixels, *pixels.shape[1:3])
            for i, latent in zip(indices, z.cpu().numpy(), strict=True):
                latents[i] = latent  # (C, H/8, W/8)
        return latents


def caption_tokens(tokenizer: PreTrainedTokenizerBase, positions: int) -> int:
    """Tokens every caption is padded or cut to, for all three encoders: the CLIP-L tokenizer's `model_max_length`
    (77 for SD3's, as in SD3's training; 32 for the tiny stand-ins, `TINY_TEXT`), at most CLIP-L's `positions`."""
    return min(tokenizer.model_max_length, positions)


class TextEncoders:
    """Captions to SD3's text conditioning: CLIP-L and CLIP-G penultimate hidden states and pooled projections,
    T5's last hidden state, each over `max_length` tokens (None: `caption_tokens` of the repo's CLIP-L).

    Like diffusers' SD3 pipeline (and SD3's training), the encoders see the padded ids without an attention mask,
    so pad positions carry real, caption-dependent features that the MM-DiT was trained on.
    """

    def __init__(self, repo: str, device: str = "auto", dtype: str = "auto", max_length: int | None = None) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast, T5EncoderModel, T5TokenizerFast

        quiet_transformers()
        self.clip_l = self._load(CLIPTextModelWithProjection, repo, "text_encoder")
        self.clip_g = self._load(CLIPTextModelWithProjection, repo, "text_encoder_2")
        self.t5 = self._load(T5EncoderModel, repo, "text_encoder_3")
        self.tokenizer_l = CLIPTokenizerFast.from_pretrained(repo, subfolder="tokenizer")
        self.tokenizer_g = CLIPTokenizerFast.from_pretrained(repo, subfolder="tokenizer_2")
        self.tokenizer_t5 = T5TokenizerFast.from_pretrained(repo, subfolder="tokenizer_3")
        self.max_length = max_length or caption_tokens(self.tokenizer_l, self.clip_l.config.max_position_embeddings)
        for name, clip in (("text_encoder", self.clip_l), ("text_encoder_2", self.clip_g)):
            c = clip.config
            # the conditioning packs pooled projections at the hidden width: true of SD3's CLIP-L and CLIP-G
            if c.projection_dim != c.hidden_size:
                raise ValueError(f"{name}: projection_dim ({c.projection_dim}) must equal hidden_size "
                                 f"({c.hidden_size})")
            if c.max_position_embeddings < self.max_length:
                raise ValueError(f"{name}: max_length {self.max_length} exceeds max_position_embeddings "
                                 f"{c.max_position_embeddings}")

    def _load(self, cls: type, repo: str, subfolder: str) -> torch.nn.Module:
        model = cls.from_pretrained(repo, subfolder=subfolder, dtype=self.dtype)
        return model.to(self.device).eval().requires_grad_(False)

    @property
    def dims(self) -> TextConditioningConfig:
        """Widths and token counts of the loaded encoders, as the conditioning config the MM-DiT is built with."""
        return TextConditioningConfig.of_encoders(self.clip_l.config.hidden_size, self.clip_g.config.hidden_size,
                                                  self.t5.config.d_model, self.max_length)

    def _ids(self, tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)  # (B, max_length)

    def _clip(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
              captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = model(self._ids(tokenizer, captions), output_hidden_states=True)
        hidden = out.hidden_states[-2]  # (B, 77, D) penultimate layer, before the final LayerNorm
        return _half(hidden), _half(out.text_embeds)  # (B, 77, D), (B, D) pooled projection

    @torch.inference_mode()
    def encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        """Captions (an empty string is the empty prompt) -> float16 arrays keyed clip_l, clip_l_pooled, clip_g,
        clip_g_pooled, t5."""
        captions = list(captions)
        clip_l, clip_l_pooled = self._clip(self.clip_l, self.tokenizer_l, captions)
        clip_g, clip_g_pooled = self._clip(self.clip_g, self.tokenizer_g, captions)
        t5 = self.t5(self._ids(self.tokenizer_t5, captions)).last_hidden_state  # (B, 77, D_t5)
        return {"clip_l": clip_l, "clip_l_pooled": clip_l_pooled, "clip_g": clip_g, "clip_g_pooled": clip_g_pooled,
                "t5": _half(t5)}


class Captioner:
    """Images to synthetic captions with any transformers image-to-text model (BLIP by default; CogVLM in the
    paper), greedy decoding so the captions are reproducible.

    With a `prompt` (conditional captioning, e.g. "a photograph of"), the prompt is stripped from the front of the
    caption, since models such as BLIP repeat it.
    """

    def __init__(self, path: str, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 32,
                 prompt: str | None = None) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt
        from transformers import AutoModelForImageTextToText, AutoProcessor

        quiet_transformers()
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def caption(self, images: list[np.ndarray]) -> list[str]:
        """uint8 (H, W, 3) images -> one stripped caption each."""
        if not images:
            return []
        pil = [Image.fromarray(image) for image in images]
        text = [self.prompt] * len(pil) if self.prompt else None
        inputs = self.processor(images=pil, text=text, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        captions = [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return [self._without_prompt(c) for c in captions]

    def _without_prompt(self, caption: str) -> str:
        if self.prompt and caption.lower().startswith(self.prompt.strip().lower()):
            return caption[len(self.prompt.strip()):].strip()
        return caption


def _half(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float16).cpu().numpy()
