"""muP, the maximal update parametrization (Tensor Programs V), for the MM-DiT trained with Adam(W).

Every weight is input-, hidden- or output-like by which of its fans grow with the width, and takes its init and its
learning rate from that: the `mup` package's MuAdamW rules, which "Scaling Diffusion Transformers Efficiently via muP"
shows MM-DiT fits as it stands. m = hidden_size / mup_base_width:

- input (`INPUT_LAYERS`: patch, text, timestep and pooled embeddings' first layer; fan-in fixed by the data):
  init variance from the fan-in alone (Xavier at the base width, N(0, 0.02)); learning rate x1.
- hidden (QKV, attention output, MLP, every adaLN modulation, the embedders' second layer; both fans grow): init
  variance ~ 1/width (Xavier; N(0, 0.02^2 / m) for the embedders'); learning rate x1/m. The adaLN modulation is
  hidden, as in the reference code, but keeps SD3's zero init (adaLN-Zero; zero is a valid muP init).
- output (`OUTPUT_LAYERS`: the final projection to patch values): zero init, as SD3's; learning rate x1/m and no
  output multiplier. From zero init, Adam trains this as the reference's MuReadout (output multiplier 1/m, learning
  rate x1) does, but for Adam's eps and the global-norm clipping, and leaves nothing outside the weights to fold.
- vector-like (biases, the QK-norm gains): learning rate x1.
- attention logits: 1/head_dim (`MMDiTConfig.attention_scale`). With heads of 64 at every width (the width rule,
  and the reference code's fixed head width) that is SD3's 1/sqrt(64).

Weight decay is AdamW's decoupled decay, multiplied by m wherever the learning rate is divided by m (MuAdamW's
rule): the decay per step, lr * weight_decay, stays the base model's. LoRA adapters (peft's `lora_A`/`lora_B`) take
their base layer's learning rate. At the base width every multiplier is 1, and muP is SP.
"""

from __future__ import annotations

from torch import nn

from model.config import MMDiTConfig

INPUT_LAYERS = ("img_in", "txt_in", "time_in.lin1", "vec_in.lin1")
OUTPUT_LAYERS = ("final.linear",)


def layer_role(name: str) -> str:
    """'input', 'hidden', 'output' or 'vector' for a parameter of the MM-DiT (plain or with peft's adapters)."""
    for mark in (".lora_A.", ".lora_B."):
        if mark in name:
            return layer_role(name.split(mark)[0] + ".weight")  # an adapter learns as its layer's weight
    layer, kind = name.replace(".base_layer.", ".").rsplit(".", 1)
    if kind != "weight" or layer.endswith("_norm"):
        return "vector"
    if layer in INPUT_LAYERS:
        return "input"
    return "output" if layer in OUTPUT_LAYERS else "hidden"


def lr_multiplier(role: str, config: MMDiTConfig) -> float:
    """The learning rate of a weight of `role` over the base one: 1/m for hidden and output weights, else 1."""
    return 1.0 / config.width_multiplier if role in ("hidden", "output") else 1.0


def param_groups(net: nn.Module, lr: float, config: MMDiTConfig, weight_decay: float = 0.0) -> list[dict]:
    """The trained parameters (`requires_grad`) as optimizer param groups, one per learning rate, each with its own
    `lr` and `weight_decay`; the group of the base learning rate first. Under SP (or at the base width): one group."""
    groups: dict[float, dict] = {}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        multiplier = lr_multiplier(layer_role(name), config)
        group = groups.setdefault(multiplier, {"params": [], "lr": lr * multiplier,
                                               "weight_decay": weight_decay / multiplier})
        group["params"].append(param)
    return [groups[m] for m in sorted(groups, key=lambda m: (m != 1.0, m))]
