"""Training checkpoints: one folder per checkpoint under the run folder, written by every rank and reported
through Ray Train (which merges the ranks' files), and the choice of the latest *complete* one on resume.

A checkpoint folder holds DeepSpeed's state of every rank (tag `ds`), the EMA shards, each rank's RNG states,
`train_state.json` (step, data position, world size) and one `complete_rank{r}.json` per rank, written last,
listing that rank's files and sizes. A folder missing any rank's list, or any listed file, or with a file of the
wrong size, was only partly written and is never resumed from.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from pipelines.storage import DiskFull, Location, folder_bytes, free_bytes, is_disk_full, join
from workloads.runtime import logger

LOG = logger("train")

DS_TAG = "ds"
STATE_FILE = "train_state.json"
PREFIX = "checkpoint_step="
_STEP = re.compile(rf"{re.escape(PREFIX)}(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    epoch: int = 0
    offset: int = 0  # batches of `epoch` already consumed
    skipped: int = 0  # non-finite steps skipped so far
    nonfinite_run: int = 0  # consecutive non-finite steps at the moment of saving
    world_size: int = 1
    zero_stage: int = 0
    parametrization: str | None = None  # MMDiTConfig.parametrization_label(); None: written before it was kept


def dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_name(rank: int) -> str:
    return f"complete_rank{rank}.json"


def ema_name(rank: int) -> str:
    return f"ema_rank{rank}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_files(folder: Path, rank: int, state: TrainState, ema: dict | None) -> None:
    """After DeepSpeed's `save_checkpoint` into `folder`: this rank's EMA (if it holds one), RNG, the train state
    (rank 0) and, last, this rank's completeness list. `folder` holds only this rank's files (its own temp dir)."""
    if ema is not None:
        torch.save(ema, folder / ema_name(rank))
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / complete_name(rank)).write_text(json.dumps(files))


def is_complete(fs, folder: str) -> bool:
    """True when every rank's list is there and every listed file exists with its size."""
    try:
        state = json.loads(fs.cat_file(join(folder, STATE_FILE)))
        sizes = {}
        for rank in range(int(state["world_size"])):
            sizes.update(json.loads(fs.cat_file(join(folder, complete_name(rank)))))
        prefix = folder.rstrip("/") + "/"
        found = {p[len(prefix):]: info["size"] for p, info in fs.find(folder, detail=True).items()
                 if p.startswith(prefix)}
    except (FileNotFoundError, KeyError, ValueError):
        return False
    return all(found.get(name) == size for name, size in sizes.items())


