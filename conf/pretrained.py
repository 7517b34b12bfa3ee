"""The production checkpoints of preprocessing, named once.

No heavy imports on purpose: the Hydra schema (`conf.preprocess`) reads its defaults from here.
"""

from __future__ import annotations

# Downloaded by the user ahead of a real run; never during tests.
SD3_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"  # VAE, CLIP-L, CLIP-G, T5 and tokenizers
SD3_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
# The paper captioned with CogVLM; the captioner is pluggable and BLIP is the small, widely available default.
CAPTIONER = "Salesforce/blip-image-captioning-large"

# The SD3 VAE's latent normalisation as its config states it. `encoders.VAEEncoder` reads the loaded VAE's own
# config; these copies only build VAEs of SD3's kind without its weights (the tiny VAE, the GPU timing check).
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_DOWNSAMPLE = 8  # pixels per latent cell on each side (256 px -> 32 latent cells)


def sd3_model_ids() -> dict[str, str]:
    """The production model ids: the SD3 diffusers repo (one subfolder per component) and the captioner."""
    return {"sd3": SD3_REPO, "captioner": CAPTIONER, **{name: f"{SD3_REPO}/{name}" for name in SD3_SUBFOLDERS}}
