"""Classifier-free guidance (Ho & Salimans 2021), optionally limited to a noise-level interval."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..space import ShapeError
from ._util import GuidedModel, _space

__all__ = ['ClassifierFreeGuidance']


class ClassifierFreeGuidance(GuidedModel):
    """Classifier-free guidance (Ho & Salimans 2021) on the data prediction.

    ``x0 = x0_c + w (x0_c - x0_u)`` with ``x0_c = model(x, t, space, **cond)`` and
    ``x0_u = model(x, t, space, **uncond)``. Since ``eps`` is affine in ``x0`` at fixed ``x``, this
    is Ho & Salimans' ``eps = (1 + w) eps_c - w eps_u``: ``w = 0`` is exactly the conditional
    model, and ``w`` is the "guidance scale minus one" of libraries that write
    ``eps_u + g (eps_c - eps_u)``.

    Both branches come from **one** model call on the doubled batch: ``x`` and ``t`` are
    concatenated with themselves, every tensor in ``cond``/``uncond`` as ``[cond; uncond]``
    along its first (item or node) dimension, and the Space is ``space.repeat(2)`` (for a
    GraphSpace: the nodes of copy 0, then copy 1, with an offset ``batch`` vector). Non-tensor
    entries must be equal in both dicts and are passed as they are.

    ``interval = (sigma_lo, sigma_hi)`` guides only items whose EDM noise level
    ``sigma / alpha`` lies in ``[sigma_lo, sigma_hi]`` (Kynkaenniemi et al. 2024, "Applying guidance
    in a limited interval"); elsewhere the conditional prediction is returned. When no item of
    the batch is inside (the usual case: samplers evaluate all items at one time) the call runs
    the conditional half only, on the original batch. Either way one call counts as one NFE.
    """

    def __init__(
        self,
        model,
        cond: dict[str, Any],
        uncond: dict[str, Any],
        scale: float,
        interval: tuple[float, float] | None = None,
    ):
        if set(cond) != set(uncond):
            raise ValueError(
                f"cond and uncond must name the same keyword arguments, got {sorted(cond)} and {sorted(uncond)}"
            )
        for k in cond:
            c, u = cond[k], uncond[k]
            if isinstance(c, Tensor) != isinstance(u, Tensor):
                raise TypeError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors or both not")
            if isinstance(c, Tensor) and c.shape[1:] != u.shape[1:]:
                raise ShapeError(f"cond[{k!r}] has shape {tuple(c.shape)} but uncond[{k!r}] has {tuple(u.shape)}")
            if not isinstance(c, Tensor) and c != u:
                raise ValueError(f"non-tensor entry {k!r} differs between cond ({c!r}) and uncond ({u!r})")
        if interval is not None:
            lo, hi = float(interval[0]), float(interval[1])
            if not 0 <= lo <= hi:
                raise ValueError(f"interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo <= sigma_hi, got {interval}")
            interval = (lo, hi)
        self.model = model
        self.cond = dict(cond)
        self.uncond = dict(uncond)
        self.scale = float(scale)
        self.interval = interval

    def _inside(self, t: Tensor) -> Tensor:
        if self.interval is None:
            return torch.ones_like(t, dtype=torch.bool)
        sig = self.process.sigma_edm(t.to(torch.float64))
        return (sig >= self.interval[0]) & (sig <= self.interval[1])

    def __call__(self, x: Tensor, t: Tensor, space=None, **extra: Any) -> Tensor:
        space = _space(space, x)
        inside = self._inside(t)
        if not bool(inside.any()):
            return self.model(x, t, space, **self.cond, **extra)
        both = {}
        for k, c in self.cond.items():
            both[k] = torch.cat([c, self.uncond[k]]) if isinstance(c, Tensor) else c
        for k, v in extra.items():
            both[k] = torch.cat([v, v]) if isinstance(v, Tensor) else v
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), space.repeat(2), **both)
        x0_c, x0_u = out[: x.shape[0]], out[x.shape[0]:]
        guided = x0_c + self.scale * (x0_c - x0_u)
        if self.interval is None or bool(inside.all()):
            return guided
        return torch.where(space.expand(inside), guided, x0_c)
