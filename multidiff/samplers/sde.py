"""Reverse-SDE samplers: Euler–Maruyama and predictor–corrector with Langevin dynamics.

Every process ``x_t = alpha x0 + sigma eps`` is the marginal of the linear SDE
``dx = f(t) x dt + g(t) dw`` (``f``, ``g^2`` from :meth:`~multidiff.process.Process.sde`), whose
reverse in time is (Song et al. 2021, eq. 6; Anderson 1982)

    dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar,   score = -(x - alpha x0_hat) / sigma^2,

the score written with the model's data prediction (Tweedie's formula). Both samplers end
with the usual denoising step ``x = x0_hat`` into ``sigma = 0``.

Where ``alpha(t) = 0`` (the linear interpolant at ``t = 1``) the SDE is singular
(``f = d log alpha/dt = -inf``, ``g^2 = +inf``); the state there carries no information about
the data, and a step leaving it is taken as the posterior step
``x_s = alpha_s x0_hat + sigma_s z`` (DDPM's step with ``alpha_t = 0``, :func:`~.common.ddim_step`
with ``eta = 1``), which is finite.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import SamplerOutput, ddim_step, prepare, transition_variance

__all__ = ["NORMS", "PREDICTORS", "sample_euler_maruyama", "sample_pc"]

PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def score_from_x0(x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    """``grad log p_t(x) = -(x - alpha x0_hat) / sigma^2`` (Tweedie's formula)."""
    return (alpha * x0 - x) / sigma**2


def _sde_tables(process, ts: Tensor) -> tuple[list[float], list[float]]:
    f, g2 = process.sde(ts)
    return f.tolist(), g2.tolist()


def _singular(alpha: float, f: float, g2: float) -> bool:
    return alpha == 0.0 or not (math.isfinite(f) and math.isfinite(g2))


def euler_maruyama_step(x: Tensor, score: Tensor, f: float, g2: float, h: float, noise: Tensor) -> Tensor:
    """One reverse-time Euler–Maruyama step of length ``h > 0`` (score_sde's ``EulerMaruyamaPredictor``):
    ``x - [f x - g^2 score] h + g sqrt(h) z``."""
    return x - (f * x - g2 * score) * h + math.sqrt(g2 * h) * noise


def reverse_diffusion_step(x: Tensor, score: Tensor, a_t: float, s_t: float, a_s: float, s_s: float,
                           noise: Tensor) -> Tensor:
    """score_sde's ``ReverseDiffusionPredictor`` for a step ``t -> s``: reverse the discrete
    forward transition ``x_t = r x_s + G z`` with ``r = alpha_t / alpha_s`` and
    ``G^2 = sigma_t^2 - r^2 sigma_s^2`` (for VP ``r = sqrt(1 - beta_i)``, ``G^2 = beta_i``; for VE
    ``r = 1``, ``G^2 = sigma_i^2 - sigma_{i-1}^2``): ``x_s = x - (r - 1) x + G^2 score + G z``."""
    r = a_t / a_s
    g2 = transition_variance(a_t, s_t, a_s, s_s)
    return (2.0 - r) * x + g2 * score + math.sqrt(g2) * noise


def _predictor_step(x: Tensor, x0: Tensor, tab, i: int, f: float, g2: float, noise: Tensor | None,
                    predictor: str) -> Tensor:
    """One reverse-SDE step ``t_i -> t_{i+1}`` shared by Euler–Maruyama and the PC predictor: the
    denoising step into ``sigma = 0``; the posterior (DDPM) step where the SDE is singular
    (``alpha = 0``); otherwise the reverse-diffusion or Euler–Maruyama update."""
    a_t, s_t, a_s, s_s = tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
    if s_s == 0.0:
        return x0
    if _singular(a_t, f, g2):
        return ddim_step(x, x0, a_t, s_t, a_s, s_s, eta=1.0, noise=noise)
    score = score_from_x0(x, x0, a_t, s_t)
    if predictor == "reverse_diffusion":
        return reverse_diffusion_step(x, score, a_t, s_t, a_s, s_s, noise)
    return euler_maruyama_step(x, score, f, g2, tab.t[i] - tab.t[i + 1], noise)


def sample_euler_maruyama(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """Euler–Maruyama on the reverse SDE (Song et al. 2021, eq. 6), coefficients at the start
    of each step; the last step into ``sigma = 0`` is the denoising step. NFE = number of steps."""
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    f_tab, g2_tab = _sde_tables(model.process, ts)
    for i in range(len(tab) - 1):
        x0 = model_x0(x, tab.t[i], i)
        noise = space.noise(generator).to(x.dtype) if tab.sigma[i + 1] > 0 else None
        x = _predictor_step(x, x0, tab, i, f_tab[i], g2_tab[i], noise, "euler_maruyama")
        x = hooks.after_step(i, tab.t[i + 1], x, x0)
    return SamplerOutput(x, model_x0.nfe)


NORMS = ("batch", "item")


def langevin_step(x: Tensor, score: Tensor, noise: Tensor, space, snr: float, r: float, norms: str = "batch") -> Tensor:
    """One Langevin corrector step (Song et al. 2021, Alg. 4/5):
    ``x + eps score + sqrt(2 eps) z`` with ``eps = 2 r (snr ||z|| / ||score||)^2``.

    The norms are taken per item through the Space (``space.sum``); with ``norms="batch"``
    their batch means enter the ratio, as in score_sde, and with ``norms="item"`` each item
    gets its own step size. Per-item step sizes keep items independent of their batch, but
    they need high dimension, where ``||z||`` and ``||score||`` concentrate: in low dimension the
    ratio is heavy-tailed (``||score||`` comes arbitrarily close to 0 near a mode, giving an
    arbitrarily long jump; on the 2-D ring this ruins the samples), and even in 256-D the
    coupling ``eps ~ ||z||^2`` to the same noise draw widens the samples by about 1% more than
    batch norms do. Either way a Langevin step of size ``eps`` on a Gaussian of variance ``v``
    is stationary at ``v / (1 - eps / 2v)``, i.e. about ``1 / (1 - r snr^2)``: 2.6% wider at 0.16.
    """
    z_norm = torch.sqrt(space.sum(noise.to(torch.float64) ** 2))
    s_norm = torch.sqrt(space.sum(score.to(torch.float64) ** 2))
    if norms == "batch":
        z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
    ratio2 = torch.where(s_norm > 0, (z_norm / s_norm.clamp(min=1e-300)) ** 2, torch.zeros_like(s_norm))
    eps = space.expand(2.0 * r * snr**2 * ratio2).to(x.dtype)
    return x + eps * score + torch.sqrt(2.0 * eps) * noise


def sample_pc(
    model,
    x: Tensor,
    ts,
    space=None,
    generator: torch.Generator | None = None,
    *,
    snr: float = 0.16,
    corrector_steps: int = 1,
    predictor: str = "reverse_diffusion",
    norms: str = "batch",
    callback=None,
    constrain=None,
    check_finite: bool = True,
) -> SamplerOutput:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1; score_sde's ``pc_sampler``).

    At every grid point ``t_i``: ``corrector_steps`` Langevin steps targeting ``p_{t_i}`` with
    signal-to-noise ratio ``snr`` (score_sde's default 0.16) and
    ``r_i = (alpha(t_i) / alpha(t_{i+1}))^2`` (score_sde's ``alpha_i = 1 - beta_i`` for VP, 1 for
    VE), then one predictor step to ``t_{i+1}``: ``"reverse_diffusion"`` (score_sde's default)
    or ``"euler_maruyama"``. The step into ``sigma = 0`` is the denoising step. ``norms`` chooses
    batch-mean (score_sde) or per-item norms in the corrector's step size (see :func:`langevin_step`).
    NFE = steps x (corrector_steps + 1), less ``corrector_steps`` if the grid starts at
    ``alpha = 0``, where the corrector's step size ``2 r_i (...)`` is zero and it is skipped.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; valid: {', '.join(PREDICTORS)}")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be a non-negative integer, got {corrector_steps!r}")
    if norms not in NORMS:
        raise ValueError(f"unknown norms {norms!r}; valid: {', '.join(NORMS)}")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr}")
    space, ts, tab, model_x0, hooks = prepare(model, x, ts, space, callback, constrain, check_finite)
    f_tab, g2_tab = _sde_tables(model.process, ts)
    for i in range(len(tab) - 1):
        a_t, s_t, a_s, s_s = tab.alpha[i], tab.sigma[i], tab.alpha[i + 1], tab.sigma[i + 1]
        r = (a_t / a_s) ** 2
        if r > 0:
            for _ in range(corrector_steps):
                score = score_from_x0(x, model_x0(x, tab.t[i], i), a_t, s_t)
                x = space.project(langevin_step(x, score, space.noise(generator).to(x.dtype), space, snr, r, norms))
        x0 = model_x0(x, tab.t[i], i)
        noise = space.noise(generator).to(x.dtype) if s_s > 0 else None
        x = _predictor_step(x, x0, tab, i, f_tab[i], g2_tab[i], noise, predictor)
        x = hooks.after_step(i, tab.t[i + 1], x, x0)
    return SamplerOutput(x, model_x0.nfe)
