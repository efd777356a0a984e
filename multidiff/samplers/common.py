"""What every sampler shares: the output type, the model evaluator and the grid tables.

A sampler is one function ``sample_xxx(model, x, ts, space=None, generator=None, *, ...,
callback=None, constrain=None) -> SamplerOutput``. ``model`` follows the
:class:`~multidiff.denoiser.DataPredictor` protocol (``model.process`` and
``model(x, t[B], space) -> x0_hat``). All of a sampler's state lives in local variables;
the :class:`Evaluator` counts network evaluations exactly and turns a non-finite model
output into an error that names the step and the noise level.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..schedules import check_grid
from ..space import DenseSpace

__all__ = ["SamplerOutput", "NonFiniteError", "Evaluator", "GridTables", "prepare", "Hooks", "ddim_step", "ancestral_step", "transition_variance"]


class SamplerOutput(NamedTuple):
    """The sample ``x`` (at the grid's last time, ``t = 0`` for a full grid) and the exact
    number of network evaluations ``nfe`` spent on it."""

    x: Tensor
    nfe: int


class NonFiniteError(FloatingPointError):
    """The model produced NaN or infinity."""


@dataclass
class GridTables:
    """Per-grid-point coefficients as Python floats (float64 maths, no device syncs in the loop)."""

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    log_snr: list[float]  # +inf where sigma = 0
    sigma_edm: list[float]  # sigma / alpha; +inf where alpha = 0

    def __len__(self) -> int:
        return len(self.t)


def grid_tables(process, ts: Tensor) -> GridTables:
    a = process.alpha(ts)
    s = process.sigma(ts)
    lam = torch.where(s > 0, 2 * (torch.log(a) - torch.log(s)), torch.full_like(s, math.inf))
    sig_edm = torch.where(a > 0, s / a, torch.full_like(s, math.inf))
    return GridTables(ts.tolist(), a.tolist(), s.tolist(), lam.tolist(), sig_edm.tolist())


class Evaluator:
    """Calls the model at a scalar time for the whole batch, counts calls, checks finiteness."""

    def __init__(self, model, space, check_finite: bool = True):
        self.model = model
        self.space = space
        self.check_finite = check_finite
        self.nfe = 0

    def __call__(self, x: Tensor, t: float, step: int | None = None) -> Tensor:
        tb = torch.full((self.space.batch_size,), t, dtype=torch.float64, device=x.device)
        out = self.model(x, tb, self.space)
        self.nfe += 1
        # a sum is non-finite whenever an element is: one cheap reduction per call, and the
        # element-wise test only when the sum overflows or a NaN is present
        if self.check_finite and not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
            sig = float(self.model.process.sigma_edm(torch.tensor(t, dtype=torch.float64)))
            where = f"step {step}" if step is not None else "a step"
            raise NonFiniteError(
                f"the model returned NaN or infinity at {where} (t={t:.6g}, sigma={sig:.6g}); "
                "check the network, its inputs and the time grid"
            )
        return out.to(x.dtype)


@dataclass
class Hooks:
    """Per-step hooks: ``constrain(x, t) -> x`` after every step (inpainting by replacement)
    and ``callback(info)`` with ``{"i", "t", "x", "x0"}`` for progress or trajectories."""

    space: object
    constrain: Callable[[Tensor, float], Tensor] | None = None
    callback: Callable[[dict], None] | None = None

    def after_step(self, i: int, t_next: float, x: Tensor, x0: Tensor | None) -> Tensor:
        x = self.space.project(x)
        if self.constrain is not None:
            x = self.constrain(x, t_next)
        if self.callback is not None:
            self.callback({"i": i, "t": t_next, "x": x, "x0": x0})
        return x


def prepare(model, x: Tensor, ts, space, callback=None, constrain=None, check_finite: bool = True):
    """Validate inputs and build ``(space, grid, tables, evaluator, hooks)`` for a sampler."""
    if not hasattr(model, "process"):
        raise TypeError(
            "model must carry its noise process (model.process) and map (x, t[B], space) -> x0; "
            "wrap a raw network with multidiff.Denoiser, or a plain D(x, sigma) with multidiff.sample_edm"
        )
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if space is None:
        space = DenseSpace.like(x)
    space.check(x, "x_T")
    ts = check_grid(ts, model.process)
    tables = grid_tables(model.process, ts)
    return space, ts, tables, Evaluator(model, space, check_finite), Hooks(space, constrain, callback)


def eps_from_x0(x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    """``eps_hat = (x - alpha x0) / sigma``."""
    return (x - alpha * x0) / sigma


def transition_variance(a_t: float, s_t: float, a_s: float, s_s: float) -> float:
    """``sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2``, the variance of the forward
    transition ``q(x_t | x_s)`` for ``s < t`` (Kingma et al. 2021, eq. 3-4), clamped at 0 against rounding."""
    return max(s_t**2 - (a_t / a_s) ** 2 * s_s**2, 0.0)


def ddim_step(
    x: Tensor,
    x0: Tensor,
    a_t: float,
    s_t: float,
    a_s: float,
    s_s: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM step ``t -> s`` for ``x = alpha x0 + sigma eps`` (Song et al. 2021a, eq. 12):
    ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
    ``c^2 = eta^2 sigma_{t|s}^2 sigma_s^2 / sigma_t^2``, ``sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2``.
    ``eta = 1`` is the DDPM posterior (ancestral) step; ``eta = 0`` is the probability-flow
    Euler step in ``(x / alpha, sigma / alpha)``."""
    if s_s == 0.0:
        return x0
    c2 = 0.0
    if eta > 0:
        c2 = eta**2 * transition_variance(a_t, s_t, a_s, s_s) * s_s**2 / s_t**2
    eps = eps_from_x0(x, x0, a_t, s_t)
    out = a_s * x0 + math.sqrt(max(s_s**2 - c2, 0.0)) * eps
    if c2 > 0:
        if noise is None:
            raise ValueError("a stochastic step needs noise")
        out = out + math.sqrt(c2) * noise
    return out


def ancestral_step(
    x: Tensor,
    x0: Tensor,
    a_t: float,
    s_t: float,
    a_s: float,
    s_s: float,
    noise: Tensor | None,
    variance: str = "posterior",
) -> Tensor:
    """One DDPM ancestral step ``t -> s``: ``x_s ~ N(mu, v)`` with the posterior mean
    ``mu = alpha_s x0 + sqrt(sigma_s^2 - beta~) eps_hat`` and ``v = beta~ = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``
    (``"posterior"``) or ``v = sigma_{t|s}^2`` (``"forward"``, DDPM's ``beta_t``); clean data
    ``x0`` when ``sigma_s = 0``."""
    if s_s == 0.0:
        return x0
    var_ts = transition_variance(a_t, s_t, a_s, s_s)
    post = var_ts * s_s**2 / s_t**2
    mean = a_s * x0 + math.sqrt(max(s_s**2 - post, 0.0)) * eps_from_x0(x, x0, a_t, s_t)
    return mean + math.sqrt(post if variance == "posterior" else var_ts) * noise
