"""Multistep probability-flow solvers: DPM-Solver++ 2M / 3M / 2M-SDE, UniPC, iPNDM, DEIS.

Checked against the Gaussian-mixture test bed: the target is reproduced at high NFE, the
deterministic solvers converge to the exact PF-ODE endpoint (adaptive RK45, rtol 1e-10, float64)
at their order, NFE is exact, every process and a zero-CoM GraphSpace work, dtypes and seeds
behave. The coefficient helpers are checked against closed forms.
"""
import math

import numpy as np
import pytest
import torch

import multidiff as md
from multidiff.process import DiscreteVP
from multidiff.samplers.common import SamplerOutput
from multidiff.samplers.ddim import sample_ddim
from multidiff.samplers.deis import sample_deis
from multidiff.samplers.dpm_solver import (
    lagrange_weights,
    phi,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
)
from multidiff.samplers.ipndm import ADAMS_BASHFORTH, sample_ipndm
from multidiff.samplers.ode import sample_heun
from multidiff.samplers.rk45 import sample_rk45
from multidiff.samplers.unipc import sample_unipc
from multidiff.schedules import uniform_t
from multidiff.space import GraphSpace
from multidiff.testing import GaussianMixture, IsotropicGaussian

SOLVERS = {
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "ipndm": sample_ipndm,
    "deis": sample_deis,
}
DETERMINISTIC = sorted(set(SOLVERS) - {"dpmpp_2m_sde"})
PROCESSES = {
    "vp-linear": md.VP.linear,
    "vp-cosine": md.VP.cosine,
    "vp-discrete": lambda: DiscreteVP.from_schedule("linear", 1000),
    "ve": md.VE,
    "edm": md.EDM,
    "flow": md.Flow,
    "subvp": md.SubVP,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the exact denoisers are tiny; thread hand-offs would dominate on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def wide_ring():
    return GaussianMixture.ring(components=8, radius=2.0, std=0.3, anisotropy=1.5)


def _run(name, model, x, ts, space=None, seed=0, **kw):
    return SOLVERS[name](model, x, ts, space, torch.Generator().manual_seed(seed), **kw)


# --------------------------------------------------------------------------------------------
# coefficient helpers
# --------------------------------------------------------------------------------------------
def test_phi_matches_its_integral_definition_and_limits():
    # phi_k(z) = int_0^1 e^{(1-v) z} v^{k-1} / (k-1)! dv, by Gauss-Legendre (exact to ~1e-15 here)
    nodes, weights = np.polynomial.legendre.leggauss(40)
    v = 0.5 * (nodes + 1)
    for k in range(1, 5):
        for z in (-30.0, -3.0, -0.6, -0.5, -0.49, -1e-3, 0.0, 0.3, 2.0):
            ref = 0.5 * float(np.sum(weights * np.exp((1 - v) * z) * v ** (k - 1))) / math.factorial(k - 1)
            assert phi(k, z) == pytest.approx(ref, rel=1e-12, abs=1e-15), (k, z)
        assert phi(k, -math.inf) == 0.0
    with pytest.raises(ValueError, match="k >= 1"):
        phi(0, 1.0)


def test_lagrange_weights_integrate_polynomials_exactly():
    nodes = [0.0, -0.7, -1.9, -3.2]
    moments = [1 / (k + 1) for k in range(4)]  # w(u) = 1 on [0, 1]
    w = lagrange_weights(nodes, moments)
    for deg in range(4):  # exact for every polynomial of degree < len(nodes)
        assert sum(wj * u**deg for wj, u in zip(w, nodes)) == pytest.approx(1 / (deg + 1), abs=1e-13)


@pytest.mark.parametrize("k", sorted(ADAMS_BASHFORTH))
def test_adams_bashforth_table_is_the_equal_step_lagrange_integral(k):
    """iPNDM's fixed coefficients are the exact AB weights on an equally spaced grid."""
    w = lagrange_weights([-float(j) for j in range(k)], [1 / (m + 1) for m in range(k)])
    assert w == pytest.approx(list(ADAMS_BASHFORTH[k]), abs=1e-13)


# --------------------------------------------------------------------------------------------
# 1. the target at high NFE
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_reproduces_the_mixture_at_high_nfe(wide_ring, name):
    n = 4000
    proc = md.VP.linear()
    model = wide_ring.denoiser(proc)
    g = torch.Generator().manual_seed(1)
    space = md.DenseSpace((n, 2), dtype=torch.float64)
    x_T = proc.prior_sample(space, g)
    out = SOLVERS[name](model, x_T, md.make_grid("log_snr", proc, 200), space, g)
    x = out.x
    mean, cov = wide_ring.marginal_moments()
    # sampling noise with 4000 draws: mean ~0.023 per coordinate, covariance entries ~0.05,
    # component weights ~0.005; the tolerances leave room for ~4 standard deviations
    assert (x.mean(0) - mean).norm() < 0.1, f"{name}: mean {x.mean(0)} vs {mean}"
    assert (torch.cov(x.T) - cov).norm() < 0.25, f"{name}: covariance {torch.cov(x.T)} vs {cov}"
    labels = wide_ring.responsibilities(x, 1.0, 0.0).argmax(-1)
    w = torch.bincount(labels, minlength=8).to(torch.float64) / n
    assert (w - wide_ring.weights).abs().max() < 0.025, f"{name}: component weights {w}"
    # every sample lands where the target has mass: log p at least that of a 4-sigma point
    floor = wide_ring.log_prob(wide_ring.means[:1] + torch.tensor([[4 * 0.3 * 1.5, 0.0]], dtype=torch.float64))
    assert float((wide_ring.log_prob(x) < floor).double().mean()) < 0.01


# --------------------------------------------------------------------------------------------
# 2. convergence order against the exact probability-flow endpoint
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ode_problem():
    """A smooth 2-D mixture on VP-linear; x_T from the prior; the exact endpoint at t_min."""
    mix = GaussianMixture.random(dim=2, components=4, seed=1, scale=1.0, spread=1.5)
    proc = md.VP.linear()
    model = mix.denoiser(proc)
    x_T = proc.prior_sample(md.DenseSpace((100, 2), dtype=torch.float64), torch.Generator().manual_seed(0))
    t_ends = torch.tensor([proc.t_max, proc.t_min], dtype=torch.float64)
    ref = sample_rk45(model, x_T, t_ends, rtol=1e-10, atol=1e-10).x

    def grid(steps):
        # log-SNR grid from t_max to t_min without the final denoising step: every solver
        # integrates the same ODE interval and full order applies up to its end
        return md.make_grid("log_snr", proc, steps + 1)[:-1]

    return model, x_T, ref, grid


def _slope(ode_problem, solver, steps):
    model, x_T, ref, grid = ode_problem
    errs = []
    for n in steps:
        out = solver(model, x_T, grid(n))
        assert out.nfe == n
        errs.append(float((out.x - ref).norm(dim=1).median()))
    return -float(np.polyfit(np.log(steps), np.log(errs), 1)[0]), errs


# (solver, options, steps, minimum fitted slope); measured slopes in the comments
ORDER_CASES = {
    "dpmpp_2m": (sample_dpmpp_2m, {}, [10, 20, 40, 80], 1.7),  # 1.86
    "dpmpp_2m_heun": (sample_dpmpp_2m, {"solver_type": "heun"}, [10, 20, 40, 80], 1.7),
    "dpmpp_3m": (sample_dpmpp_3m, {}, [10, 20, 40, 80], 2.7),  # 3.37
    # UniC raises UniP-p to order p + 1
    "unipc_1": (sample_unipc, {"order": 1}, [10, 20, 40, 80], 1.7),  # 1.90
    "unipc_2": (sample_unipc, {"order": 2}, [10, 20, 40, 80], 2.6),  # 2.82
    "unipc_2_bh1": (sample_unipc, {"order": 2, "variant": "bh1"}, [10, 20, 40, 80], 2.6),  # 3.16
    "unipc_3": (sample_unipc, {"order": 3}, [20, 40, 80, 160], 3.5),  # 3.9
    "deis_1": (sample_deis, {"order": 1}, [10, 20, 40, 80], 0.9),  # 0.96
    "deis_2": (sample_deis, {"order": 2}, [10, 20, 40, 80], 1.7),  # 1.89
    "deis_3": (sample_deis, {"order": 3}, [10, 20, 40, 80], 2.7),  # 3.34
    # in rho the asymptotic regime starts later: the top of the grid spans rho in [0.6, 150]
    "deis_3_rho": (sample_deis, {"order": 3, "variable": "rho"}, [80, 160, 320], 2.7),  # 2.88
    # tAB (interpolation in t, weights by quadrature) and the Adams-Moulton corrector (order + 1)
    "deis_4_t": (sample_deis, {"order": 4, "variable": "t"}, [20, 40, 80, 160], 3.3),
    "deis_3_t_corrector": (sample_deis, {"order": 3, "variable": "t", "corrector": True}, [10, 20, 40, 80], 3.5),
    "deis_4_t_corrector": (sample_deis, {"order": 4, "variable": "t", "corrector": True}, [20, 40, 80, 160], 4.2),
    # pseudo linear multistep: fixed equal-step weights give order 2 on a non-uniform grid
    "ipndm_2": (sample_ipndm, {"max_order": 2}, [10, 20, 40, 80], 1.7),
    "ipndm_4": (sample_ipndm, {"max_order": 4}, [10, 20, 40, 80], 1.7),
}


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_converges_to_the_exact_endpoint_at_its_order(ode_problem, case):
    fn, opts, steps, min_slope = ORDER_CASES[case]
    slope, errs = _slope(ode_problem, lambda m, x, ts: fn(m, x, ts, **opts), steps)
    assert slope >= min_slope, f"{case}: fitted slope {slope:.2f} < {min_slope}; errors {errs}"
    max_err = 5e-2 if min_slope < 1.5 else 5e-3  # and the errors are small, not just decreasing
    assert errs[-1] < max_err, f"{case}: error {errs[-1]:.2e} at {steps[-1]} steps"


def test_ipndm_equals_deis_on_a_grid_uniform_in_sigma_over_alpha():
    """On equal steps in ``s = sigma / alpha`` the exact Adams-Bashforth weights (DEIS in rho) and
    iPNDM's fixed ones coincide, step for step."""
    mix = GaussianMixture.random(dim=2, components=4, seed=1, scale=1.0, spread=1.5)
    proc = md.EDM()
    model = mix.denoiser(proc)
    x = 10.0 * torch.randn(50, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = uniform_t(proc, 12, t_max=10.0, t_min=10.0 / 12)  # 12 equal steps, the last one into sigma = 0
    assert torch.allclose(ts[:-1] - ts[1:], torch.full((12,), 10.0 / 12, dtype=torch.float64))
    for k in (1, 2, 3):
        a = sample_ipndm(model, x, ts, max_order=k).x
        b = sample_deis(model, x, ts, order=k, variable="rho").x
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_deis_in_t_equals_deis_in_rho_where_t_is_rho():
    """On the EDM process t = sigma / alpha = rho, so tAB and rhoAB interpolate the same polynomial:
    the quadrature weights of the t form must reproduce the closed-form ones (to 1e-9), with and
    without the corrector."""
    mix = GaussianMixture.random(dim=2, components=4, seed=1, scale=1.0, spread=1.5)
    proc = md.EDM()
    model = mix.denoiser(proc)
    x = 80.0 * torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = md.make_grid("karras", proc, 12)
    for k in (2, 3, 4):
        for corr in (False, True):
            a = sample_deis(model, x, ts, order=k, variable="t", corrector=corr).x
            b = sample_deis(model, x, ts, order=k, variable="rho", corrector=corr).x
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------------------------
# exact relations between solvers
# --------------------------------------------------------------------------------------------
def test_first_order_members_are_ddim(wide_ring):
    proc = md.VP.cosine()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((64, 2), dtype=torch.float64), torch.Generator().manual_seed(3))
    ts = md.make_grid("karras", proc, 9)
    ddim = sample_ddim(model, x, ts).x
    torch.testing.assert_close(sample_deis(model, x, ts, order=1).x, ddim, rtol=0, atol=1e-12)
    torch.testing.assert_close(sample_ipndm(model, x, ts, max_order=1).x, ddim, rtol=0, atol=1e-12)


def test_2m_sde_with_eta_zero_is_2m(wide_ring):
    proc = md.VP.linear()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((64, 2), dtype=torch.float64), torch.Generator().manual_seed(3))
    ts = md.make_grid("karras", proc, 9)
    for st in ("midpoint", "heun"):
        a = sample_dpmpp_2m(model, x, ts, solver_type=st).x
        b = sample_dpmpp_2m_sde(model, x, ts, None, torch.Generator().manual_seed(0), eta=0.0, solver_type=st).x
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - {"ipndm"}))
def test_final_step_into_sigma_zero_is_the_denoiser(wide_ring, name):
    """The step into ``sigma = 0`` (``lambda = +inf``) returns ``alpha_0 D`` of the last evaluation,
    whatever the order. (iPNDM, and DEIS in ``rho``, go on at full order in ``sigma / alpha``,
    which stays finite there.)"""
    proc = md.VP.linear()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((32, 2), dtype=torch.float64), torch.Generator().manual_seed(4))
    seen = []
    out = _run(name, model, x, md.make_grid("log_snr", proc, 7), callback=seen.append)
    assert [s["i"] for s in seen] == list(range(7)) and seen[-1]["t"] == 0.0
    torch.testing.assert_close(out.x, seen[-1]["x0"], rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_lower_order_final_acts_below_15_steps_only(wide_ring, name):
    proc = md.VP.linear()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((32, 2), dtype=torch.float64), torch.Generator().manual_seed(4))
    for steps, same in ((8, False), (15, True)):
        ts = md.make_grid("log_snr", proc, steps)
        a = _run(name, model, x, ts, lower_order_final=True).x
        b = _run(name, model, x, ts, lower_order_final=False).x
        assert torch.equal(a, b) == same, (steps, float((a - b).abs().max()))


