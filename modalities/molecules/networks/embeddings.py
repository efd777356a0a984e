"""Invariant edge features: distance sinusoids, a Gaussian radial basis and a smooth cutoff.

* :class:`DistanceSinusoids`: EDM's optional "sin embedding" of an edge length (Hoogeboom et al.
  2022, code option ``sin_embedding``): ``d = sqrt(d2 + 1e-8)`` and
  ``[sin(w_k d), cos(w_k d)]`` with ``w_k = 2 pi 4^k / 15``, ``k = 0..5`` (wavelengths from
  15 A down to 15/1024 A, i.e. EDM's ``max_res = 15``, ``min_res = 15/2000``, factor 4).
* :class:`GaussianBasis`: ``exp(-((d - mu_k) / w)^2)`` with ``mu_k`` evenly spaced on
  ``[0, d_max]`` and ``w`` their spacing (SchNet's radial basis, Schuett et al. 2017, eq. 5).
* :func:`cosine_cutoff`: ``0.5 (cos(pi d / r) + 1)`` for ``d < r``, else 0 (Behler 2011): it
  takes a message smoothly to zero at the radius, so a radius graph's network output does not
  jump when an atom crosses the radius.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DistanceSinusoids", "GaussianBasis", "cosine_cutoff"]


class DistanceSinusoids(nn.Module):
    """``d2 [E, 1] (squared length) -> [E, 2 K]`` sin/cos features of the length."""

    def __init__(self, max_wavelength: float = 15.0, min_wavelength: float = 15.0 / 2000.0, factor: float = 4.0):
        super().__init__()
        count = int(math.log(max_wavelength / min_wavelength, factor)) + 1
        freqs = 2 * math.pi * factor ** torch.arange(count, dtype=torch.float64) / max_wavelength
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.dim = 2 * count

    def forward(self, d2: Tensor) -> Tensor:
        d = torch.sqrt(d2 + 1e-8)
        arg = d * self.freqs.to(d.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class GaussianBasis(nn.Module):
    """``d [E] -> [E, count]``: Gaussians of width equal to their spacing on ``[0, d_max]``."""

    def __init__(self, count: int, d_max: float):
        super().__init__()
        if count < 2 or not d_max > 0:
            raise ValueError(f"the Gaussian basis needs count >= 2 and d_max > 0, got {count}, {d_max}")
        self.register_buffer("centres", torch.linspace(0.0, float(d_max), count), persistent=False)
        self.width = float(d_max) / (count - 1)
        self.dim = count

    def forward(self, d: Tensor) -> Tensor:
        return torch.exp(-(((d[:, None] - self.centres.to(d.dtype)) / self.width) ** 2))


def cosine_cutoff(d: Tensor, radius: float) -> Tensor:
    """``0.5 (cos(pi d / r) + 1)`` below ``r``, ``0`` above: smooth, 1 at ``d = 0``."""
    return torch.where(d < radius, 0.5 * (torch.cos(math.pi * d / radius) + 1.0), torch.zeros_like(d))
