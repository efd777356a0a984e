"""Distances between two sample sets, for checking samplers against analytic targets."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "energy_distance"]


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 128, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance (Rabin et al. 2011): the root mean square over random unit
    directions of the 1-D W2 between the projected samples, by sorting. Sample sets of
    different sizes are compared through their quantiles at a common set of levels."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(x)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    dirs = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64).to(x.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ dirs, dim=0)
    py, _ = torch.sort(y @ dirs, dim=0)
    n = min(px.shape[0], py.shape[0])
    levels = (torch.arange(n, dtype=torch.float64, device=x.device) + 0.5) / n
    qx = torch.quantile(px, levels, dim=0) if px.shape[0] != n else px
    qy = torch.quantile(py, levels, dim=0) if py.shape[0] != n else py
    return float(((qx - qy) ** 2).mean().sqrt())


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance (Szekely & Rizzo 2013): ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (V-statistics)."""
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(x)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
