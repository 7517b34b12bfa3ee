"""Weight interop with the public SD3 format (diffusers' `SD3Transformer2DModel`).

Our names group by stream (`blocks.i.img.*`, `blocks.i.txt.*`) with a fused QKV; diffusers' split Q/K/V
into `attn.to_*` (image) and `attn.add_*_proj` (text). Two layouts differ beyond names: the fused QKV, and
diffusers' `AdaLayerNormContinuous` (pre-only text stream, final layer) emitting (scale, shift) where
ours emits (shift, scale). A muP network whose attention scale is not SD3's (`MMDiTConfig.attention_scale`) has the
ratio folded into its queries on the way out and back out of them on the way in.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import MMDiTConfig
from model.mmdit import MMDiT

StateDict = dict[str, torch.Tensor]


def _identity(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return tensors


def _swap_halves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    first, second = tensors[0].chunk(2, dim=0)
    return [torch.cat([second, first], dim=0)]


def _split3(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors[0].chunk(3, dim=0))


def _cat(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(tensors, dim=0)]


@dataclass(frozen=True)
class _Rule:
    """One of our tensors <-> one or more diffusers tensors, with the layout change each way."""

    ours: str
    theirs: tuple[str, ...]
    to_theirs: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _identity
    to_ours: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _identity


def _patch_rules(c: MMDiTConfig) -> list[_Rule]:
    conv_shape = (c.hidden_size, c.in_channels, c.patch_size, c.patch_size)
    return [
        _Rule("img_in.weight", ("pos_embed.proj.weight",),
              lambda ts: [ts[0].reshape(conv_shape)], lambda ts: [ts[0].reshape(conv_shape[0], -1)]),
        _Rule("img_in.bias", ("pos_embed.proj.bias",)),
        _Rule("pos_embed", ("pos_embed.pos_embed",),
              lambda ts: [ts[0].unsqueeze(0)], lambda ts: [ts[0].squeeze(0)]),
    ]


def _linear_rules(ours: str, theirs: str, **kw: Callable) -> list[_Rule]:
    return [_Rule(f"{ours}.{s}", (f"{theirs}.{s}",), **kw) for s in ("weight", "bias")]


def _qkv_rules(ours: str, theirs: tuple[str, str, str]) -> list[_Rule]:
    return [_Rule(f"{ours}.{s}", tuple(f"{t}.{s}" for t in theirs), _split3, _cat) for s in ("weight", "bias")]


def _stream_rules(c: MMDiTConfig, i: int, stream: str, pre_only: bool) -> list[_Rule]:
    ours, theirs = f"blocks.{i}.{stream}", f"transformer_blocks.{i}"
    if stream == "img":
        norm, proj, ff = "norm1", "attn.to_out.0", "ff"
        qkv, qk_norms = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.norm_q", "attn.norm_k")
    else:
        norm, proj, ff = "norm1_context", "attn.to_add_out", "ff_context"
        qkv = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
        qk_norms = ("attn.norm_added_q", "attn.norm_added_k")
    swap = {"to_theirs": _swap_halves, "to_ours": _swap_halves} if pre_only else {}
    rules = _linear_rules(f"{ours}.mod.lin", f"{theirs}.{norm}.linear", **swap)
    rules += _qkv_rules(f"{ours}.qkv", tuple(f"{theirs}.{n}" for n in qkv))
    if c.qk_norm == "rms":
        pairs = zip(("q_norm", "k_norm"), qk_norms, strict=True)
        rules += [_Rule(f"{ours}.{o}.weight", (f"{theirs}.{t}.weight",)) for o, t in pairs]
    if not pre_only:
        rules += _linear_rules(f"{ours}.proj", f"{theirs}.{proj}")
        rules += _linear_rules(f"{ours}.mlp.fc1", f"{theirs}.{ff}.net.0.proj")
        rules += _linear_rules(f"{ours}.mlp.fc2", f"{theirs}.{ff}.net.2")
    return rules


def _rules(c: MMDiTConfig) -> list[_Rule]:
    rules = _patch_rules(c)
    rules += _linear_rules("txt_in", "context_embedder")
    rules += _linear_rules("time_in.lin1", "time_text_embed.timestep_embedder.linear_1")
    rules += _linear_rules("time_in.lin2", "time_text_embed.timestep_embedder.linear_2")
    rules += _linear_rules("vec_in.lin1", "time_text_embed.text_embedder.linear_1")
    rules += _linear_rules("vec_in.lin2", "time_text_embed.text_embedder.linear_2")
    for i in range(c.depth):
        rules += _stream_rules(c, i, "img", pre_only=False)
        rules += _stream_rules(c, i, "txt", pre_only=i == c.depth - 1)
    rules += _linear_rules("final.mod.lin", "norm_out.linear", to_theirs=_swap_halves, to_ours=_swap_halves)
    rules += _linear_rules("final.linear", "proj_out")
    return rules


def _check_keys(state_dict: StateDict, expected: set[str], side: str) -> None:
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise KeyError(
            f"{side} state dict does not match the config: missing {sorted(missing)[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )


def query_scale(config: MMDiTConfig) -> float:
    """Our attention logits over SD3's (1/sqrt(head_dim)) for the same weights: 1 but under muP off its head width."""
    return 1.0 if config.attention_scale is None else config.attention_scale * math.sqrt(config.head_dim)


