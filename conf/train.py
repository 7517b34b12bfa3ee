"""Hydra schema of `python -m workloads.train`: groups `model` (a flavor) and `stage` (a resolution stage)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from conf.checks import (
    CompileBackend,
    Dtype,
    Objective,
    Sampler,
    SkipLayerFields,
    ZeroStage,
    at_least,
    guidance_interval,
    in_unit_interval,
    positive,
)
from conf.evaluate import ImageMetricsConf
from conf.model import ModelConf
from conf.optim import OptimConf
from model import FLAVORS
from model.conditioning import PAPER_DROP_PROB
from model.formulations import get_formulation


@dataclass
class TrainerConf:
    SECTION = "trainer"
    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker; NCCL between them
    cpus_per_worker: float = 1.0
    # Custom Ray resources each worker needs besides its CPUs (and GPU): the workers run only on nodes that advertise
    # them: `+trainer.worker_resources.spot=1` for a node type started with `--resources='{"spot": 8}'`
    worker_resources: dict[str, float] = field(default_factory=dict)
    max_steps: int = 1000
    batch_size: int = 32  # global: split evenly over the workers
    seed: int = 0
    max_failures: int = 3  # worker or node deaths survived by restarting from the latest checkpoint (-1: forever)
    # preemptions (a drained node, a SIGTERM to a worker) survived by restarting from the checkpoint of the step they
    # stopped at, counted apart from max_failures (-1: forever; 0: a preemption ends the run, its checkpoint kept)
    max_preemptions: int = -1
    dtype: Dtype = Dtype.auto  # auto: bf16 on GPU, fp32 on CPU (float16 is refused: no loss scaling)
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    max_nonfinite: int = 10  # consecutive NaN/Inf losses (each step skipped) before the run stops
    # torch.compile each MM-DiT block (torchtitan's unit; names, checkpoints and exports unchanged); None: on GPU, off
    # on CPU, where compiling takes longer than a short run saves
    compile: bool | None = None
    compile_backend: CompileBackend = CompileBackend.inductor
    # None: PyTorch's automatic dynamic shapes (static first; the first other bucket or batch size recompiles once with
    # that dimension dynamic, then no more); True: dynamic from the start (one compile for every bucket); False: one
    # compile per shape (each bucket's own kernels; more compiles)
    compile_dynamic: bool | None = None
    # Seconds a collective (torch.distributed's, so DeepSpeed's too) waits for the other ranks before it fails the
    # step and Ray Train restarts the group from the last checkpoint (trainer.max_failures); when a step runs that
    # long, each rank dumps its Python stacks to <run>/stacks/rank<k>.txt and logs where it is. The session's start-up
    # and first step get `first_step_timeout_s` (compiles, first reads, resume), as torchtitan's init timeout.
    collective_timeout_s: float = 300.0
    first_step_timeout_s: float = 600.0
    # Test hook, never set in real runs: "<kind>@<step>:<rank>" makes that rank stall (`stall`: sleeps an hour) or
    # raise MemoryError (`oom`) at that step, in every attempt, e.g. `stall@3:1`
    fault_injection: str | None = None

    def compiles(self, device_type: str) -> bool:
        """Whether the blocks compile on a device of `device_type`: `compile`, or (None) on a GPU only."""
        return device_type == "cuda" if self.compile is None else self.compile

    def __post_init__(self) -> None:
        at_least(self, 1, "num_workers", "max_steps", "batch_size", "max_nonfinite")
        at_least(self, 0, "cpus_per_worker")
        custom = self.worker_resources
        if {"CPU", "GPU", "memory", "object_store_memory"} & set(custom) or any(v <= 0 for v in custom.values()):
            raise ValueError(f"trainer.worker_resources must name custom resources with amounts > 0 (CPUs and GPUs "
                             f"are cpus_per_worker and use_gpu), got {dict(self.worker_resources)}")
        at_least(self, -1, "max_failures", "max_preemptions")  # -1: forever
        positive(self, "collective_timeout_s", "first_step_timeout_s")
        if self.fault_injection is not None:
            FaultInjection.parse(self.fault_injection, self.num_workers)
        if self.batch_size % self.num_workers:
            raise ValueError(f"trainer.batch_size={self.batch_size} (global) must be divisible by "
                             f"trainer.num_workers={self.num_workers}")
        if self.dtype == Dtype.float16:
            raise ValueError("trainer.dtype must be auto, float32 or bfloat16 (float16 training needs loss scaling)")


@dataclass(frozen=True)
class FaultInjection:
    """`trainer.fault_injection` parsed: which rank fails how at which step (a test hook)."""

    KINDS = ("stall", "oom")
    kind: str
    step: int
    rank: int

    @classmethod
    def parse(cls, text: str, num_workers: int) -> FaultInjection:
        match = re.fullmatch(r"(\w+)@(\d+):(\d+)", text.strip())
        if not match or match[1] not in cls.KINDS or int(match[2]) < 1 or int(match[3]) >= num_workers:
            raise ValueError(f"trainer.fault_injection must be <kind>@<step>:<rank> with kind one of {cls.KINDS}, "
                             f"step >= 1 and rank < trainer.num_workers={num_workers} (e.g. stall@3:1), got {text!r}")
        return cls(match[1], int(match[2]), int(match[3]))


@dataclass
class DeepSpeedConf:
    SECTION = "deepspeed"
    stage: ZeroStage = ZeroStage["2"]  # ZeRO stage 0-3; 3 also builds the model sharded
    offload: bool = False  # optimizer state (and with stage 3 the parameters) in CPU memory
    # None: torch's AdamW (fused on GPU), DeepSpeed's CPU Adam when offloading from a GPU; false: DeepSpeed's Adam
    torch_adam: bool | None = None

    def __post_init__(self) -> None:
        if self.offload and self.stage == 0:
            raise ValueError("deepspeed.offload needs ZeRO stage 1, 2 or 3 (deepspeed.stage)")


@dataclass
class ObjectiveConf:
    SECTION = "objective"

    # flow: the formulation's loss on `data`'s latents; dpo: Diffusion-DPO on a preference dataset's pairs (winner
    # `latent`, loser `latent_loser`), the reference being the base with the LoRA adapters off (`objective=dpo`)
    kind: Objective = Objective.flow
    formulation: str = "rf/lognorm(0.00,1.00)"  # any name `model.formulations.get_formulation` accepts
    shift: float = 1.0  # training-time timestep shift alpha (3.0 at 1024^2 in the paper)
    synthetic_caption_prob: float = 0.5  # per sample: the synthetic caption instead of the original
    text_drop_prob: float = PAPER_DROP_PROB  # per encoder and sample (the paper's CFG dropout)

    def __post_init__(self) -> None:
        get_formulation(self.formulation)  # names the accepted forms
        if self.shift <= 0:
            raise ValueError(f"objective.shift must be positive, got {self.shift}")
        in_unit_interval(self, "synthetic_caption_prob", "text_drop_prob")


@dataclass
class DPOConf:
    SECTION = "dpo"
    # The KL weight of Diffusion-DPO on the velocity error; None: `model.objective.default_dpo_beta` of the
    # formulation and shift (Diffusion-DPO's 5000 on the epsilon error, scaled by E[(1 - t)^2]: about 1470).
    beta: float | None = None

    def __post_init__(self) -> None:
        if self.beta is not None and self.beta <= 0:
            raise ValueError(f"dpo.beta must be positive (or null: the default for the formulation), got {self.beta}")


@dataclass
class LoaderConf:
    SECTION = "loader"
    # without `val_data`: the share of rows held out for validation, chosen by a hash of the sample id, so the same
    # rows in every run, restart and worker count (tiny datasets: at least one row per worker); 0: validate on
    # training rows
    val_fraction: float = 0.1
    shuffle_buffer: int = 1024  # rows in each worker's shuffle buffer, reseeded every epoch
    prefetch_batches: int = 2
    # Read the training data into Ray's object store once instead of streaming it every epoch (each streamed epoch
    # starts a fresh read, seconds per bucket). None: when its files total under `materialize_fraction` of the
    # cluster's object store memory, so small datasets train fast and large ones always stream.
    materialize: bool | None = None
    materialize_fraction: float = 0.2

    def __post_init__(self) -> None:
        in_unit_interval(self, "val_fraction", open_right=True)
        at_least(self, 0, "shuffle_buffer", "prefetch_batches", "materialize_fraction")


# Every linear layer of both streams' blocks, as the paper's DPO adapters: adaLN modulation, QKV, output, MLP.
LORA_BLOCK_LINEARS = r"blocks\.\d+\.(img|txt)\.(mod\.lin|qkv|proj|mlp\.fc1|mlp\.fc2)"


@dataclass
class LoraConf:
    """LoRA adapters (peft) on a frozen base: only they are trained, optimised, averaged and checkpointed."""

    SECTION = "lora"
    rank: int = 0  # 0: off, every weight trains; > 0 needs init_from= (the base the adapters adapt)
    alpha: float | None = None  # the adapters' scale is alpha / rank; None: alpha = rank (scale 1)
    targets: str = LORA_BLOCK_LINEARS  # a regex that must match a linear layer's whole module name
    dropout: float = 0.0  # on the adapters' input

    def __post_init__(self) -> None:
        at_least(self, 0, "rank")
        in_unit_interval(self, "dropout", open_right=True)
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive (or null: alpha = rank), got {self.alpha}")
        try:
            re.compile(self.targets)
        except re.error as error:
            raise ValueError(f"lora.targets is not a regular expression ({error}): {self.targets!r}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor on B @ A."""
        return self.scale_alpha / self.rank


