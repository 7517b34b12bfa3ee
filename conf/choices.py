"""The choice lists the job configs offer, named once as plain tuples: `conf.checks` turns them into enums and the
components (`pipelines.sources`, `pipelines.dedup.embedders`) check their inputs against the same tuples.

No imports on purpose: composing a config must not load what a component needs to run (torch's models, OpenCV).
"""

from __future__ import annotations

IMAGE_FORMATS = ("folder", "webdataset", "parquet")  # input datasets of images with captions (what make_shapes writes)
FORMATS = (*IMAGE_FORMATS, "pairs")  # pairs: preference pairs in Pick-a-Pic v2's Parquet layout
# `models.synthetic_captions`: the captioner model writes each sample's synthetic caption, or the input brings it
SYNTHETIC_CAPTIONS = ("model", "input")
EMBEDDERS = ("descriptor", "torchscript")  # the deduplication job's image embeddings (`pipelines.dedup.embedders`)
