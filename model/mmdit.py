"""The MM-DiT of SD3: two streams (text, image) with their own weights and one joint attention.

Shape letters: B batch, C latent channels, H/W latent height/width, N image tokens, L text tokens,
S = L + N joint sequence, D hidden size, K heads, E head dim, P patch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from model.config import MMDiTConfig
from model.layers import (
    TIMESTEP_FEATURES,
    AdaLN,
    FeedForward,
    MLPEmbedder,
    Modulation,
    sincos_pos_embed_2d,
    timestep_embedding,
)
from model.mup import INPUT_LAYERS


def check_skip_layers(skip_layers: Sequence[int], depth: int) -> None:
    """Raise a ValueError unless every index names one of `depth` blocks."""
    if any(not isinstance(i, int) or not 0 <= i < depth for i in skip_layers):
        raise ValueError(f"skip_layers must be block indices in [0, {depth - 1}] (depth {depth}), "
                         f"got {list(skip_layers)}")


class StreamBlock(nn.Module):
    """One stream's half of an MM-DiT block: modulation, QKV (+ QK-norm), output projection and MLP.

    A `pre_only` stream (text in the last block) only supplies keys, queries and values.
    """

    def __init__(self, config: MMDiTConfig, pre_only: bool = False) -> None:
        super().__init__()
        d, self.num_heads, self.pre_only = config.hidden_size, config.num_heads, pre_only
        self.mod = AdaLN(d, count=1 if pre_only else 2, gated=not pre_only)
        self.qkv = nn.Linear(d, 3 * d)
        if config.qk_norm == "rms":
            self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(d, d)
            self.mlp = FeedForward(d, config.mlp_hidden)

    def pre_attention(self, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], list[Modulation]]:
        """(B, T, D), (B, D) -> queries, keys, values (B, K, T, E) and the modulations for later."""
        mods = self.mod(y)
        qkv = self.qkv(mods[0].apply(x))  # (B, T, 3D)
        q, k, v = rearrange(qkv, "b t (n k e) -> n b k t e", n=3, k=self.num_heads)  # 3 x (B, K, T, E)
        # A pre-only stream's queries are never used: its query norm is not run, so that weight takes no part in the
        # graph (a compiled block would otherwise hand the optimizer a None gradient for it) and costs nothing.
        return (q if self.pre_only else self.q_norm(q), self.k_norm(k), v), mods

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mods: list[Modulation]) -> torch.Tensor:
        """Gated residuals of attention output and MLP: (B, T, D) -> (B, T, D)."""
        attn_mod, mlp_mod = mods
        x = attn_mod.gated(x, self.proj(attn))  # (B, T, D)
        return mlp_mod.gated(x, self.mlp(mlp_mod.apply(x)))  # (B, T, D)


class MMDiTBlock(nn.Module):
    """Text and image streams joined by one attention over the concatenated [text, image] sequence."""

    def __init__(self, config: MMDiTConfig, last: bool = False) -> None:
        super().__init__()
        self.img = StreamBlock(config)
        self.txt = StreamBlock(config, pre_only=last)
        self.attention_scale = config.attention_scale  # None: SDPA's 1/sqrt(E), as SD3

    def forward(self, img: torch.Tensor, txt: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n_txt = txt.shape[1]
        (img_q, img_k, img_v), img_mods = self.img.pre_attention(img, y)  # (B, K, N, E) each
        (txt_q, txt_k, txt_v), txt_mods = self.txt.pre_attention(txt, y)  # (B, K, L, E) each
        k = torch.cat([txt_k, img_k], dim=2)  # (B, K, S, E)
        v = torch.cat([txt_v, img_v], dim=2)  # (B, K, S, E)
        if self.txt.pre_only:
            # Text outputs of the last block are discarded, so only image tokens query: same result, less work.
            # The text query weights stay, unused, for SD3 checkpoint compatibility.
            attn = nn.functional.scaled_dot_product_attention(img_q, k, v, scale=self.attention_scale)  # (B, K, N, E)
            img_attn = rearrange(attn, "b k n e -> b n (k e)")  # (B, N, D)
            return self.img.post_attention(img, img_attn, img_mods), None
        q = torch.cat([txt_q, img_q], dim=2)  # (B, K, S, E)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.attention_scale)  # (B, K, S, E)
        attn = rearrange(attn, "b k s e -> b s (k e)")  # (B, S, D)
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]  # (B, L, D), (B, N, D)
        img = self.img.post_attention(img, img_attn, img_mods)  # (B, N, D)
        return img, self.txt.post_attention(txt, txt_attn, txt_mods)  # (B, L, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale), LayerNorm, linear to patch values."""

    def __init__(self, config: MMDiTConfig) -> None:
        super().__init__()
        self.mod = AdaLN(config.hidden_size, count=1, gated=False)
        self.linear = nn.Linear(config.hidden_size, config.patch_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        (mod,) = self.mod(y)
        return self.linear(mod.apply(x))  # (B, N, P*P*C)


class MMDiT(nn.Module):
    """Velocity network v(z_t, t, context, pooled) of SD3."""

    def __init__(self, config: MMDiTConfig, initialize: bool = True) -> None:
        """`initialize=False` leaves the weights as allocated, for callers that initialise module by module
        (`init_module`, e.g. under ZeRO-3 where each module is gathered in turn); on the meta device it is implied."""
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.img_in = nn.Linear(config.patch_dim, d)
        self.txt_in = nn.Linear(config.context_dim, d)
        self.time_in = MLPEmbedder(TIMESTEP_FEATURES, d)
        self.vec_in = MLPEmbedder(config.pooled_dim, d)
        self.blocks = nn.ModuleList(MMDiTBlock(config, last=i == config.depth - 1) for i in range(config.depth))
        self.final = FinalLayer(config)
        grid = config.pos_embed_max_size
        # A buffer, not a parameter (as in SD3), but persistent so converted public weights carry their table.
        self.register_buffer("pos_embed", torch.empty(grid * grid, d))
        if initialize and self.pos_embed.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Explicit init (call after `to_empty` when built on the meta device): Xavier linears,
        N(0, 0.02) embedders, zero adaLN modulation and final linear (adaLN-Zero), sin-cos positions.
        Under muP (`model.mup`) the same at the base width; wider, the input layers keep the base width's variance
        and the embedders' width-to-width layers scale theirs as 1/width, as Xavier does the others'."""
        for module in self.modules():
            self.init_module(module)
        self.init_buffers()

    @torch.no_grad()
    def init_module(self, module: nn.Module) -> None:
        """Initialise `module`'s own parameters (not its children's) as `init_weights` does."""
        if isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        if not isinstance(module, nn.Linear):
            return
        nn.init.zeros_(module.bias)
        c = self.config
        embedders = {e.lin1 for e in (self.time_in, self.vec_in)} | {e.lin2 for e in (self.time_in, self.vec_in)}
        zeroed = {m.lin for m in self.modules() if isinstance(m, AdaLN)} | {self.final.linear}
        inputs = {self.get_submodule(name) for name in INPUT_LAYERS}
        if module in zeroed:
            nn.init.zeros_(module.weight)
        elif module in embedders:
            std = 0.02 if module in inputs else 0.02 / math.sqrt(c.width_multiplier)  # 1 under SP
            nn.init.normal_(module.weight, std=std)
        elif module in inputs and c.parametrization == "mup":
            # Xavier's bound with the base width as fan-out: a variance that the fixed fan-in alone sets
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(module.in_features + c.mup_base_width))
            nn.init.uniform_(module.weight, -bound, bound)
        else:
            nn.init.xavier_uniform_(module.weight)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The sin-cos position table on the maximum grid."""
        c = self.config
        table = sincos_pos_embed_2d(c.hidden_size, c.pos_embed_max_size, c.sample_size // c.patch_size,
                                    device=self.pos_embed.device)
        self.pos_embed.copy_(table)

    def cropped_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Centre crop of the maximum grid's table to the current patch grid: (grid_h * grid_w, D)."""
        g = self.config.pos_embed_max_size
        top, left = (g - grid_h) // 2, (g - grid_w) // 2
        table = self.pos_embed.view(g, g, -1)[top:top + grid_h, left:left + grid_w]  # (h, w, D)
        return table.reshape(grid_h * grid_w, -1)  # (N, D)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> None:
        """Raise a ValueError that names the tensor whose shape does not fit this network."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must have shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        max_side = c.pos_embed_max_size * c.patch_size
        if h % c.patch_size or w % c.patch_size or h > max_side or w > max_side:
            raise ValueError(
                f"x spatial size {h}x{w} must be divisible by patch_size={c.patch_size} and at most "
                f"{max_side}x{max_side} (pos_embed_max_size={c.pos_embed_max_size} patches)"
            )
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.context_dim:
            raise ValueError(f"context must have shape ({b}, L, {c.context_dim}), got {tuple(context.shape)}")
        if pooled.shape != (b, c.pooled_dim):
            raise ValueError(f"pooled must have shape ({b}, {c.pooled_dim}), got {tuple(pooled.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Sequence[int] = ()) -> torch.Tensor:
        """(B, C, H, W) latents, (B,) t in [0, 1], (B, L, context_dim), (B, pooled_dim) -> (B, C, H, W) velocity.

        The blocks in `skip_layers` are left out, both streams passing them unchanged (skip-layer guidance's
        degraded branch, as SD3.5's reference code and diffusers' `skip_layers` skip). Skipping the last block
        leaves the image stream at the previous block's output: its text stream only lends keys and values."""
        self.check_inputs(x, t, context, pooled)
        check_skip_layers(skip_layers, self.config.depth)
        p = self.config.patch_size
        grid_h, grid_w = x.shape[2] // p, x.shape[3] // p
        img = rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)  # (B, N, C*P*P)
        img = self.img_in(img) + self.cropped_pos_embed(grid_h, grid_w).to(img.dtype)  # (B, N, D)
        txt = self.txt_in(context)  # (B, L, D)
        t_features = timestep_embedding(t).to(pooled.dtype)  # (B, 256)
        y = self.time_in(t_features) + self.vec_in(pooled)  # (B, D)
        for i, block in enumerate(self.blocks):
            if i not in skip_layers:
                img, txt = block(img, txt, y)  # (B, N, D), (B, L, D) or None after the last block
        out = self.final(img, y)  # (B, N, P*P*C)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_h, w=grid_w, p=p, q=p)  # (B, C, H, W)
