"""The frozen preprocessing models, on tiny random models of the real classes built locally, offline."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import support
import torch

from conf.pretrained import sd3_model_ids
from model.conditioning import TINY_TEXT
from pipelines import encoders
from pipelines.encoders import Captioner, TextEncoders, VAEEncoder
from pipelines.synthetic import tiny_models


@pytest.fixture(scope="module")
def offline():
    """No hub access and no connection off the machine while the module's models are built and loaded."""
    with support.offline("test_encoders"):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, offline) -> tiny_models.TinyModels:
    return tiny_models.build_tiny_models(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def vae(tiny) -> VAEEncoder:
    return VAEEncoder(tiny.repo, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def text(tiny) -> TextEncoders:
    return TextEncoders(tiny.repo, device="cpu", dtype="float32")


def _images(*sizes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _stamps(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def test_build_is_idempotent(tiny):
    root = Path(tiny.repo).parent
    stamps = _stamps(root)
    again = tiny_models.build_tiny_models(str(root))
    assert again == tiny
    assert _stamps(root) == stamps  # reused, nothing rewritten
    assert json.loads((root / tiny_models.MARKER).read_text())["seed"] == 0


def test_interrupted_build_is_redone(offline, tmp_path):
    tiny = tiny_models.build_tiny_models(str(tmp_path))
    weights = Path(tiny.repo, "text_encoder_3", "model.safetensors")
    weights.unlink()
    (tmp_path / tiny_models.MARKER).unlink()  # as if the build had died before writing its marker
    assert tiny_models.build_tiny_models(str(tmp_path)) == tiny
    assert weights.is_file() and (tmp_path / tiny_models.MARKER).is_file()


def test_model_ids_document_production_checkpoints():
    ids = sd3_model_ids()
    assert ids["sd3"] == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert ids["text_encoder_3"] == f"{ids['sd3']}/text_encoder_3"
    assert ids["captioner"].startswith("Salesforce/blip")


def test_resolve_device_and_dtype():
    cpu = torch.device("cpu")
    assert encoders.resolve_dtype("auto", cpu) == torch.float32
    assert encoders.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert encoders.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert encoders.resolve_device("cpu") == cpu
    with pytest.raises(ValueError, match="dtype must be"):
        encoders.resolve_dtype("fp8", cpu)


def test_vae_latents_shapes_and_order(vae):
    images = _images((64, 64), (64, 128), (64, 64))
    latents = vae.encode(images)
    assert (vae.latent_channels, vae.downsample) == (16, 8)
    assert [z.shape for z in latents] == [(16, 8, 8), (16, 8, 16), (16, 8, 8)]
    assert all(z.dtype == np.float16 for z in latents)
    for image, z in zip(images, latents, strict=True):  # grouping by size must not reorder the outputs
        np.testing.assert_allclose(vae.encode([image])[0], z, atol=2e-3)
    assert not np.allclose(latents[0], latents[2])


def test_vae_normalises_with_config_shift_and_scale(vae):
    config = vae.vae.config  # the shapes autoencoder's own statistics, in its config as in SD3's
    assert (vae.shift_factor, vae.scaling_factor) == (config.shift_factor, config.scaling_factor) != (0.0, 1.0)
    image = _images((64, 64), seed=1)[0]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # (1, 3, H, W)
    with torch.no_grad():
        mean = vae.vae.encode(pixels).latent_dist.mean[0]  # (16, 8, 8)
    expected = ((mean - config.shift_factor) * config.scaling_factor).numpy()
    np.testing.assert_allclose(vae.encode([image])[0], expected, rtol=2e-3, atol=2e-3)


def test_vae_without_shift_factor(tiny, tmp_path):
    """A VAE whose config has shift_factor None (SD1/SDXL style) is encoded with a shift of 0."""
    copy = tmp_path / "vae"
    shutil.copytree(os.path.join(tiny.repo, "vae"), copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "shift_factor": None, "scaling_factor": 2.0}))
    plain = VAEEncoder(str(copy), subfolder=None, device="cpu", dtype="float32")
    image = _images((32, 48), seed=2)[0]
    with torch.no_grad():
        mean = plain.vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0).latent_dist.mean
    np.testing.assert_allclose(plain.encode([image])[0], 2.0 * mean[0].numpy(), rtol=2e-3, atol=2e-3)


def test_vae_is_deterministic_and_validates(vae):
    images = _images((64, 64), (64, 128), seed=3)
    for a, b in zip(vae.encode(images), vae.encode(images), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        vae.encode([images[0].astype(np.float32)])
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode([images[0][:60]])


def test_text_shapes_and_dtypes(text):
    out = text.encode(["a red circle to the left of a blue square", "three green stars"])
    shapes = {k: v.shape for k, v in out.items()}
    n = TINY_TEXT.clip_tokens  # the tiny tokenizers' model_max_length (32): no caption of theirs is longer
    assert text.max_length == n == TINY_TEXT.t5_tokens and text.dims == TINY_TEXT
    assert shapes == {"clip_l": (2, n, 32), "clip_l_pooled": (2, 32), "clip_g": (2, n, 32),
                      "clip_g_pooled": (2, 32), "t5": (2, n, 64)}
    assert all(v.dtype == np.float16 and np.isfinite(v).all() for v in out.values())


def test_text_outputs_match_the_models_own_layers(text):
    caption = "two blue squares above a red ring"
    out = text.encode([caption])
    with torch.no_grad():
        for key, model, tokenizer in (("clip_l", text.clip_l, text.tokenizer_l),
                                      ("clip_g", text.clip_g, text.tokenizer_g)):
            ids = tokenizer([caption], padding="max_length", max_length=text.max_length, truncation=True,
                            return_tensors="pt")
            assert (ids.input_ids[0] != tokenizer.pad_token_id).sum() > 4  # the caption is several real tokens
            ref = model(ids.input_ids, output_hidden_states=True)
            np.testing.assert_allclose(out[key][0], ref.hidden_states[-2][0].numpy(), atol=2e-3, rtol=2e-3)
            assert not np.allclose(out[key][0], ref.hidden_states[-1][0].numpy(), atol=1e-2)  # not the last layer
            np.testing.assert_allclose(out[f"{key}_pooled"][0], ref.text_embeds[0].numpy(), atol=2e-3, rtol=2e-3)
        ids = text.tokenizer_t5([caption], padding="max_length", max_length=text.max_length, truncation=True,
                                return_tensors="pt")
        ref = text.t5(ids.input_ids).last_hidden_state[0].numpy()
    np.testing.assert_allclose(out["t5"][0], ref, atol=2e-3, rtol=2e-3)


def test_every_word_of_the_shapes_captions_is_one_token(text):
    """The tiny tokenizers have a token for each word the shapes' captions and synthetic captions use (as a real
    tokenizer has for common words), so the prompt's words reach the text encoders whole, not spelled out in
    characters."""
    import re

    from pipelines import geneval
    from pipelines.synthetic.shapes import COLORS, SHAPES, generate

    captions = [m["prompt"] for tag in geneval.TAGS for m in geneval.distinct_prompts(tag, SHAPES, tuple(COLORS))]
    synthetic = [s.synthetic_caption for s in generate(300, seed=7, size=64)]  # not the corpus' seed
    words = sorted({w for c in captions + synthetic for w in re.findall(r"\w+", c)})
    assert {"photo", "crosses", "purple", "left", "below", "four", "and"} <= set(words)
    for tokenizer in (text.tokenizer_l, text.tokenizer_g, text.tokenizer_t5):
        for word in words:
            assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, (type(tokenizer).__name__, word)
    caption = "a photo of a red circle and an orange square"
    assert len(text.tokenizer_t5(caption, add_special_tokens=False).input_ids) == len(caption.split())
    listing = next(c for c in synthetic if c.count(",") == 2)  # four objects: a word or a mark per token
    for tokenizer in (text.tokenizer_l, text.tokenizer_t5):
        assert len(tokenizer(listing, add_special_tokens=False).input_ids) == len(re.findall(r"\w+|[,:]", listing))


def test_long_caption_is_truncated(text):
    long = " ".join(["a purple hexagon next to an orange diamond"] * 40)
    n = text.max_length
    ids = text.tokenizer_l([long], padding="max_length", max_length=n, truncation=True).input_ids[0]
    assert len(ids) == n and ids[-1] == text.tokenizer_l.eos_token_id
    out = text.encode([long, "a star"])
    assert out["clip_g"].shape == (2, n, 32) and out["t5"].shape == (2, n, 64)


def test_empty_caption_is_the_empty_prompt(text):
    out = text.encode(["", "a red circle"])
    alone = text.encode([""])
    for key, value in out.items():
        assert np.isfinite(value[0]).all() and np.abs(value[0]).max() > 0, key  # encoded, not the zeroed null input
        assert not np.allclose(value[0], value[1]), key
        np.testing.assert_allclose(alone[key][0], value[0], atol=2e-3, err_msg=key)


def test_dims_match_tiny_text(text):
    assert text.dims == TINY_TEXT


def test_captioner_is_deterministic(tiny):
    captioner = Captioner(tiny.captioner, device="cpu", dtype="float32", max_new_tokens=8)
    images = _images((32, 32), (48, 64), (64, 64), seed=4)
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) and c == c.strip() for c in captions)
    assert captioner.caption(images) == captions
    assert captioner.caption([]) == []
    prompted = Captioner(tiny.captioner, device="cpu", dtype="float32", max_new_tokens=8, prompt="a red circle")
    assert not any(c.startswith("a red circle") for c in prompted.caption(images))


