"""A U-Net for small images (8x8 digits up to about 64x64).

The layout follows DDPM (Ho et al. 2020, appendix B) with the refinements of ADM (Dhariwal &
Nichol 2021, sec. 3): residual blocks ``GroupNorm -> SiLU -> conv`` whose second normalisation
is modulated by the time (+ class) embedding as ``GN(h) (1 + scale) + shift`` ("adaptive group
normalisation", ADM eq. in sec. 3), multi-head self-attention at chosen resolutions and in the
middle, a skip connection from every encoder block to the decoder, and zero-initialised output
layers (the last convolution of each residual block, each attention projection and the output
convolution), so the untrained network outputs zeros and every block starts as the identity.

Resolution levels: level ``i`` works at ``H / 2^i`` with ``base_channels * channel_mult[i]``
channels; ``H`` and ``W`` must be divisible by ``2^(len(channel_mult) - 1)``. Attention levels are
given as level indices so the same config works for any input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigError, ImageNetwork
from .embeddings import TIME_EMBEDDINGS, ClassEmbedding, TimeEmbedding

__all__ = ["UNet", "UNetConfig"]


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a :class:`UNet`; stored in checkpoints as a dict.

    The defaults fit CPU training on the 8x8 digits in minutes: 996,321 parameters (unconditional),
    levels 8x8 (32 channels) and 4x4 (64 channels), self-attention in the 4x4 middle block.
    """

    in_channels: int = 1
    out_channels: int | None = None  # None: same as in_channels
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()  # level i has resolution H / 2^i
    mid_attention: bool = True
    num_heads: int = 4
    dropout: float = 0.1
    groups: int = 8  # GroupNorm groups; must divide every channel count
    num_classes: int = 0  # 0: unconditional
    label_dropout: float = 0.1  # classifier-free guidance: P(label -> null) in training
    time_embedding: str = "sinusoidal"
    time_scale: float = 1000.0  # the features see time_scale * t
    fourier_scale: float = 16.0
    fourier_seed: int = 0
    emb_mult: int = 4  # embedding width = emb_mult * base_channels

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"UNetConfig.{name} must be a positive integer, got {v!r}")

        for name in ("in_channels", "base_channels", "num_res_blocks", "num_heads", "groups", "emb_mult"):
            positive(name)
        if self.out_channels is not None:
            positive("out_channels")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ConfigError(f"UNetConfig.channel_mult must be a non-empty tuple of positive integers, got {self.channel_mult!r}")
        levels = len(self.channel_mult)
        for lv in self.attention_levels:
            if not isinstance(lv, int) or not 0 <= lv < levels:
                raise ConfigError(f"UNetConfig.attention_levels entry {lv!r} is not a level; valid: 0..{levels - 1}")
        for ch in {self.base_channels * m for m in self.channel_mult}:
            if ch % self.groups:
                raise ConfigError(f"GroupNorm groups={self.groups} must divide every channel count; {ch} is not divisible")
        attn_ch = {self.base_channels * self.channel_mult[lv] for lv in self.attention_levels}
        if self.mid_attention:
            attn_ch.add(self.base_channels * self.channel_mult[-1])
        for ch in attn_ch:
            if ch % self.num_heads:
                raise ConfigError(f"num_heads={self.num_heads} must divide the attention width {ch}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ConfigError(f"UNetConfig.label_dropout must be in [0, 1], got {self.label_dropout}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"UNetConfig.num_classes must be an integer >= 0, got {self.num_classes!r}")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ConfigError(f"unknown time_embedding {self.time_embedding!r}; valid: {', '.join(TIME_EMBEDDINGS)}")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """``h + conv(drop(SiLU(GN(conv(SiLU(GN(h)))) (1 + scale) + shift)))`` (ADM residual block)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H W`` positions, residual, zero-initialised output."""

    def __init__(self, channels: int, groups: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """A residual block, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(ImageNetwork):
    """``UNet(config)(x [B, C, H, W], t [B], labels=None) -> [B, C_out, H, W]``; see module doc."""

    kind = "unet"
    config_class = UNetConfig

    def __init__(self, config: UNetConfig | None = None):
        config = config if config is not None else UNetConfig()
        super().__init__(config)
        c = config
        ch = [c.base_channels * m for m in c.channel_mult]
        emb_dim = c.emb_mult * c.base_channels
        self.time_embed = TimeEmbedding(
            c.base_channels, emb_dim, kind=c.time_embedding, time_scale=c.time_scale,
            fourier_scale=c.fourier_scale, fourier_seed=c.fourier_seed,
        )
        self.class_embed = ClassEmbedding(c.num_classes, emb_dim) if c.num_classes > 0 else None

        def stage(cin, cout, level):
            attn = AttentionBlock(cout, c.groups, c.num_heads) if level in c.attention_levels else None
            return Stage(ResBlock(cin, cout, emb_dim, c.groups, c.dropout), attn)

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for level, cout in enumerate(ch):
            for _ in range(c.num_res_blocks):
                self.down.append(stage(cur, cout, level))
                cur = cout
                skips.append(cur)
            if level < len(ch) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
        self.mid = nn.ModuleList([
            Stage(ResBlock(cur, cur, emb_dim, c.groups, c.dropout),
                  AttentionBlock(cur, c.groups, c.num_heads) if c.mid_attention else None),
            Stage(ResBlock(cur, cur, emb_dim, c.groups, c.dropout), None),
        ])
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            for i in range(c.num_res_blocks + 1):
                self.up.append(stage(cur + skips.pop(), ch[level], level))
                cur = ch[level]
                if level > 0 and i == c.num_res_blocks:
                    self.up.append(Upsample(cur))
        self.norm_out = nn.GroupNorm(c.groups, cur)
        self.conv_out = _zero(nn.Conv2d(cur, c.out_channels or c.in_channels, 3, padding=1))
        self.downsamples = len(ch) - 1

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        t = self._check_input(x, t)
        f = 2**self.downsamples
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by {f} "
                f"(2^(len(channel_mult) - 1) for channel_mult={self.config.channel_mult})"
            )
        labels = self._labels(labels, x)
        emb = self.time_embed(t)
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels)
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        hs = [h]
        for m in self.down:
            h = m(h, emb) if isinstance(m, Stage) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            if isinstance(m, Stage):
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)
