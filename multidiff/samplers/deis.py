"""DEIS multistep exponential integrator (Zhang & Chen 2023, "Fast Sampling of Diffusion Models
with Exponential Integrator"), order 1 to 4, with an optional Adams-Moulton corrector.

In the EDM variables ``x~ = x / alpha`` and ``rho = sigma / alpha`` every process's
probability-flow ODE is ``dx~/drho = eps_hat(x~, rho)`` (DEIS; EDM eq. 4): the
exponential integrator has absorbed the linear drift, and one step is exactly

    x~_s = x~_t + int_{rho_t}^{rho_s} eps_hat(rho) drho.

DEIS approximates ``eps_hat`` by the polynomial through its values at the latest ``order``
grid points (Adams-Bashforth) and integrates it exactly:

    x~_s = x~_t + sum_j C_j eps_j,   C_j = int_{rho_t}^{rho_s} prod_{m != j} (rho - rho_m)/(rho_j - rho_m) drho.

The interpolation variable is ``log rho`` by default (``variable="log_rho"``: ``eps_hat`` is
smooth and the grid points are spread evenly in it, and the integral against ``drho = rho dlog rho``
is still exact, via ``phi`` functions), ``rho`` itself (``variable="rho"``, the paper's rhoAB
form) or process time (``variable="t"``, the paper's tAB form, its best at few steps: on a grid
built in ``t`` the nodes are evenly spread in the interpolation variable whatever the
schedule). In ``rho`` and ``log rho`` the coefficients are exact polynomial integrals in
float64 (:func:`~.dpm_solver.lagrange_weights`); in ``t`` the integral
``int L_j(t(rho)) drho`` is taken by 32-point Gauss-Legendre quadrature in ``rho`` with the
process's exact ``t(rho)`` (exact to round-off for a smooth schedule; on DDPM's discrete table,
piecewise linear in log-SNR, to ~1e-7 relative). All are valid on any grid, so the method has
order ``order`` on every smooth grid.

With ``corrector=True`` each step is followed by the Adams-Moulton corrector in PEC form, as
UniPC's UniC (Zhao et al. 2023): the model output at the predicted point ``x_s^pred`` joins the
interpolation as one more node and the step is redone with ``order + 1`` nodes; that output is
the one the next step uses, so the corrector costs no extra evaluation. It is not applied on the
last step (no next evaluation to reuse) nor after a start at ``alpha = 0``. In ``rho`` that includes the step into ``rho = 0``; in ``log rho``
(``-inf`` there) that step is first order, ``x_0 = alpha_0 D``. (As for any multistep method
warmed up with lower-order steps, the full order shows once those first steps are accurate
enough, as on a grid starting at high noise where ``eps_hat`` is nearly constant.)
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .common import SamplerOutput, ddim_step, eps_from_x0, prepare
from .dpm_solver import lagrange_weights, phi

__all__ = ["sample_deis"]

_VARIABLES = ("rho", "log_rho", "t")
_ORDERS = (1, 2, 3, 4)
_GAUSS_X, _GAUSS_W = (v.tolist() for v in np.polynomial.legendre.leggauss(32))


def _t_weights(process, rho_t: float, rho_s: float, nodes: list[float]) -> list[float]:
    """``C_j = int_{rho_t}^{rho_s} L_j(t(rho)) drho`` for the Lagrange basis in ``t`` on ``nodes``
    (process times), by Gauss-Legendre quadrature in ``rho`` (the nodes are interior, so
    ``rho = 0`` and ``t(rho)`` there are never needed)."""
    mid, half = 0.5 * (rho_s + rho_t), 0.5 * (rho_s - rho_t)
    rho = torch.tensor([mid + half * g for g in _GAUSS_X], dtype=torch.float64)
    tq = process.t_from_sigma_edm(rho).tolist()
    out = []
    for j, tj in enumerate(nodes):
        total = 0.0
        for tv, gw in zip(tq, _GAUSS_W):
            basis = gw
            for m, tm in enumerate(nodes):
                if m != j:
                    basis *= (tv - tm) / (tj - tm)
            total += basis
        out.append(total * half)
    return out


def _ab_weights(rho_t: float, rho_s: float, nodes: list[float], variable: str) -> list[float]:
    """``C_j = int_{rho_t}^{rho_s} L_j drho`` for the Lagrange basis on ``nodes`` (``rho`` values;
    ``nodes[0] = rho_t`` for a predictor), with ``L_j`` a polynomial in ``rho`` or in ``log rho``."""
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


def _weights(process, rho_t: float, rho_s: float, nodes: list[tuple[float, float]], variable: str) -> list[float]:
    """Weights for nodes given as ``(t, rho)`` pairs."""
    if variable == "t" and len(nodes) > 1:
        return _t_weights(process, rho_t, rho_s, [t for t, _ in nodes])
    return _ab_weights(rho_t, rho_s, [r for _, r in nodes], variable)


def _settle(hooks, x: Tensor, t: float) -> Tensor:
    """The Space's projection and the caller's constraint, before the model sees a predicted point."""
    x = hooks.space.project(x)
    return hooks.constrain(x, t) if hooks.constrain is not None else x


def sample_deis(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    order: int = 3,
    variable: str = "log_rho",
    corrector: bool = False,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """DEIS of ``order`` 1 to 4 with ``eps_hat`` interpolated in ``variable`` (``"log_rho"``,
    ``"rho"`` or ``"t"``; see the module docstring), in ratio form
    ``x_s = (alpha_s / alpha_t) x_t + alpha_s sum_j C_j eps_j``. Warm-up: a step uses at most as
    many points as are stored. A point where ``alpha = 0`` (``rho = inf``) only starts the path:
    its step is the exact DDIM step ``x_s = alpha_s D + sigma_s eps_hat`` and it never enters an
    interpolation. Order 1 is DDIM. ``corrector=True`` adds the Adams-Moulton corrector (one
    more node, the model output at the predicted point, reused by the next step), which raises
    the order by one at no extra evaluation. NFE = number of steps; ``generator`` is unused."""
    if order not in _ORDERS:
        raise ValueError(f"DEIS order must be one of {list(_ORDERS)}, got {order!r}")
    if variable not in _VARIABLES:
        raise ValueError(f"unknown DEIS interpolation variable {variable!r}; valid: {', '.join(_VARIABLES)}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    process = model.process
    rho = tab.sigma_edm
    n = len(tab) - 1
    # ((t, rho), eps_hat) at points with finite rho, newest first
    hist: list[tuple[tuple[float, float], Tensor]] = []
    d = model_x0(x, tab.t[0], 0)
    for i in range(n):
        a_t, s_t, a_s, s_s = tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        d_next = None
        if not math.isfinite(rho[i]):
            x = ddim_step(x, d, a_t, s_t, a_s, s_s)
        else:
            hist = ([((tab.t[i], rho[i]), eps_from_x0(x, d, a_t, s_t))] + hist)[:order]
            w = _weights(process, rho[i], rho[i + 1], [p for p, _ in hist], variable)
            x_t = x
            x = (a_s / a_t) * x_t
            for wj, (_, ej) in zip(w, hist):
                x = x + (a_s * wj) * ej
            if corrector and i < n - 1:
                x = _settle(hooks, x, tab.t[i + 1])
                d_next = model_x0(x, tab.t[i + 1], i + 1)
                nodes = [((tab.t[i + 1], rho[i + 1]), eps_from_x0(x, d_next, a_s, s_s))] + hist
                w = _weights(process, rho[i], rho[i + 1], [p for p, _ in nodes], variable)
                x = (a_s / a_t) * x_t
                for wj, (_, ej) in zip(w, nodes):
                    x = x + (a_s * wj) * ej
        x = hooks.after_step(i, tab.t[i + 1], x, d)
        if i < n - 1:
            d = d_next if d_next is not None else model_x0(x, tab.t[i + 1], i + 1)
    return SamplerOutput(x, model_x0.nfe)
