"""The shapes autoencoder: the command that made the shipped weights still trains, and the shipped weights have SD3's
VAE interface and reconstruct held-out shapes."""

from __future__ import annotations

import json

from diffusers import AutoencoderKL

from pipelines.synthetic import shapes_vae
from pipelines.synthetic.tiny_models import build_tiny_models, shipped_vae_version


def test_the_training_command_still_trains_and_normalises_its_latents(tmp_path):
    cfg = shapes_vae.ShapesVAEConf(out=str(tmp_path / "vae"), steps=30, batch_size=4, eval_images=8, lr=2e-3)
    figures = shapes_vae.train(cfg)
    assert figures["final_loss"] < 0.7 * figures["first_loss"]
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae"))
    mean, std = shapes_vae.latent_stats(vae, 8, 64)
    assert abs(vae.config.shift_factor - mean) < 1e-3 and abs(vae.config.scaling_factor - 1 / std) < 2e-3
    assert json.loads((tmp_path / "vae" / "training.json").read_text())["held_out"][0]["size"] == 64


def test_the_shipped_autoencoder_has_sd3s_interface_and_reconstructs_shapes():
    vae = shapes_vae.load()
    c = vae.config
    assert c.latent_channels == 16 and 2 ** (len(c.block_out_channels) - 1) == 8
    assert not c.use_quant_conv and not c.use_post_quant_conv and c.shift_factor and c.scaling_factor
    result = shapes_vae.evaluate(vae, 32, 128)
    assert result["psnr"] > 28 and result["geneval"]["overall"] > 0.9, result


def test_tiny_models_carry_the_shipped_autoencoder(tmp_path):
    tiny = build_tiny_models(str(tmp_path / "tiny"))
    copied = AutoencoderKL.from_pretrained(tiny.repo, subfolder="vae")
    assert copied.config.scaling_factor == shapes_vae.load().config.scaling_factor
    marker = json.loads((tmp_path / "tiny" / "COMPLETE.json").read_text())
    assert marker["vae"] == shipped_vae_version() != "missing"


def test_every_shipped_width_loads_through_the_tiny_models_and_reconstructs(tmp_path):
    from conf.shapes import AUTOENCODER_CHANNELS, AUTOENCODER_DOWNSAMPLE
    from pipelines.encoders import downsample

    for channels in AUTOENCODER_CHANNELS:
        vae = shapes_vae.load(shapes_vae.shipped(channels))
        assert vae.config.latent_channels == channels and downsample(vae) == AUTOENCODER_DOWNSAMPLE
        figures = json.loads((shapes_vae.shipped(channels) / "training.json").read_text())
        assert figures["config"]["latent_channels"] == channels if channels != 16 else True  # 16: from before the field
        assert shapes_vae.evaluate(vae, 16, 128)["psnr"] > 25  # 27.8-31.8 dB on 256 held-out images
    four = build_tiny_models(str(tmp_path / "tiny"), latent_channels=4)
    assert AutoencoderKL.from_pretrained(four.repo, subfolder="vae").config.latent_channels == 4
    assert "latent-c4" in four.repo
