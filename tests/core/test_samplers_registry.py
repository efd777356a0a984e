"""Every registered solver, on every process family: it reproduces the analytic target at high
NFE, keeps a GraphSpace's zero centre of mass, and commutes with rotations."""
import math

import pytest
import torch

import multidiff as md
from multidiff.samplers import SOLVERS
from multidiff.space import GraphSpace
from multidiff.testing import GaussianMixture, IsotropicGaussian

STOCHASTIC = {"ancestral", "edm_stochastic", "dpmpp_2m_sde", "euler_maruyama", "pc"}
SOLVER_OPTIONS = {"ddim": {"eta": 0.5}, "rk45": {"rtol": 1e-6, "atol": 1e-6}}
PROCESSES = {
    "vp-linear": md.VP.linear,
    "edm": md.EDM,
    "flow": md.Flow,
}
N = 4000


def _steps(solver: str) -> int:
    if solver in STOCHASTIC and solver != "edm_stochastic":
        return 400  # first-order weak convergence of the SDE schemes
    return 2 if solver == "rk45" else 100


def _component_weights(mix: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    labels = mix.responsibilities(x, 1.0, 0.0).argmax(-1)
    return torch.bincount(labels, minlength=mix.num_components).to(torch.float64) / len(x)


@pytest.fixture(scope="module")
def ring():
    # wider components than the default ring so the target is smooth at the chosen step counts
    return GaussianMixture.ring(components=8, radius=2.0, std=0.3, anisotropy=1.5)


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_reproduces_the_mixture(ring, solver, process):
    proc = PROCESSES[process]()
    model = ring.denoiser(proc)
    g = torch.Generator().manual_seed(0)
    space = md.DenseSpace((N, 2), dtype=torch.float64)
    grid = md.make_grid("karras" if solver != "rk45" else "uniform", proc, _steps(solver))
    x_T = proc.prior_sample(space, g)
    out = SOLVERS[solver](model, x_T, grid, space, g, **SOLVER_OPTIONS.get(solver, {}))
    mean, cov = ring.marginal_moments()
    x = out.x
    # sampling noise of N = 4000 draws: mean std ~ 0.025, weight std ~ 0.005
    assert (x.mean(0) - mean).norm() < 0.1, f"mean off: {x.mean(0)} vs {mean}"
    assert (torch.cov(x.T) - cov).norm() < 0.25, f"covariance off: {torch.cov(x.T)} vs {cov}"
    w = _component_weights(ring, x)
    assert (w - ring.weights).abs().max() < 0.03, f"component weights off: {w}"
    assert out.nfe >= 1


def _graph_space(generator):
    counts = [5, 9, 3, 7]
    return GraphSpace.from_counts(counts, num_features=5, com_channels=range(3), dtype=torch.float64)


class _RotatedNoise(GraphSpace):
    """The same GraphSpace, but every noise draw has its positions rotated by ``R``."""

    def __init__(self, base: GraphSpace, rotation: torch.Tensor):
        super().__init__(base.batch, base.num_features, base.com_channels, base.batch_size, base.dtype)
        self.rotation = rotation

    def noise(self, generator=None):
        return rotate(super().noise(generator), self.rotation)


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, :3] = x[:, :3] @ r.T
    return out


def random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # an element of O(3), reflections included


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_graph_space_zero_com_and_rotation_equivariance(solver):
    proc = md.VP.cosine()
    model = IsotropicGaussian(proc, scale=1.3)
    space = _graph_space(None)
    grid = md.make_grid("karras" if solver != "rk45" else "uniform", proc, 2 if solver == "rk45" else 12)
    opts = SOLVER_OPTIONS.get(solver, {})
    x_T = proc.prior_sample(space, torch.Generator().manual_seed(1))
    plain = SOLVERS[solver](model, x_T, grid, space, torch.Generator().manual_seed(2), **opts).x
    assert space.com(plain).abs().max() < 1e-6
    r = random_rotation(7)
    rot_space = _RotatedNoise(space, r)
    turned = SOLVERS[solver](model, rotate(x_T, r), grid, rot_space, torch.Generator().manual_seed(2), **opts).x
    assert rot_space.com(turned).abs().max() < 1e-6
    torch.testing.assert_close(turned, rotate(plain, r), rtol=0, atol=1e-9)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_float32_in_float32_out_and_seeded(solver):
    proc = md.VP.linear()
    model = GaussianMixture.ring().denoiser(proc)
    space = md.DenseSpace((16, 2), dtype=torch.float32)
    grid = md.make_grid("karras" if solver != "rk45" else "uniform", proc, 2 if solver == "rk45" else 8)
    x_T = proc.prior_sample(space, torch.Generator().manual_seed(0))
    a = SOLVERS[solver](model, x_T, grid, space, torch.Generator().manual_seed(1), **SOLVER_OPTIONS.get(solver, {}))
    b = SOLVERS[solver](model, x_T, grid, space, torch.Generator().manual_seed(1), **SOLVER_OPTIONS.get(solver, {}))
    assert a.x.dtype == torch.float32
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe
    assert math.isfinite(float(a.x.abs().max()))
