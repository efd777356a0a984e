"""Time grids: where a sampler evaluates the model.

A grid is a float64 tensor ``t_0 = t_max > t_1 > ... > t_{n-1} = t_min > t_n = 0``: ``n``
steps, the last one a denoising step into clean data (``sigma = 0``), as EDM and
k-diffusion do. Grids are built in whatever variable makes them natural (``t``, log-SNR,
the EDM noise level ``sigma / alpha``) and mapped to process time through the process's
exact inverse, so one grid serves every process.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from .process import Process

__all__ = [
    "uniform_t",
    "trailing",
    "uniform_log_snr",
    "karras",
    "quadratic",
    "explicit",
    "from_sigmas",
    "from_betas",
    "make_grid",
    "check_grid",
    "GRIDS",
    "GridError",
]


class GridError(ValueError):
    """A time grid that no sampler can use."""


def _finish(ts: Tensor, process: Process, final_zero: bool = True) -> Tensor:
    ts = ts.to(torch.float64)
    if final_zero:
        ts = torch.cat([ts, ts.new_zeros(1)])
    return check_grid(ts, process)


def _ends(process: Process, t_max: float | None, t_min: float | None) -> tuple[float, float]:
    t_max = process.t_max if t_max is None else float(t_max)
    t_min = process.t_min if t_min is None else float(t_min)
    if not 0 < t_min < t_max <= process.t_max * (1 + 1e-12):
        raise GridError(f"need 0 < t_min < t_max <= {process.t_max}, got t_min={t_min}, t_max={t_max}")
    return t_max, t_min


def _steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise GridError(f"the number of steps must be a positive integer, got {steps!r}")
    return steps


def _finite_top(process: Process, t_max: float, fn: Callable[[Tensor], Tensor]) -> float:
    """``fn(t_max)``, or where it is infinite (alpha = 0 at ``t_max``, as for the linear
    interpolant) its value a hair below ``t_max``; the grid still starts at ``t_max``."""
    v = float(fn(torch.tensor(t_max, dtype=torch.float64)))
    if math.isfinite(v):
        return v
    return float(fn(torch.tensor(t_max * (1 - 1e-4), dtype=torch.float64)))


def uniform_t(process: Process, steps: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """Equal steps in process time (DDPM/DDIM "linspace" spacing)."""
    t_max, t_min = _ends(process, t_max, t_min)
    n = _steps(steps)
    if n == 1:
        return _finish(torch.tensor([t_max], dtype=torch.float64), process)
    return _finish(torch.linspace(t_max, t_min, n, dtype=torch.float64), process)


def trailing(process: Process, steps: int, t_max: float | None = None) -> Tensor:
    """Equal steps in process time that end at ``t_max / steps`` instead of ``t_min``:
    ``t_i = t_max (1 - i / n)``, ``i = 0 .. n-1``, then the denoising step into ``t = 0``.

    This is the "trailing" timestep spacing of Lin et al. 2024 ("Common Diffusion Noise
    Schedules and Sample Steps Are Flawed", Table 2; diffusers' ``timestep_spacing="trailing"``):
    on DDPM's table (``t = (k + 1) / T``) it visits exactly the timesteps ``999, 999 - T/n, ...``.
    The last positive point moves up with fewer steps, so the final step into clean data is as
    long as the others; a solver whose final step is high order in ``sigma / alpha`` (iPNDM,
    DEIS in ``rho`` or ``t``) takes it in its stride, while one that denoises there
    (first-order final step) pays ``O(sigma_last^2)``. Meant for processes on ``[0, 1]``."""
    n = _steps(steps)
    t_max = process.t_max if t_max is None else float(t_max)
    if not 0 < t_max <= process.t_max * (1 + 1e-12):
        raise GridError(f"need 0 < t_max <= {process.t_max}, got t_max={t_max}")
    ts = t_max * (1.0 - torch.arange(n, dtype=torch.float64) / n)
    return _finish(ts, process)


def uniform_log_snr(process: Process, steps: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """Equal steps in log-SNR ``lambda`` (DPM-Solver's "logSNR" spacing, Lu et al. 2022)."""
    t_max, t_min = _ends(process, t_max, t_min)
    n = _steps(steps)
    lam_hi = float(process.log_snr(torch.tensor(t_min, dtype=torch.float64)))
    lam_lo = _finite_top(process, t_max, process.log_snr)
    lam = torch.linspace(lam_lo, lam_hi, n, dtype=torch.float64)
    ts = process.t_from_log_snr(lam)
    ts[-1], ts[0] = t_min, t_max  # in this order so a one-step grid starts at t_max
    return _finish(ts, process)


def karras(
    process: Process,
    steps: int,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5): ``sigma_i = (s_max^{1/rho} + i/(n-1) (s_min^{1/rho} - s_max^{1/rho}))^rho``
    in the EDM noise level ``sigma / alpha``, ``rho = 7`` by default."""
    n = _steps(steps)
    t_max, t_min = _ends(process, None, None)
    s_max = _finite_top(process, t_max, process.sigma_edm) if sigma_max is None else float(sigma_max)
    s_min = float(process.sigma_edm(torch.tensor(t_min, dtype=torch.float64))) if sigma_min is None else float(sigma_min)
    if not 0 < s_min < s_max:
        raise GridError(f"need 0 < sigma_min < sigma_max, got {s_min}, {s_max}")
    if n == 1:
        sig = torch.tensor([s_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    ts = process.t_from_sigma_edm(sig).clamp(0.0, process.t_max)
    if sigma_max is None:
        ts[0] = t_max
    return _finish(ts, process)


def quadratic(process: Process, steps: int, t_max: float | None = None, t_min: float | None = None) -> Tensor:
    """Quadratic spacing in time (DDIM, Song et al. 2021a): dense near the data."""
    t_max, t_min = _ends(process, t_max, t_min)
    n = _steps(steps)
    if n == 1:
        return _finish(torch.tensor([t_max], dtype=torch.float64), process)
    u = torch.linspace(1, 0, n, dtype=torch.float64)
    return _finish(t_min + (t_max - t_min) * u**2, process)


def explicit(process: Process, ts: Sequence[float] | Tensor, final_zero: bool = False) -> Tensor:
    """A grid given as a list of times (validated; ``final_zero`` appends ``t = 0``)."""
    return _finish(torch.as_tensor(ts, dtype=torch.float64).flatten(), process, final_zero)


def from_sigmas(process: Process, sigmas: Sequence[float] | Tensor) -> Tensor:
    """A grid given as decreasing EDM noise levels ``sigma / alpha`` (a final 0 maps to ``t = 0``)."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if bool((sig < 0).any()) or not bool(torch.isfinite(sig).all()):
        raise GridError(f"noise levels must be finite and non-negative, got {sig.tolist()}")
    ts = torch.where(sig > 0, process.t_from_sigma_edm(sig.clamp(min=1e-300)), torch.zeros_like(sig))
    return _finish(ts, process, final_zero=False)


def from_betas(process: Process, betas: Sequence[float] | Tensor) -> Tensor:
    """A grid from a short discrete beta list, as DiffWave's fast sampler
    (Kong et al. 2021, ``[1e-4, 1e-3, 1e-2, 5e-2, 2e-1, 5e-1]``): each step's
    ``alpha_bar_n = prod (1 - beta)`` is placed at the time where the process has the same
    log-SNR. The ancestral sampler on this grid takes exactly the fast schedule's steps."""
    b = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if b.numel() < 1 or bool(((b <= 0) | (b >= 1)).any()):
        raise GridError(f"betas must lie in (0, 1), got {b.tolist()}")
    ab = torch.cumprod(1 - b, 0)
    lam = torch.log(ab) - torch.log1p(-ab)
    ts = process.t_from_log_snr(lam).flip(0)
    return _finish(ts, process)


GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_t,
    "trailing": trailing,
    "log_snr": uniform_log_snr,
    "karras": karras,
    "quadratic": quadratic,
}


def make_grid(name: str, process: Process, steps: int, **kwargs) -> Tensor:
    """A named grid (see :data:`GRIDS`) with ``steps`` steps."""
    try:
        fn = GRIDS[name]
    except KeyError:
        raise GridError(f"unknown time grid {name!r}; valid names: {', '.join(sorted(GRIDS))}") from None
    return fn(process, steps, **kwargs)


def check_grid(ts: Tensor | Sequence[float], process: Process) -> Tensor:
    """Validate a grid: 1-D, finite, at least two points, strictly decreasing, within ``[0, t_max]``."""
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() < 2:
        raise GridError(f"a time grid needs at least two points in a 1-D list, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()):
        raise GridError(f"the time grid holds non-finite values: {ts.tolist()}")
    d = ts[1:] - ts[:-1]
    if bool((d >= 0).any()):
        i = int(torch.nonzero(d >= 0)[0])
        raise GridError(
            f"the time grid must decrease strictly; t[{i}]={ts[i].item():.6g} is followed by t[{i+1}]={ts[i+1].item():.6g}"
        )
    if ts[-1] < 0 or ts[0] > process.t_max * (1 + 1e-9):
        raise GridError(f"the time grid must lie in [0, {process.t_max}], got [{ts[-1].item():.6g}, {ts[0].item():.6g}]")
    return ts
