"""DEIS multistep exponential integrator (Zhang & Chen 2023, "Fast Sampling of Diffusion Models
with Exponential Integrator"), order 1 to 3.

In the EDM variables ``x~ = x / alpha`` and ``rho = sigma / alpha`` every process's
probability-flow ODE is ``dx~/drho = eps_hat(x~, rho)`` (DEIS; EDM eq. 4): the
exponential integrator has absorbed the linear drift, and one step is exactly

    x~_s = x~_t + int_{rho_t}^{rho_s} eps_hat(rho) drho.

DEIS approximates ``eps_hat`` by the polynomial through its values at the latest ``order``
grid points (Adams-Bashforth) and integrates it exactly:

    x~_s = x~_t + sum_j C_j eps_j,   C_j = int_{rho_t}^{rho_s} prod_{m != j} (rho - rho_m)/(rho_j - rho_m) drho.

The interpolation variable is ``log rho`` by default (``variable="log_rho"``: ``eps_hat`` is
smooth and the grid points are spread evenly in it, and the integral against ``drho = rho dlog rho``
is still exact, via ``phi`` functions) or ``rho`` itself (``variable="rho"``, the paper's rhoAB
form; its tAB form interpolates in ``t`` and needs quadrature for the same integral).
The coefficients are exact polynomial integrals in float64
(:func:`~.dpm_solver.lagrange_weights`), valid on any grid, so the method has order ``order``
on every smooth grid. In ``rho`` that includes the step into ``rho = 0``; in ``log rho``
(``-inf`` there) that step is first order, ``x_0 = alpha_0 D``. (As for any multistep method
warmed up with lower-order steps, the full order shows once those first steps are accurate
enough, as on a grid starting at high noise where ``eps_hat`` is nearly constant.)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import SamplerOutput, ddim_step, eps_from_x0, prepare
from .dpm_solver import lagrange_weights, phi

__all__ = ["sample_deis"]

_VARIABLES = ("rho", "log_rho")


def _ab_weights(rho_t: float, rho_s: float, nodes: list[float], variable: str) -> list[float]:
    """``C_j = int_{rho_t}^{rho_s} L_j drho`` for the Lagrange basis on ``nodes`` (``nodes[0] = rho_t``),
    with ``L_j`` a polynomial in ``rho`` or in ``log rho``."""
    if variable == "rho" or len(nodes) == 1:
        step = rho_s - rho_t
        # u = (rho - rho_t) / step on [0, 1]: int u^k drho = step / (k + 1)
        u = [(r - rho_t) / step for r in nodes]
        return lagrange_weights(u, [step / (k + 1) for k in range(len(nodes))])
    if rho_s == 0.0:  # log rho_s = -inf: no polynomial in log rho reaches it; first order
        return [-rho_t] + [0.0] * (len(nodes) - 1)
    # v = (log rho - log rho_t) / k, k = log(rho_s / rho_t): drho = rho_t k e^{k v} dv and
    # int_0^1 e^{k v} v^m dv = e^k m! phi_{m+1}(-k), so int v^m drho = rho_s k m! phi_{m+1}(-k)
    k = math.log(rho_s / rho_t)
    v = [math.log(r / rho_t) / k for r in nodes]
    return lagrange_weights(v, [rho_s * k * math.factorial(m) * phi(m + 1, -k) for m in range(len(nodes))])


def sample_deis(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    order: int = 3,
    variable: str = "log_rho",
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """DEIS of ``order`` 1, 2 or 3 with ``eps_hat`` interpolated in ``variable`` (``"log_rho"``
    or ``"rho"``; see the module docstring), in ratio form
    ``x_s = (alpha_s / alpha_t) x_t + alpha_s sum_j C_j eps_j``. Warm-up: a step uses at most as
    many points as are stored. A point where ``alpha = 0`` (``rho = inf``) only starts the path:
    its step is the exact DDIM step ``x_s = alpha_s D + sigma_s eps_hat`` and it never enters an
    interpolation. Order 1 is DDIM. NFE = number of steps; ``generator`` is unused."""
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order!r}")
    if variable not in _VARIABLES:
        raise ValueError(f"unknown DEIS interpolation variable {variable!r}; valid: {', '.join(_VARIABLES)}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    rho = tab.sigma_edm
    hist: list[tuple[float, Tensor]] = []  # (rho, eps_hat) at points with finite rho, newest first
    for i in range(len(tab) - 1):
        a_t, s_t, a_s, s_s = tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        d = model_x0(x, tab.t[i], i)
        if not math.isfinite(rho[i]):
            x = ddim_step(x, d, a_t, s_t, a_s, s_s)
        else:
            hist = ([(rho[i], eps_from_x0(x, d, a_t, s_t))] + hist)[:order]
            w = _ab_weights(rho[i], rho[i + 1], [r for r, _ in hist], variable)
            x = (a_s / a_t) * x
            for wj, (_, ej) in zip(w, hist):
                x = x + (a_s * wj) * ej
        x = hooks.after_step(i, tab.t[i + 1], x, d)
    return SamplerOutput(x, model_x0.nfe)
