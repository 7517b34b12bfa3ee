"""LoRA for the MM-DiT through peft, applied from the workloads side like the other distribution wrappers: adapters
on the blocks' linear layers (`lora.targets`), the base weights frozen. Also the two exports: the adapters merged
into a plain MM-DiT, and the adapters alone in the layout diffusers' SD3 loaders read.

peft names an adapted layer's tensors `<layer>.base_layer.weight`, `<layer>.lora_A.default.weight` and
`<layer>.lora_B.default.weight`; the effective weight is `W + (alpha / rank) * B @ A`, with B zero at the start, so
an adapted network begins exactly where its base left off.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from conf.train import LoraConf
from model import MMDiT
from model.interop import StateDict

ADAPTER = "default"  # peft's adapter name: one adapter per run
LORA_MARK = ".lora_"
BASE_MARK = ".base_layer."


def peft_config(conf: LoraConf):
    """The peft `LoraConfig` of `conf` (no dropout on the adapters' input unless set, no adapter biases)."""
    from peft import LoraConfig

    return LoraConfig(r=conf.rank, lora_alpha=conf.scale_alpha, target_modules=conf.targets,
                      lora_dropout=conf.dropout, bias="none")


def apply_lora(net: MMDiT, conf: LoraConf, seed: int) -> MMDiT:
    """Inject adapters into `net` in place and freeze everything else. The A matrices are drawn from `seed` on every
    rank, so all ranks build the same adapters (ZeRO-3 then partitions them like the base weights)."""
    from peft import inject_adapter_in_model

    matched = [name for name, module in net.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(conf.targets, name)]
    if not matched:
        raise ValueError(f"lora.targets={conf.targets!r} matches none of the MM-DiT's linear layers (e.g. "
                         "blocks.0.img.qkv, blocks.0.txt.mlp.fc1)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config(conf), net, adapter_name=ADAPTER)
    for name, param in net.named_parameters():
        param.requires_grad = LORA_MARK in name
    return net


def is_adapter(name: str) -> bool:
    return LORA_MARK in name


def adapter_layers(state: StateDict) -> list[str]:
    """The adapted layers' names (`blocks.0.img.qkv`, ...) in a peft-named state dict."""
    return sorted({name.split(LORA_MARK)[0] for name in state if is_adapter(name)})


def scaled_factors(state: StateDict, conf: LoraConf) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (A, B * alpha / rank): the scaling folded into B, so `W + B @ A` is the adapted weight."""
    suffix = f".{ADAPTER}.weight"
    return {layer: (state[f"{layer}.lora_A{suffix}"], state[f"{layer}.lora_B{suffix}"] * conf.scaling)
            for layer in adapter_layers(state)}


def merged_state(state: StateDict, conf: LoraConf) -> StateDict:
    """A peft-named MM-DiT state dict -> the plain MM-DiT's, each adapted weight replaced by `W + scale * B @ A`."""
    factors = scaled_factors(state, conf)
    merged: StateDict = {}
    for name, tensor in state.items():
        if is_adapter(name):
            continue
        plain = name.replace(BASE_MARK, ".")
        layer = plain.rsplit(".", 1)[0]
        if BASE_MARK in name and plain.endswith(".weight"):
            a, b = factors[layer]
            tensor = tensor + (b.float() @ a.float()).to(tensor.dtype)
        merged[plain] = tensor
    return merged


LORA_DIR = "lora"  # <run>/export/lora/: the adapters beside the merged export
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' `load_lora_weights(folder)` reads


def export_lora(state: StateDict, conf: LoraConf, config, folder) -> int:
    """The adapters of a peft-named state dict as `<folder>/pytorch_lora_weights.safetensors` in diffusers' SD3 LoRA
    layout (fp32); returns the file's size in bytes."""
    from pathlib import Path

    from safetensors.torch import save_file

    from model.interop import lora_to_diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    factors = {layer: (a.float(), b.float()) for layer, (a, b) in scaled_factors(state, conf).items()}
    save_file(lora_to_diffusers(factors, config), folder / LORA_WEIGHTS)
    return (folder / LORA_WEIGHTS).stat().st_size


def lora_numel(config, conf: LoraConf) -> int:
    """Adapter parameters `conf` puts on an MM-DiT of `config`: rank * (in + out) per targeted linear layer (the
    network is built on the meta device, so this costs nothing at any size)."""
    with torch.device("meta"):
        net = MMDiT(config, initialize=False)
    return sum(conf.rank * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(conf.targets, name))


@contextmanager
def adapters_disabled(net: torch.nn.Module) -> Iterator[None]:
    """Forward passes inside see the base alone (every adapter off): DPO's frozen reference without a second copy
    of the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the network has no adapters to disable (lora.rank=0)")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
