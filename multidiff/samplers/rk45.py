"""The probability-flow ODE solved adaptively with Dormand–Prince RK5(4).

The probability-flow ODE (Song et al. 2021, eq. 13) of ``x_t = alpha(t) x0 + sigma(t) eps``
written with the data prediction is the *velocity form*

    dx/dt = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat,   eps_hat = (x - alpha x0_hat) / sigma,

(the time derivative of ``alpha x0 + sigma eps`` with both replaced by their posterior
means). It is finite wherever ``sigma > 0``, including ``alpha = 0`` (the linear
interpolant at ``t = 1``, where it is the flow-matching velocity ``eps_hat - x0_hat``).
Between consecutive grid points with ``sigma > 0`` it is integrated in process time by
:func:`~multidiff.integrate.dopri5` (on the caller's device, no host round trip); a step
into ``sigma = 0`` is the usual denoising step ``x = x0_hat``. With a float64 state and
``rtol = 1e-9`` this is the exact PF-ODE endpoint other solvers are measured against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..integrate import dopri5
from .common import SamplerOutput, prepare

__all__ = ["pf_ode_coefficients", "sample_rk45"]


def pf_ode_coefficients(process, t: float) -> tuple[float, float, float, float]:
    """``(alpha, sigma, alpha', sigma')`` at ``t`` as Python floats (float64, exact derivatives)."""
    tt = torch.tensor(t, dtype=torch.float64)
    da, ds = process.derivatives(tt)
    return float(process.alpha(tt)), float(process.sigma(tt)), float(da), float(ds)


def _velocity(process, model_x0, space, step: int, last_x0: list):
    """The PF-ODE right-hand side for one solve; ``last_x0`` keeps the most recent ``x0_hat``
    (after the accepted final step, FSAL makes it ``x0_hat`` at the solve's end point)."""

    def velocity(t: float, y: Tensor) -> Tensor:
        a, s, da, ds = pf_ode_coefficients(process, t)
        x0_hat = model_x0(y, t, step)
        last_x0[:] = [x0_hat]
        return space.project(da * x0_hat + ds * (y - a * x0_hat) / s)

    return velocity


def sample_rk45(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """Adaptive RK45 on the probability-flow ODE in velocity form, between consecutive grid points.

    The grid only says where to stop (a typical one is ``[t_max, t_min, 0]``: one adaptive solve
    and the denoising step); hooks (``callback``, ``constrain``, the Space's projection) run at
    grid points only. The velocity is projected onto the Space's subspace, so zero centre of
    mass is kept inside a solve too. ``generator`` is unused (the sampler is deterministic).
    NFE = the exact number of model calls: the solver's evaluations (six per accepted or
    rejected step, two for the starting step) plus one per denoising step.
    """
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    process = model.process
    for i in range(len(tab) - 1):
        t_next = tab.t[i + 1]
        if tab.sigma[i + 1] == 0.0:
            x0 = model_x0(x, tab.t[i], i)
            x = x0
        else:
            last_x0: list[Tensor] = []
            velocity = _velocity(process, model_x0, space, i, last_x0)
            x, _ = dopri5(velocity, x, tab.t[i], t_next, rtol=rtol, atol=atol)
            x0 = last_x0[0] if last_x0 else None
        x = hooks.after_step(i, t_next, x, x0)
    return SamplerOutput(x, model_x0.nfe)
