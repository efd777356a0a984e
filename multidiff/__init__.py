"""multidiff: one modality-agnostic diffusion core, and adapters for images, audio, molecules and point clouds."""
from __future__ import annotations

from . import guidance, prediction, process, samplers, schedules, space
from .denoiser import DataPredictor, Denoiser
from .integrate import dopri5
from .likelihood import LikelihoodResult, log_likelihood
from .process import EDM, VE, VP, DiscreteVP, Flow, Process, SubVP, make_process
from .samplers import SOLVERS, SamplerOutput, get_solver
from .sampling import sample, sample_edm, steps_for_nfe
from .schedules import make_grid
from .space import DenseSpace, GraphSpace

__version__ = "0.1.0"

__all__ = [
    "Process", "VP", "DiscreteVP", "VE", "SubVP", "EDM", "Flow", "make_process",
    "DenseSpace", "GraphSpace", "Denoiser", "DataPredictor",
    "SOLVERS", "get_solver", "SamplerOutput", "make_grid", "sample", "sample_edm", "steps_for_nfe",
    "log_likelihood", "LikelihoodResult", "dopri5",
    "guidance", "prediction", "process", "samplers", "schedules", "space",
]
