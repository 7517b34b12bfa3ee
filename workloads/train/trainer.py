"""One rank's training state: the DeepSpeed engine around the MM-DiT, the EMA, the step with its collective
non-finite check, validation and sampling with the EMA weights, checkpoints and the diffusers export.

Runs inside a Ray Train worker, or in any process with `torch.distributed` initialised (tests use one process).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from conf.checks import Objective
from conf.train import TrainConf
from model import MMDiT
from model.conditioning import TextConditioningConfig
from model.formulations import get_formulation
from model.interop import export_diffusers
from model.mup import param_groups
from model.objective import default_dpo_beta, dpo_loss, training_loss
from model.precision import resolve_dtype
from pipelines import schema
from workloads.evaluate.inline import PromptSet, Sampling, sample_prompt_set
from workloads.train.checkpointing import DS_TAG, TrainState, ema_name, read_state, set_rng_state, write_rank_files
from workloads.train.data import to_model_inputs
from workloads.train.distribute import (
    apply_activation_checkpointing,
    apply_compile,
    build_model,
    deepspeed_config,
    frozen,
    full_from_shards,
    full_numel,
    load_deepspeed,
    local_shards,
    trained,
)
from workloads.train.ema import EMA
from workloads.train.lora import LORA_DIR, adapters_disabled, apply_lora, export_lora, merged_state
from workloads.train.validation import ValGroup, distributed_val_loss, sample_latents


def lr_lambda(warmup_steps: int, max_steps: int = 0, decay_steps: int = 0) -> Callable[[int], float]:
    """The learning rate's factor at scheduler step `step` (0 at the first optimizer step): a linear warm-up to the
    base rate, constant (the paper's schedule), then with `decay_steps` a linear decay over the last of `max_steps`
    to 1/decay_steps at the last step."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return min(warm, (max_steps - step) / decay_steps) if decay_steps else warm

    return factor


@dataclass
class StepResult:
    loss: float  # mean over the global batch (nan when skipped)
    bins: list[float | None]  # mean loss per t-bin over the global batch (None: no sample in the bin)
    grad_norm: float | None
    lr: float
    skipped: bool
    extra: dict[str, float] = field(default_factory=dict)  # the objective's own means (DPO: accuracy, margin, ...)


# DPO's per-pair statistics, averaged over the global batch into each step's record
DPO_STATS = ("dpo_accuracy", "dpo_reward_margin", "dpo_winner_error", "dpo_loser_error")


def per_sample_none(x0: torch.Tensor) -> torch.Tensor:
    """No per-sample statistics beyond the loss: a (0, B) tensor."""
    return torch.zeros((0, x0.shape[0]), dtype=torch.float64, device=x0.device)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's randomness at one step (caption choice, dropout, t, noise): resumable by design."""
    return zlib.crc32(f"{seed}/{rank}/{step}".encode())


class Trainer:
    def __init__(self, cfg: TrainConf, text: TextConditioningConfig, device: torch.device,
                 load: Callable[[MMDiT], None] | None = None) -> None:
        self.cfg, self.text, self.device = cfg, text, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stage = cfg.deepspeed.stage
        self.config = cfg.model.build()
        self.dtype = resolve_dtype(cfg.trainer.dtype, device, gpu_default=torch.bfloat16)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"trainer.dtype must be float32 or bfloat16 (auto: bf16 on GPU), got {self.dtype}")
        ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.trainer.batch_size, self.world,
                                     bf16=self.dtype == torch.bfloat16, on_gpu=device.type == "cuda")
        if self.stage == 3:
            # Every parameter is partitioned between uses, so swapping the EMA into the partitions is always seen.
            ds_config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0)
        torch.manual_seed(cfg.trainer.seed)  # the initial weights depend on the seed only
        net = build_model(self.config, self.stage, ds_config, load)
        self.lora = cfg.lora.enabled
        if self.lora:  # adapters on the loaded base, which is frozen from here on
            apply_lora(net, cfg.lora, seed=cfg.trainer.seed)
        if cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(net)
        self.compiled = cfg.trainer.compiles(device.type)
        if self.compiled:
            apply_compile(net, str(cfg.trainer.compile_backend), cfg.trainer.compile_dynamic)
        schedule = lr_lambda(cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.decay_steps)
        # one group per learning rate (muP's hidden weights learn slower when wider; SP: one group); the warm-up
        # multiplies each group's own
        groups = param_groups(net, cfg.optim.lr, self.config, cfg.optim.weight_decay)
        self.lr_multiplier = groups[0]["lr"] / cfg.optim.lr  # the logged lr is the base one
        self.engine, self.optimizer, _, self.scheduler = load_deepspeed(device).initialize(
            model=net, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
        self.ema = EMA(local_shards(trained(self.engine.module), self.stage), cfg.ema.decay, cfg.ema.warmup)
        self.formulation = get_formulation(cfg.objective.formulation)
        self.dpo = cfg.objective.kind == Objective.dpo
        self.beta = cfg.dpo.beta or default_dpo_beta(self.formulation, cfg.objective.shift)

    @property
    def module(self) -> MMDiT:
        return self.engine.module

    @property
    def trained_numel(self) -> int:
        """Parameters this run trains (all of them, or the adapters), at their full (unpartitioned) size."""
        return full_numel(trained(self.module))

    def step(self, batch: dict[str, torch.Tensor], step: int) -> StepResult:
        """One optimizer step on this rank's part of the global batch; every rank skips it together if any rank's
        loss is not finite."""
        cfg, n_bins = self.cfg, self.cfg.metrics.t_bins
        gen = torch.Generator(device=self.device).manual_seed(step_seed(cfg.trainer.seed, self.rank, step))
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        # the caption was chosen on the host (`streaming.CaptionCollate`): one caption's embeddings a sample
        x0, context, pooled = to_model_inputs(batch, self.text, cfg.objective.text_drop_prob, gen, self.dtype)
        if self.dpo:  # x0 is each pair's winner
            loser = batch[schema.LOSER_LATENT].to(self.dtype)
            pairs = dpo_loss(self.engine, self.reference, x0, loser, context, pooled, self.beta, self.formulation,
                             cfg.objective.shift, gen)
            per_sample, tau = pairs.loss.float(), pairs.tau
            extra = torch.stack([pairs.accuracy, pairs.reward_margin, *pairs.policy_error]).detach().double()
        else:
            out = training_loss(self.engine, x0, context, pooled, self.formulation, cfg.objective.shift, gen)
            per_sample, tau, extra = out.per_sample.float(), out.tau, per_sample_none(x0)
        finite = bool(torch.isfinite(per_sample).all())
        k = 2 + 2 * n_bins
        stats = torch.zeros(k + len(extra), dtype=torch.float64, device=self.device)
        if finite:
            bins = (tau.float() * n_bins).long().clamp(0, n_bins - 1)
            stats[0] = per_sample.detach().sum()
            stats[2:2 + n_bins].index_add_(0, bins, per_sample.detach().double())
            stats[2 + n_bins:k].index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float64))
            stats[k:] = extra.sum(dim=1)
        else:
            stats[1] = 1
        dist.all_reduce(stats)
        lr = self.scheduler.get_last_lr()[0] / self.lr_multiplier
        counts = stats[2 + n_bins:k]
        bin_means = [float(s / c) if c > 0 else None for s, c in zip(stats[2:2 + n_bins], counts, strict=True)]
        if stats[1] > 0:
            return StepResult(float("nan"), [None] * n_bins, None, lr, skipped=True)
        self.engine.backward(per_sample.mean())
        self.engine.step()
        self.ema.update()
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        names = DPO_STATS if self.dpo else ()
        means = {name: float(v / counts.sum()) for name, v in zip(names, stats[k:], strict=True)}
        return StepResult(float(stats[0] / counts.sum()), bin_means, norm, lr, skipped=False, extra=means)

    def reference(self, *inputs: torch.Tensor) -> torch.Tensor:
        """DPO's reference network: the same engine with every LoRA adapter off (the frozen base)."""
        with adapters_disabled(self.module):
            return self.engine(*inputs)

    def _release(self) -> None:
        if self.stage == 3:
            self.engine.empty_partition_cache()  # drop every gathered copy: the next forward reads the partitions

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Forward passes inside use the EMA weights (every rank must enter: ZeRO-3 gathers collectively)."""
        self._release()
        self.engine.eval()
        with self.ema.applied():
            try:
                yield
            finally:
                self._release()
        self.engine.train()

    def validate(self, groups: list[ValGroup], shuffle_text: bool = False) -> torch.Tensor:
        """The EMA model's fixed-timestep validation loss per timestep: (n_timesteps,); with `shuffle_text`, each row
        conditioned on another row's text (`distributed_val_loss`)."""
        v = self.cfg.validation
        with self.ema_weights():
            return distributed_val_loss(self.engine, groups, self.text, self.cfg.objective.formulation,
                                        v.batch_size, self.cfg.trainer.seed, self.device, self.dtype, shuffle_text)

    def samples(self, group: ValGroup) -> tuple[torch.Tensor, list[str]]:
        v, o = self.cfg.validation, self.cfg.objective
        with self.ema_weights():
            return sample_latents(self.engine, group, self.text, v.grid_prompts, v.grid_per_prompt, v.sample_steps,
                                  v.guidance, o.shift if v.shift is None else v.shift, v.sampler, o.formulation,
                                  self.cfg.trainer.seed, self.device, self.dtype, slg=v.skip_layer_guidance,
                                  guidance_below=v.guidance_below)

    def geneval_latents(self, prompts: PromptSet, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Latents of the GenEval prompt set with the EMA weights, each rank sampling its share (all on every
        rank): (n, C, h, w)."""
        v, o = self.cfg.validation, self.cfg.objective
        how = Sampling(v.sample_steps, v.guidance, o.shift if v.shift is None else v.shift, str(v.sampler),
                       o.formulation, self.cfg.trainer.seed, v.skip_layer_guidance, v.guidance_below)
        with self.ema_weights():
            return sample_prompt_set(self.engine, prompts, self.text, latent_shape, how, self.device, self.dtype,
                                     v.batch_size)

    def ema_state(self) -> dict:
        params = trained(self.module)
        state = self.ema.state_dict()
        state["names"] = [n for n, _ in params]
        state["numel"] = [int(p.ds_numel) if self.stage == 3 else p.numel() for _, p in params]
        state["shapes"] = [tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape) for _, p in params]
        return state

    def save(self, folder: Path, state: TrainState) -> None:
        """This rank's part of a checkpoint into `folder` (its own local directory)."""
        # under LoRA the frozen base is left out: a resumed run loads it from init_from again
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, exclude_frozen_parameters=self.lora)
        holds_ema = self.stage == 3 or self.rank == 0
        state = replace(state, parametrization=self.config.parametrization_label())
        write_rank_files(folder, self.rank, state, self.ema_state() if holds_ema else None)

    def load(self, folder: Path) -> TrainState:
        state = read_state(folder)
        if (state.world_size, state.zero_stage) != (self.world, self.stage):
            raise ValueError(f"checkpoint {folder.name} was written by {state.world_size} workers with ZeRO stage "
                             f"{state.zero_stage}; this run has {self.world} workers and stage {self.stage}. Resume "
                             "with the same trainer.num_workers and deepspeed.stage, or start a new run.name")
        label = self.config.parametrization_label()
        if state.parametrization not in (None, label):  # the optimizer's per-layer learning rates would not match
            raise ValueError(f"checkpoint {folder.name} was trained under {state.parametrization}; this run sets "
                             f"{label} (model.parametrization, model.mup_base_width). Resume with the same "
                             "parametrization, or start a new run.name (train.init_from= takes its weights alone)")
        path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_module_strict=not self.lora)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
        ema = torch.load(folder / ema_name(self.rank if self.stage == 3 else 0), weights_only=False)
        self.ema.load_state_dict(ema)
        set_rng_state(torch.load(folder / f"rng_rank{self.rank}.pt", weights_only=False))
        return state

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full EMA network's state on rank 0 (None elsewhere; a collective under ZeRO-3): the averaged trained
        parameters and, under LoRA, the frozen base as trained with (peft's names), in fp32."""
        full = full_from_shards(trained(self.module), self.ema.shadow, self.stage, self.device)
        base = frozen(self.module)
        if base:
            full |= full_from_shards(base, local_shards(base, self.stage), self.stage, self.device)
        if self.rank != 0:
            return None
        return {k: v.float() for k, v in full.items()} | {"pos_embed": self.module.pos_embed.detach().float().cpu()}

    def _plain(self, state: dict[str, torch.Tensor]) -> MMDiT:
        """The plain MM-DiT of a full state dict (adapters merged into their base weights under LoRA)."""
        if self.lora:
            state = merged_state(state, self.cfg.lora)
        with torch.device("meta"):
            net = MMDiT(self.config)
        net.load_state_dict(state, strict=True, assign=True)
        return net

    def ema_model(self) -> MMDiT | None:
        """The full EMA network on rank 0 (None elsewhere); a collective under ZeRO-3."""
        state = self.ema_state_dict()
        return None if state is None else self._plain(state)

    def export(self, folder: Path) -> None:
        """The EMA weights as a diffusers `SD3Transformer2DModel` folder (written by rank 0); under LoRA merged into
        the base, and the adapters alone in `lora/` (diffusers' SD3 LoRA file)."""
        state = self.ema_state_dict()
        if state is None:
            return
        export_diffusers(self._plain(state), folder)
        if self.lora:
            export_lora(state, self.cfg.lora, self.config, folder / LORA_DIR)