@dataclass
class EMAConf:
    SECTION = "ema"
    decay: float = 0.9999
    warmup: bool = True  # decay min(decay, (1 + step) / (10 + step)): early EMA follows the weights

    def __post_init__(self) -> None:
        in_unit_interval(self, "decay", open_right=True)


@dataclass
class ValidationConf(SkipLayerFields):
    SECTION = "validation"
    every: int = 1000  # steps; also at the end
    samples: int = 64  # held-out rows for the fixed-timestep loss (rounded down to a multiple of the workers)
    batch_size: int = 16
    grid_prompts: int = 4  # validation captions sampled into the PNG grid
    grid_per_prompt: int = 4
    sample_steps: int = 28
    sampler: Sampler = Sampler.euler
    guidance: float = 5.0
    guidance_below: float = 1.0  # CFG only at t <= this (a guidance interval); 1: at every step
    shift: float | None = None  # sampling shift; None: the training shift
    # GenEval on shapes (`workloads.evaluate`) of the EMA weights every `geneval_every` steps and at the end, with
    # the sampling settings above; 0: off. Logs `geneval` and `geneval_<task>` to metrics.jsonl and TensorBoard.
    geneval_every: int = 0
    # also before the first step of a new run (the starting weights: a fine-tune's or DPO's base); the summary then
    # has `geneval_before` and `geneval_after` (overall and per task)
    geneval_before: bool = False
    geneval_prompts_per_task: int = 4  # of each of GenEval's six tasks
    geneval_images_per_prompt: int = 1
    # CLIP score of the grid's samples against their captions and FID against a reference folder (torchmetrics), for
    # real data: the evaluation job's `image_metrics` settings, logged as `clip_score` and `fid` at each validation.
    image_metrics: ImageMetricsConf = field(default_factory=ImageMetricsConf)
    # also the loss with each row conditioned on another row's text: `val_loss_shuffled_text`, and `text_gap` (their
    # ratio - 1): about 0 while the network ignores its prompt, growing as it learns to read it
    text_gap: bool = True

    def __post_init__(self) -> None:
        at_least(self, 1, "every", "samples", "batch_size", "grid_prompts", "grid_per_prompt", "sample_steps",
                 "geneval_prompts_per_task", "geneval_images_per_prompt")
        at_least(self, 0, "geneval_every", "guidance")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"validation.shift must be positive, got {self.shift}")
        guidance_interval(self)
        self.check_skip_layer_fields()


