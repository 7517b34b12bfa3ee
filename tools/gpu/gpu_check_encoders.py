"""One-shot GPU checks of the preprocessing encoders (no Ray needed): the tiny models agree between CPU fp32 and
GPU fp16, and per-sample encode time of full-size, randomly initialised SD3 VAE and CLIP-L / CLIP-G text
encoders at 256 px (the paper's Table 7 gives 2.45, 0.45 and 2.77 ms).

Run: `python -m tools.gpu.gpu_check_encoders`.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from pipelines.encoders import Captioner, TextEncoders, VAEEncoder
from pipelines.synthetic.tiny_models import build_tiny_models
from tools.gpu.sd3_encoders import CLIP_G, CLIP_L, PAPER_MS, SD3_VAE, encoder_calls, per_sample_ms


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


@torch.inference_mode()
def full_size_timings(batch: int = 64) -> None:
    models = {"vae": AutoencoderKL(**SD3_VAE), "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
              "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))}
    models = {name: model.to("cuda", torch.float16).eval() for name, model in models.items()}
    ms = per_sample_ms(encoder_calls(models, batch, 256), batch, torch.device("cuda"))
    for name, value in ms.items():
        print(f"SD3-size {name}, 256 px / 77 tokens, fp16, batch {batch}: {value:.3f} ms/sample "
              f"(paper {PAPER_MS[name]})")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    for check in (agreement, full_size_timings):
        try:
            check()
        except Exception as err:  # report and go on: one failed check should not hide the others' figures
            print(f"{check.__name__} failed: {type(err).__name__}: {err}")
