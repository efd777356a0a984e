"""DPM-Solver++ multistep solvers (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models"): 2M, 3M and the SDE variant 2M-SDE.

All three work with the data prediction ``D = x0_hat`` in the half log-SNR
``lambda = log(alpha / sigma)`` (half of the tables' ``log_snr``). The probability-flow ODE has
the exact solution (the variation-of-constants formula of DPM-Solver++)::

    x_s = (sigma_s / sigma_t) x_t + alpha_s * int_0^h e^{u - h} D(lambda_t + u) du,   h = lambda_s - lambda_t,

so only ``D`` along the path has to be approximated. The multistep methods interpolate it
through the data predictions already computed at earlier grid points, so each step costs one
evaluation. A point where ``alpha = 0`` (``lambda = -inf``, the linear interpolant at
``t = 1``) only starts the path: the first step from it is the exact first-order step
``x_s = (sigma_s / sigma_t) x_t + alpha_s D`` and it never enters an interpolation. The step
into ``sigma = 0`` (``lambda = +inf``) is first order, ``x_0 = alpha_0 D``: an extrapolation in
``lambda`` to ``+inf`` has no meaning.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from .common import SamplerOutput, prepare

__all__ = [
    "final_order_cap",
    "half_lambdas",
    "lagrange_weights",
    "phi",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m",
]

_SOLVER_TYPES = ("midpoint", "heun")


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j>=0} z^j / (j + k)!`` (``phi_1(z) = (e^z - 1) / z``,
    ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``), the weights of exponential integrators
    (Hochbruck & Ostermann 2010): ``int_0^1 e^{(1 - v) z} v^{k-1} / (k-1)! dv``.

    The series is used for ``|z| < 1/2``, where the recursion would cancel digits; ``z = -inf``
    gives 0."""
    if k < 1:
        raise ValueError(f"phi_k needs k >= 1, got {k}")
    if z == -math.inf:
        return 0.0
    if abs(z) < 0.5:
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    val = math.expm1(z) / z
    for j in range(1, k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def lagrange_weights(nodes: Sequence[float], moments: Sequence[float]) -> list[float]:
    """``w_j = int L_j(u) w(u) du`` for the Lagrange basis ``L_j`` on ``nodes``, given the
    weight's monomial moments ``moments[k] = int u^k w(u) du`` (at least ``len(nodes)`` of them).

    The integral of the interpolating polynomial of values ``f_j`` is then ``sum_j w_j f_j``:
    exact polynomial integration in float64, no quadrature."""
    out = []
    for j, uj in enumerate(nodes):
        coeffs = [1.0]  # monomial coefficients of prod_{m != j} (u - u_m), lowest degree first
        denom = 1.0
        for m, um in enumerate(nodes):
            if m == j:
                continue
            shifted = [0.0] + coeffs
            coeffs = [shifted[k] - um * (coeffs[k] if k < len(coeffs) else 0.0) for k in range(len(shifted))]
            denom *= uj - um
        out.append(sum(c * mk for c, mk in zip(coeffs, moments)) / denom)
    return out


def half_lambdas(tab) -> list[float]:
    """``lambda = log(alpha / sigma)`` per grid point (``-inf`` at ``alpha = 0``, ``+inf`` at ``sigma = 0``)."""
    return [0.5 * v for v in tab.log_snr]


#: below this many steps ``lower_order_final`` lowers the order of the last steps (DPM-Solver's
#: advice for fewer than ~15 steps, where the final steps are long in lambda)
LOWER_ORDER_FINAL_STEPS = 15


def final_order_cap(i: int, tab, lower_order_final: bool) -> int:
    """The highest order step ``i`` may use. With ``lower_order_final``, on a grid of fewer than
    :data:`LOWER_ORDER_FINAL_STEPS` steps that ends with the denoising step into ``sigma = 0``,
    the step into the last positive grid point is first order and the one before it at most
    second (DPM-Solver's ``lower_order_final``: the final steps are the longest in ``lambda``
    and extrapolating ``D`` over them overshoots). Otherwise no cap."""
    n = len(tab) - 1
    if lower_order_final and tab.sigma[n] == 0.0 and n < LOWER_ORDER_FINAL_STEPS:
        return max(1, n - 1 - i)
    return sys.maxsize


def _combine(terms: list[tuple[float, Tensor]]) -> Tensor:
    out = terms[0][0] * terms[0][1]
    for c, v in terms[1:]:
        out = out + c * v
    return out


def _dpmpp_2m(model, x, ts, space, generator, eta, solver_type, s_noise, lower_order_final, callback, constrain,
              check_finite):
    if solver_type not in _SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; valid: {', '.join(_SOLVER_TYPES)}")
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    lam = half_lambdas(tab)
    prev: tuple[float, Tensor] | None = None  # (lambda, D) at the previous point with finite lambda
    for i in range(len(tab) - 1):
        s_t, a_s, s_s = tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        d = model_x0(x, tab.t[i], i)
        if s_s == 0.0:
            x = a_s * d  # lambda_s = +inf: e^{-h} = 0, the first-order step is exact in x_t
        else:
            h = lam[i + 1] - lam[i]  # +inf when alpha_t = 0
            eta_h = eta * h if eta > 0 else 0.0  # avoid 0 * inf
            c = h + eta_h  # (1 + eta) h
            w0 = -math.expm1(-c)  # 1 - e^{-(1 + eta) h}
            # first-order part of DPM-Solver++ (eta = 0) and of its SDE variant
            x = (s_s / s_t) * math.exp(-eta_h) * x + (a_s * w0) * d
            if prev is not None and math.isfinite(h) and final_order_cap(i, tab, lower_order_final) >= 2:
                r = (lam[i] - prev[0]) / h
                # midpoint: the paper's D = (1 + 1/(2r)) D_t - 1/(2r) D_prev;
                # heun: the linear interpolant integrated exactly, weight (c - 1 + e^{-c}) / c
                coef = 0.5 * w0 if solver_type == "midpoint" else c * phi(2, -c)
                x = x + (a_s * coef / r) * (d - prev[1])
            if eta > 0:
                std = s_s * math.sqrt(-math.expm1(-2.0 * eta_h)) * s_noise
                x = x + std * space.noise(generator).to(x.dtype)
        prev = (lam[i], d) if math.isfinite(lam[i]) else None
        x = hooks.after_step(i, tab.t[i + 1], x, d)
    return SamplerOutput(x, model_x0.nfe)


def sample_dpmpp_2m(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """DPM-Solver++(2M) (Lu et al. 2022b, the multistep second-order algorithm): with ``h = lambda_s - lambda_t`` and
    ``r = (lambda_t - lambda_prev) / h``::

        x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) ((1 + 1/(2r)) D_t - 1/(2r) D_prev).

    The first step (no previous point) and the step into ``sigma = 0`` are first order; with
    ``lower_order_final`` so is the step before it on grids of fewer than 15 steps
    (:func:`final_order_cap`). ``solver_type="heun"`` integrates the linear interpolant of ``D``
    exactly instead (weight ``(h - 1 + e^{-h}) / h`` on ``(D_t - D_prev) / r``). Second order;
    NFE = number of steps; ``generator`` is unused."""
    return _dpmpp_2m(model, x, ts, space, generator, 0.0, solver_type, 1.0, lower_order_final, callback, constrain,
                     check_finite)


def sample_dpmpp_2m_sde(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 1.0,
    solver_type: str = "midpoint",
    s_noise: float = 1.0,
    lower_order_final: bool = True,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, the SDE solver of its appendix; ``eta`` interpolates
    to the ODE at 0)::

        x_s = (sigma_s / sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-(1+eta) h}) D_t
              + alpha_s c(h) / r (D_t - D_prev) + sigma_s sqrt(1 - e^{-2 eta h}) s_noise z,

    with ``c = (1 - e^{-(1+eta) h}) / 2`` (``"midpoint"``, the paper's form) or the exact
    integral of the linear interpolant ``c = ((1+eta)h - 1 + e^{-(1+eta)h}) / ((1+eta)h)``
    (``"heun"``). At ``eta = 1`` this is the paper's SDE solver: ``e^{-h}`` on ``x_t``,
    ``1 - e^{-2h}`` on ``D`` and ``sigma_s sqrt(1 - e^{-2h}) z``. No noise is added on the step
    into ``sigma = 0``; ``lower_order_final`` as in :func:`sample_dpmpp_2m`. NFE = number of steps;
    the same ``generator`` seed gives the same samples."""
    return _dpmpp_2m(model, x, ts, space, generator, float(eta), solver_type, float(s_noise), lower_order_final,
                     callback, constrain, check_finite)


def sample_dpmpp_3m(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    lower_order_final: bool = True,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """DPM-Solver++(3M): the exact solution (module docstring) with ``D`` replaced by its
    quadratic interpolant through the three latest data predictions (at ``lambda_t`` and the two
    previous points), integrated exactly::

        x_s = (sigma_s / sigma_t) x_t + alpha_s * sum_j w_j D_j,
        w_j = int_0^h e^{u-h} L_j(u) du = sum_k  c_{jk} k! h^{k+1} phi_{k+1}(-h),

    with ``L_j`` the Lagrange basis on the nodes ``lambda_j - lambda_t`` and ``c_{jk}`` its
    monomial coefficients. In Taylor form this is DPM-Solver's third-order multistep update
    ``alpha_s (h phi_1 D + h^2 phi_2 D' + h^3 phi_3 D'')`` with ``D', D''`` from divided
    differences. (The widely copied form ``- alpha phi_3 D2`` with
    ``D2 = (D1_0 - D1_1)/(r0 + r1)`` carries half the needed ``D''`` term, ``D2 ~ h^2 D''/2``,
    and converges at order 2 only: measured local slopes 2.85, 2.36, 2.10, 2.02 from 10 to 160
    steps, where this form gives 3.69, 3.40, 3.02, 2.92.)

    Warm-up: first, then second order while fewer points are stored. The step into
    ``sigma = 0`` is first order; with ``lower_order_final``, on grids of fewer than 15 steps,
    the step before it is first order and the one before that at most second
    (:func:`final_order_cap`). Third order; NFE = number of steps; ``generator`` is unused."""
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    lam = half_lambdas(tab)
    n = len(tab) - 1
    hist: list[tuple[float, Tensor]] = []  # (lambda, D) at points with finite lambda, newest last
    for i in range(n):
        s_t, a_s, s_s = tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        d = model_x0(x, tab.t[i], i)
        if math.isfinite(lam[i]):
            hist = (hist + [(lam[i], d)])[-3:]
        h = lam[i + 1] - lam[i]
        if s_s == 0.0:
            x = a_s * d
        elif not math.isfinite(h):  # alpha_t = 0: the exact first-order step
            x = (s_s / s_t) * x + a_s * d
        else:
            order = min(len(hist), final_order_cap(i, tab, lower_order_final))
            pts = hist[-order:]
            nodes = [(lj - lam[i]) / h for lj, _ in pts]
            moments = [math.factorial(k) * h * phi(k + 1, -h) for k in range(order)]
            w = lagrange_weights(nodes, moments)
            x = _combine([(s_s / s_t, x)] + [(a_s * wj, dj) for wj, (_, dj) in zip(w, pts)])
        x = hooks.after_step(i, tab.t[i + 1], x, d)
    return SamplerOutput(x, model_x0.nfe)