@dataclass
class CheckpointConf:
    SECTION = "checkpoint"
    every: int = 1000  # steps; also at the end unless final=false
    keep: int = 3
    final: bool = True  # false: no checkpoint at the last step unless it is a multiple of `every`

    def __post_init__(self) -> None:
        at_least(self, 1, "every", "keep")


@dataclass
class MetricsConf:
    SECTION = "metrics"
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs by name, no MFU on CPU
    t_bins: int = 4  # the per-t-bin loss splits [0, 1] into this many bins
    sync_every: int = 100  # steps between uploads of metrics.jsonl and TensorBoard files to remote storage
    tensorboard: bool = True
    print_every: int = 50  # steps between rank 0's progress lines (validation steps always print)

    def __post_init__(self) -> None:
        at_least(self, 1, "t_bins", "sync_every", "print_every")
        positive(self, "peak_tflops", optional=True)


@dataclass
class RunConf:
    SECTION = "run"
    storage: str = "runs"  # local folder or s3:// URI; everything the run writes is under <storage>/<name>/
    name: str = "train"  # the resume key: the same storage and name continue the same run

    def __post_init__(self) -> None:
        if not self.storage:
            raise ValueError("run.storage must be a local folder or an s3:// URI, got an empty string")
        if not self.name.strip("/. "):
            raise ValueError(f"run.name must name a folder under run.storage (the resume key), got {self.name!r}")


