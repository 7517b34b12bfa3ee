"""Hydra schema of `python -m pipelines.dedup`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from conf.checks import EmbedderKind, InputFormat, at_least
from conf.preprocess import StageConf


@dataclass
class EmbedderConf:
    """The image embedding. `descriptor` needs no weights (a blurred, flip-symmetrised colour thumbnail: catches
    copies, re-encodes, resizes, flips and crops of a few percent); `torchscript` loads a copy-detection model by
    path, e.g. SSCD's `sscd_disc_mixup.torchscript.pt` (512-d; the user supplies the file, its licence is
    non-commercial)."""

    SECTION = "embedder"
    kind: EmbedderKind = EmbedderKind.descriptor
    path: str | None = None  # the TorchScript file (local path or s3://) for kind=torchscript
    image_size: int = 320  # torchscript: images squashed to image_size^2, ImageNet-normalised (SSCD's batched recipe)
    thumbnail: int = 16  # descriptor: side of the colour thumbnail (3 * thumbnail^2 dimensions)
    blur: float = 1.0  # descriptor: Gaussian sigma on the thumbnail, in thumbnail pixels (tolerance to shifts)
    flip_invariant: bool = True  # descriptor: an image and its mirror image embed alike
    stage: StageConf = field(default_factory=lambda: StageConf(batch_size=64))

    def __post_init__(self) -> None:
        at_least(self, 16, "image_size")
        at_least(self, 4, "thumbnail")
        at_least(self, 0, "blur")
        self.stage.check("embedder.stage")
        if self.kind == "torchscript" and not self.path:
            raise ValueError("embedder.kind=torchscript needs embedder.path= (a TorchScript file, e.g. SSCD's "
                             "sscd_disc_mixup.torchscript.pt)")


@dataclass
class DedupConf:
    """Embed every image, cluster the embeddings with faiss k-means, and range-search each cluster at `threshold`:
    every item within range of an earlier kept item (in input order) is its duplicate."""

    SECTION = "dedup"
    input: str = MISSING  # images: folder, WebDataset or Parquet, local or s3:// (what preprocessing reads)
    output: str = MISSING
    input_format: InputFormat = InputFormat.auto
    endpoint_url: str | None = None
    folder_shard_size: int = 256  # must match the preprocessing job's, which checks the shards against the manifest
    max_pixels: int = 40_000_000  # decompression-bomb limit, as in preprocessing
    embedder: EmbedderConf = field(default_factory=EmbedderConf)
    # faiss' squared L2 between L2-normalised embeddings (2 - 2 cos). None: the embedder's own (SSCD: the paper's
    # 0.5; descriptor: chosen by `workloads.bench.dedup`'s sweep on planted duplicates).
    threshold: float | None = None
    clusters: int = 16_000  # the paper's; scaled down to about points_per_cluster items per cluster for small inputs
    points_per_cluster: int = 64
    kmeans_sample: int = 1_000_000  # at most this many embeddings train the k-means (a seeded sample)
    kmeans_iters: int = 20
    clusters_per_task: int = 64  # clusters one range-search task handles
    task_num_cpus: float = 1.0  # the k-means, assignment and range-search Ray tasks
    decode_num_cpus: float = 0.5
    use_gpu: bool | None = None  # embedding actors on GPUs; None: whenever the cluster has GPUs when the job starts
    seed: int = 0

    def __post_init__(self) -> None:
        at_least(self, 1, "folder_shard_size", "max_pixels", "clusters", "points_per_cluster", "kmeans_sample",
                 "kmeans_iters", "clusters_per_task")
        at_least(self, 0, "seed")
        if self.threshold is not None and not 0 < self.threshold <= 4:
            raise ValueError(f"dedup.threshold is a squared L2 distance between unit vectors, in (0, 4]; got "
                             f"{self.threshold}")
        for name in ("task_num_cpus", "decode_num_cpus"):
            if getattr(self, name) <= 0:
                raise ValueError(f"dedup.{name} must be > 0, got {getattr(self, name)}")


def register() -> None:
    ConfigStore.instance().store(name="dedup", node=DedupConf)
