"""The denoising loss, for every process, prediction kind, time distribution and weighting.

For data ``x0``, a time ``t ~ p(t)`` and noise ``eps ~ N(0, I)`` on the Space's subspace,
``x_t = alpha(t) x0 + sigma(t) eps`` and the network ``F`` (called exactly as
:class:`~multidiff.denoiser.Denoiser` calls it) is trained on

    L = E_t [ w(t) * || P(F(x_t, t) - F*) ||^2 / dof ],

where ``F*`` is the target of its prediction kind (``eps``, ``x0``, ``v = alpha eps - sigma x0``,
``score = -eps / sigma``, ``velocity = alpha' x0 + sigma' eps``, or for ``"edm"`` the effective
target ``(x0 - c_skip x~) / c_out`` of Karras et al. 2022, eq. 8), ``P`` the Space's projection
(the centre-of-mass part of a graph residual is not a degree of freedom) and ``dof`` the
Space's per-item degrees of freedom. The squared norm is summed per item by ``space.sum``.

**Weightings.** At fixed ``x_t`` every prediction kind is an affine function of the x0 estimate,
``F = a_kind(t) x0_hat + b_kind(t) x_t``, so a weighting is one function ``w_x0(t)`` on the
x0-MSE, and on the network's own MSE it is ``w(t) = w_x0(t) / a_kind(t)^2``
(Kingma & Gao 2023, sec. 2). Each weighting is stated in its natural frame:

=========  ============================================  ==========================================
name       natural form                                  ``w_x0(t)``
=========  ============================================  ==========================================
simple     eps-MSE (Ho et al. 2020)                      ``SNR = alpha^2 / sigma^2``
edm        x0-MSE times ``lambda(s) = 1 / c_out^2``      ``(s^2 + s_d^2) / (s s_d)^2`` with
           (Karras et al. 2022, Table 1)                 ``s = sigma / alpha``, ``s_d = sigma_data``
min_snr    x0-MSE times ``min(SNR, gamma)``              ``min(SNR, gamma)``, ``gamma = 5``
           (Hang et al. 2023)
flow       velocity-MSE (flow matching, Lipman et al.    ``((alpha' sigma - sigma' alpha) / sigma)^2``
           2022; Liu et al. 2022)                        (``1 / t^2`` for the linear interpolant)
mse        the plain MSE of the network's own output     ``a_kind(t)^2``
=========  ============================================  ==========================================

The squared sensitivities ``a_kind^2`` are ``1`` (x0), ``SNR`` (eps), ``(alpha^2+sigma^2)^2/sigma^2``
(v), ``alpha^2/sigma^4`` (score), ``((alpha' sigma - sigma' alpha)/sigma)^2`` (velocity) and
``1/c_out^2`` (edm). So min-SNR for eps is ``min(SNR, gamma)/SNR`` and for v (VP) is
``min(SNR, gamma)/(SNR + 1)``, as in Hang et al. 2023; ``edm`` on an ``"edm"`` network is ``1``.

**Time sampling.**

* ``"uniform"``: ``t ~ U[t_eps, t_max]`` (``t_eps`` defaults to ``process.t_min``).
* ``"lognormal"``: ``ln s ~ N(P_mean, P_std^2)`` in the EDM noise level ``s = sigma / alpha``,
  ``P_mean = -1.2``, ``P_std = 1.2`` (Karras et al. 2022, sec. 5), mapped to process time by
  ``process.t_from_sigma_edm`` and clamped to ``[t_eps, t_max]``.
* ``"log_snr"``: log-SNR uniform on ``[lambda(t_max), lambda(t_eps)]`` (the "uniform in
  log-SNR" density of Kingma & Gao 2023).
* ``"importance"``: adaptive importance sampling by the loss history (Nichol & Dhariwal 2021,
  sec. 3.3, in continuous time): ``[t_eps, t_max]`` is cut into equal bins, a bin is drawn with
  probability proportional to ``sqrt(E[L^2])`` of its recent losses (an exponential moving
  average; uniform until every bin has ``warmup`` losses) and ``t`` uniformly inside it; each
  item's loss is multiplied by ``1 / (bins * p_bin)`` so the objective stays the uniform-t one
  and only its variance changes. The history is updated by every call (see :class:`LossHistory`).

The first three define the objective (as EDM's log-normal does); ``"importance"`` does not.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..denoiser import TIME_INPUTS, Denoiser
from ..prediction import check_prediction
from ..process import Process
from ..space import DenseSpace

__all__ = ["DenoisingLoss", "LossOutput", "LossHistory", "WEIGHTINGS", "TIME_SAMPLINGS", "sensitivity2"]

WEIGHTINGS = ("simple", "edm", "min_snr", "flow", "mse")
TIME_SAMPLINGS = ("uniform", "lognormal", "log_snr", "importance")

# the prediction kind whose plain MSE each weighting is (``None``: the network's own kind)
_NATURAL_KIND = {"simple": "eps", "edm": "edm", "min_snr": "x0", "flow": "velocity", "mse": None}


class LossOutput(NamedTuple):
    """``loss`` (scalar, the mean of ``per_item``), ``per_item`` ``[B]`` (weighted, including any
    importance weight), the times ``t`` ``[B]`` (float64) and the per-item ``weight`` ``[B]``
    that multiplied each item's MSE."""

    loss: Tensor
    per_item: Tensor
    t: Tensor
    weight: Tensor