def _scaled_rows(tensor: torch.Tensor, rows: int, factor: float) -> torch.Tensor:
    return torch.cat([tensor[:rows] * factor, tensor[rows:]])


def _scale_queries(state_dict: StateDict, config: MMDiTConfig, factor: float) -> StateDict:
    """The state with every attention's logits scaled by `factor` through its queries: their rows of the fused QKV
    (weight and bias), or under QK-norm, which takes out any scale of its input, the query norm's gain."""
    if factor == 1.0:
        return state_dict
    out = dict(state_dict)
    for i in range(config.depth):
        for stream in ("img", "txt"):
            prefix = f"blocks.{i}.{stream}"
            if config.qk_norm == "rms":
                out[f"{prefix}.q_norm.weight"] = state_dict[f"{prefix}.q_norm.weight"] * factor
            else:
                for name in (f"{prefix}.qkv.weight", f"{prefix}.qkv.bias"):
                    out[name] = _scaled_rows(state_dict[name], config.hidden_size, factor)
    return out


def to_diffusers(state_dict: StateDict, config: MMDiTConfig) -> StateDict:
    """Our state dict -> `SD3Transformer2DModel` names and layouts (muP's attention scale folded into the queries)."""
    rules = _rules(config)
    _check_keys(state_dict, {r.ours for r in rules}, "MMDiT")
    state_dict = _scale_queries(state_dict, config, query_scale(config))
    out: StateDict = {}
    for rule in rules:
        out.update(zip(rule.theirs, rule.to_theirs([state_dict[rule.ours]]), strict=True))
    return out


def from_diffusers(state_dict: StateDict, config: MMDiTConfig) -> StateDict:
    """`SD3Transformer2DModel` state dict -> our names and layouts (for a muP `config`, the same function)."""
    rules = _rules(config)
    _check_keys(state_dict, {t for r in rules for t in r.theirs}, "SD3Transformer2DModel")
    ours = {r.ours: r.to_ours([state_dict[t] for t in r.theirs])[0] for r in rules}
    return _scale_queries(ours, config, 1.0 / query_scale(config))


LORA_PREFIX = "transformer"  # the pipeline component diffusers' SD3 LoRA loaders route these keys to


def lora_to_diffusers(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: MMDiTConfig) -> StateDict:
    """LoRA factors of our linear layers (layer -> (A, B), the scale folded into B) -> the state dict diffusers'
    `SD3Transformer2DModel.load_lora_adapter` and `StableDiffusion3Pipeline.load_lora_weights` read
    (`transformer.<their layer>.lora_A.weight`, no alphas: scale 1). A fused QKV's adapter becomes one per
    projection with the same A and B's rows split; the layouts that reorder output rows reorder B's. Without QK-norm,
    a QKV adapter's query rows take the fold of muP's attention scale, as the query weights do."""
    rules = {r.ours: r for r in _rules(config)}
    fold = query_scale(config) if config.qk_norm == "none" else 1.0
    out: StateDict = {}
    for layer, (a, b) in factors.items():
        rule = rules.get(f"{layer}.weight")
        if rule is None or rule.ours in ("img_in.weight",):
            raise ValueError(f"no diffusers linear layer corresponds to {layer!r}: its adapter cannot be exported")
        if layer.endswith(".qkv") and fold != 1.0:
            b = _scaled_rows(b, config.hidden_size, fold)
        for theirs, rows in zip(rule.theirs, rule.to_theirs([b]), strict=True):
            name = theirs.removesuffix(".weight")
            out[f"{LORA_PREFIX}.{name}.lora_A.weight"] = a.clone()  # one copy each: a file holds no aliases
            out[f"{LORA_PREFIX}.{name}.lora_B.weight"] = rows.contiguous()
    return out


