"""CLIP score and FID (torchmetrics) on tiny random CLIP and Inception stand-ins built offline, loaded through the
production calls; the config's checks; the evaluation report's new keys."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import offline
from transformers import CLIPModel, CLIPProcessor

from conf.evaluate import EvaluateConf, ImageMetricsConf
from pipelines.storage import Location
from pipelines.synthetic import tiny_models
from pipelines.synthetic.shapes import generate
from workloads import runtime
from workloads.evaluate import driver
from workloads.evaluate.image_metrics import batches, clip_score, fid, image_metrics, load_clip, load_inception


@pytest.fixture(scope="module", autouse=True)
def no_network():
    with offline("test_image_metrics"):
        yield


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """The first seed's random CLIP whose cosines on this file's images are positive: a random CLIP's often share one
    sign, and the score's floor at 0 would hide every difference. A search, not a fixed seed, so a change of the tiny
    tokenizers' vocabulary (which redraws the weights) cannot break the tests."""
    root = tmp_path_factory.mktemp("clip")
    for seed in range(32):
        path = tiny_models.build_tiny_clip(str(root / f"seed-{seed}"), seed=seed)
        if (cosines(path, *shapes(8, seed=2)) > 0).all() and (cosines(path, *shapes(6, seed=1)) > 0).sum() >= 2:
            return path
    pytest.fail("no seed below 32 gave a tiny CLIP with positive cosines on the test images")


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    return tiny_models.build_tiny_inception(str(tmp_path_factory.mktemp("inception") / "inception.pt"))


def shapes(n: int, seed: int, size: int = 48) -> tuple[list[np.ndarray], list[str]]:
    samples = list(generate(n, seed=seed, size=size))
    return [np.asarray(s.image) for s in samples], [s.caption for s in samples]


def noise(n: int, seed: int, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def cosines(clip: str, images: list[np.ndarray], prompts: list[str]) -> torch.Tensor:
    """The pairs' cosines straight from transformers: CLIP's own normalised projections."""
    model, processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=[Image.fromarray(i) for i in images], return_tensors="pt",
                                padding=True))
    return (out.image_embeds * out.text_embeds).sum(-1)  # (N,)


def test_clip_score_is_the_floored_mean_cosine_of_each_image_with_its_prompt(clip):
    images, prompts = shapes(6, seed=1)
    expected = 100 * cosines(clip, images, prompts)
    singles = [clip_score([i], [p], clip) for i, p in zip(images, prompts, strict=True)]
    assert singles == pytest.approx([max(float(e), 0.0) for e in expected], abs=1e-3)
    assert sum(s > 0 for s in singles) >= 2  # the check above is not all zeros
    assert clip_score(images, prompts, clip, batch_size=4) == pytest.approx(max(float(expected.mean()), 0.0), abs=1e-3)


def test_clip_score_is_deterministic_in_range_and_reads_the_prompts(clip):
    images, prompts = shapes(8, seed=2)
    score = clip_score(images, prompts, clip, batch_size=3)
    assert score == clip_score(images, prompts, clip, batch_size=3)  # the weights come from disk, not a fresh init
    assert 0.0 <= score <= 100.0
    assert clip_score(images, prompts[::-1], clip) != pytest.approx(score, abs=1e-3)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, prompts[:-1], clip)


def test_a_clip_model_that_is_not_on_disk_is_named_and_not_downloaded(clip, tmp_path):
    model_only = tmp_path / "model_only"
    CLIPModel.from_pretrained(clip).save_pretrained(model_only)  # no processor beside it
    for missing in (str(tmp_path / "nowhere"), "openai/not-a-cached-clip", str(model_only)):
        with pytest.raises(FileNotFoundError, match=r"image_metrics\.clip_model=.*nothing is downloaded"):
            load_clip(missing)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_the_difference(inception):
    a, _ = shapes(24, seed=3)
    b, _ = shapes(24, seed=4)
    same = fid(a, a, inception)
    assert abs(same) < 1e-3 and abs(fid(a[::-1], a, inception, batch_size=5)) < 1e-3  # order and batching free
    other_shapes, other_noise = fid(a, b, inception), fid(a, noise(24, seed=5), inception)
    assert 0 < other_shapes < other_noise
    assert fid(a, b, inception, batch_size=7) == pytest.approx(other_shapes, rel=1e-4)
    assert fid(b, a, inception) == pytest.approx(other_shapes, rel=1e-4)  # a distance: symmetric