@dataclass
class TrainConf:
    """One training run. Sweep trials and the demo carry this schema itself (their `train:` section) and set only
    their own axis on it."""

    data: str | None = None  # a preprocessing output (local or s3://); required to run
    val_data: str | None = None  # a held-out preprocessing output; else `loader.val_fraction` of `data`
    endpoint_url: str | None = None  # S3-compatible stores; else AWS_ENDPOINT_URL(_S3) or AWS defaults
    init_from: str | None = None  # a previous run's folder (its export/) or a diffusers transformer folder
    stage_resolution: int | None = None  # set by `stage`: the data must be preprocessed near this resolution
    stage_needs_init: bool = False  # set by `stage`: later stages continue a previous stage's weights
    model: ModelConf = field(default_factory=ModelConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    deepspeed: DeepSpeedConf = field(default_factory=DeepSpeedConf)
    optim: OptimConf = field(default_factory=OptimConf)
    objective: ObjectiveConf = field(default_factory=ObjectiveConf)
    loader: LoaderConf = field(default_factory=LoaderConf)
    ema: EMAConf = field(default_factory=EMAConf)
    lora: LoraConf = field(default_factory=LoraConf)
    dpo: DPOConf = field(default_factory=DPOConf)
    validation: ValidationConf = field(default_factory=ValidationConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    metrics: MetricsConf = field(default_factory=MetricsConf)
    run: RunConf = field(default_factory=RunConf)
    export: bool = True  # <run>/export/: the EMA weights as a diffusers SD3Transformer2DModel folder

    def __post_init__(self) -> None:
        if self.optim.decay_steps > self.trainer.max_steps:
            raise ValueError(f"optim.decay_steps={self.optim.decay_steps} is more than trainer.max_steps="
                             f"{self.trainer.max_steps}: the decay is over the run's last steps")
        if self.stage_needs_init and not self.init_from:
            raise ValueError(f"the stage at {self.stage_resolution}px continues a previous stage: set "
                             "init_from=<the previous stage's run folder>")
        if self.objective.kind == Objective.dpo and not self.lora.enabled:
            raise ValueError("objective.kind=dpo needs lora.rank > 0: its reference is the frozen base with the "
                             "adapters off (e.g. lora.rank=16)")
        if self.lora.enabled and not self.init_from:
            raise ValueError(f"lora.rank={self.lora.rank} trains adapters on frozen base weights: set "
                             "init_from=<a run folder or a diffusers SD3Transformer2DModel folder>")
        self.validation.check_skip_layers_fit(self.model.build().depth)


@dataclass
class TrainJob(TrainConf):
    """`python -m workloads.train`'s primary config: the schema plus Hydra's groups `model` and `stage`."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"model": "debug"}, {"stage": None},
                                                         {"objective": None}])


# Resolution stages (the paper pre-trains at 256^2, then continues at higher resolution with mixed aspect ratios and
# a shifted timestep schedule). Later stages start from the previous stage's weights: `init_from=<its run folder>`.
STAGES: dict[str, dict] = {
    "res256": {"stage_resolution": 256, "stage_needs_init": False, "objective": {"shift": 1.0}},
    "res512": {"stage_resolution": 512, "stage_needs_init": True, "objective": {"shift": 3.0}},
    "res1024": {"stage_resolution": 1024, "stage_needs_init": True, "objective": {"shift": 3.0},
                "trainer": {"activation_checkpointing": True}},
}


# `objective=dpo`: preference tuning as Diffusion-DPO trained it, on the prompts the images were judged against (no
# synthetic captions) with no caption dropout; LoRA adapters of rank 16 unless lora.rank says otherwise.
OBJECTIVES: dict[str, dict] = {
    "dpo": {"objective": {"kind": "dpo", "synthetic_caption_prob": 0.0, "text_drop_prob": 0.0},
            "lora": {"rank": 16}},
}


def register() -> None:
    store = ConfigStore.instance()
    for name, node in OBJECTIVES.items():
        store.store(group="objective", name=name, node=node, package="_global_")
    for name in FLAVORS:
        store.store(group="model", name=name, node=ModelConf(flavor=name))
    for name, node in STAGES.items():
        store.store(group="stage", name=name, node=node, package="_global_")
    store.store(name="train", node=TrainJob)
