"""Noise processes against their defining formulas, written out independently here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from multidiff import EDM, VE, VP, DiscreteVP, Flow, SubVP, make_process
from multidiff.process import PROCESSES, discrete_betas
from multidiff.testing import GaussianMixture

F64 = torch.float64
B0, B1 = 0.1, 20.0  # DDPM's 1e-4 -> 0.02 over 1000 steps, in continuous time


def random_t(process, n=1000, seed=0, lo=None):
    g = torch.Generator().manual_seed(seed)
    lo = process.t_min if lo is None else lo
    return lo + (process.t_max - lo) * torch.rand(n, generator=g, dtype=F64)


def vp_linear_alpha(t):
    return torch.exp(-(t**2) * (B1 - B0) / 4 - t * B0 / 2)


def cosine_clip_time(s=0.008, max_beta=0.999, steps=1000):
    """Where the cosine schedule's rate pi/(1+s) tan(pi/2 (t+s)/(1+s)) reaches -steps log(1 - max_beta)."""
    cap = -steps * math.log(1 - max_beta)
    rate = lambda t: math.pi / (1 + s) * math.tan(math.pi / 2 * (t + s) / (1 + s)) - cap  # noqa: E731
    return brentq(rate, 0.0, 1.0 - 1e-12, xtol=1e-15), cap


def cosine_alpha_bar(t, s=0.008):
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731  (Nichol & Dhariwal eq. 17)
    return f(t) / f(torch.zeros_like(t))


def sigmoid_alpha_bar(t, start=-3.0, end=3.0, tau=1.0):
    v = lambda u: 1 / (1 + torch.exp(u / tau))  # noqa: E731  sigmoid(-u / tau)
    return (v(start + t * (end - start)) - v(torch.tensor(end, dtype=F64))) / (
        v(torch.tensor(start, dtype=F64)) - v(torch.tensor(end, dtype=F64))
    )


def reference(name):
    """(process, alpha(t), sigma(t)) from the defining formulas."""
    if name == "vp-linear":
        return VP.linear(), vp_linear_alpha, lambda t: torch.sqrt(1 - vp_linear_alpha(t) ** 2)
    if name == "vp-polynomial":  # EDM-molecules: alpha^2 = (1 - 2p)(1 - t^2)^2 + p, p = 1e-5
        ab = lambda t: (1 - 2e-5) * (1 - t**2) ** 2 + 1e-5  # noqa: E731
        return VP.polynomial(), lambda t: ab(t).sqrt(), lambda t: (1 - ab(t)).sqrt()
    if name == "vp-sigmoid":
        return VP.sigmoid(), lambda t: sigmoid_alpha_bar(t).sqrt(), lambda t: (1 - sigmoid_alpha_bar(t)).sqrt()
    if name == "ve":
        return VE(0.01, 50.0), torch.ones_like, lambda t: 0.01 * (50.0 / 0.01) ** t
    if name == "subvp":
        return SubVP(), vp_linear_alpha, lambda t: 1 - vp_linear_alpha(t) ** 2
    if name == "edm":
        return EDM(), torch.ones_like, lambda t: t
    if name == "flow":
        return Flow(), lambda t: 1 - t, lambda t: t
    raise KeyError(name)


CLOSED = ["vp-linear", "vp-polynomial", "vp-sigmoid", "ve", "subvp", "edm", "flow"]


