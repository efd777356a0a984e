"""Noise processes: the forward corruption ``x_t = alpha(t) x_0 + sigma(t) eps``.

Every process is defined by two scalar functions of continuous time ``t`` in
``[0, t_max]`` (``t_max = 1`` for all but :class:`EDM`, whose time *is* its noise
level, Karras et al. 2022, ``sigma(t) = t``). Everything a sampler, a loss or the
likelihood needs follows from ``alpha`` and ``sigma``:

* log-SNR ``lambda(t) = log(alpha^2 / sigma^2)`` and its inverse ``t(lambda)``;
* the EDM view ``sigma_edm(t) = sigma / alpha`` (the noise level of ``x / alpha``);
* the linear SDE ``dx = f(t) x dt + g(t) dw`` with the same marginals (Kingma et al.
  2021, eq. 16-17): ``f = d log(alpha)/dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2``;
* the prior ``N(0, sigma(t_max)^2 I)`` on the Space's degrees of freedom.

Derivatives are taken by autograd in float64 on the closed forms, so they are
exact, not finite differences.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "Process",
    "VP",
    "DiscreteVP",
    "VE",
    "SubVP",
    "EDM",
    "Flow",
    "make_process",
    "PROCESSES",
    "discrete_betas",
]


def _as_tensor(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


class Process:
    """A Gaussian noise process ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``.

    Subclasses implement :meth:`log_alpha` and :meth:`sigma` (or :meth:`alpha`) as closed
    forms; the rest is derived here. ``t_min`` is the smallest time a default grid uses
    before its final denoising step to ``t = 0``.
    """

    name: str = "process"
    t_max: float = 1.0
    t_min: float = 1e-3

    # -- defining functions -------------------------------------------------------------
    def log_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------
    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``; ``+inf`` where ``sigma = 0``."""
        return 2.0 * (self.log_alpha(t) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_snr` (bisection in float64 unless a subclass has a closed form)."""
        return self._bisect(self.log_snr, lam, decreasing=True)

    def sigma_edm(self, t: Tensor) -> Tensor:
        """EDM noise level of the scaled state ``x / alpha``: ``sigma / alpha``."""
        return torch.exp(-0.5 * self.log_snr(t))

    def t_from_sigma_edm(self, sigma_edm: Tensor) -> Tensor:
        sigma_edm = _as_tensor(sigma_edm)
        return self.t_from_log_snr(-2.0 * torch.log(sigma_edm))

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t), g(t)^2)`` of the forward SDE ``dx = f x dt + g dw`` (Kingma et al. 2021, eq. 17)."""
        t = _as_tensor(t)
        t64 = t.detach().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            log_a = self.log_alpha(t64)
            var = self.sigma(t64) ** 2
            f = torch.autograd.grad(log_a.sum(), t64, retain_graph=True)[0]
            dvar = torch.autograd.grad(var.sum(), t64)[0]
        g2 = dvar - 2.0 * f * var.detach()
        return f.to(t.dtype), g2.to(t.dtype)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha/dt, d sigma/dt)``, exact (autograd on the closed forms)."""
        t = _as_tensor(t)
        t64 = t.detach().to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            da = torch.autograd.grad(self.alpha(t64).sum(), t64)[0]
            ds = torch.autograd.grad(self.sigma(t64).sum(), t64)[0]
        return da.to(t.dtype), ds.to(t.dtype)

    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor, expand: Callable[[Tensor], Tensor]) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) noise`` with per-item ``t`` broadcast by ``expand``."""
        return expand(self.alpha(t)).to(x0.dtype) * x0 + expand(self.sigma(t)).to(x0.dtype) * noise

    # -- prior ------------------------------------------------------------------------------
    @property
    def prior_std(self) -> float:
        return float(self.sigma(torch.tensor(self.t_max, dtype=torch.float64)))

    def prior_sample(self, space, generator: torch.Generator | None = None) -> Tensor:
        """A draw of ``x_{t_max}`` from ``N(0, sigma(t_max)^2 I)`` on the Space's subspace."""
        return self.prior_std * space.noise(generator)

    def prior_log_prob(self, x: Tensor, space) -> Tensor:
        """Per-item log-density of the prior, on ``space.dof()`` degrees of freedom."""
        var = self.prior_std**2
        sq = space.sum(x.to(torch.float64) ** 2)
        dof = space.dof().to(sq)
        return -0.5 * dof * math.log(2 * math.pi * var) - 0.5 * sq / var

    # -- helpers ----------------------------------------------------------------------------
    def _bisect(self, fn: Callable[[Tensor], Tensor], target: Tensor, decreasing: bool) -> Tensor:
        target = _as_tensor(target)
        y = target.to(torch.float64)
        lo = torch.zeros_like(y)
        hi = torch.full_like(y, self.t_max)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            v = fn(mid)
            go_right = (v > y) if decreasing else (v < y)
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return (0.5 * (lo + hi)).to(target.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


# --------------------------------------------------------------------------------------------
# Variance preserving: alpha^2 + sigma^2 = 1, defined by log(alpha_bar(t)), alpha_bar = alpha^2
# --------------------------------------------------------------------------------------------
class VP(Process):
    """Variance-preserving process, ``alpha^2 + sigma^2 = 1``.

    Build one with a schedule constructor: :meth:`linear` (DDPM, Ho et al. 2020, in
    continuous time as score_sde), :meth:`cosine` (Nichol & Dhariwal 2021),
    :meth:`polynomial` (EDM-molecules, Hoogeboom et al. 2022) or :meth:`sigmoid`
    (Jabri et al. 2022; Chen 2023).
    """

    def __init__(
        self,
        log_alpha_bar: Callable[[Tensor], Tensor],
        t_from_alpha_bar: Callable[[Tensor], Tensor] | None,
        name: str,
        t_min: float = 1e-3,
    ):
        self._log_alpha_bar = log_alpha_bar
        self._t_from_alpha_bar = t_from_alpha_bar
        self.name = name
        self.t_min = t_min

    def log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self._log_alpha_bar(_as_tensor(t))

    def sigma(self, t: Tensor) -> Tensor:
        # sqrt(1 - alpha_bar) computed as sqrt(-expm1(log alpha_bar)) for accuracy near t = 0
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(_as_tensor(t))))

    def log_snr(self, t: Tensor) -> Tensor:
        lab = self._log_alpha_bar(_as_tensor(t))
        return lab - torch.log(-torch.expm1(lab))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        if self._t_from_alpha_bar is None:
            return super().t_from_log_snr(lam)
        lam = _as_tensor(lam)
        # alpha_bar = sigmoid(lambda)
        return self._t_from_alpha_bar(torch.sigmoid(lam.to(torch.float64))).to(lam.dtype)

    # -- schedules ---------------------------------------------------------------------------
    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> "VP":
        """``beta(t) = beta_min + t (beta_max - beta_min)``; the defaults are DDPM's
        ``1e-4 -> 0.02`` over ``T = 1000`` steps in continuous time (Song et al. 2021)."""
        db = beta_max - beta_min

        def log_alpha_bar(t: Tensor) -> Tensor:
            return -0.5 * db * t**2 - beta_min * t

        def t_from_alpha_bar(ab: Tensor) -> Tensor:
            # solve 0.5 db t^2 + beta_min t + log(ab) = 0 for t >= 0
            c = torch.log(ab)
            if db == 0:
                return -c / beta_min
            return (-beta_min + torch.sqrt(beta_min**2 - 2.0 * db * c)) / db

        p = cls(log_alpha_bar, t_from_alpha_bar, "vp-linear")
        p.beta_min, p.beta_max = beta_min, beta_max
        return p

    @classmethod
    def cosine(cls, s: float = 0.008, max_beta: float = 0.999, steps: int = 1000) -> "VP":
        """``alpha_bar(t) = cos^2(pi/2 (t+s)/(1+s)) / cos^2(pi/2 s/(1+s))`` (Nichol & Dhariwal 2021).

        Their discrete clip ``beta_n <= max_beta`` over ``steps`` steps becomes, in continuous
        time, a cap on the rate ``beta(t) = -d log alpha_bar/dt <= -steps log(1 - max_beta)``:
        past the time ``t_c`` where the cosine rate reaches the cap, ``log alpha_bar`` falls
        linearly, so ``alpha(1) > 0`` and the log-SNR stays finite and invertible.
        """
        half_pi = math.pi / 2
        log_f0 = 2 * math.log(math.cos(half_pi * s / (1 + s)))
        rate_cap = -steps * math.log1p(-max_beta)
        # beta(t) = pi/(1+s) tan(pi/2 (t+s)/(1+s)); solve beta(t_c) = rate_cap
        t_c = min(1.0, math.atan(rate_cap * (1 + s) / math.pi) / half_pi * (1 + s) - s)
        lab_c = 2 * math.log(math.cos(half_pi * (t_c + s) / (1 + s))) - log_f0

        def log_alpha_bar(t: Tensor) -> Tensor:
            tc = torch.clamp(t, max=t_c)
            inner = 2 * torch.log(torch.cos(half_pi * (tc + s) / (1 + s))) - log_f0
            return torch.where(t <= t_c, inner, lab_c - rate_cap * (t - t_c))

        def t_from_alpha_bar(ab: Tensor) -> Tensor:
            lab = torch.log(ab)
            cos_part = torch.clamp(torch.exp(0.5 * (lab + log_f0)), max=1.0)
            inner = torch.acos(cos_part) / half_pi * (1 + s) - s
            lin = t_c + (lab_c - lab) / rate_cap
            return torch.where(lab >= lab_c, inner, lin)

        p = cls(log_alpha_bar, t_from_alpha_bar, "vp-cosine")
        p.t_clip = t_c
        return p

    @classmethod
    def polynomial(cls, power: float = 2.0, precision: float = 1e-5) -> "VP":
        """EDM-molecules' ``polynomial_2``: ``alpha_bar = (1 - 2p)(1 - t^power)^2 + p``
        with ``p = precision`` (Hoogeboom et al. 2022, ``noise_precision = 1e-5``)."""
        p_ = precision

        def log_alpha_bar(t: Tensor) -> Tensor:
            # t = 0 is the data itself (alpha = 1, sigma = 0), as for every process; the precision
            # floor p of EDM's table applies for t > 0
            return torch.where(t > 0, torch.log((1 - 2 * p_) * (1 - t**power) ** 2 + p_), torch.zeros_like(t))

        def t_from_alpha_bar(ab: Tensor) -> Tensor:
            inner = torch.clamp((ab - p_) / (1 - 2 * p_), 0.0, 1.0)
            return torch.clamp(1 - torch.sqrt(inner), 0.0, 1.0) ** (1.0 / power)

        return cls(log_alpha_bar, t_from_alpha_bar, f"vp-polynomial{power:g}")

    @classmethod
    def sigmoid(cls, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip: float = 1e-9) -> "VP":
        """``alpha_bar(t) = (sig(-(start + t(end-start))/tau) - sig(-end/tau)) / (sig(-start/tau) - sig(-end/tau))``
        (Chen 2023, "On the importance of noise scheduling"), clipped to ``[clip, 1]``."""
        v_start = 1 / (1 + math.exp(start / tau))
        v_end = 1 / (1 + math.exp(end / tau))

        def log_alpha_bar(t: Tensor) -> Tensor:
            v = torch.sigmoid(-(start + t * (end - start)) / tau)
            return torch.log(torch.clamp((v - v_end) / (v_start - v_end), min=clip))

        def t_from_alpha_bar(ab: Tensor) -> Tensor:
            v = ab * (v_start - v_end) + v_end
            return torch.clamp((-tau * torch.logit(v) - start) / (end - start), 0.0, 1.0)

        return cls(log_alpha_bar, t_from_alpha_bar, "vp-sigmoid")


def discrete_betas(kind: str, steps: int, **kw) -> Tensor:
    """Discrete beta tables in float64: ``"linear"`` (DDPM: ``beta_start=1e-4 -> beta_end=0.02``;
    DiffWave: ``steps=50, beta_end=0.05``), ``"cosine"`` (Nichol & Dhariwal, clipped at 0.999),
    ``"polynomial_2"`` (EDM-molecules, with its step clip at 0.001 and ``precision``)."""
    if kind == "linear":
        return torch.linspace(kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02), steps, dtype=torch.float64)
    if kind == "cosine":
        s, max_beta = kw.get("s", 0.008), kw.get("max_beta", 0.999)
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((n + 1) / steps) / f(n / steps), max_beta) for n in range(steps)], dtype=torch.float64)
    if kind.startswith("polynomial"):
        power = float(kind.split("_")[1]) if "_" in kind else kw.get("power", 2.0)
        precision = kw.get("precision", 1e-5)
        x = torch.linspace(0, steps, steps + 1, dtype=torch.float64)
        a2 = (1 - (x / steps) ** power) ** 2
        # EDM's clip_noise_schedule: per-step ratio alpha2_n / alpha2_{n-1} clipped at 0.001
        a2 = torch.cat([torch.ones(1, dtype=torch.float64), a2])
        step = torch.clamp(a2[1:] / a2[:-1], min=0.001, max=1.0)
        a2 = torch.cumprod(step, 0)
        a2 = (1 - 2 * precision) * a2 + precision
        ab = a2[1:]  # alpha_bar at n = 1..steps (index 0 is n = 0 of EDM's table)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])  # so that prod(1 - beta) = a2[1:]
        return 1 - ab / prev
    raise ValueError(f"unknown discrete beta schedule {kind!r}; valid: 'linear', 'cosine', 'polynomial_<power>'")


class DiscreteVP(VP):
    """A discrete DDPM process with ``steps`` steps and ``alpha_bar_n = prod_{i<=n} (1 - beta_i)``.

    Step ``n`` sits at ``t = n / steps``; ``alpha_bar`` is exact there, and the log-SNR is
    interpolated linearly in ``t`` between integer steps (below ``t = 1/steps`` it is
    extended linearly with the first segment's slope; ``t = 0`` is the clean data).
    ``model`` time inputs can be mapped back to integer steps with :meth:`step_of`.
    """

    def __init__(self, betas: Sequence[float] | Tensor, name: str = "vp-discrete"):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D list of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.betas = betas
        self.steps = len(betas)
        self.alphas_bar = torch.cumprod(1 - betas, 0)
        lab = torch.log(self.alphas_bar)
        self._lam = lab - torch.log(-torch.expm1(lab))  # log-SNR at n = 1..steps
        if not bool((self._lam[1:] < self._lam[:-1]).all()):
            raise ValueError("alpha_bar must decrease strictly along the table")
        self.name = name
        self.t_min = 1.0 / self.steps
        self.t_max = 1.0
        self._log_alpha_bar = self._interp_log_alpha_bar
        self._t_from_alpha_bar = None

    def _lam_at(self, t: Tensor) -> Tensor:
        lam_tab = self._lam.to(t.device)
        u = t.to(torch.float64) * self.steps - 1.0  # fractional index into the table
        i = torch.clamp(torch.floor(u), 0, self.steps - 2).long()
        frac = u - i.to(torch.float64)
        lam = lam_tab[i] + frac * (lam_tab[i + 1] - lam_tab[i])
        return torch.where(t <= 0, torch.full_like(lam, math.inf), lam).to(t.dtype)

    def _interp_log_alpha_bar(self, t: Tensor) -> Tensor:
        # alpha_bar = sigmoid(lambda)  =>  log alpha_bar = -softplus(-lambda)
        return -torch.nn.functional.softplus(-self._lam_at(_as_tensor(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        return self._lam_at(_as_tensor(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        lam_tab = self._lam.to(lam.device)
        l64 = lam.to(torch.float64)
        # table is decreasing: searchsorted on the negated table
        j = torch.searchsorted(-lam_tab, -l64.contiguous()).clamp(1, self.steps - 1)
        i = j - 1
        frac = (l64 - lam_tab[i]) / (lam_tab[j] - lam_tab[i])
        t = (i.to(torch.float64) + 1.0 + frac) / self.steps
        return torch.where(torch.isinf(l64) & (l64 > 0), torch.zeros_like(t), t).to(lam.dtype)

    def step_of(self, t: Tensor) -> Tensor:
        """Fractional DDPM step ``n = t * steps - 1`` in a 0-based table (diffusers' timestep)."""
        return t * self.steps - 1.0

    @classmethod
    def from_schedule(cls, kind: str = "linear", steps: int = 1000, **kw) -> "DiscreteVP":
        return cls(discrete_betas(kind, steps, **kw), name=f"vp-discrete-{kind}")


# --------------------------------------------------------------------------------------------
# Other families
# --------------------------------------------------------------------------------------------
class VE(Process):
    """Variance exploding (Song et al. 2021): ``alpha = 1``,
    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.name = "ve"
        self.t_min = 1e-5  # score_sde's eps for VE

    def log_alpha(self, t: Tensor) -> Tensor:
        return 0.0 * _as_tensor(t)  # (not zeros_like: keeps the autograd link for derivatives() and sde())

    def sigma(self, t: Tensor) -> Tensor:
        t = _as_tensor(t)
        return torch.where(
            t <= 0, torch.zeros_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        )

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        lam = _as_tensor(lam)
        return (-0.5 * lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


class SubVP(VP):
    """sub-VP (Song et al. 2021): ``alpha`` as the linear VP, ``sigma = 1 - alpha^2``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        base = VP.linear(beta_min, beta_max)
        super().__init__(base._log_alpha_bar, None, "subvp")
        self._base = base

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(self._log_alpha_bar(_as_tensor(t)))

    def log_snr(self, t: Tensor) -> Tensor:
        lab = self._log_alpha_bar(_as_tensor(t))
        return lab - 2 * torch.log(-torch.expm1(lab))


class EDM(Process):
    """Karras et al. 2022: ``alpha = 1``, ``sigma(t) = t`` for ``t`` in ``[0, sigma_max]``.

    Its time is its noise level, so ``t_max = sigma_max`` (the one process whose time does
    not end at 1). ``sigma_data`` is used by the EDM preconditioning and loss weighting.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.name = "edm"
        self.t_max = sigma_max
        self.t_min = sigma_min

    def log_alpha(self, t: Tensor) -> Tensor:
        return 0.0 * _as_tensor(t)  # (not zeros_like: keeps the autograd link for derivatives() and sde())

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return torch.exp(-0.5 * _as_tensor(lam))


class Flow(Process):
    """Linear interpolant / rectified flow (Liu et al. 2022; Lipman et al. 2022):
    ``alpha = 1 - t``, ``sigma = t``. Pair it with the ``"velocity"`` prediction."""

    name = "flow"

    def __init__(self):
        self.t_min = 1e-3

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-_as_tensor(t))

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - _as_tensor(t)

    def sigma(self, t: Tensor) -> Tensor:
        return _as_tensor(t)

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # alpha/sigma = exp(lam/2)  =>  t = 1 / (1 + exp(lam/2))
        return torch.sigmoid(-0.5 * _as_tensor(lam))


PROCESSES: dict[str, Callable[..., Process]] = {
    "vp-linear": VP.linear,
    "vp-cosine": VP.cosine,
    "vp-polynomial": VP.polynomial,
    "vp-sigmoid": VP.sigmoid,
    "vp-discrete": DiscreteVP.from_schedule,
    "ve": VE,
    "subvp": SubVP,
    "edm": EDM,
    "flow": Flow,
}


def make_process(name: str, **kwargs) -> Process:
    """Build a process by name (see :data:`PROCESSES`)."""
    try:
        factory = PROCESSES[name]
    except KeyError:
        raise ValueError(f"unknown process {name!r}; valid names: {', '.join(sorted(PROCESSES))}") from None
    return factory(**kwargs)
