"""A small Diffusion Transformer (DiT; Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers").

``x [B, C, H, W]`` is cut into ``p x p`` patches, each linearly embedded into a token
(sec. 3.2 "Patchify"), plus a 2-D positional embedding (fixed sin-cos as in the paper, or
learned). The time embedding plus the class embedding form the conditioning vector ``c``, which
modulates every transformer block through adaLN-Zero (sec. 3.2, Fig. 3):

    (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))            # zero-initialised
    x = x + gate1 * Attention(LN(x) (1 + scale1) + shift1)
    x = x + gate2 * MLP(LN(x) (1 + scale2) + shift2)

so every block starts as the identity. The final layer is ``LN`` with adaptive shift/scale and a
zero-initialised linear map to ``p * p * C_out`` values per token, then "unpatchify" back to the
image. The sin-cos embedding is computed for whatever grid the input has, so a sin-cos DiT
accepts any size divisible by the patch size; a learned one needs ``image_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigError, ImageNetwork
from .embeddings import TIME_EMBEDDINGS, ClassEmbedding, TimeEmbedding

__all__ = ["DiT", "DiTConfig", "sincos_2d"]

POS_EMBEDDINGS = ("sincos", "learned")


@dataclass(frozen=True)
class DiTConfig:
    """Everything that defines a :class:`DiT`; stored in checkpoints as a dict.

    The defaults (8x8 inputs, 2x2 patches = 16 tokens, width 96, depth 4) have 722,788
    parameters and train on CPU in minutes.
    """

    in_channels: int = 1
    out_channels: int | None = None  # None: same as in_channels
    image_size: int = 8
    patch_size: int = 2
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pos_embedding: str = "sincos"
    num_classes: int = 0
    label_dropout: float = 0.1
    time_embedding: str = "sinusoidal"
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    fourier_seed: int = 0
    time_feature_dim: int = 256

    def __post_init__(self):
        for name in ("in_channels", "image_size", "patch_size", "hidden_size", "depth", "num_heads", "time_feature_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"DiTConfig.{name} must be a positive integer, got {v!r}")
        if self.out_channels is not None and (not isinstance(self.out_channels, int) or self.out_channels < 1):
            raise ConfigError(f"DiTConfig.out_channels must be a positive integer or None, got {self.out_channels!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ConfigError(f"unknown pos_embedding {self.pos_embedding!r}; valid: {', '.join(POS_EMBEDDINGS)}")
        if self.pos_embedding == "sincos" and self.hidden_size % 4:
            raise ConfigError(f"the sin-cos position code needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.time_feature_dim % 2:
            raise ConfigError(f"DiTConfig.time_feature_dim must be even, got {self.time_feature_dim}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"DiTConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"DiTConfig.num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ConfigError(f"DiTConfig.label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ConfigError(f"unknown time_embedding {self.time_embedding!r}; valid: {', '.join(TIME_EMBEDDINGS)}")


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D position code ``[h*w, dim]`` (row-major tokens): the first half of the channels
    encodes the row, the second half the column, each as ``[sin(pos w_k), cos(pos w_k)]`` with
    ``w_k = 10000^(-k / (dim/4))`` (Vaswani et al. 2017, applied per axis as in MAE and DiT)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def code(pos):
        arg = pos[:, None] * omega[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.cat([code(rows.reshape(-1)), code(cols.reshape(-1))], dim=1).float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))
        self.ada = nn.Linear(hidden, 6 * hidden)

    def attention(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d_head]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(ImageNetwork):
    """``DiT(config)(x [B, C, H, W], t [B], labels=None) -> [B, C_out, H, W]``; see module doc."""

    kind = "dit"
    config_class = DiTConfig

    def __init__(self, config: DiTConfig | None = None):
        config = config if config is not None else DiTConfig()
        super().__init__(config)
        c = config
        p, d = c.patch_size, c.hidden_size
        self.out_channels = c.out_channels or c.in_channels
        self.patch_embed = nn.Conv2d(c.in_channels, d, p, stride=p)
        grid = c.image_size // p
        if c.pos_embedding == "learned":
            self.pos = nn.Parameter(torch.zeros(1, grid * grid, d))
        else:
            self.register_buffer("pos", sincos_2d(d, grid, grid)[None], persistent=False)
        self.time_embed = TimeEmbedding(
            c.time_feature_dim, d, kind=c.time_embedding, time_scale=c.time_scale,
            fourier_scale=c.fourier_scale, fourier_seed=c.fourier_seed,
        )
        self.class_embed = ClassEmbedding(c.num_classes, d) if c.num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(d, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.final = FinalLayer(d, p * p * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        # DiT's initialisation (Peebles & Xie 2023, sec. 3.2 and their released code's recipe):
        # Xavier-uniform linear maps, small normal embeddings, adaLN-Zero and output layer at 0.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos, nn.Parameter):
            nn.init.normal_(self.pos, std=0.02)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.table.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight)
            nn.init.zeros_(block.ada.bias)
        for lin in (self.final.ada, self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _pos(self, gh: int, gw: int, like: Tensor) -> Tensor:
        if self.pos.shape[1] == gh * gw and self.config.image_size // self.config.patch_size == gh == gw:
            return self.pos
        if isinstance(self.pos, nn.Parameter):
            s = self.config.image_size
            raise ValueError(
                f"this DiT has a learned position embedding for {s}x{s} images; got "
                f"{gh * self.config.patch_size}x{gw * self.config.patch_size} (use pos_embedding='sincos' for other sizes)"
            )
        return sincos_2d(self.config.hidden_size, gh, gw).to(like.device)[None]

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        t = self._check_input(x, t)
        p = self.config.patch_size
        b, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
        labels = self._labels(labels, x)
        c = self.time_embed(t)
        if self.class_embed is not None:
            c = c + self.class_embed(labels)
        tokens = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = tokens + self._pos(h // p, w // p, tokens)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final(tokens, c)  # [B, N, p*p*C]
        out = out.reshape(b, h // p, w // p, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, self.out_channels, h, w).to(x.dtype)