@pytest.mark.parametrize("name", CLOSED)
def test_alpha_sigma_log_snr_match_definitions(name):
    """alpha, sigma and lambda = log(alpha^2 / sigma^2) at 1,000 random t (float64, rtol 1e-10)."""
    process, alpha, sigma = reference(name)
    t = random_t(process, lo=1e-4 if name != "edm" else 0.002)
    if name == "flow":
        t = t.clamp(max=1 - 1e-9)
    torch.testing.assert_close(process.alpha(t), alpha(t), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(process.sigma(t), sigma(t), rtol=1e-10, atol=1e-14)
    lam = torch.log(alpha(t) ** 2 / sigma(t) ** 2)
    torch.testing.assert_close(process.log_snr(t), lam, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(process.sigma_edm(t), sigma(t) / alpha(t), rtol=1e-9, atol=0)


def test_cosine_matches_nichol_dhariwal_below_clip_and_rate_cap_above():
    process = VP.cosine()
    t_c, cap = cosine_clip_time()
    assert abs(process.t_clip - t_c) < 1e-10
    t = random_t(process, lo=1e-4)
    below = t[t <= t_c]  # t_c = 0.99971: the clip acts only in the last 3e-4 of the time range
    above = t_c + (1 - t_c) * torch.rand(100, generator=torch.Generator().manual_seed(9), dtype=F64)[1:]
    assert below.numel() > 990 and 0.999 < t_c < 1.0
    ab = cosine_alpha_bar(below)
    torch.testing.assert_close(process.alpha(below) ** 2, ab, rtol=1e-10, atol=0)
    torch.testing.assert_close(process.sigma(below) ** 2, 1 - ab, rtol=1e-9, atol=0)
    # past t_c, log alpha_bar falls at the capped rate of DDPM's beta <= 0.999 (1000 steps)
    lab_c = torch.log(cosine_alpha_bar(torch.tensor([t_c], dtype=F64)))
    torch.testing.assert_close(2 * torch.log(process.alpha(above)), lab_c - cap * (above - t_c), rtol=1e-10, atol=1e-10)


def test_discrete_vp_exact_at_steps_and_log_snr_interpolated_between():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    process = DiscreteVP(betas)
    alpha_bar = torch.cumprod(1 - betas, 0)
    n = torch.arange(1, 1001, dtype=F64)
    torch.testing.assert_close(process.alpha(n / 1000) ** 2, alpha_bar, rtol=1e-12, atol=0)
    lam_tab = torch.log(alpha_bar / (1 - alpha_bar))
    t = random_t(process, lo=1e-3)
    expected = np.interp(t.numpy() * 1000, n.numpy(), lam_tab.numpy())  # linear in t between steps
    torch.testing.assert_close(process.log_snr(t), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    assert process.log_snr(torch.tensor(0.0, dtype=F64)) == math.inf  # t = 0 is the clean data


ALL = sorted(PROCESSES)


@pytest.mark.parametrize("name", ALL)
def test_log_snr_round_trip(name):
    """t -> lambda -> t at 1,000 random t, float64, to 1e-8 (relative for EDM's t up to 80)."""
    process = make_process(name)
    t = random_t(process, seed=1)
    if name == "flow":
        t = t.clamp(max=1 - 1e-6)
    back = process.t_from_log_snr(process.log_snr(t))
    torch.testing.assert_close(back, t, rtol=1e-8, atol=1e-8)
    sig = process.sigma_edm(t)
    torch.testing.assert_close(process.t_from_sigma_edm(sig), t, rtol=1e-8, atol=1e-8)


def sde_reference(name, t):
    beta = B0 + t * (B1 - B0)
    if name == "vp-linear":
        return -beta / 2, beta
    if name == "subvp":  # score_sde: g^2 = beta(t) (1 - exp(-2 int_0^t beta))
        integral = B0 * t + (B1 - B0) * t**2 / 2
        return -beta / 2, beta * (1 - torch.exp(-2 * integral))
    if name == "ve":  # g^2 = d sigma^2 / dt
        return torch.zeros_like(t), 2 * math.log(50.0 / 0.01) * (0.01 * (50.0 / 0.01) ** t) ** 2
    if name == "edm":
        return torch.zeros_like(t), 2 * t
    if name == "flow":  # f = d log(1 - t)/dt, g^2 = d t^2/dt - 2 f t^2
        return -1 / (1 - t), 2 * t + 2 * t**2 / (1 - t)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["vp-linear", "subvp", "ve", "edm", "flow"])
def test_sde_drift_and_diffusion(name):
    process = make_process(name)
    t = random_t(process, seed=2).clamp(max=process.t_max * (1 - 1e-6))
    f, g2 = process.sde(t)
    f_ref, g2_ref = sde_reference(name, t)
    torch.testing.assert_close(f, f_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, g2_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "ve", "edm", "flow", "vp-discrete"])
def test_forward_marginal_moments(name):
    """x_t = process.marginal(x0, t, eps) for x0 from a 2-D mixture has mean alpha mu and
    covariance alpha^2 Sigma + sigma^2 I (200,000 samples; tolerance 5 standard errors)."""
    process = make_process(name)
    mix = GaussianMixture.ring(components=4, radius=1.5, std=0.3)
    n = 200_000
    g = torch.Generator().manual_seed(4)
    x0 = mix.sample(n, g)
    mu = (mix.weights[:, None] * mix.means).sum(0)
    cov = (mix.weights[:, None, None] * (mix.covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0) - torch.outer(mu, mu)
    for frac in (0.3, 0.8):
        t_val = frac * process.t_max if name != "edm" else frac * 3.0
        t = torch.full((n,), t_val, dtype=F64)
        xt = process.marginal(x0, t, torch.randn(n, 2, generator=g, dtype=F64), lambda c: c[:, None])
        a, s = float(process.alpha(t[:1])), float(process.sigma(t[:1]))
        m_ref = a * mu
        c_ref = a**2 * cov + s**2 * torch.eye(2, dtype=F64)
        sd = torch.sqrt(torch.diagonal(c_ref))
        assert bool(((xt.mean(0) - m_ref).abs() < 5 * sd / math.sqrt(n)).all())
        emp = torch.cov(xt.T)
        # var of an empirical covariance entry <= 2 c_ii c_jj / n for near-Gaussian data; the mixture is close enough
        tol = 5 * torch.sqrt(3 * torch.outer(sd**2, sd**2) / n)
        assert bool(((emp - c_ref).abs() < tol).all()), (emp, c_ref)


def test_forward_marginal_matches_mixture_log_prob():
    """The 1-D law of x_t (3-component mixture, VP-linear, t = 0.3) against the CDF integrated from
    GaussianMixture.log_prob of the marginal: Kolmogorov-Smirnov distance below 1.63/sqrt(n)
    (the 1% critical value), and the density integrates to 1 within 1e-6."""
    mix = GaussianMixture(torch.tensor([[-2.0], [0.5], [3.0]]), torch.tensor([[[0.2]], [[0.6]], [[0.1]]]), [0.3, 0.5, 0.2])
    process = VP.linear()
    n = 20_000
    g = torch.Generator().manual_seed(5)
    t = torch.full((n,), 0.3, dtype=F64)
    xt = process.marginal(mix.sample(n, g), t, torch.randn(n, 1, generator=g, dtype=F64), lambda c: c[:, None])
    a, s = process.alpha(t[:1]), process.sigma(t[:1])
    grid = torch.linspace(-8, 8, 40_001, dtype=F64)
    dens = torch.exp(mix.log_prob(grid[:, None], a, s))
    cdf = torch.cumulative_trapezoid(dens, grid)
    cdf = torch.cat([cdf.new_zeros(1), cdf])
    assert abs(float(cdf[-1]) - 1) < 1e-6
    xs, _ = torch.sort(xt[:, 0])
    model_cdf = torch.from_numpy(np.interp(xs.numpy(), grid.numpy(), cdf.numpy()))
    emp_hi = torch.arange(1, n + 1, dtype=F64) / n
    ks = float(torch.maximum((emp_hi - model_cdf).abs(), (emp_hi - 1 / n - model_cdf).abs()).max())
    assert ks < 1.63 / math.sqrt(n), ks


def test_discrete_betas_match_diffusers():
    from diffusers import DDPMScheduler

    cos = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double()
    lin = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas.double()
    assert float((discrete_betas("cosine", 1000) - cos).abs().max()) < 1e-6
    assert float((discrete_betas("linear", 1000) - lin).abs().max()) < 1e-6


def edm_polynomial_alphas2(timesteps, power=2.0, s=1e-5):
    """EDM-molecules' polynomial schedule (Hoogeboom et al. 2022), transcribed: alphas2 on
    t = n / T, n = 0..T, with the per-step ratio clipped at 0.001 and the precision s."""
    steps = timesteps + 1
    x = np.linspace(0, steps, steps)
    alphas2 = (1 - np.power(x / steps, power)) ** 2
    alphas2 = np.concatenate([np.ones(1), alphas2])
    ratio = np.clip(alphas2[1:] / alphas2[:-1], 0.001, 1.0)
    alphas2 = np.cumprod(ratio)
    return (1 - 2 * s) * alphas2 + s


@pytest.mark.parametrize("steps", [1000, 500])
def test_polynomial_2_matches_edm_molecules(steps):
    """DiscreteVP's alpha_bar_n = prod (1 - beta) equals EDM's alphas2[n] for n = 1..T, and
    the continuous VP.polynomial agrees with the table where the clip is inactive."""
    ref = torch.from_numpy(edm_polynomial_alphas2(steps))
    betas = discrete_betas("polynomial_2", steps)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), ref[1:], rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(betas, 1 - ref[1:] / torch.cat([torch.ones(1, dtype=F64), ref[1:-1]]), rtol=0, atol=1e-6)
    n = torch.arange(steps + 1, dtype=F64)
    cont = VP.polynomial().alpha(n / steps) ** 2
    unclipped = (1 - 2e-5) * (1 - (n / steps) ** 2) ** 2 + 1e-5
    # t = 0 is the data itself (alpha = 1, sigma = 0) for every process; EDM's floor acts for t > 0
    assert float(cont[0]) == 1.0 and float(VP.polynomial().sigma(torch.zeros((), dtype=F64))) == 0.0
    assert torch.allclose(cont[1:], unclipped[1:], rtol=1e-12)
    free = (ref - unclipped).abs() < 1e-12  # steps where EDM's clip did not act
    free[0] = False
    assert int(free.sum()) > 0.99 * steps
    torch.testing.assert_close(cont[free], ref[free], rtol=1e-10, atol=0)


def test_prior_sample_and_log_prob():
    """prior N(0, sigma(t_max)^2 I): sample variance and the log-density formula."""
    from multidiff import DenseSpace

    for process in (VP.linear(), VE(), EDM()):
        space = DenseSpace((4000, 8), dtype=F64)
        x = process.prior_sample(space, torch.Generator().manual_seed(0))
        var = float(process.sigma(torch.tensor(process.t_max, dtype=F64))) ** 2
        assert abs(float(x.var()) / var - 1) < 0.03  # 32,000 draws: se 0.8%
        lp = process.prior_log_prob(x, space)
        ref = -0.5 * 8 * math.log(2 * math.pi * var) - 0.5 * (x**2).sum(1) / var
        torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", sorted(__import__("multidiff").process.PROCESSES))
def test_time_zero_is_the_data_for_every_process(name):
    """Grids end at t = 0 and samplers denoise into it: every process must have alpha(0) = 1 and
    sigma(0) = 0 exactly there (EDM-molecules' precision floor and VE's sigma_min act for t > 0)."""
    from multidiff.process import make_process

    p = make_process(name)
    zero = torch.zeros((), dtype=F64)
    assert float(p.alpha(zero)) == 1.0 and float(p.sigma(zero)) == 0.0