def diffusers_config(config: MMDiTConfig) -> dict:
    """Constructor arguments of the equivalent `SD3Transformer2DModel`."""
    return {
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "num_layers": config.depth,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_dim,
        "caption_projection_dim": config.hidden_size,
        "pooled_projection_dim": config.pooled_dim,
        "out_channels": config.in_channels,
        "pos_embed_max_size": config.pos_embed_max_size,
        "dual_attention_layers": (),
        "qk_norm": "rms_norm" if config.qk_norm == "rms" else None,
    }


def config_from_diffusers(dconfig: dict) -> MMDiTConfig:
    """Our config for an `SD3Transformer2DModel` config; rejects variants this MM-DiT does not implement."""
    if dconfig.get("dual_attention_layers"):
        raise ValueError("dual_attention_layers (MMDiT-X, SD3.5 Medium) is not supported by this MM-DiT")
    hidden = dconfig["num_attention_heads"] * dconfig["attention_head_dim"]
    if dconfig.get("caption_projection_dim", hidden) != hidden:
        raise ValueError(
            f"caption_projection_dim must equal the hidden size {hidden}, got {dconfig['caption_projection_dim']}"
        )
    out_channels = dconfig.get("out_channels") or dconfig["in_channels"]
    if out_channels != dconfig["in_channels"]:
        raise ValueError(f"out_channels ({out_channels}) must equal in_channels ({dconfig['in_channels']})")
    qk_norm = {None: "none", "rms_norm": "rms"}.get(dconfig.get("qk_norm"))
    if qk_norm is None:
        raise ValueError(f"qk_norm {dconfig.get('qk_norm')!r} is not supported; use None or 'rms_norm'")
    return MMDiTConfig(
        depth=dconfig["num_layers"], hidden_size=hidden, num_heads=dconfig["num_attention_heads"],
        patch_size=dconfig["patch_size"], in_channels=dconfig["in_channels"],
        context_dim=dconfig["joint_attention_dim"], pooled_dim=dconfig["pooled_projection_dim"],
        pos_embed_max_size=dconfig["pos_embed_max_size"], sample_size=dconfig["sample_size"], qk_norm=qk_norm,
    )


def export_diffusers(model: MMDiT, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     max_shard_size: str = "10GB") -> None:
    """Write `model` as a folder that `SD3Transformer2DModel.from_pretrained(path)` loads."""
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    state = to_diffusers({k: v.detach() for k, v in model.state_dict().items()}, model.config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with init_empty_weights():
        target = SD3Transformer2DModel(**diffusers_config(model.config))
    target.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    target.save_pretrained(os.fspath(path), safe_serialization=True, max_shard_size=max_shard_size)


def load_diffusers(path: str | os.PathLike, subfolder: str | None = None, dtype: torch.dtype = torch.float32,
                   config: MMDiTConfig | None = None) -> MMDiT:
    """Read an `SD3Transformer2DModel` folder or hub id (e.g. the `transformer` subfolder of SD3) as our MM-DiT: in
    the folder's own (standard) parametrization, or as `config`, a network of the same shape (a muP one, say)."""
    from diffusers import SD3Transformer2DModel

    source = SD3Transformer2DModel.from_pretrained(os.fspath(path), subfolder=subfolder, torch_dtype=dtype)
    found = config_from_diffusers(dict(source.config))
    if config is not None and config.exported() != found:
        raise ValueError(f"{os.fspath(path)} holds a different network ({found}) than the one asked for ({config})")
    config = config or found
    state = from_diffusers(source.state_dict(), config)
    with torch.device("meta"):
        model = MMDiT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model
