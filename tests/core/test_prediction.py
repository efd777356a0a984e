"""Prediction kinds: every conversion against the definitions, and EDM's Table 1."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from multidiff import VP, Denoiser, DenseSpace, Flow
from multidiff.prediction import PREDICTIONS, EDMPreconditioning, check_prediction, convert, from_x0, to_x0

F64 = torch.float64
KINDS = ("x0", "eps", "v", "score", "velocity")


def state(seed=0, n=256):
    """Random (x0, eps, alpha, sigma, alpha', sigma') and every kind's value by its definition."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 5, generator=g, dtype=F64)
    eps = torch.randn(n, 5, generator=g, dtype=F64)
    a = 0.05 + torch.rand(n, 1, generator=g, dtype=F64)
    s = 0.05 + 2 * torch.rand(n, 1, generator=g, dtype=F64)
    da = -3 * torch.rand(n, 1, generator=g, dtype=F64)  # alpha decreases, sigma increases in t
    ds = 0.1 + 3 * torch.rand(n, 1, generator=g, dtype=F64)
    x = a * x0 + s * eps
    values = {
        "x0": x0,
        "edm": x0,
        "eps": eps,
        "v": a * eps - s * x0,  # Salimans & Ho 2022
        "score": -eps / s,  # grad log N(x; a x0, s^2 I)
        "velocity": da * x0 + ds * eps,  # dx/dt along the path with fixed (x0, eps)
    }
    return x, a, s, da, ds, values


@pytest.mark.parametrize("src,dst", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_convert_every_pair_matches_definitions(src, dst):
    x, a, s, da, ds, val = state()
    out = convert(val[src], src, dst, x, a, s, da, ds)
    torch.testing.assert_close(out, val[dst], rtol=1e-9, atol=1e-9)
    back = convert(out, dst, src, x, a, s, da, ds)
    torch.testing.assert_close(back, val[src], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_to_x0_inverts_from_x0(kind):
    x, a, s, da, ds, val = state(seed=1)
    x0_hat = val["x0"] + 0.3  # any estimate, not only the truth
    pred = from_x0(kind, x0_hat, x, a, s, da, ds)
    torch.testing.assert_close(to_x0(kind, pred, x, a, s, da, ds), x0_hat, rtol=1e-10, atol=1e-10)


def test_velocity_of_the_linear_interpolant_is_eps_minus_x0():
    x, _, _, _, _, val = state(seed=2)
    t = torch.rand(256, 1, generator=torch.Generator().manual_seed(3), dtype=F64) * 0.98 + 0.01
    x = (1 - t) * val["x0"] + t * val["eps"]
    out = from_x0("velocity", val["x0"], x, 1 - t, t, -torch.ones_like(t), torch.ones_like(t))
    torch.testing.assert_close(out, val["eps"] - val["x0"])


def test_velocity_needs_derivatives():
    x, a, s, _, _, val = state()
    with pytest.raises(ValueError, match="dalpha and dsigma"):
        to_x0("velocity", val["velocity"], x, a, s)


def test_edm_preconditioning_is_table_1():
    """Karras et al. 2022, Table 1 ("Ours"): c_skip = s_d^2 / (s^2 + s_d^2),
    c_out = s s_d / sqrt(s^2 + s_d^2), c_in = 1 / sqrt(s^2 + s_d^2), c_noise = ln(s) / 4,
    lambda = (s^2 + s_d^2) / (s s_d)^2."""
    for sd in (0.5, 1.0, 0.25):
        pre = EDMPreconditioning(sd)
        s = torch.logspace(-3, math.log10(80), 50, dtype=F64)
        torch.testing.assert_close(pre.c_skip(s), sd**2 / (s**2 + sd**2), rtol=1e-14, atol=0)
        torch.testing.assert_close(pre.c_out(s), s * sd / (s**2 + sd**2).sqrt(), rtol=1e-14, atol=0)
        torch.testing.assert_close(pre.c_in(s), 1 / (s**2 + sd**2).sqrt(), rtol=1e-14, atol=0)
        torch.testing.assert_close(pre.c_noise(s), torch.log(s) / 4, rtol=1e-14, atol=0)
        torch.testing.assert_close(pre.loss_weight(s), (s**2 + sd**2) / (s * sd) ** 2, rtol=1e-14, atol=0)
        torch.testing.assert_close(pre.loss_weight(s), 1 / pre.c_out(s) ** 2, rtol=1e-12, atol=0)


def test_edm_preconditioning_unit_variance_design():
    """The design goal of Table 1: for data of std s_d, the network input c_in x~ and the effective
    target (x0 - c_skip x~) / c_out both have unit variance (100,000 draws, tolerance 2%)."""
    sd = 0.5
    pre = EDMPreconditioning(sd)
    g = torch.Generator().manual_seed(0)
    x0 = sd * torch.randn(100_000, generator=g, dtype=F64)
    n = torch.randn(100_000, generator=g, dtype=F64)
    for s in (0.01, 0.5, 10.0):
        s_t = torch.tensor(s, dtype=F64)
        xs = x0 + s * n
        assert abs(float((pre.c_in(s_t) * xs).var()) - 1) < 0.02
        assert abs(float(((x0 - pre.c_skip(s_t) * xs) / pre.c_out(s_t)).var()) - 1) < 0.02


@pytest.mark.parametrize("kind", ["eps", "x0", "v", "score", "velocity", "edm"])
@pytest.mark.parametrize("process", [VP.linear(), Flow()], ids=["vp-linear", "flow"])
def test_denoiser_recovers_x0_from_a_perfect_network(kind, process):
    """A network that outputs the exact value of its kind makes Denoiser return x0 (float64)."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(64, 3, generator=g, dtype=F64)
    eps = torch.randn(64, 3, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(64, generator=g, dtype=F64)
    space = DenseSpace.like(x0)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    da, ds = (c[:, None] for c in process.derivatives(t))
    x = a * x0 + s * eps
    pre = EDMPreconditioning(0.5)

    def net(x_in, time_in):
        if kind == "edm":
            sig = (s / a)
            assert torch.allclose(time_in[:, None], torch.log(sig) / 4)  # c_noise
            assert torch.allclose(x_in, pre.c_in(sig) * x / a)  # c_in x~
            return (x0 - pre.c_skip(sig) * x / a) / pre.c_out(sig)
        assert torch.equal(time_in, t)
        return from_x0(kind, x0, x, a, s, da, ds)

    torch.testing.assert_close(Denoiser(net, process, kind)(x, t, space), x0, rtol=1e-9, atol=1e-9)


def test_check_prediction():
    for kind in PREDICTIONS:
        assert check_prediction(kind) == kind
    with pytest.raises(ValueError, match="x0, eps, v, score, velocity, edm"):
        check_prediction("noise")
