"""The probability-flow ODE solved adaptively with Dormand–Prince RK5(4), in process time or in
the log noise level.

The probability-flow ODE (Song et al. 2021, eq. 13) of ``x_t = alpha(t) x0 + sigma(t) eps``
written with the data prediction is the *velocity form*

    dx/dt = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat,   eps_hat = (x - alpha x0_hat) / sigma,

finite wherever ``sigma > 0``, including ``alpha = 0`` (the linear interpolant at ``t = 1``,
where it is the flow-matching velocity ``eps_hat - x0_hat``).

``variable="log_rho"`` integrates instead in ``u = log(sigma / alpha)`` (minus half the
log-SNR; the variable of DPM-Solver, Lu et al. 2022a, there ``lambda = -u``), mapping back
with the process's exact ``t(u) = t_from_log_snr(-2u)``. Dividing the velocity form by
``du/dt = sigma'/sigma - alpha'/alpha`` gives

    dx/du = (1 + g) x - alpha x0_hat(x, t(u)),   g = (alpha'/alpha) / (sigma'/sigma - alpha'/alpha) = dlog(alpha)/du,

whose coefficients depend on the schedule only through the noise level (for VP,
``g = -sigma^2``). DDPM's discrete table, interpolated piecewise linearly in log-SNR between its
1000 steps, has a kink in ``alpha(t)``, ``sigma(t)`` at every step, which an adaptive solver in
process time must resolve one by one (9,435 evaluations at ``rtol = 1e-8`` on the benchmark's
2-D ring); in ``u`` the right-hand side is as smooth as the posterior mean (321). On a smooth
schedule process time is as good or better (VP-cosine, isotropic Gaussian, ``rtol = 1e-6``:
45 evaluations in ``t``, 111 in ``u``), so ``variable="auto"``, the default, picks ``u`` for
:class:`~multidiff.process.DiscreteVP` and ``t`` otherwise.

In ``u`` a grid point where ``alpha = 0`` (``u = +inf``) only starts the path: the first part of
an interval starting there, down to the time where ``sigma / alpha = RHO_SWITCH``, is integrated
in process time in the velocity form, the rest in ``u``. Every solve runs through
:func:`~multidiff.integrate.dopri5` on the caller's device, with no host round trip. A step
into ``sigma = 0`` is the usual denoising step ``x = x0_hat``. With a float64 state and
``rtol = 1e-9`` this is the exact PF-ODE endpoint other solvers are measured against.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..integrate import dopri5
from ..process import DiscreteVP
from .common import SamplerOutput, prepare

__all__ = ["RHO_SWITCH", "VARIABLES", "pf_ode_coefficients", "sample_rk45"]

#: integration variables of :func:`sample_rk45`
VARIABLES = ("auto", "t", "log_rho")

#: on an interval starting at ``alpha = 0``, process time is used down to this EDM noise level
#: ``sigma / alpha`` and ``log(sigma / alpha)`` below it (for the linear interpolant: t = 0.999)
RHO_SWITCH = 1e3


def pf_ode_coefficients(process, t: float) -> tuple[float, float, float, float]:
    """``(alpha, sigma, alpha', sigma')`` at ``t`` as Python floats (float64, exact derivatives)."""
    tt = torch.tensor(t, dtype=torch.float64)
    da, ds = process.derivatives(tt)
    return float(process.alpha(tt)), float(process.sigma(tt)), float(da), float(ds)


def _velocity(process, model_x0, space, step: int, last_x0: list):
    """The velocity form in process time; ``last_x0`` keeps the most recent ``x0_hat``."""

    def velocity(t: float, y: Tensor) -> Tensor:
        a, s, da, ds = pf_ode_coefficients(process, t)
        x0_hat = model_x0(y, t, step)
        last_x0[:] = [x0_hat]
        return space.project(da * x0_hat + ds * (y - a * x0_hat) / s)

    return velocity


def _log_rho_field(process, model_x0, space, step: int, last_x0: list, ends: dict):
    """``dx/du = (1 + g) x - alpha x0_hat``, ``g = dlog(alpha)/du``; ``ends`` maps the solve's end
    values of ``u`` to their grid times, so the model sees the grid's own ``t`` there (no
    round-off from ``t(u)``)."""

    def field(u: float, x: Tensor) -> Tensor:
        t = ends[u] if u in ends else float(process.t_from_log_snr(torch.tensor(-2.0 * u, dtype=torch.float64)))
        a, s, da, ds = pf_ode_coefficients(process, t)
        # du/dt = dlog(sigma)/dt - dlog(alpha)/dt: g is a ratio of two t-derivatives, continuous
        # across the kinks of a piecewise schedule even where each of them jumps
        g = (da / a) / (ds / s - da / a)
        x0_hat = model_x0(x, t, step)
        last_x0[:] = [x0_hat]
        return space.project((1.0 + g) * x - a * x0_hat)

    return field


def sample_rk45(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    variable: str = "auto",
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """Adaptive RK45 on the probability-flow ODE between consecutive grid points, in process time
    (``variable="t"``) or in ``u = log(sigma / alpha)`` (``"log_rho"``); ``"auto"`` takes ``u``
    for the piecewise schedule of :class:`~multidiff.process.DiscreteVP` and ``t`` otherwise
    (see the module docstring).

    The grid only says where to stop (a typical one is ``[t_max, t_min, 0]``: one adaptive solve
    and the denoising step); hooks (``callback``, ``constrain``, the Space's projection) run at
    grid points only. ``rtol``/``atol`` bound the local error of ``x`` per unit of the
    integration variable's step. The right-hand side is
    projected onto the Space's subspace, so zero centre of mass is kept inside a solve too.
    ``generator`` is unused (the sampler is deterministic). NFE = the exact number of model
    calls: the solver's evaluations (six per accepted or rejected step, two for the starting
    step) plus one per denoising step.
    """
    if variable not in VARIABLES:
        raise ValueError(f"unknown RK45 integration variable {variable!r}; valid: {', '.join(VARIABLES)}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    process = model.process
    if variable == "auto":
        variable = "log_rho" if isinstance(process, DiscreteVP) else "t"
    for i in range(len(tab) - 1):
        t_now, t_next = tab.t[i], tab.t[i + 1]
        if tab.sigma[i + 1] == 0.0:
            x0 = model_x0(x, t_now, i)
            x = x0
            x = hooks.after_step(i, t_next, x, x0)
            continue
        last_x0: list[Tensor] = []
        rho_now, rho_next = tab.sigma_edm[i], tab.sigma_edm[i + 1]
        if variable == "t":
            velocity = _velocity(process, model_x0, space, i, last_x0)
            x, _ = dopri5(velocity, x, t_now, t_next, rtol=rtol, atol=atol)
            x = hooks.after_step(i, t_next, x, last_x0[0] if last_x0 else None)
            continue
        if not math.isfinite(rho_now):
            # alpha = 0: no finite log noise level; process time down to RHO_SWITCH first
            if rho_next >= RHO_SWITCH:
                t_switch = t_next
            else:
                t_switch = float(process.t_from_sigma_edm(torch.tensor(RHO_SWITCH, dtype=torch.float64)))
            velocity = _velocity(process, model_x0, space, i, last_x0)
            x, _ = dopri5(velocity, x, t_now, t_switch, rtol=rtol, atol=atol)
            if t_switch == t_next:
                x = hooks.after_step(i, t_next, x, last_x0[0] if last_x0 else None)
                continue
            t_now = t_switch
            rho_now = float(process.sigma_edm(torch.tensor(t_switch, dtype=torch.float64)))
        u0, u1 = math.log(rho_now), math.log(rho_next)
        field = _log_rho_field(process, model_x0, space, i, last_x0, {u0: t_now, u1: t_next})
        x, _ = dopri5(field, x, u0, u1, rtol=rtol, atol=atol)
        x = hooks.after_step(i, t_next, x, last_x0[0] if last_x0 else None)
    return SamplerOutput(x, model_x0.nfe)
