"""Bad input gives a clear, specific error, never silent garbage."""
from __future__ import annotations

import re

import pytest
import torch

import multidiff
from multidiff import VP, Denoiser, DenseSpace, GraphSpace, make_grid, make_process
from multidiff.prediction import PREDICTIONS, check_prediction
from multidiff.process import PROCESSES
from multidiff.samplers import SOLVERS, NonFiniteError, get_solver
from multidiff.schedules import GRIDS, GridError
from multidiff.space import ShapeError
from multidiff.testing import GaussianMixture, IsotropicGaussian

F64 = torch.float64


def lists_all(message: str, names) -> bool:
    return all(name in message for name in names)


def test_unknown_process_lists_valid_names():
    with pytest.raises(ValueError, match="unknown process 'vp-quadratic'") as err:
        make_process("vp-quadratic")
    assert lists_all(str(err.value), PROCESSES)


def test_unknown_solver_lists_valid_names():
    with pytest.raises(ValueError, match="unknown solver 'dpm_fast'") as err:
        get_solver("dpm_fast")
    assert lists_all(str(err.value), SOLVERS)


def test_unknown_prediction_lists_valid_names():
    with pytest.raises(ValueError, match="unknown prediction 'noise'") as err:
        check_prediction("noise")
    assert lists_all(str(err.value), PREDICTIONS)
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        Denoiser(lambda x, t: x, VP.linear(), prediction="noise")
    with pytest.raises(ValueError, match="unknown time_input 'time'"):
        Denoiser(lambda x, t: x, VP.linear(), time_input="time")


def test_unknown_grid_lists_valid_names():
    with pytest.raises(GridError, match="unknown time grid 'cosine'") as err:
        make_grid("cosine", VP.linear(), 10)
    assert lists_all(str(err.value), GRIDS)
    assert isinstance(err.value, ValueError)


def test_step_time_input_needs_a_discrete_process():
    den = Denoiser(lambda x, t: x, VP.linear(), prediction="eps", time_input="step")
    with pytest.raises(ValueError, match="discrete process"):
        den(torch.zeros(2, 3), torch.full((2,), 0.5, dtype=F64), DenseSpace((2, 3)))


def test_nfe_below_one_is_refused():
    for nfe in (0, -1):
        with pytest.raises(ValueError, match="nfe must be a positive integer"):
            multidiff.steps_for_nfe("ddim", nfe)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_shape_not_matching_the_space(solver):
    model = GaussianMixture.ring().denoiser(VP.linear())
    ts = make_grid("karras", model.process, 4)
    with pytest.raises(ShapeError, match=r"x_T has shape \(8, 3\).*\(8, 2\)"):
        get_solver(solver)(model, torch.zeros(8, 3), ts, DenseSpace((8, 2)))
    graph = GraphSpace.from_counts([3, 4], 3, com_channels=(0, 1, 2))
    with pytest.raises(ShapeError, match=r"\(7, 2\).*\(7, 3\)"):
        get_solver(solver)(IsotropicGaussian(VP.linear()), torch.zeros(7, 2), ts, graph)


class NaNBelow:
    """A model that returns NaN once t falls to ``t_bad`` or below (a broken network)."""

    def __init__(self, process, t_bad):
        self.process, self.t_bad = process, t_bad
        self.inner = IsotropicGaussian(process)

    def __call__(self, x, t, space):
        out = self.inner(x, t, space)
        return torch.where(t[:, None] <= self.t_bad, torch.full_like(out, float("nan")), out)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_nan_from_the_model_names_step_and_sigma(solver):
    """A model returning NaN from the first call: NonFiniteError naming step 0 and its sigma."""
    process = VP.linear()
    ts = make_grid("karras", process, 6)
    model = NaNBelow(process, t_bad=2.0)
    x = process.prior_sample(DenseSpace((4, 2)), torch.Generator().manual_seed(0))
    sigma0 = float(process.sigma_edm(ts[:1]))
    with pytest.raises(NonFiniteError, match=rf"step 0 .*sigma={re.escape(f'{sigma0:.6g}')}"):
        get_solver(solver)(model, x, ts, DenseSpace((4, 2)), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("solver", ["ddim", "euler", "ancestral"])
def test_nan_later_names_that_step(solver):
    process = VP.linear()
    ts = make_grid("karras", process, 8)
    model = NaNBelow(process, t_bad=float(ts[3]))
    x = process.prior_sample(DenseSpace((4, 2)), torch.Generator().manual_seed(0))
    sigma3 = float(process.sigma_edm(ts[3:4]))
    with pytest.raises(NonFiniteError, match=rf"step 3 \(t={float(ts[3]):.6g}, sigma={re.escape(f'{sigma3:.6g}')}\)"):
        get_solver(solver)(model, x, ts, DenseSpace((4, 2)), torch.Generator().manual_seed(1))
    # check_finite=False hands the NaN back to the caller who asked for it
    out = get_solver(solver)(model, x, ts, DenseSpace((4, 2)), torch.Generator().manual_seed(1), check_finite=False)
    assert bool(torch.isnan(out.x).any())


def test_bad_grid_given_to_a_sampler():
    model = GaussianMixture.ring().denoiser(VP.linear())
    x = torch.zeros(4, 2)
    with pytest.raises(GridError, match="decrease strictly"):
        get_solver("ddim")(model, x, torch.tensor([1.0, 0.2, 0.5, 0.0]))
    with pytest.raises(GridError, match="non-finite"):
        get_solver("euler")(model, x, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(GridError, match=r"must lie in \[0, 1.0\]"):
        get_solver("heun")(model, x, torch.tensor([3.0, 0.5, 0.0]))


def test_model_without_a_process_is_refused():
    with pytest.raises(TypeError, match="model.process"):
        get_solver("ddim")(lambda x, t, space: x, torch.zeros(2, 2), make_grid("uniform", VP.linear(), 3))
