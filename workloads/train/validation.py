"""Validation during training: a fixed validation set (read once by the driver), the fixed-timestep loss of
`model.objective` split over the ranks, and a PNG grid of CFG samples for fixed validation captions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from conf.train import ValidationConf
from model.conditioning import TextConditioningConfig
from model.objective import DEFAULT_VALIDATION_TIMESTEPS, validation_loss, validation_timesteps
from model.sampling import SkipLayerGuidance, sample
from pipelines import schema
from pipelines.encoders import downsample, vae_forward
from pipelines.geneval.scoring import summarize
from pipelines.storage import Location
from workloads.evaluate.image_metrics import image_metrics
from workloads.evaluate.inline import PromptSet, metric_fields, score_images, to_uint8
from workloads.plots import latents_to_rgb, sample_grid
from workloads.runtime import logger
from workloads.train.data import TENSOR_COLUMNS, choose_captions, to_model_inputs
from workloads.train.holdout import held_out

LOG = logger("train")


@dataclass
class ValGroup:
    """Validation rows of one bucket: tensor columns as numpy arrays, captions, and ids that key the fixed noise."""

    bucket: str
    columns: dict[str, np.ndarray]
    captions: list[str]
    ids: np.ndarray  # (n,) int64, unique over the whole validation set

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self, rows: np.ndarray | slice, columns: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The rows' tensor columns (`columns`, or all)."""
        names = self.columns if columns is None else columns
        return {c: torch.from_numpy(np.ascontiguousarray(self.columns[c][rows])) for c in names}


