"""Every job of the project, once: the name `cluster.submit` takes, the module `python -m` runs, the Hydra config the
module composes, where that config is registered, and one line on what the job does.

`cluster.submit`, the README's job table (`tests/unit/test_docs.py`) and the cluster-definition tests read this
table. It imports nothing of the project, so any layer may read it; `register` is a name, imported only by those
that compose a job's config (`cluster.submit`, the tests).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str
    module: str  # run as `python -m <module>`
    config: str  # the config name the module's `cli(...)` composes
    register: str  # "module:function" that stores `config` in Hydra's ConfigStore, or a module whose import does
    description: str  # one line: the README's "what it does"

    @property
    def line(self) -> str:
        """The job as one line of a listing."""
        return f"{self.name:<17}{self.module:<32}{self.description}"


JOBS: dict[str, Job] = {job.name: job for job in (
    Job("make_shapes", "pipelines.make_shapes", "make_shapes", "pipelines.make_shapes",
        "the shapes dataset (images, captions, ground truth)"),
    Job("dedup", "pipelines.dedup", "dedup", "conf.dedup:register",
        "near-duplicate images: embeddings, faiss k-means, range search"),
    Job("preprocess", "pipelines.preprocess", "preprocess", "conf.preprocess:register",
        "Ray Data: decode, filter, caption, VAE latents, text embeddings to Parquet"),
    Job("shapes_vae", "pipelines.synthetic.shapes_vae", "shapes_vae", "pipelines.synthetic.shapes_vae",
        "trains the shapes autoencoder `models=tiny` ships"),
    Job("train", "workloads.train", "train", "conf.train:register",
        "Ray Train + DeepSpeed ZeRO: EMA, validation, checkpoints, export; LoRA, DPO"),
    Job("sweep", "workloads.sweep", "sweep", "conf.sweep:register",
        "Ray Tune studies: depth scaling, shift, formulations, sampling steps; the recipe study (ASHA)"),
    Job("evaluate", "workloads.evaluate", "evaluate", "conf.evaluate",
        "GenEval-shapes and its partial credits of images or of a run's samples; CLIP score, FID"),
    Job("make_pairs", "workloads.make_pairs", "make_pairs", "conf.pairs:register",
        "preference pairs of a run's samples, judged by GenEval-shapes"),
    Job("demo", "workloads.demo", "demo", "conf.demo:register", "all of the above on the shapes data"),
    Job("reference", "workloads.reference", "reference", "conf.reference:register",
        "the shapes reference model: its data and long run, resumable; ships its EMA export"),
    Job("reproduce", "workloads.reproduce", "reproduce", "conf.reproduce:register",
        "the paper's studies on the shapes data, with verdicts"),
    Job("bench_train", "workloads.bench.train", "bench_train", "conf.bench:register_train",
        "streaming-input overhead and ZeRO state per rank"),
    Job("bench_model", "workloads.bench.model", "bench_model", "conf.bench:register",
        "MM-DiT step time against diffusers'"),
    Job("bench_compile", "workloads.bench.compile", "bench_compile", "conf.bench:register_compile",
        "per-block `torch.compile` against eager, per bucket"),
    Job("bench_preprocess", "workloads.bench.preprocess", "bench_preprocess", "workloads.bench.preprocess",
        "preprocessing job against a plain loop"),
    Job("bench_vae", "workloads.bench.vae", "bench_vae", "workloads.bench.vae",
        "split VAE forwards against one batch"),
    Job("bench_dedup", "workloads.bench.dedup", "bench_dedup", "workloads.bench.dedup",
        "deduplication quality and speed on planted copies"),
)}