def test_the_cpu_stages_do_not_import_the_model_libraries():
    """Ray Data's read, decode and write tasks import `pipelines.stages` and `pipelines.output` in every worker
    process they start; diffusers and transformers (seconds of CPU each) load only where a model does."""
    import subprocess
    import sys

    code = ("import sys, pipelines.stages, pipelines.output; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _count_calls(monkeypatch, obj, name: str) -> list[int]:
    """Batch sizes `obj.name` is called with, recorded as it still runs."""
    sizes: list[int] = []
    method = getattr(obj, name)

    def counted(x, *args, **kwargs):
        sizes.append(len(x))
        return method(x, *args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return sizes


def test_vae_forwards_split_on_the_cpu(vae, tiny, monkeypatch):
    """A CPU forward covers as many images as keep the full-resolution activation within CPU_ACTIVATION_BYTES;
    encoding and decoding in those parts give the whole batch's result."""
    per_image = vae.vae.config.block_out_channels[0] * 64 * 64 * 4  # fp32
    assert encoders.images_per_forward(vae.vae, 64, 64) == encoders.CPU_ACTIVATION_BYTES // per_image
    assert encoders.images_per_forward(vae.vae, 4096, 4096) == 1
    images = _images(*[(64, 64)] * 5)
    whole = vae.encode(images)
    monkeypatch.setattr(encoders, "CPU_ACTIVATION_BYTES", 2 * per_image)
    sizes = _count_calls(monkeypatch, vae.vae, "encode")
    split = vae.encode(images)
    assert sizes == [2, 2, 1]
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)

    from workloads.train.validation import LatentDecoder

    decoder = LatentDecoder(tiny.repo)
    latents = torch.from_numpy(np.stack(whole).astype(np.float32))
    monkeypatch.setattr(encoders, "CPU_ACTIVATION_BYTES", 10**12)
    decoded = decoder(latents)
    monkeypatch.setattr(encoders, "CPU_ACTIVATION_BYTES", 2 * per_image)
    sizes = _count_calls(monkeypatch, decoder.vae, "decode")
    assert decoder(latents).shape == (5, 64, 64, 3) and sizes == [2, 2, 1]
    torch.testing.assert_close(decoder(latents), decoded, atol=1e-5, rtol=1e-4)


def test_vae_bench_reports_split_against_whole(tiny, vae, capsys):
    from workloads.bench import vae as bench_vae

    cfg = bench_vae.BenchVAEConf(sizes=[64], batch=3, repeats=1, threads=1, tiny_dir=str(Path(tiny.repo).parent))
    row = bench_vae.run(cfg)[64]
    assert row["images_per_forward"] == encoders.images_per_forward(vae.vae, 64, 64)
    for name in ("encode", "decode"):
        assert row[name]["whole"] > 0 and row[name]["split"] > 0 and 0 <= row[name]["kernel_split"] <= 1
    assert "ratio" in capsys.readouterr().out
