"""Exponential moving averages of network weights: fixed decay and the EDM2 power profile.

After optimiser step ``t = 1, 2, ...`` the average is updated as

    theta_ema(t) = beta(t) * theta_ema(t - 1) + (1 - beta(t)) * theta(t).

* **fixed**: ``beta(t) = decay``.
* **power** (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion
  models", sec. 3.1): ``beta(t) = (1 - 1/t)^(gamma + 1)``. The average then weights the
  trajectory by a power function, ``theta_ema(t) ∝ ∫_0^t tau^gamma theta(tau) dtau``, whose width
  relative to its position is the same at every ``t``: its relative standard deviation is

      sigma_rel = sqrt(gamma + 1) / ((gamma + 2) * sqrt(gamma + 3))

  (the standard deviation of the density ``(gamma + 1) tau^gamma / t^(gamma+1)`` on ``[0, t]``
  divided by ``t``; equivalently ``(gamma + 2)^2 (gamma + 3) sigma_rel^2 = gamma + 1``, a cubic
  in ``gamma``). ``sigma_rel`` rises from 0 at ``gamma = -1`` to its maximum
  :data:`SIGMA_REL_MAX` ``≈ 0.3003`` at ``gamma* = (sqrt(5) - 3) / 2`` (where
  ``gamma^2 + 3 gamma + 1 = 0``) and falls to 0 as ``gamma -> inf``; :func:`sigma_rel_to_gamma`
  takes the branch ``gamma > gamma*``, the long averages of EDM2 (``sigma_rel = 0.05`` gives
  ``gamma ≈ 16.97``, ``0.10`` gives ``gamma ≈ 6.94``). At ``t = 1``, ``beta = 0``: the average
  starts at the weights.

Buffers (e.g. normalisation statistics) are copied, not averaged. The average is kept in the
weights' own dtype and device.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EMA", "SIGMA_REL_MAX", "power_beta", "sigma_rel_of_gamma", "sigma_rel_to_gamma"]

GAMMA_STAR = (math.sqrt(5.0) - 3.0) / 2.0


def sigma_rel_of_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA with exponent ``gamma > -1``."""
    if not gamma > -1.0:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    return math.sqrt(gamma + 1.0) / ((gamma + 2.0) * math.sqrt(gamma + 3.0))


SIGMA_REL_MAX = sigma_rel_of_gamma(GAMMA_STAR)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma > gamma*`` with :func:`sigma_rel_of_gamma` ``(gamma) = sigma_rel``
    (bisection on the decreasing branch; accurate to ~1e-12 relative)."""
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.6f}), got {sigma_rel}")
    lo, hi = GAMMA_STAR, 1.0
    while sigma_rel_of_gamma(hi) > sigma_rel:  # sigma_rel ~ 1/gamma for large gamma
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sigma_rel_of_gamma(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


def power_beta(t: int, gamma: float) -> float:
    """``beta(t) = (1 - 1/t)^(gamma + 1)`` for update number ``t >= 1``."""
    if t < 1:
        raise ValueError(f"the update number t must be >= 1, got {t}")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


class EMA:
    """A moving average of ``model``'s parameters, held in ``self.module`` (a frozen copy in eval
    mode, usable for sampling). ``kind`` is ``"fixed"`` (``decay``) or ``"power"`` (``sigma_rel``)."""

    def __init__(self, model: nn.Module, kind: str = "fixed", decay: float = 0.999, sigma_rel: float = 0.05):
        if kind not in ("fixed", "power"):
            raise ValueError(f"unknown EMA kind {kind!r}; valid: fixed, power")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.kind, self.decay, self.sigma_rel = kind, float(decay), float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(sigma_rel) if kind == "power" else None
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def beta(self, t: int) -> float:
        """The decay of update number ``t`` (1-based)."""
        return self.decay if self.kind == "fixed" else power_beta(t, self.gamma)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Fold ``model``'s current weights into the average; returns the ``beta`` used."""
        self.num_updates += 1
        beta = self.beta(self.num_updates)
        ema_p = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            # lerp: e + (1 - beta) (p - e) = beta e + (1 - beta) p
            ema_p[name].lerp_(p.detach().to(ema_p[name].dtype), 1.0 - beta)
        ema_b = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_b[name].copy_(b)
        return beta

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like ``model.state_dict()``."""
        return self.module.state_dict()

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "decay": self.decay, "sigma_rel": self.sigma_rel, "gamma": self.gamma,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
        self.num_updates = int(meta["num_updates"])