def read_val_set(data: Location, files: dict[str, list[str]], samples: int, world_size: int,
                 holdout: float = 0.0) -> list[ValGroup]:
    """Up to `samples` rows shared evenly over the buckets, each bucket's count a multiple of `world_size` (every
    rank then runs the same number of forward passes, which ZeRO-3 needs); with a `holdout` (`Split.holdout`), only
    the rows `held_out` picks. Files in name order, rows in file order: the same set in every run."""
    quota = samples // max(1, len(files))
    read_columns = [*TENSOR_COLUMNS, schema.CAPTION, *([schema.ID] if holdout else [])]
    groups, next_id = [], 0
    for bucket, paths in sorted(files.items()):
        tables, rows = [], 0
        for path in sorted(paths):
            table = pq.read_table(pa.BufferReader(data.fs.cat_file(path)), columns=read_columns)
            if holdout:
                table = table.filter(pa.array(held_out(table.column(schema.ID).to_pylist(), holdout)))
            tables.append(table)
            rows += table.num_rows
            if rows >= quota:
                break
        n = (min(rows, quota) // world_size) * world_size
        if n == 0:
            continue
        table = pa.concat_tables(tables).slice(0, n)
        columns = {c: table.column(c).combine_chunks().to_numpy_ndarray() for c in TENSOR_COLUMNS}
        captions = [c or "" for c in table.column(schema.CAPTION).to_pylist()]
        groups.append(ValGroup(bucket, columns, captions, np.arange(next_id, next_id + n)))
        next_id += n
    if not groups:
        where = ("the rows held out by loader.val_fraction are" if holdout
                 else f"{sum(len(p) for p in files.values())} validation files give")
        raise ValueError(f"no validation rows: {where} fewer than {world_size} rows per bucket "
                         f"(validation.samples={samples}, trainer.num_workers={world_size})")
    return groups


@torch.no_grad()
def distributed_val_loss(network, groups: list[ValGroup], text: TextConditioningConfig, formulation: str,
                         batch_size: int, seed: int, device: torch.device, dtype: torch.dtype,
                         shuffle_text: bool = False) -> torch.Tensor:
    """Mean validation loss per timestep over every rank's share of the set: (n_timesteps,), same on all ranks.

    `shuffle_text`: each row is conditioned on the text of the row before it in its group (the same noise and
    timesteps), so the difference to the unshuffled loss says how much the network reads its prompt."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sums = torch.zeros(DEFAULT_VALIDATION_TIMESTEPS + 1, dtype=torch.float64, device=device)  # last: count
    for group in groups:
        mine = np.arange(rank, len(group), world)
        text_of = np.roll(np.arange(len(group)), 1)  # with shuffle_text: row i reads row i-1's text
        text_columns = [c for c in group.columns if c != schema.LATENT]
        for start in range(0, len(mine), batch_size):
            rows = mine[start:start + batch_size]
            batch = group.tensors(rows)
            if shuffle_text:
                batch |= group.tensors(text_of[rows], text_columns)
            batch = {k: v.to(device) for k, v in batch.items()}
            x0, context, pooled = to_model_inputs(choose_captions(batch, False), text, drop_prob=0.0, dtype=dtype)
            losses = validation_loss(network, x0, context, pooled, torch.from_numpy(group.ids[rows]),
                                     formulation=formulation, seed=seed)  # (B, n_t)
            sums[:-1] += losses.sum(dim=0).double()
            sums[-1] += len(rows)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[:-1] / sums[-1]).float().cpu()


@torch.no_grad()
def sample_latents(network, group: ValGroup, text: TextConditioningConfig, prompts: int, per_prompt: int,
                   steps: int, guidance: float, shift: float, method: str, formulation: str, seed: int,
                   device: torch.device, dtype: torch.dtype,
                   slg: SkipLayerGuidance | None = None,
                   guidance_below: float = 1.0) -> tuple[torch.Tensor, list[str]]:
    """CFG samples (with skip-layer guidance `slg` if set, CFG only at t <= `guidance_below`) for the group's first
    `prompts` captions, `per_prompt` fixed noises each: (P * n, C, h, w)."""
    rows = np.repeat(np.arange(min(prompts, len(group))), per_prompt)
    batch = {k: v.to(device) for k, v in group.tensors(rows).items()}
    _, context, pooled = to_model_inputs(choose_captions(batch, False), text, drop_prob=0.0, dtype=dtype)
    shape = tuple(batch[schema.LATENT].shape[1:])
    noise = torch.randn((len(rows), *shape), generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    latents = sample(network, noise, context, pooled, steps=steps, guidance=guidance, shift=shift, method=method,
                     formulation=formulation, slg=slg, guidance_below=guidance_below)
    return latents.float().cpu(), [group.captions[i] for i in range(min(prompts, len(group)))]


class LatentDecoder:
    """Latents to RGB with the dataset's VAE (`(z / scale) + shift`, then decode); without a loadable VAE, a
    preview of the first three latent channels."""

    def __init__(self, repo: str | None) -> None:
        self.repo, self.vae, self.note = repo, None, None
        if repo is None:
            self.note = "no VAE recorded in the dataset manifest"
            return
        try:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(repo, subfolder="vae").eval()
        except Exception as error:  # any loading failure falls back to the preview
            self.note = f"VAE {repo!r} not loadable ({type(error).__name__}: {error})"
        if self.note:
            LOG.info(f"sample grids show latent channels 0-2: {self.note}")

    def for_scoring(self, what: str) -> torch.nn.Module:
        """The VAE, for decoding images that are scored (GenEval, pairs): a latent preview is no image to score, so
        without a loadable VAE this raises, naming `what` needs it and why there is none."""
        if self.vae is None:
            raise ValueError(f"{what} scores decoded images and needs the data's VAE: {self.note}")
        return self.vae

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, H, W, 3) in [0, 1]."""
        if self.vae is None:
            return latents_to_rgb(latents)
        height, width = (side * downsample(self.vae) for side in latents.shape[2:])
        return vae_forward(self.vae, self._decode, latents, height, width)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        z = latents / config.scaling_factor + (config.shift_factor or 0.0)
        images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def write_grid(decoder: LatentDecoder, latents: torch.Tensor, captions: list[str], path: Path) -> None:
    write_images(decoder(latents), captions, path)


def write_images(images: torch.Tensor, captions: list[str], path: Path) -> None:
    """Decoded (B, H, W, 3) images in [0, 1] as a grid PNG, a row per caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(images, [c[:40] for c in captions], path)


def geneval_results(step: int) -> str:
    """Where in the run folder the per-image GenEval-shapes results of `step` go (as the evaluation job's
    results.jsonl)."""
    return f"geneval/step_{step:08d}.jsonl"


class Validator:
    """EMA validation every `validation.every` steps and at the end: the fixed-timestep loss (overall and per
    timestep; every rank takes part) and, on rank 0, a sample grid PNG in the run folder. With a GenEval prompt
    set, every `validation.geneval_every` steps and at the end also GenEval on shapes: every rank samples its share,
    rank 0 decodes, scores and records `geneval` and `geneval_<task>`."""

    def __init__(self, trainer, groups: list[ValGroup], cfg: ValidationConf, vae: str | None, log,
                 geneval: PromptSet | object | None = None) -> None:
        self.trainer, self.groups, self.cfg, self.vae, self.log = trainer, groups, cfg, vae, log
        self.geneval = geneval if cfg.geneval_every else None  # a PromptSet, or the ObjectRef of its encoding
        self.decoder: LatentDecoder | None = None

    def maybe_run(self, step: int, final: bool) -> dict:
        """The validation fields of this step's record, or {} when nothing is due."""
        record = {}
        if step % self.cfg.every == 0 or final:
            record |= self.loss_and_grid(step)
        if self.geneval is not None and (step % self.cfg.geneval_every == 0 or final):
            record |= self.geneval_fields(step)
        return record

    def loss_and_grid(self, step: int) -> dict:
        per_t = self.trainer.validate(self.groups)
        record = {"val_loss": float(per_t.mean())}
        if self.cfg.text_gap:
            shuffled = float(self.trainer.validate(self.groups, shuffle_text=True).mean())
            record |= {"val_loss_shuffled_text": shuffled, "text_gap": shuffled / record["val_loss"] - 1}
        timesteps = validation_timesteps(len(per_t)).tolist()
        record.update({f"val_loss_at_{t:.3f}": float(v) for t, v in zip(timesteps, per_t.tolist(), strict=True)})
        latents, captions = self.trainer.samples(self.groups[0])
        if self.log is not None:
            images = self.decoded()(latents)  # (P * n, H, W, 3)
            write_images(images, captions, self.log.path(f"samples/step_{step:08d}.png"))
            if self.cfg.image_metrics.enabled:
                per_prompt = len(images) // len(captions)
                record |= image_metrics(self.cfg.image_metrics, list(to_uint8(images)),
                                        [c for c in captions for _ in range(per_prompt)])
        return record

    def geneval_fields(self, step: int) -> dict:
        if not isinstance(self.geneval, PromptSet):  # Ray seam: the driver's encoding task, fetched when first due
            import ray

            self.geneval = ray.get(self.geneval)
        latent_shape = tuple(self.groups[0].columns[schema.LATENT].shape[1:])  # the training resolution
        latents = self.trainer.geneval_latents(self.geneval, latent_shape)
        if self.log is None:  # only rank 0 records
            return {}
        results = score_images(to_uint8(self.decoded()(latents)), self.geneval)
        lines = "".join(json.dumps(r) + "\n" for r in results)  # per image, as the evaluation job's results.jsonl
        self.log.path(geneval_results(step)).write_text(lines)
        return metric_fields(summarize(results))

    def decoded(self) -> LatentDecoder:
        self.decoder = self.decoder or LatentDecoder(self.vae)
        return self.decoder
