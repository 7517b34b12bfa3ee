"""Analytic parameter count and training FLOPs of the MM-DiT: the one place these formulas live.

FLOPs convention (used for MFU, the sweep's compute axis and the benchmarks): multiply-adds of every
matmul count 2 FLOPs; a training step costs 3x the forward (forward + backward for activations and weights);
norms, activations, softmax and elementwise ops are not counted. Each token passes only its own stream's
weights; adaLN modulation and the embedders of per-sample vectors run once per sample. The leading term is
the paper's 72*d*h^2*T*(1 + T/(6h)) with T = image + text tokens; the 6*N*T rule overcounts about 3x for
this architecture because each token only meets half of the block weights.
"""

from __future__ import annotations

from model.config import MMDiTConfig
from model.layers import TIMESTEP_FEATURES

TRAIN_FORWARD_MULTIPLIER = 3.0
DEFAULT_TEXT_TOKENS = 154  # 77 CLIP tokens + 77 T5 tokens


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _stream_params(c: MMDiTConfig, pre_only: bool) -> int:
    h = c.hidden_size
    mod = _linear(h, h * (2 if pre_only else 6))
    qkv = _linear(h, 3 * h)
    qk_norm = 2 * c.head_dim if c.qk_norm == "rms" else 0
    if pre_only:
        return mod + qkv + qk_norm
    return mod + qkv + qk_norm + _linear(h, h) + _linear(h, c.mlp_hidden) + _linear(c.mlp_hidden, h)


def count_params(config: MMDiTConfig) -> int:
    """Exact number of trainable parameters (the sin-cos position table is a buffer, not counted)."""
    c, h = config, config.hidden_size
    embedders = (_linear(c.patch_dim, h) + _linear(c.context_dim, h)
                 + _linear(TIMESTEP_FEATURES, h) + _linear(h, h)
                 + _linear(c.pooled_dim, h) + _linear(h, h))
    blocks = (c.depth * _stream_params(c, pre_only=False)  # image streams
              + (c.depth - 1) * _stream_params(c, pre_only=False)  # text streams
              + _stream_params(c, pre_only=True))  # last text stream
    final = _linear(h, 2 * h) + _linear(h, c.patch_dim)
    return embedders + blocks + final


def forward_flops(config: MMDiTConfig, height: int, width: int, text_tokens: int = DEFAULT_TEXT_TOKENS) -> float:
    """Forward FLOPs for one sample with a `height` x `width` latent (not pixels)."""
    c, h = config, config.hidden_size
    n_img, n_txt = c.image_tokens(height, width), text_tokens
    seq = n_img + n_txt
    full_stream = 3 * h * h + h * h + 2 * h * c.mlp_hidden  # qkv, out proj, MLP macs per token
    per_block_tokens = n_img * full_stream + n_txt * full_stream
    last_block_tokens = n_img * full_stream + n_txt * 3 * h * h  # pre-only text stream: qkv only
    attention = 2 * seq * seq * h  # QK^T and AV per block
    last_attention = 2 * n_img * seq * h  # the last block's text tokens do not query
    adaln = (2 * 6 * h * h) * (c.depth - 1) + (6 + 2) * h * h + 2 * h * h  # once per sample
    embed = n_img * c.patch_dim * h + n_txt * c.context_dim * h + n_img * h * c.patch_dim
    vectors = (TIMESTEP_FEATURES + h + c.pooled_dim + h) * h
    macs = ((c.depth - 1) * (per_block_tokens + attention) + last_block_tokens + last_attention
            + adaln + embed + vectors)
    return 2.0 * macs


def train_flops(config: MMDiTConfig, height: int, width: int, text_tokens: int = DEFAULT_TEXT_TOKENS) -> float:
    """Training FLOPs per sample (forward + backward) for a `height` x `width` latent; see module docstring."""
    return TRAIN_FORWARD_MULTIPLIER * forward_flops(config, height, width, text_tokens)


def paper_train_flops(config: MMDiTConfig, height: int, width: int, text_tokens: int = DEFAULT_TEXT_TOKENS) -> float:
    """The paper's leading-order estimate 72*d*h^2*T*(1 + T/(6h)), for cross-checking `train_flops`."""
    d, h = config.depth, config.hidden_size
    seq = config.image_tokens(height, width) + text_tokens
    return 72.0 * d * h * h * seq * (1 + seq / (6 * h))
