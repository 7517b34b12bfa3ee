"""Distribution applied to the MM-DiT from outside `model/` (the torchtitan way, the block as the unit): the DeepSpeed
ZeRO engine config, sharded construction (ZeRO-3 never materialises the whole network on one rank), access to each
rank's own slice of the weights, activation checkpointing per block and torch.compile per block."""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from conf.optim import OptimConf
from conf.train import DeepSpeedConf
from model import MMDiT, MMDiTConfig


def load_deepspeed(device: torch.device) -> ModuleType:
    """DeepSpeed, imported on first use rather than with this module (drivers and tests that never build an engine
    skip it). Training on CPU (`trainer.use_gpu=false`) names DeepSpeed's CPU accelerator before the first import,
    so DeepSpeed takes it without probing for a GPU and logging "Setting accelerator to CPU" in every process."""
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_distributed(device: torch.device, timeout_s: float | None = None) -> None:
    """DeepSpeed's process group: NCCL on GPUs, gloo on CPUs, collectives failing after `timeout_s` (None: torch's
    default); under Ray Train the group exists already, made with `TorchConfig(timeout_s=...)`.

    On CPU DeepSpeed's backend would first JIT-compile a shared-memory all-reduce (`deepspeed_shm_comm`: about 40 s
    on 2 cores, again for every new environment) that only its inference kernels call (`inference_all_reduce`);
    ZeRO's collectives go through torch.distributed. Marking the op incompatible (the probe's cache is meant to be
    edited) skips the build."""
    deepspeed = load_deepspeed(device)
    if device.type == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", **timeout)


def deepspeed_config(ds: DeepSpeedConf, optim: OptimConf, global_batch: int, world_size: int, bf16: bool,
                     on_gpu: bool) -> dict:
    """The DeepSpeed config dict: data parallel over `world_size`, AdamW, clipping, ZeRO stage and offload.

    AdamW by default (`torch_adam` None): torch's, as its fused kernel on a GPU, which needs no build (DeepSpeed's
    fused Adam is JIT-compiled with nvcc, absent where torch came as a plain wheel); with the optimizer offloaded
    from a GPU, DeepSpeed's CPU Adam (built with g++), much faster than torch's on CPU tensors."""
    torch_adam = (not (on_gpu and ds.offload)) if ds.torch_adam is None else ds.torch_adam
    fused = {"fused": True} if torch_adam and on_gpu and not ds.offload else {}
    zero: dict = {"stage": ds.stage}
    if ds.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if ds.stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            "torch_adam": torch_adam, **fused}},
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": not torch_adam,  # torch's AdamW on offloaded states is allowed, if slower
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_model(config: MMDiTConfig, stage: int, ds_config: dict,
                load: Callable[[MMDiT], None] | None = None) -> MMDiT:
    """The MM-DiT, initialised (or loaded by `load`, which runs on rank 0 only: DeepSpeed's engine broadcasts
    rank 0's weights for ZeRO 0-2, and ZeRO-3 partitions what rank 0 wrote).

    Under ZeRO-3 the parameters are partitioned as each module is built, then every module is gathered in turn,
    initialised on rank 0 and partitioned again, so no rank ever holds more than one module's full weights.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if stage != 3:
        net = MMDiT(config)
        if load is not None and rank == 0:
            load(net)
        return net
    import deepspeed  # loaded by init_distributed, which runs first

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        net = MMDiT(config, initialize=False)
    for module in net.modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                if rank == 0:
                    net.init_module(module)
    net.init_buffers()
    if load is not None:
        with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=0):
            if rank == 0:
                load(net)
    return net


Named = list[tuple[str, torch.nn.Parameter]]


def trained(net: torch.nn.Module) -> Named:
    """The parameters training updates, by name: all of them, or under LoRA the adapters only."""
    return [(name, p) for name, p in net.named_parameters() if p.requires_grad]


def frozen(net: torch.nn.Module) -> Named:
    return [(name, p) for name, p in net.named_parameters() if not p.requires_grad]


def full_numel(params: Named) -> int:
    """Elements of `params` at their full size (a ZeRO-3 parameter's `ds_numel`, not this rank's partition)."""
    return sum(int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel() for _, p in params)


def local_shards(params: Named, stage: int) -> list[torch.Tensor]:
    """Each parameter's part held by this rank: the ZeRO-3 partition (flat), else the whole (replicated) tensor."""
    return [p.ds_tensor if stage == 3 else p for _, p in params]


