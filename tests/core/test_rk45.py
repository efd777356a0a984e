"""Adaptive Dormand–Prince: the integrator on closed-form ODEs, and the RK45 probability-flow
sampler against the closed-form PF-ODE map of a Gaussian target."""
import math

import pytest
import torch

import multidiff as md
from multidiff.integrate import IntegrationError, dopri5
from multidiff.samplers.rk45 import sample_rk45
from multidiff.testing import GaussianMixture, IsotropicGaussian

F64 = torch.float64


def _damped_rotation():
    a = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)  # two states, rows
    return a, y0


@pytest.mark.parametrize("controller", ["pi", "standard"])
@pytest.mark.parametrize("rtol", [1e-6, 1e-9])
def test_dopri5_matches_the_matrix_exponential(controller, rtol):
    """y' = A y with y(3) = exp(3A) y0: relative error within 10 rtol (measured 4-6 rtol: a global
    error over ~100-500 steps against a per-step tolerance); nfev is the exact number of calls."""
    a, y0 = _damped_rotation()
    calls = []

    def fn(t, y):
        calls.append(t)
        return y @ a.T

    y1, nfev = dopri5(fn, y0, 0.0, 3.0, rtol=rtol, atol=rtol, controller=controller)
    exact = y0 @ torch.linalg.matrix_exp(3.0 * a).T
    rel = float((y1 - exact).abs().max() / exact.abs().max())
    assert rel <= 10 * rtol, rel
    assert nfev == len(calls)
    assert (nfev - 2) % 6 == 0  # FSAL: 1 + 1 (starting step) + 6 per step
    assert y1.dtype == F64 and y1.shape == y0.shape


def test_dopri5_tuple_state_backwards_in_time():
    """A tuple state integrated from t=2 down to t=0.5: y' = t y, z' = -z (per-tensor error norm,
    so the small second component is as accurate as the first)."""
    y0 = (torch.ones(3, dtype=F64), 1e-3 * torch.ones(2, dtype=F64))
    (y, z), nfev = dopri5(lambda t, s: (t * s[0], -s[1]), y0, 2.0, 0.5, rtol=1e-8, atol=1e-12)
    assert isinstance(y, torch.Tensor) and isinstance(z, torch.Tensor)
    torch.testing.assert_close(y, torch.full((3,), math.exp((0.25 - 4.0) / 2), dtype=F64), rtol=1e-7, atol=0)
    torch.testing.assert_close(z, torch.full((2,), 1e-3 * math.exp(1.5), dtype=F64), rtol=1e-7, atol=0)
    assert nfev > 0


def test_dopri5_keeps_float32_and_honours_first_step_and_max_steps():
    y0 = torch.ones(4, dtype=torch.float32)
    y1, _ = dopri5(lambda t, y: -y, y0, 0.0, 1.0, rtol=1e-5, atol=1e-6, first_step=1e-3)
    assert y1.dtype == torch.float32
    torch.testing.assert_close(y1, torch.full((4,), math.exp(-1.0)), rtol=1e-4, atol=0)
    with pytest.raises(IntegrationError, match="max_steps=3"):
        dopri5(lambda t, y: -y, y0, 0.0, 100.0, rtol=1e-10, atol=1e-10, max_steps=3)
    with pytest.raises(ValueError, match="controller"):
        dopri5(lambda t, y: -y, y0, 0.0, 1.0, controller="pid")
    y_same, n = dopri5(lambda t, y: -y, y0, 1.0, 1.0)
    assert n == 0 and torch.equal(y_same, y0)


# --------------------------------------------------------------------------------------------
# The PF-ODE sampler on a Gaussian target
# --------------------------------------------------------------------------------------------
M = torch.tensor([0.7, -1.2, 0.3], dtype=F64)
S = torch.tensor([0.5, 1.3, 0.2], dtype=F64)  # per-axis std of x0 ~ N(M, diag(S^2))


def _coeffs(proc, t):
    t = torch.tensor(t, dtype=F64)
    return float(proc.alpha(t)), float(proc.sigma(t))


def _closed_form(proc, x_T):
    """For x0 ~ N(m, diag(s^2)) the PF-ODE keeps u = (x_t - alpha_t m) / sqrt(alpha_t^2 s^2 + sigma_t^2)
    constant per axis (du/dt = 0 by direct substitution of the exact score), so
    x_{t_min} = alpha_min m + sqrt(v_min / v_T) (x_T - alpha_T m); the denoising step then gives
    E[x0 | x_{t_min}] = m + alpha_min s^2 / v_min (x_{t_min} - alpha_min m)."""
    a_T, s_T = _coeffs(proc, proc.t_max)
    a_m, s_m = _coeffs(proc, proc.t_min)
    v_T, v_m = a_T**2 * S**2 + s_T**2, a_m**2 * S**2 + s_m**2
    x_min = a_m * M + torch.sqrt(v_m / v_T) * (x_T - a_T * M)
    return x_min, M + a_m * S**2 / v_m * (x_min - a_m * M)


