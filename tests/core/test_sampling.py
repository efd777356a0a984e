"""The sampling front door: NFE budgets, bring-your-own-denoiser, DiffWave's fast schedule."""
import math

import pytest
import torch

import multidiff as md
from multidiff.process import DiscreteVP, discrete_betas
from multidiff.samplers import SOLVERS
from multidiff.schedules import GridError, from_betas, karras
from multidiff.testing import GaussianMixture


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.ring()


@pytest.mark.parametrize("solver", sorted(set(SOLVERS) - {"rk45"}))
@pytest.mark.parametrize("nfe", [5, 10])
def test_sample_spends_at_most_the_budget(ring, solver, nfe):
    model = ring.denoiser(md.VP.linear())
    space = md.DenseSpace((64, 2), dtype=torch.float64)
    out = md.sample(model, space, solver=solver, nfe=nfe, generator=torch.Generator().manual_seed(0))
    assert out.nfe <= nfe
    assert out.nfe >= nfe - 2  # no budget wasted beyond the solver's step granularity
    assert out.x.shape == (64, 2) and bool(torch.isfinite(out.x).all())


@pytest.mark.parametrize("solver", ["euler", "heun", "ddim"] + [s for s in ("dpmpp_2m", "unipc", "ipndm") if s in SOLVERS])
def test_sample_edm_equals_the_solver_on_the_edm_process(ring, solver):
    """A plain D(x, sigma) through sample_edm gives exactly what the solver gives on the EDM
    process with the same denoiser."""
    proc = md.EDM()
    model = ring.denoiser(proc)
    g = torch.Generator().manual_seed(3)
    x = 80.0 * torch.randn(100, 2, generator=g, dtype=torch.float64)
    ts = karras(proc, 12)
    sigmas = ts  # EDM time is its noise level
    plain = lambda x, sigma: ring.posterior_mean(x, torch.ones_like(sigma), sigma)  # noqa: E731
    a = md.sample_edm(plain, x, sigmas, solver=solver)
    b = SOLVERS[solver](model, x, ts, md.DenseSpace.like(x))
    assert a.nfe == b.nfe
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-12)


def test_sample_edm_rejects_a_grid_that_does_not_end_at_zero(ring):
    x = torch.randn(4, 2)
    with pytest.raises(GridError, match="ending at 0"):
        md.sample_edm(lambda x, s: x, x, [80.0, 10.0, 1.0])
    with pytest.raises(GridError, match="decrease"):
        md.sample_edm(lambda x, s: x, x, [10.0, 80.0, 0.0])


def test_ancestral_on_diffwave_fast_schedule_is_diffwave_fast_sampling(ring):
    """On DiffWave's T=50 training table, the ancestral sampler over ``from_betas``'s grid
    equals DiffWave's fast sampling loop (Kong et al. 2021, Alg. 2 with the 6-step
    inference schedule) transcribed here, noise draw for noise draw."""
    train = DiscreteVP(discrete_betas("linear", 50, beta_start=1e-4, beta_end=0.05))
    fast = torch.tensor([1e-4, 1e-3, 1e-2, 5e-2, 2e-1, 5e-1], dtype=torch.float64)
    model = ring.denoiser(train)
    ts = from_betas(train, fast)
    assert len(ts) == 7

    n = 50
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = md.samplers.sample_ancestral(model, x_T, ts, md.DenseSpace.like(x_T), torch.Generator().manual_seed(1))

    # DiffWave's loop: x <- (x - beta_n / sqrt(1 - abar_n) eps) / sqrt(1 - beta_n) + sigma_n z
    abar = torch.cumprod(1 - fast, 0)
    g = torch.Generator().manual_seed(1)
    x = x_T.clone()
    for i in range(len(fast) - 1, -1, -1):
        t = ts[len(fast) - 1 - i]
        a, s = train.alpha(t), train.sigma(t)
        eps = (x - a * model(x, t.expand(n), None)) / s
        x = (x - fast[i] / torch.sqrt(1 - abar[i]) * eps) / torch.sqrt(1 - fast[i])
        if i > 0:
            sig = torch.sqrt((1 - abar[i - 1]) / (1 - abar[i]) * fast[i])
            x = x + sig * torch.randn(n, 2, generator=g, dtype=torch.float64)
    assert ours.nfe == 6
    torch.testing.assert_close(ours.x, x, rtol=0, atol=1e-9)


def test_same_seed_same_samples(ring):
    model = ring.denoiser(md.VP.cosine())
    space = md.DenseSpace((32, 2))
    a = md.sample(model, space, solver="ancestral", nfe=8, generator=torch.Generator().manual_seed(5)).x
    b = md.sample(model, space, solver="ancestral", nfe=8, generator=torch.Generator().manual_seed(5)).x
    c = md.sample(model, space, solver="ancestral", nfe=8, generator=torch.Generator().manual_seed(6)).x
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32


def test_nfe_budget_errors():
    with pytest.raises(ValueError, match="positive integer"):
        md.steps_for_nfe("ddim", 0)
    with pytest.raises(ValueError, match="valid names"):
        md.steps_for_nfe("no-such-solver", 10)
    assert md.steps_for_nfe("heun", 9) == 5 and md.steps_for_nfe("heun", 10) == 5
    assert math.isclose(md.steps_for_nfe("ddim", 7), 7)