def full_from_shards(params: Named, shards: list[torch.Tensor], stage: int,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Full tensors of `params` by name, from every rank's shards (a collective under ZeRO-3); returned on the CPU
    in the shards' precision."""
    if stage != 3:
        return {name: s.detach().cpu() for (name, _), s in zip(params, shards, strict=True)}
    world = dist.get_world_size()
    out = {}
    for (name, p), shard in zip(params, shards, strict=True):
        local = shard.detach().to(device)
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
    return out


def expected_state_bytes(params: int, world: int, stage: int, param_bytes: int) -> float:
    """Per-rank bytes of weights plus optimizer state for AdamW, as in the ZeRO paper: the weights (`param_bytes`
    each), an fp32 master copy (DeepSpeed keeps one unless ZeRO is off in fp32) and two fp32 moments; stage 1
    partitions master and moments, stage 2 also the gradients (not counted here), stage 3 also the weights."""
    master = 0 if (stage == 0 and param_bytes == 4) else 4
    weights = params * param_bytes / (world if stage == 3 else 1)
    optimizer = params * (master + 8) / (world if stage >= 1 else 1)
    return weights + optimizer


def measured_state_bytes(net: torch.nn.Module, optimizer, stage: int) -> int:
    """Bytes of distinct storage this rank holds for the weights and the optimizer (moments, fp32 masters)."""
    tensors = local_shards(list(net.named_parameters()), stage)
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        tensors += [t for t in getattr(optimizer, name, None) or [] if isinstance(t, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def apply_activation_checkpointing(net: MMDiT) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The forward is replaced per instance, so parameter names (and checkpoints, and diffusers export) are unchanged.
    """
    for block in net.blocks:
        if getattr(block, "activation_checkpointing", False):
            continue
        block.forward = checkpointed(block.forward)
        block.activation_checkpointing = True


def checkpointed(forward: Callable) -> Callable:
    """`forward` run under non-reentrant checkpointing. A function of ours, not a `functools.partial` of `checkpoint`:
    torch.compile skips torch's own frames (and `checkpoint` disables it for what runs inside), so a compiled block
    must enter through code it traces; it then captures the checkpoint as one region of the block's graph."""

    def run(*args: torch.Tensor) -> object:
        return checkpoint(forward, *args, use_reentrant=False)

    return run


# Compiles a block may keep before torch falls back to running it eagerly (PyTorch's default is 8): with
# `compile_dynamic=False` each bucket and batch size (training, validation, sampling), in training and eval mode,
# is a compile of its own.
RECOMPILE_LIMIT = 64


def apply_compile(net: MMDiT, backend: str = "inductor", dynamic: bool | None = None) -> None:
    """torch.compile each block in place (`nn.Module.compile`: the parameter names, and so checkpoints, the EMA and
    the diffusers export, are unchanged). After `apply_activation_checkpointing`, so the checkpointed forward is what
    compiles and the recomputation runs compiled code. Every block but the last has the same code and shapes, so
    they share one graph; the last (text stream pre-only) has its own. Under ZeRO-3 DeepSpeed's gather hooks on each
    layer are excluded from compilation (`torch.compiler.disable` in DeepSpeed), which splits the block's graph at
    every layer: it runs, with less fusion than under ZeRO 0-2."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in net.blocks:
        block.compile(backend=backend, dynamic=dynamic)


# DeepSpeed 0.19 still calls c10d's all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13 deprecates
# with a warning on every call (one per ZeRO-3 gather); the calls work, so keep the logs readable.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
