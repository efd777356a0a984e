"""Time and class embeddings shared by the image networks.

Time features (the network's time input ``t`` is multiplied by ``time_scale`` first, so any
float time the :class:`multidiff.Denoiser` passes works: process time in ``[0, 1]``, log-SNR,
``sigma``, a DDPM step or EDM's ``c_noise``):

* ``"sinusoidal"``: the transformer position code used by DDPM (Vaswani et al. 2017, sec. 3.5;
  Ho et al. 2020, appendix B): ``[cos(s t w_k), sin(s t w_k)]`` with
  ``w_k = max_period^(-k / half)``, ``k = 0..half-1``.
* ``"fourier"``: Gaussian random Fourier features (Tancik et al. 2020; Song et al. 2021,
  appendix H.2): ``[sin(2 pi s t W_k), cos(2 pi s t W_k)]`` with fixed ``W_k ~ N(0, scale^2)``
  drawn from ``fourier_seed``. ``W`` is a buffer, so it travels in the state dict, and it is
  the same for every build of the same config whatever the global RNG state.

Either feature vector goes through ``Linear -> SiLU -> Linear`` (DDPM, ADM). Class labels use
one extra learned row, index ``num_classes``, as the "no label" (null) class for
classifier-free guidance (Ho & Salimans 2022): the unconditional prediction is the one made
with the null class.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TIME_EMBEDDINGS", "ClassEmbedding", "LabelError", "TimeEmbedding", "TimeFeatures", "drop_labels"]

TIME_EMBEDDINGS = ("sinusoidal", "fourier")


class LabelError(ValueError):
    """Class labels that do not fit the network (out of range, wrong shape, or given to an
    unconditional network)."""


class TimeFeatures(nn.Module):
    """Fixed (not learned) features of a per-item time input ``t [B] -> [B, dim]``, in float32."""

    def __init__(
        self,
        dim: int,
        kind: str = "sinusoidal",
        time_scale: float = 1000.0,
        max_period: float = 10000.0,
        fourier_scale: float = 16.0,
        fourier_seed: int = 0,
    ):
        super().__init__()
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"unknown time embedding {kind!r}; valid: {', '.join(TIME_EMBEDDINGS)}")
        if dim < 2 or dim % 2:
            raise ValueError(f"the time feature dimension must be an even number >= 2, got {dim}")
        self.kind = kind
        self.time_scale = float(time_scale)
        half = dim // 2
        if kind == "sinusoidal":
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        else:
            gen = torch.Generator().manual_seed(int(fourier_seed))
            freqs = 2 * math.pi * fourier_scale * torch.randn(half, generator=gen, dtype=torch.float64)
        self.register_buffer("freqs", freqs.float())

    def forward(self, t: Tensor) -> Tensor:
        # float32 whatever the input dtype or autocast (float64 is missing on some devices);
        # sin/cos are elementwise, so autocast leaves them in float32.
        arg = (self.time_scale * t.float())[:, None] * self.freqs[None]
        if self.kind == "sinusoidal":
            return torch.cat([arg.cos(), arg.sin()], dim=1)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """``t [B] -> [B, emb_dim]``: fixed features, then ``Linear -> SiLU -> Linear``."""

    def __init__(self, feature_dim: int, emb_dim: int, **feature_kw):
        super().__init__()
        self.features = TimeFeatures(feature_dim, **feature_kw)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.features(t))


class ClassEmbedding(nn.Module):
    """A learned vector per class plus one for the null class (index ``num_classes``)."""

    def __init__(self, num_classes: int, emb_dim: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.table = nn.Embedding(self.num_classes + 1, emb_dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels)


def check_labels(labels: Tensor | None, batch: int, num_classes: int, device: torch.device) -> Tensor | None:
    """Validate ``labels`` for a network with ``num_classes`` classes and return the index
    tensor to embed (``None`` for an unconditional network).

    Valid labels are ``0..num_classes``; ``num_classes`` is the null class. ``labels=None`` on a
    class-conditional network means "null class for every item".
    """
    if num_classes == 0:
        if labels is not None:
            raise LabelError("this network is unconditional (num_classes=0) but labels were given; pass labels=None")
        return None
    if labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise LabelError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (batch,):
        raise LabelError(f"labels must have shape [{batch}] (one per item), got {list(labels.shape)}")
    bad = (labels < 0) | (labels > num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise LabelError(
            f"class label {int(labels[i])} of item {i} is out of range: valid labels are 0..{num_classes - 1} "
            f"and {num_classes} for the null (unconditional) class"
        )
    return labels.to(device=device, dtype=torch.long)


def drop_labels(
    labels: Tensor, p: float, null_label: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace each label by ``null_label`` with probability ``p`` (classifier-free guidance
    training, Ho & Salimans 2022, Algorithm 1). The mask is drawn from ``generator`` (on the
    labels' device) or, if ``None``, from torch's global RNG."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout must be a probability in [0, 1], got {p}")
    if p == 0.0:
        return labels
    mask = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(mask, torch.full_like(labels, null_label), labels)
