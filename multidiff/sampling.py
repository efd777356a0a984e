"""The front door to the samplers: pick a solver by name and an NFE budget, or bring a plain
EDM/k-diffusion denoiser ``D(x, sigma)``.

* :func:`sample` draws ``x_T`` from the prior on a Space and runs a named solver with the
  number of steps that spends at most ``nfe`` network evaluations.
* :func:`sample_edm` runs any named solver on a plain denoiser in the EDM convention
  ``x = x0 + sigma eps`` over a decreasing ``sigma`` grid ending at 0.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .process import EDM, Process
from .samplers import SamplerOutput, get_solver
from .schedules import GridError, from_sigmas, make_grid
from .space import DenseSpace

__all__ = ["sample", "sample_edm", "steps_for_nfe", "PlainDenoiser", "DEFAULT_GRID", "DEFAULT_SOLVER", "default_grid"]

#: network evaluations per step, for solvers that spend more than one (the step into
#: ``sigma = 0`` of the Heun family costs one evaluation instead of two).
_EVALS_PER_STEP = {"heun": 2, "edm_stochastic": 2}

#: the solver :func:`sample` uses unless told otherwise: iPNDM (3 stored derivatives) on the
#: quadratic grid had the best score over NFE 5-20 on both benchmark targets (benchmarks/README.md)
DEFAULT_SOLVER = "ipndm"

#: the time grid each solver uses unless told otherwise on a process that lives on t in [0, 1]
#: (VP, discrete DDPM, sub-VP, VE, flow): each solver's best grid on the sampler benchmark
#: (DDPM's discrete linear table; benchmarks/README.md, "Choosing the defaults"). On the EDM
#: process (t = sigma, as with EDM preconditioning and :func:`sample_edm`) every solver defaults
#: to Karras et al.'s rho = 7 grid instead, the one EDM models are trained and tuned for; see
#: :func:`default_grid`. Solvers not listed fall back to "karras".
DEFAULT_GRID: dict[str, str] = {
    "ddim": "quadratic",
    "euler": "quadratic",
    "heun": "trailing",
    "dpmpp_2m": "quadratic",
    "dpmpp_3m": "quadratic",
    "unipc": "quadratic",
    "ipndm": "quadratic",
    "deis": "log_snr",
}


def default_grid(solver: str, process: Process) -> str:
    """The grid :func:`sample` uses for ``solver`` on ``process`` (see :data:`DEFAULT_GRID`)."""
    if isinstance(process, EDM):
        return "karras"
    return DEFAULT_GRID.get(solver, "karras")


def steps_for_nfe(solver: str, nfe: int, **options: Any) -> int:
    """The largest number of steps whose cost stays within ``nfe`` evaluations."""
    get_solver(solver)
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if solver == "pc":
        per = 1 + int(options.get("corrector_steps", 1))  # corrector(s) then predictor at every grid point
        if nfe < per:
            raise ValueError(f"solver 'pc' with {per - 1} corrector steps needs at least {per} evaluations, got nfe={nfe}")
        return nfe // per
    per = _EVALS_PER_STEP.get(solver, 1)
    if per == 1:
        return nfe
    steps = (nfe + 1) // per
    if steps < 1:
        raise ValueError(f"solver {solver!r} needs at least {per - 1} evaluations, got nfe={nfe}")
    return steps


def sample(
    model,
    space,
    solver: str = DEFAULT_SOLVER,
    nfe: int = 20,
    grid: str | Tensor | None = None,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    **options: Any,
) -> SamplerOutput:
    """Sample from ``model`` on ``space`` with a named ``solver`` in at most ``nfe`` evaluations.

    ``grid`` is a grid name (see :data:`multidiff.schedules.GRIDS`) or an explicit grid tensor;
    by default the solver's default grid on this process (:func:`default_grid`). ``x_T`` defaults to a
    draw from the process prior. For ``solver="rk45"`` the budget is set by ``rtol``/``atol``
    in ``options`` and ``nfe`` is ignored.
    """
    fn = get_solver(solver)
    process: Process = model.process
    if isinstance(grid, Tensor):
        ts = grid
    else:
        name = grid or default_grid(solver, process)
        if solver == "rk45":  # adaptive: one interval [t_max, t_min], then the denoising step
            ts = make_grid("uniform", process, 2)
        else:
            ts = make_grid(name, process, steps_for_nfe(solver, nfe, **options))
    if x_T is None:
        x_T = process.prior_sample(space, generator)
    return fn(model, x_T, ts, space, generator, **options)


class PlainDenoiser:
    """Adapts ``D(x, sigma) -> x0_hat`` (EDM/k-diffusion convention, ``x = x0 + sigma eps``)
    to the sampler protocol on the :class:`~multidiff.process.EDM` process (``t = sigma``)."""

    def __init__(self, denoiser: Callable[[Tensor, Tensor], Tensor], sigma_max: float, sigma_min: float):
        self.denoiser = denoiser
        self.process = EDM(sigma_min=sigma_min, sigma_max=sigma_max)

    def __call__(self, x: Tensor, t: Tensor, space) -> Tensor:
        return self.denoiser(x, t.to(x.dtype))


def sample_edm(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas,
    solver: str = "dpmpp_2m",
    generator: torch.Generator | None = None,
    space=None,
    **options: Any,
) -> SamplerOutput:
    """Run any solver of :data:`multidiff.samplers.SOLVERS` on a plain denoiser.

    Args:
        denoiser: ``D(x, sigma) -> x0_hat`` with ``sigma`` a per-item ``[B]`` tensor in ``x``'s dtype.
        x: the starting state at ``sigmas[0]``, i.e. ``x = x0 + sigmas[0] * noise`` (for sampling
            from scratch: ``sigmas[0] * torch.randn(...)``).
        sigmas: decreasing noise levels ending at 0, e.g. ``multidiff.schedules.karras(EDM(), n)``'s
            sigmas or k-diffusion's ``get_sigmas_karras(n, 0.002, 80)``.
        solver: a solver name; ``options`` go to it (``eta``, ``order``, ``s_churn``, ...).
        space: defaults to a :class:`~multidiff.space.DenseSpace` of ``x``'s shape.

    Returns:
        ``SamplerOutput(x, nfe)``.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if sig.numel() < 2 or float(sig[-1]) != 0.0:
        raise GridError(f"sigmas must hold at least two decreasing noise levels ending at 0, got {sig.tolist()}")
    positive = sig[:-1]
    if bool((positive <= 0).any()):
        raise GridError(f"only the last noise level may be 0, got {sig.tolist()}")
    model = PlainDenoiser(denoiser, float(positive.max()), float(positive.min()))
    ts = from_sigmas(model.process, sig)
    space = DenseSpace.like(x) if space is None else space
    return get_solver(solver)(model, x, ts, space, generator, **options)

