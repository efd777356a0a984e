"""Probability-flow ODE solvers in the EDM variables (Karras et al. 2022).

With ``x~ = x / alpha`` and ``s = sigma / alpha`` every process's probability-flow ODE is
``dx~/ds = (x~ - D(x~, s)) / s = eps_hat`` (EDM eq. 4 with ``s(t) = t``, ``scale = 1``), so one
set of solvers serves all processes. Steps are written as ratios so that a grid starting
where ``alpha = 0`` (the linear interpolant at ``t = 1``) stays finite.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import SamplerOutput, ddim_step, eps_from_x0, prepare

__all__ = ["sample_euler", "sample_heun", "sample_edm_stochastic"]


def sample_euler(model, x: Tensor, ts, space=None, generator=None, *, callback=None, constrain=None,
                 check_finite: bool = True) -> SamplerOutput:
    """Euler's method on ``dx~/ds = eps_hat`` (EDM Alg. 1 without the second stage); the same
    update as deterministic DDIM. NFE = number of steps."""
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    for i in range(len(tab) - 1):
        x0 = model_x0(x, tab.t[i], i)
        x = ddim_step(x, x0, tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1])
        x = hooks.after_step(i, tab.t[i + 1], x, x0)
    return SamplerOutput(x, model_x0.nfe)


def _heun_step(model_x0, x, x0, i, t_s, a_t, s_t, a_s, s_s):
    """EDM Alg. 1 lines 5-8: an Euler predictor, then the trapezoidal corrector. The corrector
    is skipped where the step reaches ``sigma = 0`` or starts at ``alpha = 0`` (infinite ``s``)."""
    x_pred = ddim_step(x, x0, a_t, s_t, a_s, s_s)
    if s_s == 0.0 or a_t == 0.0:
        return x_pred, x0
    x0_s = model_x0(x_pred, t_s, i)
    d_t = eps_from_x0(x, x0, a_t, s_t)
    d_s = eps_from_x0(x_pred, x0_s, a_s, s_s)
    h = s_s / a_s - s_t / a_t
    return a_s * (x / a_t + 0.5 * h * (d_t + d_s)), x0_s


def sample_heun(model, x: Tensor, ts, space=None, generator=None, *, callback=None, constrain=None,
                check_finite: bool = True) -> SamplerOutput:
    """Heun's second-order method (EDM Alg. 1). NFE = 2 x steps - 1 (the step into
    ``sigma = 0`` is an Euler step), one less again if the grid starts at ``alpha = 0``."""
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    for i in range(len(tab) - 1):
        x0 = model_x0(x, tab.t[i], i)
        x, x0_last = _heun_step(model_x0, x, x0, i, tab.t[i + 1], tab.alpha[i], tab.sigma[i],
                                tab.alpha[i + 1], tab.sigma[i + 1])
        x = hooks.after_step(i, tab.t[i + 1], x, x0_last)
    return SamplerOutput(x, model_x0.nfe)


def sample_edm_stochastic(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): at each step with noise level
    ``s`` in ``[s_tmin, s_tmax]`` raise it to ``s^ = s (1 + gamma)``,
    ``gamma = min(s_churn / steps, sqrt(2) - 1)``, by adding fresh noise of std
    ``sqrt(s^2 - s^2) s_noise``, then take a Heun step from ``s^``. ``s^`` is capped at the
    process's largest noise level. Defaults are EDM's ImageNet-64 settings.
    NFE = 2 x steps - 1."""
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    proc = model.process
    n = len(tab) - 1
    s_top = float(proc.sigma_edm(torch.tensor(proc.t_max, dtype=torch.float64)))
    for i in range(n):
        t, a_t, s_t = tab.t[i], tab.alpha[i], tab.sigma[i]
        sig = tab.sigma_edm[i]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sig <= s_tmax else 0.0
        sig_hat = min(sig * (1 + gamma), s_top)
        if sig_hat > sig and math.isfinite(sig_hat):
            t = float(proc.t_from_sigma_edm(torch.tensor(sig_hat, dtype=torch.float64)))
            a_hat = float(proc.alpha(torch.tensor(t, dtype=torch.float64)))
            s_hat = float(proc.sigma(torch.tensor(t, dtype=torch.float64)))
            # in x~ = x / alpha: x~^ = x~ + sqrt(s^2_hat - s^2) s_noise z
            extra = math.sqrt(sig_hat**2 - sig**2) * s_noise
            x = a_hat * (x / a_t + extra * space.noise(generator).to(x.dtype))
            a_t, s_t = a_hat, s_hat
        x0 = model_x0(x, t, i)
        x, x0_last = _heun_step(model_x0, x, x0, i, tab.t[i + 1], a_t, s_t, tab.alpha[i + 1], tab.sigma[i + 1])
        x = hooks.after_step(i, tab.t[i + 1], x, x0_last)
    return SamplerOutput(x, model_x0.nfe)
