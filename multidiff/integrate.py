"""An adaptive Dormand–Prince RK5(4) integrator for tensor ODEs, on the caller's device and dtype.

``dopri5(fn, y0, t0, t1)`` integrates ``dy/dt = fn(t, y)`` from ``t0`` to ``t1`` (either
direction) and returns ``(y(t1), nfev)``. ``y`` is a tensor or a tuple of tensors (the
likelihood integrates the state together with its log-density change); every tensor stays
where the caller put it, so a GPU solve never leaves the GPU.

The method is Dormand & Prince (1980), the fifth-order solution with the embedded
fourth-order error estimate and the "first same as last" property (the last stage of an
accepted step is the first stage of the next, so a step costs six evaluations). Following
Hairer, Nørsett & Wanner, *Solving ODEs I* (II.4):

* error norm (eq. 4.11): ``err = sqrt(mean_i (e_i / sc_i)^2)``, ``sc_i = atol + rtol max(|y0_i|, |y1_i|)``,
  taken per tensor and maximised over the tensors of a tuple, so a small component (a
  per-item log-density) is controlled as tightly as the large one beside it;
* starting step: the two-evaluation estimate of II.4 ("Starting step size");
* step-size control: the PI controller of Hairer & Wanner, *Solving ODEs II* (IV.2, eq. 2.43c),
  ``h_new = h * safety * err^-(1/5 - 0.75 beta) * err_prev^beta`` with ``beta = 0.04`` as in
  their DOPRI5 code, or the standard (I) controller ``h * safety * err^(-1/5)``; the factor is
  clipped to ``[0.2, 10]`` and a step right after a rejection may not grow.

A step whose stages produce NaN or infinity counts as rejected (the step is cut by 5x); a
solve that needs more than ``max_steps`` steps, or whose step underflows, raises
:class:`IntegrationError` naming the time it reached.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["IntegrationError", "State", "dopri5"]

State = Tensor | Sequence[Tensor]

# Dormand & Prince (1980), Table 2 (RK5(4)7M): nodes, stage weights, 5th-order weights, and
# the error weights b - b_hat of the embedded 4th-order solution.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[6]  # FSAL: the 7th stage is evaluated at the new solution
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)

_SAFETY = 0.9
_FAC_MIN = 0.2  # largest shrink per step
_FAC_MAX = 10.0  # largest growth per step
_PI_BETA = 0.04  # Hairer's DOPRI5 default


class IntegrationError(RuntimeError):
    """The adaptive solver could not reach the end point (too many steps or step underflow)."""


def _combine(y: tuple[Tensor, ...], h: float, coeffs: Sequence[float], ks: Sequence[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """``y + h * sum_j coeffs[j] * ks[j]`` for every tensor of the state."""
    out = []
    for n, yi in enumerate(y):
        acc = yi
        for c, k in zip(coeffs, ks):
            if c != 0.0:
                acc = acc + (h * c) * k[n]
        out.append(acc)
    return tuple(out)


def _rms_norm(v: tuple[Tensor, ...], scale: tuple[Tensor, ...]) -> float:
    """Max over tensors of ``sqrt(mean((v / scale)^2))`` (HNW I, eq. 4.11, per tensor)."""
    worst = 0.0
    for vi, si in zip(v, scale):
        if vi.numel() == 0:
            continue
        r = float(torch.sqrt(torch.mean((vi / si) ** 2)))
        if not math.isfinite(r):
            return math.inf
        worst = max(worst, r)
    return worst


def _initial_step(fn, t0: float, y0, f0, direction: float, span: float, rtol: float, atol: float,
                  order: int = 5) -> tuple[float, int]:
    """HNW I, II.4 "Starting step size": returns ``(|h|, evaluations used)``. The trial point is
    kept inside the interval (``|h0| <= span``): ``fn`` may not be defined beyond it."""
    scale = tuple(atol + rtol * yi.abs() for yi in y0)
    d0 = _rms_norm(y0, scale)
    d1 = _rms_norm(f0, scale)
    h0 = min(1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1, span)
    y1 = tuple(yi + direction * h0 * fi for yi, fi in zip(y0, f0))
    f1 = fn(t0 + direction * h0, y1)
    d2 = _rms_norm(tuple(a - b for a, b in zip(f1, f0)), scale) / h0
    dmax = max(d1, d2)
    if not math.isfinite(dmax):
        return h0, 1
    h1 = max(1e-6, h0 * 1e-3) if dmax <= 1e-15 else (0.01 / dmax) ** (1.0 / order)
    return min(100 * h0, h1), 1


def _as_tuple(y) -> tuple[Tensor, ...]:
    if isinstance(y, Tensor):
        return (y,)
    return tuple(y)


def dopri5(
    fn: Callable[[float, State], State],
    y0: State,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 100_000,
    controller: str = "pi",
) -> tuple[State, int]:
    """Integrate ``dy/dt = fn(t, y)`` from ``t0`` to ``t1`` with adaptive Dormand–Prince RK5(4).

    Args:
        fn: ``fn(t, y) -> dy/dt`` with ``t`` a Python float and ``y`` shaped like ``y0`` (a
            tensor, or a tuple of tensors if ``y0`` is one); it must return the same structure.
        y0: the state at ``t0``; its device and dtype are kept throughout.
        t0, t1: start and end times (``t1 < t0`` integrates backwards).
        rtol, atol: relative and absolute tolerance per element (HNW I, eq. 4.10).
        first_step: initial ``|h|``; by default estimated from two evaluations (HNW I, II.4).
        max_steps: the largest number of attempted steps before :class:`IntegrationError`.
        controller: ``"pi"`` (Hairer & Wanner's PI step control) or ``"standard"``.

    Returns:
        ``(y1, nfev)``: the state at ``t1`` (same structure as ``y0``) and the exact number of
        calls of ``fn``.
    """
    if controller not in ("pi", "standard"):
        raise ValueError(f"unknown step-size controller {controller!r}; valid: 'pi', 'standard'")
    if not (rtol > 0 and atol >= 0) or not (math.isfinite(rtol) and math.isfinite(atol)):
        raise ValueError(f"need rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    t0, t1 = float(t0), float(t1)
    is_tensor = isinstance(y0, Tensor)

    def restore(y: tuple[Tensor, ...]):
        return y[0] if is_tensor else y

    def f(t: float, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        out = _as_tuple(fn(t, restore(y)))
        if len(out) != len(y):
            raise ValueError(f"fn returned {len(out)} tensors for a state of {len(y)}")
        return out

    y = _as_tuple(y0)
    if t1 == t0:
        return restore(y), 0
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)

    k1 = f(t0, y)
    nfev = 1
    if first_step is None:
        h, extra = _initial_step(f, t0, y, k1, direction, span, rtol, atol)
        nfev += extra
    else:
        h = abs(float(first_step))
        if not h > 0:
            raise ValueError(f"first_step must be positive, got {first_step}")
    h = min(h, span)

    t = t0
    err_prev = 1e-4
    rejected_last = False
    steps = 0
    expo = 0.2 - (0.75 * _PI_BETA if controller == "pi" else 0.0)
    while direction * (t1 - t) > 0:
        if steps >= max_steps:
            raise IntegrationError(
                f"dopri5 reached max_steps={max_steps} at t={t:.6g} on the way from {t0:.6g} to {t1:.6g} "
                f"(last step {h:.3g}); loosen rtol/atol or raise max_steps"
            )
        if h < 1e-14 * max(1.0, abs(t)):
            raise IntegrationError(
                f"dopri5 step size underflow ({h:.3g}) at t={t:.6g} on the way from {t0:.6g} to {t1:.6g}: "
                "the ODE is too stiff or its right-hand side is not finite there"
            )
        steps += 1
        last = h >= direction * (t1 - t) * (1 - 1e-12)
        if last:
            h = direction * (t1 - t)
        hs = direction * h
        ks = [k1]
        for stage in range(1, 6):
            ys = _combine(y, hs, _A[stage], ks)
            ks.append(f(t + _C[stage] * hs, ys))
        y_new = _combine(y, hs, _B, ks)
        t_new = t1 if last else t + hs
        k7 = f(t_new, y_new)
        nfev += 6
        ks.append(k7)
        err_vec = _combine(tuple(torch.zeros_like(yi) for yi in y), hs, _E, ks)
        scale = tuple(atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y, y_new))
        err = _rms_norm(err_vec, scale)

        if not math.isfinite(err):
            h *= _FAC_MIN
            rejected_last = True
            continue
        # fac = err^-expo (* err_prev^beta), safety-scaled and clipped (HNW II, IV.2)
        fac = _SAFETY * max(err, 1e-10) ** (-expo)
        if controller == "pi":
            fac *= err_prev**_PI_BETA
        fac = min(_FAC_MAX, max(_FAC_MIN, fac))
        if err <= 1.0:
            t, y, k1 = t_new, y_new, k7
            err_prev = max(err, 1e-4)
            if rejected_last:
                fac = min(fac, 1.0)
            rejected_last = False
            h = h * fac
        else:
            h = h * min(1.0, fac)
            rejected_last = True
    return restore(y), nfev