# --------------------------------------------------------------------------------------------
# 3. exact NFE
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("process", ["vp-linear", "flow"])
def test_nfe_is_the_number_of_steps(wide_ring, name, steps, process):
    proc = PROCESSES[process]()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((8, 2), dtype=torch.float64), torch.Generator().manual_seed(5))
    out = _run(name, model, x, md.make_grid("karras", proc, steps))
    assert out.nfe == steps == model.calls
    assert bool(torch.isfinite(out.x).all())


# --------------------------------------------------------------------------------------------
# 4. every process, and a zero-CoM GraphSpace
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heun_endpoints(wide_ring):
    """Per process: x_T and a fine-grid Heun endpoint (800 steps on the log-SNR grid) from it."""
    out = {}
    for pname, make in PROCESSES.items():
        proc = make()
        model = wide_ring.denoiser(proc)
        x = proc.prior_sample(md.DenseSpace((64, 2), dtype=torch.float64), torch.Generator().manual_seed(6))
        out[pname] = (proc, x, sample_heun(model, x, md.make_grid("log_snr", proc, 800)).x)
    return out


@pytest.mark.parametrize("process", sorted(PROCESSES))
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_process(wide_ring, heun_endpoints, process, name):
    """Finite everywhere (Flow's grid starts at alpha = 0, lambda = -inf) and, at 40 log-SNR steps,
    within 0.05 (median per sample) of the fine-grid endpoint; measured <= 0.02 on every process."""
    proc, x, ref = heun_endpoints[process]
    model = wide_ring.denoiser(proc)
    for grid in ("log_snr", "karras"):
        out = _run(name, model, x, md.make_grid(grid, proc, 40))
        assert bool(torch.isfinite(out.x).all()), f"{name} on {process} ({grid}) is not finite"
        if grid == "log_snr":
            err = float((out.x - ref).norm(dim=1).median())
            assert err < 0.05, f"{name} on {process}: median error {err:.3g}"


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_sde_variant_on_every_process(wide_ring, process):
    proc = PROCESSES[process]()
    model = wide_ring.denoiser(proc)
    g = torch.Generator().manual_seed(7)
    x = proc.prior_sample(md.DenseSpace((2000, 2), dtype=torch.float64), g)
    out = sample_dpmpp_2m_sde(model, x, md.make_grid("log_snr", proc, 60), None, g)
    assert bool(torch.isfinite(out.x).all()) and out.nfe == 60
    mean, cov = wide_ring.marginal_moments()
    # 2000 draws: mean noise ~0.03 per coordinate, covariance entries ~0.07
    assert (out.x.mean(0) - mean).norm() < 0.15
    assert (torch.cov(out.x.T) - cov).norm() < 0.4


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("process", ["vp-linear", "edm", "flow"])
def test_graph_space_keeps_zero_centre_of_mass(name, process):
    proc = PROCESSES[process]()
    space = GraphSpace.from_counts([3, 5, 4], num_features=5, com_channels=range(3), dtype=torch.float64)
    model = IsotropicGaussian(proc, scale=0.7)
    g = torch.Generator().manual_seed(8)
    x = proc.prior_sample(space, g)
    coms = []
    out = SOLVERS[name](model, x, md.make_grid("karras", proc, 10), space, g,
                        callback=lambda info: coms.append(space.com(info["x"]).abs().max()))
    assert bool(torch.isfinite(out.x).all())
    assert float(torch.stack(coms).max()) < 1e-6
    assert float(space.com(out.x).abs().max()) < 1e-6


