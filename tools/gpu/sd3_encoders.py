"""SD3's frozen encoders at full size with random weights, for timing without the real checkpoints: their configs,
the paper's per-sample costs (Table 7), a writer of a random-weight repo in SD3's diffusers layout (which
`pipelines.encoders` and the preprocessing job load through the same `from_pretrained` as the real one), and
per-sample encode times of loaded encoders. Shared by `gpu_check_encoders` and `gpu_job`.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from conf.pretrained import SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR
from workloads.bench.model import median_time

SD3_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
           "layers_per_block": 2, "shift_factor": SD3_VAE_SHIFT_FACTOR, "scaling_factor": SD3_VAE_SCALING_FACTOR,
           "use_quant_conv": False, "use_post_quant_conv": False}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "max_position_embeddings": 77, "vocab_size": 49408}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu"}
# google/t5-v1_1-xxl's encoder, SD3's text_encoder_3
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "tie_word_embeddings": False}

# Table 7 of the paper: per-sample encode cost at 256^2 in half precision (one caption per text encoder).
PAPER_MS = {"vae": 2.45, "clip_l": 0.45, "clip_g": 2.77, "t5": 17.46}
# encoder name -> the repo subfolder it lives in (SD3's diffusers layout)
SUBFOLDERS = {"vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
TOKENS = 77


def paper_ratios(ms: dict[str, float]) -> dict[str, float]:
    """ours / paper for each encoder of Table 7 that `ms` has (below 1: faster than the paper's figure)."""
    return {name: ms[name] / PAPER_MS[name] for name in PAPER_MS if name in ms}


def sd3_configs(tokenizers: str) -> dict[str, object]:
    """SD3's component configs, with the special-token ids of the tokenizers in `tokenizers` (a repo in SD3's
    layout): its tokenizers are what the written repo will carry."""
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer

    clip = CLIPTokenizer.from_pretrained(tokenizers, subfolder="tokenizer")
    # CLIP pools at the first end-of-text token: the ids must be those its tokenizer writes
    ids = {"bos_token_id": clip.bos_token_id, "eos_token_id": clip.eos_token_id, "pad_token_id": clip.pad_token_id}
    t5 = T5Tokenizer.from_pretrained(tokenizers, subfolder="tokenizer_3")
    return {"vae": dict(SD3_VAE), "clip_l": CLIPTextConfig(**CLIP_L, **ids), "clip_g": CLIPTextConfig(**CLIP_G, **ids),
            "t5": T5Config(**T5_XXL, pad_token_id=t5.pad_token_id, eos_token_id=t5.eos_token_id,
                           decoder_start_token_id=t5.pad_token_id)}


def repo_configs(repo: str) -> dict[str, object]:
    """The component configs of an existing repo in SD3's layout (e.g. the tiny models')."""
    from diffusers import AutoencoderKL
    from transformers import AutoConfig

    return {name: AutoencoderKL.load_config(repo, subfolder=sub) if name == "vae"
            else AutoConfig.from_pretrained(repo, subfolder=sub) for name, sub in SUBFOLDERS.items()}


@contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside get their tensors on `device` in `dtype` from the start: no fp32 copy on the host first
    (T5-XXL alone is 19 GB in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def write_random_repo(out: str, configs: dict[str, object], tokenizers: str, device: torch.device,
                      dtype: torch.dtype, seed: int = 0, tokens: int | None = None) -> dict[str, int]:
    """Random-weight VAE, CLIP-L, CLIP-G and T5 encoders of `configs` saved under `out` in SD3's diffusers layout,
    with the tokenizers of the repo `tokenizers` copied beside them, cutting captions to `tokens` when given (SD3's 77
    for its own configs; the tiny tokenizers say 32); returns each encoder's parameter count."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from pipelines.encoders import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar per model
    classes = {"clip_l": CLIPTextModelWithProjection, "clip_g": CLIPTextModelWithProjection, "t5": T5EncoderModel}
    root = Path(out)
    params = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for name, subfolder in SUBFOLDERS.items():
            with building_on(device, dtype):
                model = AutoencoderKL.from_config(configs[name]) if name == "vae" else classes[name](configs[name])
            model.save_pretrained(root / subfolder)
            params[name] = sum(p.numel() for p in model.parameters())
            del model
    for subfolder in TOKENIZERS:
        shutil.copytree(Path(tokenizers) / subfolder, root / subfolder, dirs_exist_ok=True)
        if tokens is not None:  # `model_max_length` is what `pipelines.encoders.caption_tokens` reads
            settings = root / subfolder / "tokenizer_config.json"
            settings.write_text(json.dumps(json.loads(settings.read_text()) | {"model_max_length": tokens}, indent=2))
    return params


def _vae_latent(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.mean  # (B, C, H/8, W/8)


def encoder_calls(models: dict[str, torch.nn.Module], batch: int, resolution: int) -> dict[str, Callable[[], object]]:
    """One batched call per encoder on random inputs of Table 7's shapes: `resolution`^2 images for the VAE, 77 token
    ids for the text encoders (CLIP with its hidden states, as preprocessing reads the penultimate one)."""
    calls: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        weight = next(model.parameters())
        if name == "vae":
            pixels = torch.randn(batch, 3, resolution, resolution, device=weight.device, dtype=weight.dtype)
            calls[name] = functools.partial(_vae_latent, model, pixels)
            continue
        ids = torch.randint(0, model.config.vocab_size, (batch, TOKENS), device=weight.device)
        calls[name] = functools.partial(model, ids, output_hidden_states=True) if name.startswith("clip") \
            else functools.partial(model, ids)
    return calls


@torch.inference_mode()
def per_sample_ms(calls: dict[str, Callable[[], object]], batch: int, device: torch.device,
                  repeats: int = 10) -> dict[str, float]:
    """Median milliseconds per sample of each call (made on `batch` samples)."""
    return {name: median_time(call, device, repeats) / batch * 1e3 for name, call in calls.items()}
