"""Hydra schema of `python -m workloads.evaluate`: GenEval-shapes scores of a folder of images, or of a trained
network's samples of a prompt set, and optionally their CLIP score and FID (`image_metrics`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from conf.checks import Device, Sampler, SkipLayerFields, at_least, guidance_interval, positive

INCEPTION = "inception-2015-12-05.pt"  # the FID network's file: TensorFlow's FID Inception, as TorchScript


@dataclass
class ImageMetricsConf:
    """CLIP score and FID of the evaluated images (torchmetrics), for networks trained on real data. Their models come
    from local files (or s3:// for FID): nothing is downloaded during a run."""

    SECTION = "image_metrics"
    # CLIP score with this CLIP: a folder saved with `save_pretrained` (CLIPModel + CLIPProcessor) or a hub id already
    # in the local Hugging Face cache (production: openai/clip-vit-large-patch14). None: no CLIP score.
    clip_model: str | None = None
    # FID against this folder (local or s3://) of reference images (.png, .jpg, .jpeg, .webp, any size). None: no FID.
    fid_reference: str | None = None
    # The FID network, needed with fid_reference: a TorchScript Inception file (local or s3://), NVIDIA's
    # inception-2015-12-05.pt (StyleGAN2-ADA's and clean-fid's), pool features (2048) of images resized inside to 299.
    fid_weights: str | None = None
    batch_size: int = 32  # images per forward pass
    device: Device = Device.auto  # auto: the driver's GPU if it has one

    def __post_init__(self) -> None:
        for name in ("clip_model", "fid_reference", "fid_weights"):
            if getattr(self, name) == "":
                raise ValueError(f"image_metrics.{name} must be a path or null, got an empty string")
        if self.fid_reference is not None and self.fid_weights is None:
            raise ValueError(f"image_metrics.fid_reference needs image_metrics.fid_weights=<the TorchScript Inception "
                             f"file, {INCEPTION}>: nothing is downloaded during a run")
        if self.fid_weights is not None and self.fid_reference is None:
            raise ValueError("image_metrics.fid_weights is set without image_metrics.fid_reference (the folder of "
                             "reference images FID compares with)")
        at_least(self, 1, "batch_size")

    @property
    def enabled(self) -> bool:
        return self.clip_model is not None or self.fid_reference is not None


@dataclass
class EvaluateConf(SkipLayerFields):
    SECTION = "evaluate"
    # Score a folder (local or s3://) of images with their prompts beside them: `<key>.png` + `<key>.txt` (a
    # make_shapes `folder/` output scores its own ground truth), or GenEval's layout `<index>/metadata.jsonl` +
    # `<index>/samples/*.png`.
    images: str | None = None
    # Or sample a prompt set with a trained network first: a run folder (its `export/`, the EMA weights) or a
    # diffusers SD3 transformer folder.
    run: str | None = None
    out: str = MISSING  # the report folder (local or s3://): results.jsonl, summary.json, grid.png (+ images/)
    # With run=: the SD3-layout folder of the text encoders and VAE the network's data was preprocessed with
    # (`models.sd3_repo` in the dataset manifest; `data=` reads it from there).
    models: str | None = None
    data: str | None = None
    prompts: str | None = None  # GenEval metadata JSONL; None: the shapes prompt set of `prompt_seed`
    prompt_seed: int = 0
    prompts_per_task: int | None = None  # None: GenEval's counts (553 prompts); else this many of each task
    images_per_prompt: int = 4
    resolution: int = 64
    steps: int = 28
    guidance: float = 4.0
    guidance_below: float = 1.0  # CFG only at t <= this (a guidance interval); 1: at every step
    shift: float = 1.0
    sampler: Sampler = Sampler.euler
    seed: int = 0
    batch_size: int = 64  # images per Ray Data batch (sampling, scoring)
    grid_images: int = 48  # images shown in grid.png, each marked correct or not
    endpoint_url: str | None = None
    # CLIP score and FID of the same images, written into summary.json as clip_score and fid; off by default
    image_metrics: ImageMetricsConf = field(default_factory=ImageMetricsConf)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.run is None):
            raise ValueError("evaluate takes one of images=<folder> (score it) or run=<run or export> (sample, "
                             "then score)")
        if self.run is not None and self.models is None and self.data is None:
            raise ValueError("run= needs models=<SD3-layout folder of the text encoders and VAE> or data=<the "
                             "preprocessed dataset the run trained on>")
        at_least(self, 1, "batch_size", "images_per_prompt", "steps", "resolution")
        at_least(self, 0, "grid_images", "guidance")
        positive(self, "shift")
        guidance_interval(self)
        at_least(self, 1, "prompts_per_task", optional=True)
        if self.resolution % 8:
            raise ValueError(f"evaluate.resolution must be a multiple of 8, got {self.resolution}")
        self.check_skip_layer_fields()


ConfigStore.instance().store(name="evaluate", node=EvaluateConf)
