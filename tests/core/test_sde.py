"""Reverse-SDE samplers (Euler–Maruyama, predictor–corrector) against the exact ring mixture."""

import pytest
import torch

import multidiff as md
from multidiff.samplers.sde import sample_euler_maruyama, sample_pc
from multidiff.testing import GaussianMixture, IsotropicGaussian

N, STEPS = 4000, 500


@pytest.fixture(scope="module")
def ring():
    return GaussianMixture.ring()  # 8 components, radius 2, std 0.15


def _check_ring(ring, x):
    """Mean within 4.5 standard errors (se = sqrt(var / N) = 0.022); covariance entries within
    0.1 (measured <= 0.035); component weights (nearest mean; the components are 10 std apart)
    within 0.025 (se 0.005, measured <= 0.013); the within-component variance, the mean squared
    distance to the nearest mean per axis, within 0.002 of 0.15^2 = 0.0225 (measured
    0.0223-0.0233): this catches a sampler that lands near the modes but too wide or too sharp."""
    mu, cov = ring.marginal_moments()
    assert bool(torch.isfinite(x).all())
    se = torch.sqrt(torch.diagonal(cov) / len(x))
    assert bool(((x.mean(0) - mu).abs() <= 4.5 * se).all()), (x.mean(0), se)
    assert float((torch.cov(x.T) - cov).abs().max()) <= 0.1
    d = torch.cdist(x, ring.means)
    w = torch.bincount(d.argmin(1), minlength=ring.num_components).to(x.dtype) / len(x)
    assert float((w - ring.weights).abs().max()) <= 0.025, w
    within = float(d.min(1).values.pow(2).mean() / 2)
    assert abs(within - 0.15**2) <= 0.002, within


CASES = [  # (process, grid): every family, and the linear interpolant's singular start at alpha = 0
    (md.VP.linear(), "uniform"),
    (md.VE(), "log_snr"),
    (md.EDM(), "log_snr"),
    (md.Flow(), "uniform"),
]


