"""Hydra schema of `python -m pipelines.preprocess`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from conf.checks import Dtype, InputFormat, ModelsKind, SyntheticCaptions, at_least, positive
from conf.pretrained import CAPTIONER, SD3_REPO
from conf.shapes import AUTOENCODER_CHANNELS


@dataclass
class ModelsConf:
    """`models=tiny` builds small random models of the real classes offline; `models=sd3` loads pretrained ones.
    `synthetic_captions=input` takes each sample's synthetic caption from the input instead of the captioner (captions
    made offline, e.g. by a VLM as in the paper): `<key>.synthetic.txt` beside the image or in the tar, or a
    `caption_synthetic` Parquet column; a sample without one is rejected."""

    kind: ModelsKind = ModelsKind.tiny
    sd3_repo: str = SD3_REPO  # hub id or local folder with the diffusers SD3 layout
    captioner: str = CAPTIONER
    synthetic_captions: SyntheticCaptions = SyntheticCaptions.model
    tiny_dir: str = "~/.cache/sd3-train/tiny-models"  # where `tiny` builds its models
    dtype: Dtype = Dtype.auto  # auto: fp16 on GPU, fp32 on CPU
    caption_max_new_tokens: int = 40
    # models=tiny: the shipped shapes autoencoder's latent channels (`conf.shapes.AUTOENCODER_CHANNELS`)
    latent_channels: int = 16

    def __post_init__(self) -> None:
        if self.caption_max_new_tokens < 1:
            raise ValueError(f"models.caption_max_new_tokens must be >= 1, got {self.caption_max_new_tokens}")
        if self.latent_channels not in AUTOENCODER_CHANNELS:  # the shipped shapes autoencoders
            raise ValueError(f"models.latent_channels must be one of {list(AUTOENCODER_CHANNELS)}, got "
                             f"{self.latent_channels}")


@dataclass
class StageConf:
    """An autoscaling actor pool for one model stage."""

    batch_size: int = 16
    min_actors: int = 1
    max_actors: int = 1
    num_cpus: float = 0.5  # fractional so all stages fit on a 2-core laptop; raise on clusters
    torch_threads: int = 1
    # GPUs per actor when the job runs on GPUs; a fraction lets stages share one (e.g. 0.5 each for VAE and text)
    num_gpus: float = 1.0

    def check(self, section: str) -> None:
        """Raise naming `<section>.<field>`: the config that holds this stage calls it with its own path (the same
        schema is `compute.vae` in preprocessing and `embedder.stage` in deduplication)."""
        if not 1 <= self.min_actors <= self.max_actors or self.batch_size < 1:
            raise ValueError(f"{section}: need 1 <= min_actors <= max_actors and batch_size >= 1, got {self}")
        if self.num_gpus <= 0:
            raise ValueError(f"{section}.num_gpus must be > 0 (a fraction shares a GPU), got {self.num_gpus}")
        if not self.num_cpus > 0:
            raise ValueError(f"{section}.num_cpus must be > 0 (a fraction shares a core), got {self.num_cpus}")
        if self.torch_threads < 1:
            raise ValueError(f"{section}.torch_threads must be >= 1, got {self.torch_threads}")


@dataclass
class ComputeConf:
    SECTION = "compute"
    # One GPU per model actor. None: whenever the cluster has GPUs when the job starts; set true on autoscaling
    # clusters whose GPU group scales up from zero.
    use_gpu: bool | None = None
    decode_num_cpus: float = 0.5
    decode_batch_size: int = 32
    write_batch_size: int = 64
    vae: StageConf = field(default_factory=StageConf)
    caption: StageConf = field(default_factory=StageConf)
    text: StageConf = field(default_factory=StageConf)
    filters: StageConf = field(default_factory=StageConf)  # the score filters' models, when any is on

    def __post_init__(self) -> None:
        positive(self, "decode_num_cpus")
        at_least(self, 1, "decode_batch_size", "write_batch_size")
        for name in ("vae", "caption", "text", "filters"):
            getattr(self, name).check(f"compute.{name}")


@dataclass
class ScoreFilterConf:
    """A per-image score from a TorchScript model by path: (N, 3, size, size) RGB floats in [0, 1] -> (N,) scores
    (e.g. a CLIP-based aesthetic or NSFW predictor scripted with its own normalisation). Images scoring outside
    [min_score, max_score] are rejects of stage `filter`; kept ones carry the score as the column `score_<name>`."""

    model: str | None = None  # None: the filter is off
    min_score: float | None = None
    max_score: float | None = None
    size: int = 224


@dataclass
class FiltersConf:
    """Score filters, each off until given a model: `filters.aesthetic.model=<file> filters.aesthetic.min_score=5`
    (as LAION's aesthetic predictor is often cut), `filters.nsfw.model=<file> filters.nsfw.max_score=0.5`."""

    aesthetic: ScoreFilterConf = field(default_factory=ScoreFilterConf)
    nsfw: ScoreFilterConf = field(default_factory=ScoreFilterConf)

    def active(self) -> dict[str, ScoreFilterConf]:
        return {name: f for name, f in vars(self).items() if isinstance(f, ScoreFilterConf) and f.model}

    def __post_init__(self) -> None:
        for name, f in vars(self).items():
            if not isinstance(f, ScoreFilterConf):
                continue
            bounds = (f.min_score, f.max_score)
            if f.model and bounds == (None, None):
                raise ValueError(f"filters.{name}.model is set but neither min_score nor max_score: give a threshold")
            if not f.model and bounds != (None, None):
                raise ValueError(f"filters.{name} has a threshold but no model: set filters.{name}.model=<TorchScript "
                                 "file>")
            if None not in bounds and f.min_score > f.max_score:
                raise ValueError(f"filters.{name}: min_score {f.min_score} > max_score {f.max_score}")
            if f.size < 16:
                raise ValueError(f"filters.{name}.size must be >= 16, got {f.size}")


@dataclass
class PreprocessConf:
    # Hydra's defaults list: `models=tiny` (default) or `models=sd3` picks a group entry, then fields override.
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"models": "tiny"}])
    input: str = MISSING  # local path or s3:// URI
    output: str = MISSING
    input_format: InputFormat = InputFormat.auto
    endpoint_url: str | None = None  # S3-compatible stores; else AWS_ENDPOINT_URL(_S3) or AWS defaults
    models: ModelsConf = field(default_factory=ModelsConf)
    resolution: int = 256  # square target when no buckets are given
    buckets: list[str] = field(default_factory=list)  # e.g. ["256x256", "320x192", "192x320"] (width x height)
    max_pixels: int = 40_000_000  # decompression-bomb limit, checked before decoding
    min_side: int = 32  # smaller images are rejected
    max_aspect: float = 4.0  # more elongated images are rejected
    max_caption_chars: int = 2000  # longer captions are cut (the encoders see 77 tokens anyway)
    folder_shard_size: int = 256  # images per shard for image-folder inputs
    # A `pipelines.dedup` output made from this input: its duplicates become rejects of stage `dedup`.
    dedup: str | None = None
    filters: FiltersConf = field(default_factory=FiltersConf)  # aesthetic and NSFW scores; none is on by default
    compute: ComputeConf = field(default_factory=ComputeConf)

    def __post_init__(self) -> None:
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"resolution must be a positive multiple of 16, got {self.resolution}")
        for name in ("max_pixels", "min_side", "max_caption_chars", "folder_shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.input_format == "pairs" and self.models.synthetic_captions == "input":
            raise ValueError("models.synthetic_captions=input does not apply to input_format=pairs (a pair's synthetic "
                             "caption is its prompt): leave it at model")


def register() -> None:
    store = ConfigStore.instance()
    store.store(group="models", name="tiny", node=ModelsConf(kind="tiny"))
    store.store(group="models", name="sd3", node=ModelsConf(kind="sd3"))
    store.store(name="preprocess", node=PreprocessConf)
