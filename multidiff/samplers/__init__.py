"""Samplers: pure functions ``(model, x_T, ts, space, generator, **options) -> SamplerOutput(x, nfe)``.

See :data:`SOLVERS` for the registry by name and :func:`get_solver` to look one up.
"""
from __future__ import annotations

from typing import Callable

from .common import NonFiniteError, SamplerOutput
from .ddim import sample_ancestral, sample_ddim
from .deis import sample_deis
from .dpm_solver import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m
from .ipndm import sample_ipndm
from .ode import sample_edm_stochastic, sample_euler, sample_heun
from .rk45 import sample_rk45
from .sde import sample_euler_maruyama, sample_pc
from .unipc import sample_unipc

SOLVERS: dict[str, Callable[..., SamplerOutput]] = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "edm_stochastic": sample_edm_stochastic,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "rk45": sample_rk45,
}


def get_solver(name: str) -> Callable[..., SamplerOutput]:
    """The sampler registered under ``name``; an unknown name lists the valid ones."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; valid names: {', '.join(sorted(SOLVERS))}") from None


__all__ = [
    "SOLVERS",
    "get_solver",
    "SamplerOutput",
    "NonFiniteError",
    "sample_ancestral",
    "sample_ddim",
    "sample_euler",
    "sample_heun",
    "sample_edm_stochastic",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_dpmpp_2m_sde",
    "sample_unipc",
    "sample_ipndm",
    "sample_deis",
    "sample_euler_maruyama",
    "sample_pc",
    "sample_rk45",
]
