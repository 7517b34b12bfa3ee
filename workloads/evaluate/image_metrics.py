"""CLIP score and FID of generated images through torchmetrics (`CLIPScore`, `FrechetInceptionDistance`), for
networks trained on real data.

Both networks come from local files, never downloaded during a run: CLIP is a folder saved with `save_pretrained` or
a hub id already in the local Hugging Face cache (production: openai/clip-vit-large-patch14); the FID network is a
TorchScript Inception file (`conf.evaluate.INCEPTION`), handed to torchmetrics as its `feature` module. torchmetrics'
own Inception comes from torch-fidelity, which imports torchvision, whose builds are tied to one torch build each; the
TorchScript file needs neither. Tests load tiny random stand-ins (`pipelines.synthetic.tiny_models.build_tiny_clip`,
`build_tiny_inception`) through the same calls.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from conf.evaluate import INCEPTION, ImageMetricsConf
from model.precision import resolve_device
from pipelines.storage import Location
from pipelines.torchscript import load_torchscript

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_image(location: Location, path: str) -> np.ndarray:
    """The image at `path` (in `location`'s filesystem) as uint8 (H, W, 3)."""
    with location.fs.open(path, "rb") as f:
        return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))


class StoredImages(Sequence[np.ndarray]):
    """Image files read when indexed: a sequence to go through more than once without holding every image."""

    def __init__(self, location: Location, paths: Sequence[str]) -> None:
        self.location, self.paths = location, list(paths)

    @classmethod
    def under(cls, folder: Location, name: str = "images") -> StoredImages:
        """Every image file under `folder`, in sorted order; `name` is the config field the folder came from."""
        if not folder.fs.isdir(folder.root):
            raise FileNotFoundError(f"{name}={folder.uri}: no such folder")
        paths = [f for f in sorted(folder.fs.find(folder.root)) if f.lower().endswith(IMAGE_SUFFIXES)]
        if not paths:
            raise FileNotFoundError(f"{name}={folder.uri}: no images ({', '.join(IMAGE_SUFFIXES)}) under it")
        return cls(folder, paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return read_image(self.location, self.paths[index])


def batches(images: Iterable[np.ndarray], size: int) -> Iterator[torch.Tensor]:
    """Consecutive images of one shape as uint8 (B, 3, H, W) batches of at most `size` (a new one at each new shape)."""
    batch: list[np.ndarray] = []
    for index, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"images[{index}] must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        if batch and (len(batch) == size or image.shape != batch[0].shape):
            yield _channels_first(batch)
            batch = []
        batch.append(image)
    if batch:
        yield _channels_first(batch)


def _channels_first(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)


class ClipFeatures(nn.Module):
    """A `CLIPModel` whose `get_image_features` / `get_text_features` return the projected embeddings as tensors:
    transformers 5 wraps them in an output object, which torchmetrics 1.9's CLIPScore takes for a tensor
    (Lightning-AI/torchmetrics#3407, fixed after 1.9.0)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _embedding(self.clip.get_image_features(pixel_values=pixel_values))  # (B, D)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _embedding(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))  # (B, D)


def _embedding(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


def load_clip(model: str) -> tuple[ClipFeatures, object]:
    """The CLIP model and processor of `model` (a local folder or a hub id in the local cache), never downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip = CLIPModel.from_pretrained(model, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(model, local_files_only=True)
    except OSError:
        raise FileNotFoundError(f"image_metrics.clip_model={model}: no CLIP model and processor there (a folder saved "
                                "with save_pretrained, or a hub id already in the local Hugging Face cache; nothing "
                                "is downloaded during a run)") from None
    return ClipFeatures(clip.eval()), processor


def clip_score(images: Sequence[np.ndarray], prompts: Sequence[str], model: str, batch_size: int = 32,
               device: torch.device | str = "cpu") -> float:
    """The mean CLIP score of the (image, prompt) pairs: 100 x the cosine of their CLIP embeddings, the mean floored
    at 0 (torchmetrics' `CLIPScore`), in [0, 100]."""
    from torchmetrics.multimodal import CLIPScore

    if len(images) != len(prompts) or not images:
        raise ValueError(f"the CLIP score needs one prompt per image, at least one: got {len(images)} images and "
                         f"{len(prompts)} prompts")
    metric = CLIPScore(model_name_or_path=lambda: load_clip(model)).to(device)
    done = 0
    with torch.no_grad():
        for batch in batches(images, batch_size):
            metric.update(list(batch.to(device)), list(prompts[done:done + len(batch)]))
            done += len(batch)
    return float(metric.compute())


class InceptionFeatures(nn.Module):
    """The FID network of a TorchScript file with the published Inception's interface: uint8 (B, 3, H, W) images of
    any size, resized inside, to (B, F) pool features with `return_features=True`."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images, return_features=True)  # (B, F)


def load_inception(weights: Location | str) -> InceptionFeatures:
    """The FID network from its TorchScript file (local or s3://)."""
    return InceptionFeatures(load_torchscript(weights, "image_metrics.fid_weights", f"the TorchScript Inception, "
                                              f"{INCEPTION}"))


def fid(images: Iterable[np.ndarray], reference: Iterable[np.ndarray], weights: Location | str, batch_size: int = 32,
        device: torch.device | str = "cpu") -> float:
    """The Fréchet distance between the Inception features of `images` and of `reference` (torchmetrics'
    `FrechetInceptionDistance` with the network of `weights`); 0 for two identical sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=load_inception(weights)).to(device)
    counts = {True: 0, False: 0}
    with torch.no_grad():
        for real, source in ((True, reference), (False, images)):
            for batch in batches(source, batch_size):
                metric.update(batch.to(device), real=real)
                counts[real] += len(batch)
    if min(counts.values()) < 2:
        raise ValueError(f"FID needs at least 2 images of each set, got {counts[False]} generated and {counts[True]} "
                         "reference images")
    return float(metric.compute())


def image_metrics(cfg: ImageMetricsConf, images: Sequence[np.ndarray] | Location,
                  prompts: Sequence[str] | None = None, endpoint_url: str | None = None) -> dict[str, float]:
    """The configured metrics of `images` (uint8 (H, W, 3) arrays, or every image under a folder) and their prompts:
    `{"clip_score": ..., "fid": ...}`, a key for each metric `cfg` turns on."""
    images = StoredImages.under(images) if isinstance(images, Location) else images
    device = resolve_device(str(cfg.device))
    out: dict[str, float] = {}
    if cfg.clip_model is not None:
        if prompts is None:
            raise ValueError("image_metrics.clip_model is set: the CLIP score needs the images' prompts")
        out["clip_score"] = clip_score(images, prompts, cfg.clip_model, cfg.batch_size, device)
    if cfg.fid_reference is not None:
        folder = Location.of(cfg.fid_reference, endpoint_url)
        reference = StoredImages.under(folder, "image_metrics.fid_reference")
        weights = Location.of(str(cfg.fid_weights), endpoint_url)
        out["fid"] = fid(images, reference, weights, cfg.batch_size, device)
    return out