# --------------------------------------------------------------------------------------------
# 5. dtypes and seeds
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_float32_in_float32_out(wide_ring, name):
    proc = md.VP.linear()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((256, 2), dtype=torch.float32), torch.Generator().manual_seed(9))
    out = _run(name, model, x, md.make_grid("karras", proc, 20))
    assert out.x.dtype == torch.float32 and bool(torch.isfinite(out.x).all())
    if name != "dpmpp_2m_sde":  # float32 arithmetic stays within float32 rounding of float64
        ref = _run(name, model, x.double(), md.make_grid("karras", proc, 20)).x
        assert float((out.x.double() - ref).abs().max()) < 1e-3


def test_sde_variant_same_seed_same_samples(wide_ring):
    proc = md.VP.linear()
    model = wide_ring.denoiser(proc)
    x = proc.prior_sample(md.DenseSpace((32, 2)), torch.Generator().manual_seed(10))
    ts = md.make_grid("karras", proc, 10)
    a = sample_dpmpp_2m_sde(model, x, ts, None, torch.Generator().manual_seed(11)).x
    b = sample_dpmpp_2m_sde(model, x, ts, None, torch.Generator().manual_seed(11)).x
    c = sample_dpmpp_2m_sde(model, x, ts, None, torch.Generator().manual_seed(12)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# bad options
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn, kwargs, match",
    [
        (sample_unipc, {"order": 4}, "1, 2 or 3"),
        (sample_unipc, {"variant": "bh3"}, "bh1, bh2"),
        (sample_deis, {"order": 0}, r"\[1, 2, 3, 4\]"),
        (sample_deis, {"variable": "x"}, "rho, log_rho, t"),
        (sample_ipndm, {"max_order": 5}, r"\[1, 2, 3, 4\]"),
        (sample_dpmpp_2m, {"solver_type": "rk"}, "midpoint, heun"),
        (sample_dpmpp_2m_sde, {"eta": -1.0}, "eta must be >= 0"),
    ],
)
def test_bad_options_name_the_valid_ones(wide_ring, fn, kwargs, match):
    proc = md.VP.linear()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=match):
        fn(wide_ring.denoiser(proc), x, md.make_grid("karras", proc, 3), **kwargs)


def test_returns_sampler_output(wide_ring):
    proc = md.EDM()
    out = sample_unipc(wide_ring.denoiser(proc), torch.zeros(4, 2), md.make_grid("karras", proc, 3))
    assert isinstance(out, SamplerOutput)