@pytest.mark.parametrize("proc", [md.VP.linear(), md.EDM(), md.Flow(), md.VE()], ids=str)
def test_rk45_reproduces_the_closed_form_pf_ode_map(proc):
    """float64, rtol = atol = 1e-9: the endpoint at t_min and after the denoising step agree with
    the closed form to 1e-7 (measured 0.5-2.3e-9); NFE is the exact number of model calls."""
    target = GaussianMixture(M[None], torch.diag(S**2)[None])
    model = target.denoiser(proc)
    a_T, s_T = _coeffs(proc, proc.t_max)
    g = torch.Generator().manual_seed(0)
    x_T = math.sqrt(a_T**2 + s_T**2) * torch.randn(16, 3, generator=g, dtype=F64)
    exact_min, exact_0 = _closed_form(proc, x_T)

    out = sample_rk45(model, x_T, [proc.t_max, proc.t_min], rtol=1e-9, atol=1e-9)
    assert float((out.x - exact_min).abs().max()) < 1e-7
    assert out.nfe == model.calls

    model.calls = 0
    full = sample_rk45(model, x_T, [proc.t_max, proc.t_min, 0.0], rtol=1e-9, atol=1e-9)
    assert float((full.x - exact_0).abs().max()) < 1e-7
    assert full.nfe == model.calls == out.nfe + 1


def test_rk45_intermediate_grid_points_change_nothing_but_the_cost():
    proc = md.VP.cosine()
    ring = GaussianMixture.ring()
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    a = sample_rk45(ring.denoiser(proc), x_T, md.make_grid("uniform", proc, 2), rtol=1e-8, atol=1e-8)
    b = sample_rk45(ring.denoiser(proc), x_T, md.make_grid("log_snr", proc, 6), rtol=1e-8, atol=1e-8)
    assert float((a.x - b.x).abs().max()) < 1e-5
    seen = []
    sample_rk45(ring.denoiser(proc), x_T, md.make_grid("log_snr", proc, 6), callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(6))


def test_rk45_on_a_graph_space_keeps_zero_com_and_the_closed_form():
    """IsotropicGaussian (x0 ~ N(0, c^2 P)) on a GraphSpace with zero CoM, float32: the centre
    of mass stays below 1e-6 and the map is x0 = c^2 alpha_min / v_min sqrt(v_min / v_T) x_T."""
    proc, c = md.VP.linear(), 1.5
    space = md.GraphSpace.from_counts([3, 6, 4], num_features=5, com_channels=(0, 1, 2))
    model = IsotropicGaussian(proc, scale=c)
    x_T = proc.prior_sample(space, torch.Generator().manual_seed(2))
    out = sample_rk45(model, x_T, md.make_grid("uniform", proc, 2), space, rtol=1e-6, atol=1e-6)
    assert float(space.com(out.x).abs().max()) < 1e-6
    a_T, s_T = _coeffs(proc, proc.t_max)
    a_m, s_m = _coeffs(proc, proc.t_min)
    v_T, v_m = a_T**2 * c**2 + s_T**2, a_m**2 * c**2 + s_m**2
    exact = (c**2 * a_m / v_m * math.sqrt(v_m / v_T)) * x_T
    torch.testing.assert_close(out.x, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("proc", [md.VP.linear(), md.EDM(), md.Flow(), md.VE(), md.DiscreteVP.from_schedule("linear", 1000)],
                         ids=str)
def test_rk45_in_log_noise_level_reproduces_the_closed_form(proc):
    """variable="log_rho" (u = log(sigma/alpha)); on Flow the interval from alpha = 0 starts in process
    time down to sigma/alpha = RHO_SWITCH. Closed form to 1e-7 at rtol = atol = 1e-9."""
    target = GaussianMixture(M[None], torch.diag(S**2)[None])
    model = target.denoiser(proc)
    a_T, s_T = _coeffs(proc, proc.t_max)
    x_T = math.sqrt(a_T**2 + s_T**2) * torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact_min, exact_0 = _closed_form(proc, x_T)
    out = sample_rk45(model, x_T, [proc.t_max, proc.t_min], rtol=1e-9, atol=1e-9, variable="log_rho")
    assert float((out.x - exact_min).abs().max()) < 1e-7
    full = sample_rk45(model, x_T, [proc.t_max, proc.t_min, 0.0], rtol=1e-9, atol=1e-9, variable="log_rho")
    assert float((full.x - exact_0).abs().max()) < 1e-7
    assert full.nfe == model.calls - out.nfe


def test_rk45_on_the_discrete_table_integrates_in_log_noise_level():
    """DDPM's table is piecewise linear in log-SNR: in process time the solver resolves ~1000 kinks;
    "auto" integrates in u there: within 1e-5 of its own rtol = 1e-10 solve at rtol = 1e-7, with at
    least 5x fewer evaluations than process time, whose endpoint is off by up to ~3e-4 (steps
    that skip kinks); measured on the benchmark's 2-D ring at rtol 1e-8: 9,435 in t, 321 in u."""
    proc = md.DiscreteVP.from_schedule("linear", 1000)
    model = GaussianMixture.ring().denoiser(proc)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    grid = md.make_grid("uniform", proc, 2)
    in_t = sample_rk45(model, x_T, grid, rtol=1e-7, atol=1e-7, variable="t")
    auto = sample_rk45(model, x_T, grid, rtol=1e-7, atol=1e-7)
    ref = sample_rk45(model, x_T, grid, rtol=1e-10, atol=1e-10)
    assert float((auto.x - ref.x).abs().max()) < 1e-5
    assert float((in_t.x - ref.x).abs().max()) < 1e-3
    assert 5 * auto.nfe < in_t.nfe, (auto.nfe, in_t.nfe)  # measured 213 vs 2049
    with pytest.raises(ValueError, match="auto, t, log_rho"):
        sample_rk45(model, x_T, grid, variable="lambda")
