"""The paper's deduplication math on faiss (appendix E): k-means centroids from a sample of the embeddings, each
embedding assigned to its nearest centroid, then within each cluster a range search at the threshold, where every
item within range of an earlier kept item is that item's duplicate. Pure numpy and faiss, no Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np


def has_gpu_faiss() -> bool:
    """Whether this faiss build can use GPUs (faiss-gpu), so k-means can take one."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def cluster_count(n: int, clusters: int, points_per_cluster: int) -> int:
    """The configured number of clusters, scaled down so each gets about `points_per_cluster` items."""
    return max(1, min(clusters, math.ceil(n / points_per_cluster)))


def train_centroids(x: np.ndarray, k: int, iters: int, seed: int, gpu: bool = False) -> np.ndarray:
    """faiss k-means on the rows of `x` (float32, unit length): (k, dim) centroids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    # faiss subsamples to 256 points per centroid by default: a seeded sample was drawn already
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, gpu=gpu, max_points_per_centroid=max(256, len(x)),
                          verbose=False)
    kmeans.train(x)
    return np.asarray(kmeans.centroids, dtype=np.float32)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid (exact search)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return nearest[:, 0].astype(np.int64)


@dataclass(frozen=True)
class Duplicates:
    """Within one cluster: `item[j]` duplicates the kept `of[j]` at squared distance `distance[j]` (positions in the
    cluster's item order)."""

    item: np.ndarray
    of: np.ndarray
    distance: np.ndarray


def find_duplicates(x: np.ndarray, threshold: float) -> Duplicates:
    """Rows of `x` (one cluster, in input order) within `threshold` (squared L2, strict) of an earlier kept row.

    Each kept row claims the later rows in its range that no earlier kept row claimed; a claimed row claims none,
    so a chain a~b~c with a and c apart keeps c.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    lims, distances, labels = index.range_search(x, threshold)
    of = np.full(len(x), -1, dtype=np.int64)
    dist = np.zeros(len(x), dtype=np.float32)
    for i in range(len(x)):
        if of[i] >= 0:
            continue  # a duplicate: its neighbours are judged by the kept item it duplicates
        hits, hit_d = labels[lims[i]:lims[i + 1]], distances[lims[i]:lims[i + 1]]
        later = (hits > i) & (of[hits] < 0)
        of[hits[later]] = i
        dist[hits[later]] = hit_d[later]
    item = np.flatnonzero(of >= 0)
    return Duplicates(item, of[item], np.maximum(dist[item], 0.0))