def test_fid_inputs_are_checked(inception, tmp_path):
    a, _ = shapes(4, seed=6)
    with pytest.raises(ValueError, match="at least 2 images of each set, got 1 generated"):
        fid(a[:1], a, inception)
    with pytest.raises(ValueError, match=r"images\[1\] must be uint8 \(H, W, 3\)"):
        list(batches([a[0], a[1].astype(np.float32)], 4))
    with pytest.raises(FileNotFoundError, match=r"image_metrics\.fid_weights=.*no such file"):
        load_inception(str(tmp_path / "inception.pt"))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state_dict.pt")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_inception(str(tmp_path / "state_dict.pt"))
    assert load_inception(inception)(torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2)).shape == (4, 16)


def write_folder(folder: Path, images: list[np.ndarray], prompts: list[str] | None = None) -> None:
    """`<key>.png` (+ `<key>.txt` with its prompt), half of them a level down, as a user's folder may be."""
    for k, image in enumerate(images):
        stem = folder / ("nested" if k % 2 else "") / f"{k:03d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        stem.with_suffix(".PNG" if k == 0 else ".png").write_bytes(buffer.getvalue())
        if prompts is not None:
            stem.with_suffix(".txt").write_text(prompts[k])


def test_image_metrics_gives_each_configured_metric_of_arrays_or_a_folder(clip, inception, tmp_path):
    images, prompts = shapes(6, seed=7)
    reference, _ = shapes(10, seed=8, size=64)  # another size: the network resizes
    write_folder(tmp_path / "reference", reference)
    both = ImageMetricsConf(clip_model=clip, fid_reference=str(tmp_path / "reference"), fid_weights=inception,
                            device="cpu")
    metrics = image_metrics(both, images, prompts)
    assert metrics == {"clip_score": pytest.approx(clip_score(images, prompts, clip)),
                       "fid": pytest.approx(fid(images, reference, inception))}
    assert image_metrics(ImageMetricsConf(clip_model=clip), images, prompts).keys() == {"clip_score"}
    assert image_metrics(ImageMetricsConf(), images, prompts) == {}
    write_folder(tmp_path / "generated", images)
    order = np.argsort([f"{'nested/' if k % 2 else ''}{k:03d}" for k in range(6)])  # the folder's sorted order
    from_folder = image_metrics(both, Location.of(str(tmp_path / "generated")), [prompts[k] for k in order])
    assert from_folder == pytest.approx(metrics)
    with pytest.raises(ValueError, match="needs the images' prompts"):
        image_metrics(both, images)
    gone = ImageMetricsConf(fid_reference=str(tmp_path / "nowhere"), fid_weights=inception)
    with pytest.raises(FileNotFoundError, match=r"image_metrics\.fid_reference=.*no such folder"):
        image_metrics(gone, images)


@pytest.mark.parametrize(("fields", "message"), [
    ({"fid_reference": "/ref"}, "image_metrics.fid_reference needs image_metrics.fid_weights=<the TorchScript"),
    ({"fid_weights": "/inception.pt"}, "image_metrics.fid_weights is set without image_metrics.fid_reference"),
    ({"clip_model": ""}, "image_metrics.clip_model must be a path or null"),
    ({"batch_size": 0}, "image_metrics.batch_size must be >= 1"),
])
def test_bad_image_metric_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        ImageMetricsConf(**fields)


