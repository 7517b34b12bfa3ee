"""One-shot GPU checks of the preprocessing encoders (no Ray needed): the tiny models agree between CPU fp32 and
GPU fp16, and per-sample encode time of full-size, randomly initialised SD3 VAE and CLIP-L / CLIP-G text
encoders at 256 px (the paper's Table 7 gives 2.45, 0.45 and 2.77 ms).

Run: `python -m workloads.bench.gpu_check_encoders`.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from pipelines.encoders import Captioner, TextEncoders, VAEEncoder
from pipelines.models import SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR
from pipelines.synthetic.tiny_models import build_tiny_models

SD3_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
           "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
           "layers_per_block": 2, "shift_factor": SD3_VAE_SHIFT_FACTOR, "scaling_factor": SD3_VAE_SCALING_FACTOR,
           "use_quant_conv": False, "use_post_quant_conv": False}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "max_position_embeddings": 77, "vocab_size": 49408}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu"}


def agreement() -> None:
    tiny = build_tiny_models(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4)]
    captions = ["a red circle", "two blue squares to the left of a green triangle", "", "a photo"]
    cpu = VAEEncoder(tiny.repo, device="cpu", dtype="float32").encode(images)
    gpu = VAEEncoder(tiny.repo, device="cuda", dtype="auto").encode(images)
    diff = max(np.abs(a.astype(np.float32) - b).max() for a, b in zip(cpu, gpu, strict=True))
    print(f"tiny VAE cpu fp32 vs cuda fp16: max|diff| {diff:.2e}")
    cpu_t = TextEncoders(tiny.repo, device="cpu", dtype="float32").encode(captions)
    gpu_t = TextEncoders(tiny.repo, device="cuda", dtype="auto").encode(captions)
    for key in cpu_t:
        print(f"tiny text {key:14} max|diff| {np.abs(cpu_t[key].astype(np.float32) - gpu_t[key]).max():.2e}")
    print("tiny captioner on cuda:", Captioner(tiny.captioner, device="cuda", dtype="auto").caption(images[:2]))


def timed(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def full_size_timings(batch: int = 64) -> None:
    vae = AutoencoderKL(**SD3_VAE).to("cuda", torch.float16).eval()
    pixels = torch.randn(batch, 3, 256, 256, device="cuda", dtype=torch.float16)
    seconds = timed(lambda: vae.encode(pixels).latent_dist.mean)
    print(f"SD3-size VAE encode, 256 px, fp16, batch {batch}: {seconds / batch * 1e3:.2f} ms/sample (paper 2.45)")
    for name, cfg, paper in (("CLIP-L", CLIP_L, 0.45), ("CLIP-G", CLIP_G, 2.77)):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).to("cuda", torch.float16).eval()
        ids = torch.randint(0, 49407, (batch, 77), device="cuda")
        seconds = timed(lambda model=model, ids=ids: model(ids, output_hidden_states=True))
        print(f"{name}-size text encoder, 77 tokens, fp16, batch {batch}: {seconds / batch * 1e3:.3f} ms/sample "
              f"(paper {paper})")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    for check in (agreement, full_size_timings):
        try:
            check()
        except Exception as err:  # report and go on: one failed check should not hide the others' figures
            print(f"{check.__name__} failed: {type(err).__name__}: {err}")