def sensitivity2(kind: str, process: Process, t: Tensor, sigma_data: float = 0.5) -> Tensor:
    """``a_kind(t)^2``: how much the squared error of a ``kind`` prediction grows per unit
    squared error of the x0 estimate at fixed ``x_t`` (float64, per item)."""
    t = t.to(torch.float64)
    snr = torch.exp(process.log_snr(t))
    if kind == "x0":
        return torch.ones_like(t)
    if kind == "eps":
        return snr
    if kind == "edm":
        return snr + 1.0 / sigma_data**2  # 1 / c_out^2 with s^2 = 1 / SNR
    a, s = process.alpha(t), process.sigma(t)
    if kind == "v":
        return (a**2 + s**2) ** 2 / s**2
    if kind == "score":
        return a**2 / s**4
    if kind == "velocity":
        da, ds = process.derivatives(t)
        return ((da * s - ds * a) / s) ** 2
    raise ValueError(f"no sensitivity for prediction {kind!r}")


class LossHistory:
    """Per-bin loss second moments over ``[t_lo, t_hi]`` for adaptive importance sampling of ``t``
    (Nichol & Dhariwal 2021, sec. 3.3: ``p(t) ~ sqrt(E[L_t^2])``, mixed with ``uniform_mix`` of
    the uniform density so no bin starves). Keep it in checkpoints with :meth:`state_dict`."""

    def __init__(self, t_lo: float, t_hi: float, bins: int = 50, decay: float = 0.99, warmup: int = 10,
                 uniform_mix: float = 1e-3):
        if not (isinstance(bins, int) and bins >= 1):
            raise ValueError(f"bins must be a positive integer, got {bins!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.t_lo, self.t_hi, self.bins = float(t_lo), float(t_hi), bins
        self.decay, self.warmup, self.uniform_mix = decay, int(warmup), float(uniform_mix)
        self.second_moment = torch.zeros(bins, dtype=torch.float64)
        self.counts = torch.zeros(bins, dtype=torch.long)

    def bin_of(self, t: Tensor) -> Tensor:
        u = (t.detach().to(torch.float64).cpu() - self.t_lo) / (self.t_hi - self.t_lo)
        return torch.clamp((u * self.bins).floor().long(), 0, self.bins - 1)

    def probabilities(self) -> Tensor:
        """Bin probabilities ``[bins]``: uniform until every bin has ``warmup`` losses."""
        if bool((self.counts < self.warmup).any()):
            return torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        p = self.second_moment.sqrt()
        if float(p.sum()) <= 0:
            return torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        p = p / p.sum()
        return (1 - self.uniform_mix) * p + self.uniform_mix / self.bins

    def sample(self, n: int, generator: torch.Generator | None, device) -> tuple[Tensor, Tensor]:
        """``n`` times and their importance weights ``1 / (bins * p_bin)``."""
        p = self.probabilities().to(device)
        idx = torch.multinomial(p, n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        width = (self.t_hi - self.t_lo) / self.bins
        t = self.t_lo + (idx.to(torch.float64) + u) * width
        return t, 1.0 / (self.bins * p[idx])

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Fold a batch of per-item losses at times ``t`` into the per-bin moving averages."""
        idx = self.bin_of(t)
        sq = losses.detach().to(torch.float64).cpu() ** 2
        n = torch.bincount(idx, minlength=self.bins)
        mean_sq = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, idx, sq) / n.clamp(min=1)
        seen = n > 0
        first = seen & (self.counts == 0)
        # one EMA step per bin and batch; a bin's first batch initialises it (no bias toward 0)
        ema = self.decay * self.second_moment + (1 - self.decay) * mean_sq
        self.second_moment = torch.where(first, mean_sq, torch.where(seen, ema, self.second_moment))
        self.counts += n

    def state_dict(self) -> dict[str, Any]:
        return {"second_moment": self.second_moment.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["second_moment"].shape) != (self.bins,):
            raise ValueError(f"the saved history has {state['second_moment'].shape[0]} bins, this one {self.bins}")
        self.second_moment = state["second_moment"].to(torch.float64).cpu().clone()
        self.counts = state["counts"].to(torch.long).cpu().clone()


class DenoisingLoss:
    """The denoising loss of a network of a given prediction kind under ``process``.

    Args:
        process: the noise process.
        prediction: the network's output kind, as for :class:`~multidiff.denoiser.Denoiser`.
        weighting: one of :data:`WEIGHTINGS` (see the module docstring).
        time_sampling: one of :data:`TIME_SAMPLINGS`.
        t_eps, t_max: the time interval (default ``[process.t_min, process.t_max]``).
        time_input, sigma_data, autocast: how the network is called (as :class:`Denoiser`).
        p_mean, p_std: the log-normal's parameters (EDM: ``-1.2, 1.2``).
        snr_gamma: ``gamma`` of min-SNR (Hang et al. 2023: 5).
        bins, ema_decay, warmup: the importance sampler's :class:`LossHistory`.

    Call it as ``loss(net, x0, space, generator, **cond) -> LossOutput``; ``net`` is the raw
    network ``net(x_in, time_in, **space.model_kwargs(), **cond)`` or a :class:`Denoiser`
    wrapping one (its prediction kind must match). ``t=`` and ``noise=`` override the draws.
    """

    def __init__(
        self,
        process: Process,
        prediction: str = "eps",
        weighting: str = "simple",
        time_sampling: str = "uniform",
        *,
        t_eps: float | None = None,
        t_max: float | None = None,
        time_input: str = "t",
        sigma_data: float = 0.5,
        autocast: torch.dtype | None = None,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        snr_gamma: float = 5.0,
        bins: int = 50,
        ema_decay: float = 0.99,
        warmup: int = 10,
    ):
        self.process = process
        self.prediction = check_prediction(prediction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time sampling {time_sampling!r}; valid: {', '.join(TIME_SAMPLINGS)}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time_input {time_input!r}; valid: {', '.join(TIME_INPUTS)}")
        self.weighting, self.time_sampling, self.time_input = weighting, time_sampling, time_input
        self.t_eps = float(process.t_min if t_eps is None else t_eps)
        self.t_max = float(process.t_max if t_max is None else t_max)
        if not 0.0 < self.t_eps < self.t_max <= process.t_max * (1 + 1e-12):
            raise ValueError(f"need 0 < t_eps < t_max <= {process.t_max}, got t_eps={self.t_eps}, t_max={self.t_max}")
        if p_std <= 0 or snr_gamma <= 0 or sigma_data <= 0:
            raise ValueError(f"p_std, snr_gamma and sigma_data must be positive, got {p_std}, {snr_gamma}, {sigma_data}")
        self.sigma_data, self.autocast = float(sigma_data), autocast
        self.p_mean, self.p_std, self.snr_gamma = float(p_mean), float(p_std), float(snr_gamma)
        self.history = LossHistory(self.t_eps, self.t_max, bins, ema_decay, warmup) if time_sampling == "importance" else None

    # -- draws -----------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> tuple[Tensor, Tensor | None]:
        """``n`` times (float64) from the configured distribution and, for ``"importance"``,
        their importance weights (else ``None``)."""
        lo, hi = self.t_eps, self.t_max
        if self.time_sampling == "importance":
            return self.history.sample(n, generator, device)
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            return lo + (hi - lo) * u, None
        if self.time_sampling == "lognormal":
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            t = self.process.t_from_sigma_edm(torch.exp(self.p_mean + self.p_std * z))
            return t.clamp(lo, hi), None
        # log_snr: uniform in lambda between the ends (a hair inside t_max where alpha = 0 there)
        lam_lo = float(self.process.log_snr(torch.tensor(hi, dtype=torch.float64)))
        if not math.isfinite(lam_lo):
            lam_lo = float(self.process.log_snr(torch.tensor(hi - 1e-4 * (hi - lo), dtype=torch.float64)))
        lam_hi = float(self.process.log_snr(torch.tensor(lo, dtype=torch.float64)))
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.process.t_from_log_snr(lam_lo + (lam_hi - lam_lo) * u).clamp(lo, hi), None

    def draw(self, x0: Tensor, space, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(t, noise, importance_weight)`` exactly as a call with the same generator state draws
        them (times first, then noise through ``space.noise`` so a zero centre of mass holds)."""
        t, iw = self.sample_t(space.batch_size, generator, x0.device)
        return t, space.noise(generator).to(x0.dtype), iw

    # -- the pieces ------------------------------------------------------------------------
    def weight(self, t: Tensor) -> Tensor:
        """Per-item weight ``w(t)`` on the network's own MSE (float64; see the module docstring)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        natural = _NATURAL_KIND[self.weighting] or self.prediction
        if self.weighting == "min_snr":
            w_nat = torch.clamp(torch.exp(self.process.log_snr(t)), max=self.snr_gamma)
        else:
            w_nat = torch.ones_like(t)
        if natural == self.prediction:
            return w_nat
        return w_nat * sensitivity2(natural, self.process, t, self.sigma_data) / sensitivity2(
            self.prediction, self.process, t, self.sigma_data
        )

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, space) -> Tensor:
        """The regression target of the network's prediction kind."""
        kind, p, dt = self.prediction, self.process, x0.dtype
        t = t.to(torch.float64)
        if kind == "eps":
            return noise
        if kind == "x0":
            return x0
        if kind == "edm":
            # (x0 - c_skip x~) / c_out with x~ = x0 + s noise, written without the cancellation
            # at small s: (s / s_d x0 - s_d noise) / sqrt(s^2 + s_d^2)  (Karras et al. 2022, eq. 8)
            s, sd = p.sigma_edm(t), self.sigma_data
            norm = torch.sqrt(s**2 + sd**2)
            return space.expand(s / (sd * norm)).to(dt) * x0 - space.expand(sd / norm).to(dt) * noise
        a, s = space.expand(p.alpha(t)).to(dt), space.expand(p.sigma(t)).to(dt)
        if kind == "v":
            return a * noise - s * x0
        if kind == "score":
            return -noise / s
        da, ds = p.derivatives(t)
        return space.expand(da).to(dt) * x0 + space.expand(ds).to(dt) * noise  # velocity

    def raw_output(self, net: Callable[..., Tensor] | Denoiser, x_t: Tensor, t: Tensor, space, **cond: Any) -> Tensor:
        """The network's raw output at ``(x_t, t)``, called through a :class:`Denoiser` so that its
        input scaling, time input and EDM preconditioning are exactly those used at sampling."""
        if isinstance(net, Denoiser):
            if net.prediction != self.prediction:
                raise ValueError(f"the Denoiser predicts {net.prediction!r} but the loss was built for {self.prediction!r}")
            inner, time_input, sigma_data = net.net, net.time_input, net.precond.sigma_data
            base_cond, autocast = net.cond, net.autocast
        else:
            inner, time_input, sigma_data, base_cond, autocast = net, self.time_input, self.sigma_data, {}, self.autocast
        captured: list[Tensor] = []

        def probe(x_in: Tensor, time_in: Tensor, **kw: Any) -> Tensor:
            out = inner(x_in, time_in, **kw)
            captured.append(out)
            return out

        Denoiser(probe, self.process, self.prediction, time_input, sigma_data, base_cond, autocast)(x_t, t, space, **cond)
        return captured[0]

    # -- the loss --------------------------------------------------------------------------
    def __call__(
        self,
        net: Callable[..., Tensor] | Denoiser,
        x0: Tensor,
        space=None,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        **cond: Any,
    ) -> LossOutput:
        space = DenseSpace.like(x0) if space is None else space
        space.check(x0, "x0")
        iw = None
        if t is None:
            t, iw = self.sample_t(space.batch_size, generator, x0.device)
        else:
            t = torch.as_tensor(t, dtype=torch.float64, device=x0.device).expand(space.batch_size)
        if noise is None:
            noise = space.noise(generator).to(x0.dtype)
        space.check(noise, "noise")
        x_t = self.process.marginal(x0, t, noise, space.expand)
        out = self.raw_output(net, x_t, t, space, **cond).to(x0.dtype)
        err = space.project(out - self.target(x0, noise, t, space))
        mse = space.sum(err**2) / space.dof().to(err)
        weight = self.weight(t).to(device=mse.device)
        per_item = weight.to(mse.dtype) * mse
        if self.history is not None and iw is not None:
            self.history.update(t, per_item)
            weight = weight * iw
            per_item = per_item * iw.to(per_item.dtype)
        return LossOutput(per_item.mean(), per_item, t, weight)
