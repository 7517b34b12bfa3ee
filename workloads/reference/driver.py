"""`python -m workloads.reference [storage=<dir or s3://...>] [ship_to=<dir>]`: the shapes reference model, made again.

The recipe (`conf.reference`) in three jobs the project already has: the shapes images (`make_shapes`), their latents
and text embeddings (`preprocess`, on the shipped shapes autoencoder of `latent_channels`), and one long training
run (`train`, resumable: the same command continues it from its latest checkpoint). With `ship_to=`, the run's EMA
export is written there in float16 beside a card (`reference.json`: the recipe, the step and training FLOPs it
holds, and its GenEval-shapes against training compute), which is how the repository's
`pipelines/synthetic/weights/shapes-reference` was made. It is a shapes reference model, not SD3.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from omegaconf import OmegaConf

from conf.checks import validate
from conf.preprocess import ComputeConf, ModelsConf, PreprocessConf, StageConf
from conf.reference import ReferenceConf, register
from conf.train import TrainConf
from pipelines.make_shapes import MakeShapesConf
from pipelines.storage import Location, join, require_bucket, write_bytes
from pipelines.synthetic.shapes_vae import shipped
from workloads.plots import plot_score_curve
from workloads.runtime import cli, ensure_ray, logger
from workloads.train import driver as train_job
from workloads.train.runlog import read_records

LOG = logger("reference")
CARD = "reference.json"
CURVE = "curve.png"  # GenEval-shapes and its credits against training FLOPs, beside the card
WEIGHTS = "diffusion_pytorch_model.safetensors"


def shapes_conf(cfg: ReferenceConf) -> MakeShapesConf:
    return MakeShapesConf(out=join(cfg.storage, "shapes"), n=cfg.images, seed=cfg.seed, size=cfg.image_size,
                          shard_size=cfg.shard_size, formats=["folder"], endpoint_url=cfg.endpoint_url)


def preprocess_conf(cfg: ReferenceConf) -> PreprocessConf:
    """The images encoded by the tiny text encoders and the shipped shapes autoencoder; fractional CPUs on a machine
    without GPUs so every stage fits beside the others on 2 cores."""
    gpu = cfg.train.trainer.use_gpu
    stage = StageConf() if gpu else StageConf(batch_size=32, num_cpus=0.5)
    return PreprocessConf(
        input=join(cfg.storage, "shapes", "folder"), output=join(cfg.storage, "data"), input_format="folder",
        endpoint_url=cfg.endpoint_url, resolution=cfg.resolution, folder_shard_size=cfg.shard_size,
        models=ModelsConf(kind="tiny", caption_max_new_tokens=8, latent_channels=cfg.latent_channels),
        compute=ComputeConf(use_gpu=gpu or None, decode_num_cpus=0.25, decode_batch_size=32, write_batch_size=32,
                            vae=stage, caption=stage, text=stage))


def train_conf(cfg: ReferenceConf) -> TrainConf:
    """The run: the recipe's training settings on the data under `storage`, its folder `<storage>/runs/<name>`."""
    c = copy.deepcopy(cfg.train)
    c.data, c.endpoint_url = join(cfg.storage, "data"), cfg.endpoint_url
    c.run.storage = join(cfg.storage, "runs")
    c.model.in_channels = cfg.latent_channels
    validate(c)
    return c


def check(cfg: ReferenceConf) -> None:
    """Everything that can be wrong before any work."""
    from pipelines.make_shapes import check as check_shapes

    validate(cfg)
    check_shapes(shapes_conf(cfg))
    train_job.check(train_conf(cfg))
    require_bucket(cfg.storage, "storage", cfg.endpoint_url)


def curve(run: Location, batch_size: int, flops_per_sample: float) -> list[dict]:
    """GenEval-shapes and its partial credits at every step the run scored, with the training FLOPs to that step."""
    rows = []
    for record in read_records(run):
        if "geneval" in record:
            rows.append({"step": record["step"], "train_flops": record["step"] * batch_size * flops_per_sample,
                         **{k: v for k, v in record.items() if k.startswith(("geneval", "credit_", "chance_"))}})
    return rows


def card(cfg: ReferenceConf, train: TrainConf, summary: dict) -> dict:
    """What the shipped folder holds and how it was made."""
    run = train_job.run_location(train)
    per_sample = summary["train_flops_per_sample"]
    return {
        "name": "shapes reference model (an MM-DiT trained on the shapes toy data; not SD3)",
        "command": " ".join(["python -m workloads.reference", *sys.argv[1:]]),  # as this process was started
        "recipe": OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True),
        "autoencoder": shipped(cfg.latent_channels).name,
        "resolution": cfg.resolution,
        "step": summary["step"],
        "train_flops": summary["step"] * train.trainer.batch_size * per_sample,
        "params": summary.get("params"),
        "geneval": summary.get("geneval"),
        "credits": {k: v for k, v in summary.items() if k.startswith(("credit_", "chance_"))},
        "curve": curve(run, train.trainer.batch_size, per_sample),
    }


def ship(cfg: ReferenceConf, train: TrainConf, summary: dict, to: str) -> Path:
    """The run's EMA export in float16 (`config.json`, the safetensors file), its card and the card's curve drawn
    (`curve.png`), each written whole into `to`."""
    import torch
    from safetensors.torch import load, save

    export = train_job.run_location(train)
    out = Path(to)
    local = LocalFileSystem()
    weights = {k: v.to(torch.float16) if v.is_floating_point() else v
               for k, v in load(export.read_bytes("export", WEIGHTS)).items()}
    write_bytes(local, str(out / WEIGHTS), save(weights))
    write_bytes(local, str(out / "config.json"), export.read_bytes("export", "config.json"))
    made = card(cfg, train, summary)
    write_bytes(local, str(out / CARD), (json.dumps(made, indent=1) + "\n").encode())
    if made["curve"]:  # the score against compute, drawn
        with tempfile.TemporaryDirectory() as scratch:
            plot_score_curve(made["curve"], Path(scratch) / CURVE)
            write_bytes(local, str(out / CURVE), (Path(scratch) / CURVE).read_bytes())
    LOG.info(f"shipped the EMA export of step {summary['step']} (float16) and its card to {out}")
    return out


def run(cfg: ReferenceConf) -> str:
    check(cfg)
    train = train_conf(cfg)
    t = train.trainer
    ensure_ray(min_cpus=t.num_workers * t.cpus_per_worker + 2)  # training workers plus room for Ray Data's readers
    from pipelines import make_shapes, preprocess
    from workloads.sweep.driver import finished

    make_shapes.run(shapes_conf(cfg))
    preprocess.run(preprocess_conf(cfg))
    summary = finished(train)
    if summary is None:
        train_job.run(train)
        summary = finished(train)
    where = join(train.run.storage, train.run.name)
    if summary is None:
        LOG.info(f"{where} stopped before step {t.max_steps}; the same command resumes it")
        return where
    if cfg.ship_to:
        ship(cfg, train, summary, cfg.ship_to)
    return where


register()


def main() -> None:
    cli("reference", run, doc=__doc__)


if __name__ == "__main__":
    main()
