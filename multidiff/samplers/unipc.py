"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), data prediction, order 1 to 3.

In the half log-SNR ``lambda = log(alpha / sigma)`` with ``h = lambda_s - lambda_t``, ``z = -h``
(the data-prediction sign), the data predictions ``m_0 = D(x_t)`` and ``m_{-k}`` at earlier
points ``lambda_{-k}``, ``r_k = (lambda_{-k} - lambda_t) / h`` and ``D_k = (m_{-k} - m_0) / r_k``:

* UniP-p (the predictor, in data-prediction form)::

      x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^{-h}) m_0 - alpha_s B sum_{k<p} a_k D_k,

  where ``a`` solves ``sum_k a_k r_k^{i-1} = g_i`` for ``i = 1 .. p-1``, with
  ``g_i = i! z phi_{i+1}(z) / B`` (``phi_k`` as in :func:`~.dpm_solver.phi`).
* UniC-p (the corrector) uses the model output ``m_s = D(x_s^pred)`` at the new point
  as one more node, ``r_p = 1``, ``D_p = m_s - m_0``, and solves the same system for
  ``i = 1 .. p``. It raises the order by one. ``m_s`` is the evaluation the next step needs
  anyway, so the corrector costs no extra network evaluation; it is not applied after the last
  step (there is no next evaluation to reuse).

``B = z`` is the paper's variant ``B(h) = h`` (``"bh1"``) and ``B = e^z - 1`` its
``B(h) = e^h - 1`` (``"bh2"``), both written for ``z = -h``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import SamplerOutput, prepare
from .dpm_solver import final_order_cap, half_lambdas, phi

__all__ = ["sample_unipc"]

_VARIANTS = ("bh1", "bh2")


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the tiny (<= 3 x 3) UniPC systems."""
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][k] * out[k] for k in range(r + 1, n))) / m[r][r]
    return out


def _unipc_coefficients(h: float, rks: list[float], variant: str) -> tuple[float, list[float]]:
    """``B`` and the solution ``a`` of ``sum_k a_k r_k^{i-1} = i! z phi_{i+1}(z) / B`` (``z = -h``),
    ``i = 1 .. len(rks)``."""
    z = -h
    big_b = z if variant == "bh1" else math.expm1(z)
    if len(rks) == 1:
        # one node: UniPC's constant a_1 = 1/2, the h -> 0 limit of g_1 / B for both variants.
        # Solving exactly would cancel B from the update; the constant keeps the order and is
        # where the two variants differ.
        return big_b, [0.5]
    g = [math.factorial(i) * z * phi(i + 1, z) / big_b for i in range(1, len(rks) + 1)]
    vander = [[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)]
    return big_b, _solve(vander, g)


def _subtract(x: Tensor, scale: float, coeffs: list[float], diffs: list[Tensor]) -> Tensor:
    for ak, dk in zip(coeffs, diffs):
        x = x - (scale * ak) * dk
    return x


def _settle(hooks, x: Tensor, t: float) -> Tensor:
    """The Space's projection and the caller's constraint, before the model sees the predicted point."""
    x = hooks.space.project(x)
    return hooks.constrain(x, t) if hooks.constrain is not None else x


def sample_unipc(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """UniPC-p: the UniP-p predictor followed by the UniC corrector (see the module docstring;
    Zhao et al. 2023, with data prediction). ``order`` in ``1..3``; ``variant`` is ``"bh1"``
    (``B(h) = h``) or ``"bh2"`` (``B(h) = e^h - 1``). The corrector raises the order to
    ``order + 1`` (measured fitted slopes 1.9, 2.8 and 3.7 for ``order`` 1, 2 and 3).

    Warm-up: a step uses at most as many points as are stored. The step into ``sigma = 0`` is
    first order (``x_0 = alpha_0 D``); with ``lower_order_final``, on grids of fewer than 15
    steps, the predictor of the step before it is first order and the one before that at most
    second (:func:`~.dpm_solver.final_order_cap`). A point where ``alpha = 0``
    (``lambda = -inf``) only starts the path: its step is the exact first-order step, with no
    corrector. NFE = number of steps; ``generator`` is unused."""
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    if variant not in _VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; valid: {', '.join(_VARIANTS)}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    lam = half_lambdas(tab)
    n = len(tab) - 1
    hist: list[tuple[float, Tensor]] = []  # (lambda, D) at earlier points with finite lambda, newest last
    m0 = model_x0(x, tab.t[0], 0)
    for i in range(n):
        s_t, a_s, s_s = tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        h = lam[i + 1] - lam[i]
        last = i == n - 1
        m_next = None
        if s_s == 0.0:
            x = a_s * m0  # lambda_s = +inf: the exact first-order step
        elif not math.isfinite(h):  # alpha_t = 0: the exact first-order step, no corrector
            x = (s_s / s_t) * x + a_s * m0
        else:
            p = min(order, len(hist) + 1, final_order_cap(i, tab, lower_order_final))
            prev = hist[::-1][: p - 1]  # (lambda, m) at t_{-1}, t_{-2}, ...
            rks = [(lk - lam[i]) / h for lk, _ in prev]
            diffs = [(mk - m0) / rk for rk, (_, mk) in zip(rks, prev)]
            base = (s_s / s_t) * x + (-a_s * math.expm1(-h)) * m0
            x = base
            if rks:  # UniP-p
                big_b, a_pred = _unipc_coefficients(h, rks, variant)
                x = _subtract(x, a_s * big_b, a_pred, diffs)
            if not last:
                # UniC-p: one more node at r = 1 with the model output at the predicted point,
                # which the next step reuses
                x = _settle(hooks, x, tab.t[i + 1])
                m_next = model_x0(x, tab.t[i + 1], i + 1)
                big_b, a_corr = _unipc_coefficients(h, rks + [1.0], variant)
                x = _subtract(base, a_s * big_b, a_corr, diffs + [m_next - m0])
        if math.isfinite(lam[i]):
            hist = (hist + [(lam[i], m0)])[-2:]
        x = hooks.after_step(i, tab.t[i + 1], x, m0)
        if not last:
            m0 = m_next if m_next is not None else model_x0(x, tab.t[i + 1], i + 1)
    return SamplerOutput(x, model_x0.nfe)