@pytest.mark.parametrize("proc,grid", CASES, ids=lambda c: str(c))
def test_euler_maruyama_reproduces_the_ring(ring, proc, grid):
    model = ring.denoiser(proc)
    space = md.DenseSpace((N, 2), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_T = proc.prior_sample(space, g)
    out = sample_euler_maruyama(model, x_T, md.make_grid(grid, proc, STEPS), space, g)
    assert out.nfe == model.calls == STEPS
    _check_ring(ring, out.x)


@pytest.mark.parametrize(
    "proc,grid,predictor",
    [(md.VP.linear(), "uniform", "reverse_diffusion"), (md.VE(), "log_snr", "reverse_diffusion"),
     (md.Flow(), "uniform", "euler_maruyama")],
    ids=lambda c: str(c),
)
def test_predictor_corrector_reproduces_the_ring(ring, proc, grid, predictor):
    """One Langevin step (snr 0.16) per grid point; NFE = steps x 2, less the skipped corrector
    at alpha = 0 for the linear interpolant."""
    model = ring.denoiser(proc)
    space = md.DenseSpace((N, 2), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x_T = proc.prior_sample(space, g)
    out = sample_pc(model, x_T, md.make_grid(grid, proc, STEPS), space, g, predictor=predictor)
    starts_at_alpha_zero = float(proc.alpha(torch.tensor(proc.t_max, dtype=torch.float64))) == 0.0
    assert out.nfe == model.calls == 2 * STEPS - (1 if starts_at_alpha_zero else 0)
    _check_ring(ring, out.x)


def test_pc_nfe_counts_every_corrector_evaluation(ring):
    proc = md.VP.linear()
    model = ring.denoiser(proc)
    x = torch.randn(8, 2, dtype=torch.float64)
    out = sample_pc(model, x, md.make_grid("uniform", proc, 7), generator=torch.Generator().manual_seed(0),
                    corrector_steps=3)
    assert out.nfe == model.calls == 7 * (3 + 1)
    out = sample_pc(model, x, md.make_grid("uniform", proc, 7), generator=torch.Generator().manual_seed(0),
                    corrector_steps=0)
    assert out.nfe == 7


@pytest.mark.parametrize("sampler", [sample_euler_maruyama, sample_pc])
def test_same_seed_same_samples(ring, sampler):
    proc = md.VP.cosine()
    ts = md.make_grid("log_snr", proc, 20)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = sampler(ring.denoiser(proc), x, ts, generator=torch.Generator().manual_seed(1)).x
    b = sampler(ring.denoiser(proc), x, ts, generator=torch.Generator().manual_seed(1)).x
    c = sampler(ring.denoiser(proc), x, ts, generator=torch.Generator().manual_seed(2)).x
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler,kw", [(sample_euler_maruyama, {}), (sample_pc, {})])
def test_graph_space_zero_com_and_variance(sampler, kw):
    """IsotropicGaussian (x0 ~ N(0, 1.5^2 P)) on a GraphSpace with zero CoM, float32: centre of
    mass below 1e-6 after every step and at the end; the per-item E||x||^2 = dof 1.5^2 within
    5% over 300 items x 40 dof (se 1.2%; measured within 2%)."""
    proc, c = md.VP.linear(), 1.5
    counts = [3 + (i % 6) for i in range(300)]
    space = md.GraphSpace.from_counts(counts, num_features=5, com_channels=(0, 1, 2))
    model = IsotropicGaussian(proc, scale=c)
    g = torch.Generator().manual_seed(3)
    x_T = proc.prior_sample(space, g)
    worst = []
    out = sampler(model, x_T, md.make_grid("log_snr", proc, 100), space, g,
                  callback=lambda info: worst.append(float(space.com(info["x"]).abs().max())), **kw)
    assert max(worst) < 1e-6 and float(space.com(out.x).abs().max()) < 1e-6
    ratio = float(space.sum(out.x.double() ** 2).sum() / (space.dof().double().sum() * c**2))
    assert abs(ratio - 1.0) < 0.05, ratio


@pytest.mark.parametrize("norms", ["item", "batch"])
def test_corrector_norms_in_high_dimension(norms):
    """Per-item or batch-mean corrector norms in 256 dimensions on N(0, c^2 I), snr 0.05, 200
    steps: E||x||^2 / (D c^2) within 3.5% of 1 (64 x 256 draws, se 0.6%). Measured: batch
    1.014, item 1.024 (the same as Euler–Maruyama's 1.014 at this step count, plus for per-item
    norms the coupling of the step size to the noise draw, eps ~ ||z||^2). At snr 0.16 both
    carry the Langevin step's own variance inflation, ~1/(1 - snr^2): measured 1.032 and 1.048."""
    proc, c = md.VE(), 0.7
    space = md.DenseSpace((64, 256), dtype=torch.float64)
    model = IsotropicGaussian(proc, scale=c)
    g = torch.Generator().manual_seed(4)
    x_T = proc.prior_sample(space, g)
    out = sample_pc(model, x_T, md.make_grid("log_snr", proc, 200), space, g, norms=norms, snr=0.05)
    ratio = float((out.x**2).mean() / c**2)
    assert abs(ratio - 1.0) < 0.035, ratio


def test_bad_options_are_named():
    proc = md.VP.linear()
    model = IsotropicGaussian(proc)
    x = torch.randn(4, 3)
    ts = md.make_grid("uniform", proc, 3)
    with pytest.raises(ValueError, match="valid: reverse_diffusion, euler_maruyama"):
        sample_pc(model, x, ts, predictor="ancestral")
    with pytest.raises(ValueError, match="valid: batch, item"):
        sample_pc(model, x, ts, norms="global")
    with pytest.raises(ValueError, match="corrector_steps"):
        sample_pc(model, x, ts, corrector_steps=-1)
