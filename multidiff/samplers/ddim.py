"""DDPM ancestral sampling and DDIM (Ho et al. 2020; Song et al. 2021a).

Both take the posterior-family step of :func:`~.common.ddim_step` between consecutive grid
points; on the integer steps of a :class:`~multidiff.process.DiscreteVP` they are exactly
the original algorithms, and on any other grid or process their continuous-time
generalisation (``q(x_s | x_t, x0)`` for ``x = alpha x0 + sigma eps``).
"""
from __future__ import annotations


import torch
from torch import Tensor

from .common import SamplerOutput, ancestral_step, ddim_step, prepare

__all__ = ["sample_ddim", "sample_ancestral"]


def sample_ddim(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 0.0,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """DDIM with stochasticity ``eta`` in ``[0, 1]`` (0: deterministic, 1: DDPM posterior).
    NFE = number of steps."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    for i in range(len(tab) - 1):
        x0 = model_x0(x, tab.t[i], i)
        noise = space.noise(generator).to(x.dtype) if eta > 0 and tab.sigma[i + 1] > 0 else None
        x = ddim_step(x, x0, tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1], eta, noise)
        x = hooks.after_step(i, tab.t[i + 1], x, x0)
    return SamplerOutput(x, model_x0.nfe)


def sample_ancestral(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    variance: str = "posterior",
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """DDPM ancestral sampling: draw ``x_s ~ N(mu(x_t, x0_hat), v)``.

    ``variance="posterior"`` uses the posterior variance ``beta~ = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``
    (DDPM's lower bound; the same as DDIM with ``eta = 1``); ``"forward"`` uses the forward
    transition variance ``sigma_{t|s}^2`` (DDPM's ``beta_t``, the upper bound).
    On a grid from :func:`~multidiff.schedules.from_betas` this is DiffWave's fast sampler.
    """
    if variance not in ("posterior", "forward"):
        raise ValueError(f"variance must be 'posterior' or 'forward', got {variance!r}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    for i in range(len(tab) - 1):
        x0 = model_x0(x, tab.t[i], i)
        noise = space.noise(generator).to(x.dtype) if tab.sigma[i + 1] > 0 else None
        x = ancestral_step(x, x0, tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1], noise, variance)
        x = hooks.after_step(i, tab.t[i + 1], x, x0)
    return SamplerOutput(x, model_x0.nfe)