def test_the_evaluate_command_line_takes_the_image_metrics_section():
    base = ["images=/images", "out=/out"]
    assert not runtime.compose("evaluate", base).image_metrics.enabled  # off by default: GenEval alone
    cfg = runtime.compose("evaluate", [*base, "image_metrics.clip_model=openai/clip-vit-large-patch14"])
    assert cfg.image_metrics.clip_model == "openai/clip-vit-large-patch14" and cfg.image_metrics.enabled
    for bad, named in (("image_metrics.fid_reference=/ref", "fid_weights"), ("image_metrics.device=tpu", "cuda")):
        with pytest.raises(Exception) as error:
            runtime.compose("evaluate", [*base, bad])
        assert runtime.is_user_error(error.value) and named in runtime.one_line(error.value)


def test_the_evaluation_report_gains_clip_score_and_fid_beside_geneval(clip, inception, tmp_path):
    images, prompts = shapes(6, seed=9)
    reference, _ = shapes(6, seed=10)
    write_folder(tmp_path / "images", images, prompts)
    write_folder(tmp_path / "reference", reference)
    folder, out = Location.of(str(tmp_path / "images")), Location.of(str(tmp_path / "out"))
    items = driver.list_items(folder)
    results = driver.score_items(items, folder)  # GenEval's scoring, here without Ray
    metrics_conf = ImageMetricsConf(clip_model=clip, fid_reference=str(tmp_path / "reference"), fid_weights=inception)
    cfg = EvaluateConf(images=folder.uri, out=out.uri, image_metrics=metrics_conf)
    metrics = driver.real_image_metrics(cfg, items, folder)
    summary = driver.write_report(results, out, None, metrics)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    assert summary.keys() >= {"overall", "tasks", "clip_score", "fid"} and summary["images"] == 6
    assert summary["fid"] == pytest.approx(fid([driver.read_image(folder, i.path) for i in items], reference,
                                               inception))
    plain = EvaluateConf(images=folder.uri, out=out.uri)
    assert driver.real_image_metrics(plain, items, folder) == {}
    assert driver.write_report(results, out, None).keys() == summary.keys() - {"clip_score", "fid"}


class GridTrainer:
    """What `Validator` asks of the trainer, with fixed answers: a loss per timestep and a grid's latents."""

    def __init__(self, latents: torch.Tensor, captions: list[str]) -> None:
        self.latents, self.captions = latents, captions

    def validate(self, groups, shuffle_text: bool = False) -> torch.Tensor:
        return torch.full((8,), 0.6 if shuffle_text else 0.5)

    def samples(self, group):
        return self.latents, self.captions


class Log:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name


def test_validation_logs_the_grids_clip_score_and_fid(clip, inception, tmp_path):
    """`validation.image_metrics`: rank 0's record gains the CLIP score of the grid's samples against their
    captions (each caption once per sample) and their FID against the reference folder."""
    from conf.train import ValidationConf
    from workloads.evaluate.inline import to_uint8
    from workloads.train.validation import Validator

    reference = tmp_path / "reference"
    reference.mkdir()
    for i, image in enumerate(shapes(6, seed=2)[0]):
        Image.fromarray(image).save(reference / f"{i}.png")
    cfg = ValidationConf(every=5, grid_per_prompt=2, image_metrics=ImageMetricsConf(
        clip_model=clip, fid_reference=str(reference), fid_weights=inception))
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # no VAE: the latent preview
    captions = ["a red circle", "two blue squares"]
    validator = Validator(GridTrainer(latents, captions), [None], cfg, None, Log(tmp_path / "run"))
    assert validator.maybe_run(3, final=False) == {}
    record = validator.maybe_run(5, final=False)
    assert record["val_loss"] == 0.5 and (tmp_path / "run" / "samples" / "step_00000005.png").exists()
    assert record["val_loss_shuffled_text"] == pytest.approx(0.6) and record["text_gap"] == pytest.approx(0.2)
    images = list(to_uint8(validator.decoded()(latents)))
    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    assert record["clip_score"] == pytest.approx(clip_score(images, prompts, clip))
    assert record["fid"] == pytest.approx(fid(images, shapes(6, seed=2)[0], inception), rel=1e-4)