def find_latest(run: Location | str) -> Location | None:
    """The newest complete checkpoint folder of the run folder, or None."""
    run = Location.of(run).refreshed()
    if not run.exists():
        return None
    steps = []
    for entry in run.fs.ls(run.root, detail=False):
        match = _STEP.search(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            steps.append((int(match.group(1)), entry.rstrip("/")))
    for step, folder in sorted(steps, reverse=True):
        if is_complete(run.fs, folder):
            return run.child(dir_name(step))
        LOG.info(f"skipping incomplete checkpoint {folder}")
    return None


def fetch(checkpoint: Location, local: Path) -> Path:
    """A local folder with the checkpoint's files: the folder itself when local, else a download into `local`."""
    if isinstance(checkpoint.fs, LocalFileSystem):
        return Path(checkpoint.root)
    checkpoint.fs.get(checkpoint.root.rstrip("/") + "/", str(local) + "/", recursive=True)
    return local


def read_state(folder: Path) -> TrainState:
    return TrainState(**json.loads((folder / STATE_FILE).read_text()))


def full_ema(folder: Path) -> tuple[list[str], list[torch.Tensor]]:
    """The full EMA tensors of a checkpoint (parameter names, fp32 tensors), from the shards of every rank."""
    state = read_state(folder)
    first = torch.load(folder / ema_name(0), weights_only=False)
    if state.zero_stage != 3:
        return first["names"], first["shadow"]
    ranks = [first] + [torch.load(folder / ema_name(r), weights_only=False) for r in range(1, state.world_size)]
    tensors = []
    for i, (numel, shape) in enumerate(zip(first["numel"], first["shapes"], strict=True)):
        tensors.append(torch.cat([r["shadow"][i] for r in ranks])[:numel].view(shape))
    return first["names"], tensors


class Checkpointer:
    """Saves a checkpoint every `checkpoint.every` steps and, with `at_end`, at the last (or when asked, `save`):
    every rank writes its part into a local folder and copies it into `<run>/checkpoint_step=N/`, its completeness
    list last; once every rank's copy is there, `ray.train.report` registers the folder with Ray Train (a barrier:
    all ranks call it). A full disk on any rank removes the half-written folder and raises `DiskFull` on every rank,
    with the bytes the checkpoint needs and the bytes free."""

    def __init__(self, trainer, every: int, log, at_end: bool = True, run: Location | None = None) -> None:
        self.trainer, self.every, self.log, self.at_end, self.run = trainer, every, log, at_end, run
        self.last_bytes: int | None = None  # the last checkpoint's size over all ranks
        self.last_step: int | None = None  # the step of the last checkpoint this session wrote

    def maybe_save(self, state: TrainState, final: bool, metrics: dict) -> bool:
        if state.step % self.every and not (final and self.at_end):
            return False
        self.save(state, metrics)
        return True

    def save(self, state: TrainState, metrics: dict) -> None:
        import tempfile

        import ray.train
        import torch.distributed as dist

        target = self.run.child(dir_name(state.step))
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            error: BaseException | None = None
            try:
                self.trainer.save(Path(tmp), state)
            except Exception as caught:
                error = disk_full_or_raise(caught, tmp)
            # on the trainer's device: a GPU job's process group is NCCL only, which refuses CPU tensors
            sizes = torch.tensor([folder_bytes(tmp), float(error is not None)], dtype=torch.float64,
                                 device=self.trainer.device)
            dist.all_reduce(sizes)
            self.last_bytes = int(sizes[0].item())
            if not sizes[1].item():
                try:
                    upload(Path(tmp), target)
                except Exception as caught:
                    error = disk_full_or_raise(caught, target.uri)
            failed = torch.tensor([float(error is not None)], device=self.trainer.device)
            dist.all_reduce(failed)  # also: every rank's copy is complete before rank 0 looks at the folder
            if failed.item():
                self.give_up(target, state.step, error)
            if self.log is not None:
                self.log.sync()
                LOG.info(f"checkpoint {state.step}: {self.last_bytes / 2**20:.1f} MiB over all ranks")
            report = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | None)}
            storage = ray.train.get_context().get_storage()
            # Ray seam: the ranks copied their files themselves (above), so Ray Train only registers the folder
            checkpoint = ray.train.Checkpoint(path=f"{storage.experiment_fs_path}/{dir_name(state.step)}",
                                              filesystem=storage.storage_filesystem)
            ray.train.report(report, checkpoint=checkpoint if self.log is not None else None,
                             checkpoint_dir_name=dir_name(state.step),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        self.last_step = state.step

    def give_up(self, target: Location, step: int, error: BaseException | None) -> None:
        """A rank found no room: rank 0 removes the half-written folder, and every rank raises the first message."""
        import torch.distributed as dist

        if self.log is not None and target.refreshed().exists():
            target.fs.rm(target.root, recursive=True)
        mine = None
        if isinstance(error, DiskFull):  # the run folder (all ranks' bytes), or this rank's local temporary folder
            needed = self.last_bytes if error.path == target.uri else error.needed
            mine = str(DiskFull(error.path, needed, free_bytes(error.path), resume_hint(self.run, step), error.reason))
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, mine)
        raise CheckpointDiskFull(next(m for m in messages if m is not None))


class CheckpointDiskFull(RuntimeError):
    """Every rank's error when a checkpoint found no room: the one-line message of the rank that hit it."""


def resume_hint(run: Location, step: int) -> str:
    latest = find_latest(run)
    where = f"from {latest.uri}" if latest is not None else "from the start (no complete checkpoint yet)"
    return f"free space, then run the same command: it resumes {where}; checkpoint {step} was not kept"


def disk_full_or_raise(error: BaseException, path: str) -> DiskFull:
    """A write error that is a full disk, as a DiskFull naming `path`; any other error is raised again."""
    if not is_disk_full(error):
        raise error
    return DiskFull.of(error, path, None)


def upload(local: Path, target: Location) -> None:
    """This rank's checkpoint files into the run's checkpoint folder, its completeness list last (so a copy cut short
    is never taken for a complete one). Ranks write different names into the same folder."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name.startswith("complete_rank"))
    for path in files:
        relative = path.relative_to(local).as_posix()
        destination = target.path(relative)
        target.fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        target.fs.put_file(str(path), destination)
