"""The denoising loss against exact answers: weights, oracle targets, posterior slopes, time laws."""
from __future__ import annotations

import math

import pytest
import torch

from multidiff import EDM, VP, Denoiser, DenseSpace, Flow, GraphSpace
from multidiff.prediction import from_x0
from multidiff.space import ShapeError
from multidiff.training import DenoisingLoss, LossHistory

F64 = torch.float64
GAMMA = 5.0
SIGMA_DATA = 0.5

PROCESSES = {"vp-linear": VP.linear, "flow": Flow, "edm": EDM}
KINDS = {
    "vp-linear": ("eps", "x0", "v", "score", "velocity", "edm"),
    "flow": ("eps", "x0", "v", "velocity"),
    "edm": ("eps", "x0", "v", "edm"),
}
WEIGHTINGS = ("simple", "edm", "min_snr", "flow", "mse")


def coefficients(process, t):
    t = torch.as_tensor(t, dtype=F64)
    a, s = process.alpha(t), process.sigma(t)
    da, ds = process.derivatives(t)
    return a, s, da, ds


def sens2(kind, a, s, da, ds):
    """Squared sensitivity of each kind's output to the x0 estimate (written out here)."""
    se = s / a
    return {
        "x0": torch.ones_like(a),
        "eps": a**2 / s**2,
        "v": (a**2 + s**2) ** 2 / s**2,
        "score": a**2 / s**4,
        "velocity": ((da * s - ds * a) / s) ** 2,
        "edm": (se**2 + SIGMA_DATA**2) / (se * SIGMA_DATA) ** 2,
    }[kind]


def x0_weight(weighting, kind, a, s, da, ds):
    """Each weighting as a weight on the x0-MSE, from its paper's definition."""
    snr = a**2 / s**2
    se = s / a
    if weighting == "simple":  # eps-MSE (Ho et al. 2020)
        return snr
    if weighting == "edm":  # lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 (Karras et al. 2022)
        return (se**2 + SIGMA_DATA**2) / (se * SIGMA_DATA) ** 2
    if weighting == "min_snr":  # min(SNR, gamma) on the x0-MSE (Hang et al. 2023)
        return torch.clamp(snr, max=GAMMA)
    if weighting == "flow":  # velocity-MSE
        return ((da * s - ds * a) / s) ** 2
    return sens2(kind, a, s, da, ds)  # mse: the network's own MSE


def true_target(kind, x0, noise, a, s, da, ds):
    """The regression target of each kind by its definition."""
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    if kind == "v":
        return a * noise - s * x0
    if kind == "score":
        return -noise / s
    if kind == "velocity":
        return da * x0 + ds * noise
    se = s / a  # edm: D = c_skip x~ + c_out F = x0, Karras et al. 2022 Table 1
    c_skip = SIGMA_DATA**2 / (se**2 + SIGMA_DATA**2)
    c_out = se * SIGMA_DATA / torch.sqrt(se**2 + SIGMA_DATA**2)
    return (x0 - c_skip * (x0 + se * noise)) / c_out


def exact_net(process, kind, space, scale):
    """A raw network of ``kind`` whose x0 estimate is the exact posterior mean of
    ``x0 ~ N(0, scale^2 I)`` (on the Space's subspace); time input ``t`` (or EDM's c_noise)."""

    def net(x_in, time_in, **kw):
        if kind == "edm":
            se = torch.exp(4 * time_in.to(F64))  # c_noise = ln(sigma) / 4
            e = space.expand
            xs = x_in * e(torch.sqrt(se**2 + SIGMA_DATA**2))  # undo c_in
            x0 = e(scale**2 / (scale**2 + se**2)) * xs
            c_skip = SIGMA_DATA**2 / (se**2 + SIGMA_DATA**2)
            c_out = se * SIGMA_DATA / torch.sqrt(se**2 + SIGMA_DATA**2)
            return (x0 - e(c_skip) * xs) / e(c_out)
        a, s, da, ds = (space.expand(c) for c in coefficients(process, time_in))
        x0 = a * scale**2 / (a**2 * scale**2 + s**2) * x_in
        return from_x0(kind, x0, x_in, a, s, da, ds)

    return net


CASES = [(p, k, w) for p in PROCESSES for k in KINDS[p] for w in WEIGHTINGS]


@pytest.mark.parametrize("pname,kind,weighting", CASES)
def test_weight_equals_formula(pname, kind, weighting):
    """(i) the per-item weight on the network's own MSE is w_x0(t) / a_kind(t)^2."""
    process = PROCESSES[pname]()
    loss = DenoisingLoss(process, kind, weighting, snr_gamma=GAMMA, sigma_data=SIGMA_DATA)
    hi = 0.999 if pname == "flow" else process.t_max
    t = process.t_min + (hi - process.t_min) * torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=F64)
    c = coefficients(process, t)
    expected = x0_weight(weighting, kind, *c) / sens2(kind, *c)
    torch.testing.assert_close(loss.weight(t), expected, rtol=1e-9, atol=0.0)


def test_weight_closed_forms_by_paper():
    """(i) spot values of the best-known combinations, written directly."""
    p = VP.linear()
    t = torch.tensor([0.05, 0.3, 0.7], dtype=F64)
    a, s = p.alpha(t), p.sigma(t)
    snr = a**2 / s**2
    one = torch.ones_like(t)
    torch.testing.assert_close(DenoisingLoss(p, "eps", "simple").weight(t), one)
    torch.testing.assert_close(DenoisingLoss(p, "eps", "min_snr").weight(t), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(DenoisingLoss(p, "v", "min_snr").weight(t), torch.clamp(snr, max=5.0) / (snr + 1))
    torch.testing.assert_close(DenoisingLoss(p, "x0", "min_snr").weight(t), torch.clamp(snr, max=5.0))
    torch.testing.assert_close(DenoisingLoss(p, "edm", "edm").weight(t), one)
    sig = s / a
    torch.testing.assert_close(DenoisingLoss(p, "x0", "edm").weight(t), (sig**2 + 0.25) / (sig * 0.5) ** 2)
    f = Flow()
    tf = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(DenoisingLoss(f, "velocity", "flow").weight(tf), torch.ones_like(tf))
    torch.testing.assert_close(DenoisingLoss(f, "x0", "flow").weight(tf), 1 / tf**2)
    torch.testing.assert_close(DenoisingLoss(f, "velocity", "simple").weight(tf), (1 - tf) ** 2)


@pytest.mark.parametrize("sampling", ["uniform", "lognormal", "log_snr", "importance"])
@pytest.mark.parametrize("pname,kind,weighting", [c for c in CASES if c[2] in ("simple", "min_snr", "mse")]
                         + [("vp-linear", "edm", "edm"), ("flow", "velocity", "flow"), ("edm", "x0", "edm")])
def test_oracle_that_knows_the_noise_has_zero_loss(pname, kind, weighting, sampling):
    """(ii) a network returning the true target of its kind has loss 0; the oracle reproduces
    the loss's own draws of t and noise from the same generator state."""
    process = PROCESSES[pname]()
    loss = DenoisingLoss(process, kind, weighting, sampling, sigma_data=SIGMA_DATA, snr_gamma=GAMMA)
    x0 = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    space = DenseSpace.like(x0)
    t, noise, _ = loss.draw(x0, space, torch.Generator().manual_seed(7))
    c = [space.expand(v) for v in coefficients(process, t)]
    target = true_target(kind, x0, noise, *c)

    def oracle(x_in, time_in, **kw):
        return target

    out = loss(oracle, x0, space, torch.Generator().manual_seed(7))
    assert torch.equal(out.t, t)
    assert float(out.loss) < 1e-16, float(out.loss)
    # and a network off by a constant 0.1 costs exactly w(t) * 0.01 per item
    off = loss(lambda x_in, time_in: target + 0.1, x0, space, torch.Generator().manual_seed(7))
    torch.testing.assert_close(off.per_item, 0.01 * off.weight, rtol=1e-6, atol=0)


@pytest.mark.parametrize("pname,kind,weighting", CASES)
def test_exact_denoiser_loss_equals_posterior_variance(pname, kind, weighting):
    """For x0 ~ N(0, s0^2 I) and the exact E[x0 | x_t] expressed in each kind, the expected
    per-item loss at fixed t is w_x0(t) * s0^2 sigma^2 / (alpha^2 s0^2 + sigma^2) (the
    posterior variance per dimension). 16 dims x 2048 items: MC rel. error ~0.8%, tolerance 4%."""
    process = PROCESSES[pname]()
    scale = 0.8
    g = torch.Generator().manual_seed(3)
    space = DenseSpace((2048, 16), dtype=F64)
    x0 = scale * torch.randn(space.shape, generator=g, dtype=F64)
    loss = DenoisingLoss(process, kind, weighting, sigma_data=SIGMA_DATA, snr_gamma=GAMMA)
    for t_val in (0.1, 0.5) if pname != "edm" else (0.2, 3.0):
        t = torch.full((space.batch_size,), t_val, dtype=F64)
        out = loss(exact_net(process, kind, space, scale), x0, space, g, t=t)
        a, s, da, ds = coefficients(process, t_val)
        expected = x0_weight(weighting, kind, a, s, da, ds) * scale**2 * s**2 / (a**2 * scale**2 + s**2)
        assert abs(float(out.loss) / float(expected) - 1) < 0.04, (t_val, float(out.loss), float(expected))


@pytest.mark.parametrize("pname,kind", [("vp-linear", "eps"), ("vp-linear", "x0"), ("vp-linear", "v"),
                                        ("edm", "eps"), ("flow", "velocity"), ("flow", "eps")])
def test_least_squares_linear_net_is_posterior_slope(pname, kind):
    """(iii) for x0 ~ N(0, s0^2) in 1-D and a scalar linear net F = k x_t, the minimiser of the
    loss at fixed t is the exact posterior slope (eps: sigma / (alpha^2 s0^2 + sigma^2)). The
    loss is quadratic in k, so two autograd gradients give its exact least-squares minimiser.
    200,000 samples; tolerance 5 standard errors of the fitted slope (each under 2% relative)."""
    process = PROCESSES[pname]()
    s0, n = 1.5, 200_000
    x0 = s0 * torch.randn(n, 1, generator=torch.Generator().manual_seed(11), dtype=F64)
    loss = DenoisingLoss(process, kind, "mse")
    for t_val in (0.2, 0.6) if pname != "edm" else (0.5, 4.0):
        t = torch.full((n,), t_val, dtype=F64)

        def loss_and_grad(k0):
            k = torch.tensor(k0, dtype=F64, requires_grad=True)
            out = loss(lambda x, time: k * x, x0, None, torch.Generator().manual_seed(5), t=t)
            (g,) = torch.autograd.grad(out.loss, k)
            return float(out.loss.detach()), float(g)

        (l0, g0), (_, g1) = loss_and_grad(0.0), loss_and_grad(1.0)
        hess = g1 - g0  # = 2 mean(x_t^2)
        k_fit = -g0 / hess
        resid = l0 - g0**2 / (2 * hess)  # mean squared residual at the minimum
        std_err = math.sqrt(resid / (n * hess / 2))
        a, s, da, ds = (float(v) for v in coefficients(process, t_val))
        k_eps = s / (a**2 * s0**2 + s**2)
        k_x0 = a * s0**2 / (a**2 * s0**2 + s**2)
        exact = {"eps": k_eps, "x0": k_x0, "v": a * k_eps - s * k_x0, "velocity": da * k_x0 + ds * k_eps}[kind]
        assert abs(k_fit - exact) < 5 * std_err, (t_val, k_fit, exact, std_err)
        assert std_err < 0.02 * abs(exact)  # the check is sharp: at most 2% per standard error


@pytest.mark.parametrize("process", [EDM(), VP.linear()], ids=["edm", "vp-linear"])
def test_lognormal_sigma(process):
    """(iv) ln(sigma_edm(t)) has mean -1.2 and std 1.2 (400,000 draws: standard errors 0.002
    and 0.0013; tolerance 0.01). t_eps is set below the log-normal's reach on VP."""
    t_eps = None if isinstance(process, EDM) else 1e-5
    loss = DenoisingLoss(process, "eps", "edm", "lognormal", t_eps=t_eps)
    t, _ = loss.sample_t(400_000, torch.Generator().manual_seed(0))
    ln_sigma = torch.log(process.sigma_edm(t))
    assert abs(float(ln_sigma.mean()) + 1.2) < 0.01
    assert abs(float(ln_sigma.std()) - 1.2) < 0.01


def test_uniform_and_log_snr_sampling():
    """uniform t on [t_eps, t_max] and uniform lambda on [lambda(t_max), lambda(t_eps)]: first two
    moments within 5 standard errors (200,000 draws)."""
    p = VP.cosine()
    n = 200_000
    t, iw = DenoisingLoss(p, time_sampling="uniform", t_eps=0.01).sample_t(n, torch.Generator().manual_seed(1))
    assert iw is None and float(t.min()) >= 0.01 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.505) < 5 * 0.99 / math.sqrt(12 * n)
    t, _ = DenoisingLoss(p, time_sampling="log_snr", t_eps=0.01).sample_t(n, torch.Generator().manual_seed(2))
    lam = p.log_snr(t)
    lo, hi = float(p.log_snr(torch.tensor(1.0, dtype=F64))), float(p.log_snr(torch.tensor(0.01, dtype=F64)))
    width = hi - lo
    assert abs(float(lam.mean()) - 0.5 * (lo + hi)) < 5 * width / math.sqrt(12 * n)
    assert abs(float(lam.std()) - width / math.sqrt(12)) < 0.01 * width
    # Flow has lambda = -inf at t = 1: the draws stay finite
    t, _ = DenoisingLoss(Flow(), time_sampling="log_snr").sample_t(1000, torch.Generator().manual_seed(3))
    assert bool(torch.isfinite(Flow().log_snr(t)).all())


def test_importance_sampling_follows_history_and_stays_unbiased():
    """Adaptive importance sampling (Nichol & Dhariwal 2021, sec. 3.3): after the history has
    seen a per-t loss L(t) = 1 + 20 t^2, bins are drawn with p ~ sqrt(E[L^2]) (within 0.002
    of the formula), and E[L(t) * weight] equals the uniform-t mean 1 + 20/3 (tolerance 1%,
    MC standard error ~0.1%) with a lower variance than uniform sampling."""
    hist = LossHistory(0.0, 1.0, bins=20, decay=0.9, warmup=5)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(hist.probabilities(), torch.full((20,), 0.05, dtype=F64))  # uniform before warm-up
    for _ in range(50):
        t, _ = hist.sample(2000, g, "cpu")
        hist.update(t, 1 + 20 * t**2)
    centres = (torch.arange(20, dtype=F64) + 0.5) / 20
    rms = torch.sqrt(torch.stack([((1 + 20 * u**2) ** 2).mean() for u in
                                  [c + (torch.rand(4000, generator=g, dtype=F64) - 0.5) / 20 for c in centres]]))
    expected = 0.999 * rms / rms.sum() + 0.001 / 20
    assert float((hist.probabilities() - expected).abs().max()) < 0.002
    t, w = hist.sample(400_000, g, "cpu")
    est = (1 + 20 * t**2) * w
    assert abs(float(est.mean()) / (1 + 20 / 3) - 1) < 0.01
    u = torch.rand(400_000, generator=g, dtype=F64)
    assert float(est.var()) < 0.5 * float((1 + 20 * u**2).var())
    state = hist.state_dict()
    other = LossHistory(0.0, 1.0, bins=20)
    other.load_state_dict(state)
    assert torch.equal(other.probabilities(), hist.probabilities())


def test_importance_loss_updates_history_and_reweights():
    p = VP.linear()
    loss = DenoisingLoss(p, "eps", "simple", "importance", bins=10, warmup=1)
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731  (eps-MSE of 0 is ||eps||^2 / dof ~ 1)
    for i in range(5):
        probs = loss.history.probabilities()  # the law the next call draws from
        out = loss(net, x0, generator=torch.Generator().manual_seed(i))
    assert int(loss.history.counts.sum()) == 5 * 256
    assert not torch.allclose(probs, torch.full_like(probs, 0.1))  # past warm-up: not uniform any more
    # eps-MSE weight is 1, so each item's weight is exactly its importance weight 1 / (bins p_bin)
    torch.testing.assert_close(out.weight, 1.0 / (10 * probs[loss.history.bin_of(out.t)]))
    torch.testing.assert_close(out.loss, out.per_item.mean())


def test_graph_space_reduction_uses_dof_and_noise_has_zero_com():
    """(v) GraphSpace: the loss's noise has zero centre of mass (1e-6 in float32), and the per-item
    loss divides by n F - 3: with the exact isotropic denoiser every item's mean loss equals the
    posterior variance (items of 2..7 nodes, 5 features; 400 replicas; tolerance 5%). Dividing
    by n F instead would be 30% off for the 2-node item."""
    counts = [2, 3, 5, 7]
    base = GraphSpace.from_counts(counts, 5, com_channels=(0, 1, 2))
    loss = DenoisingLoss(VP.linear(), "eps", "simple")
    x0 = base.noise(torch.Generator().manual_seed(0))
    _, noise, _ = loss.draw(x0, base, torch.Generator().manual_seed(1))
    assert float(base.com(noise).abs().max()) < 1e-6

    reps = 400
    space = GraphSpace.from_counts(counts * reps, 5, com_channels=(0, 1, 2), dtype=F64)
    scale = 1.3
    x0 = scale * space.noise(torch.Generator().manual_seed(2))
    t_val = 0.3
    t = torch.full((space.batch_size,), t_val, dtype=F64)
    out = loss(exact_net(loss.process, "eps", space, scale), x0, space, torch.Generator().manual_seed(3), t=t)
    a, s, _, _ = coefficients(loss.process, t_val)
    expected = float(a**2 / s**2 * scale**2 * s**2 / (a**2 * scale**2 + s**2))
    per_size = out.per_item.reshape(reps, len(counts)).mean(0)
    assert float((per_size / expected - 1).abs().max()) < 0.05, per_size / expected
    # a residual along the centre of mass is not a degree of freedom: it costs nothing
    shift = torch.zeros(1, 5, dtype=F64)
    shift[0, :3] = 0.7
    net = exact_net(loss.process, "eps", space, scale)
    out2 = loss(lambda x, tt, **kw: net(x, tt, **kw) + shift, x0, space, torch.Generator().manual_seed(3), t=t)
    torch.testing.assert_close(out2.per_item, out.per_item)


def test_denoiser_passes_through_and_mismatch_is_refused():
    p = VP.linear()
    x0 = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    net = lambda x, t: 0.5 * x  # noqa: E731
    loss = DenoisingLoss(p, "v", "min_snr")
    a = loss(net, x0, generator=torch.Generator().manual_seed(1))
    b = loss(Denoiser(net, p, "v"), x0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.per_item, b.per_item)
    with pytest.raises(ValueError, match="predicts 'eps'"):
        loss(Denoiser(net, p, "eps"), x0)


def test_bad_loss_arguments():
    p = VP.linear()
    with pytest.raises(ValueError, match="valid: simple, edm, min_snr, flow, mse"):
        DenoisingLoss(p, weighting="snr")
    with pytest.raises(ValueError, match="valid: uniform, lognormal, log_snr, importance"):
        DenoisingLoss(p, time_sampling="beta")
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        DenoisingLoss(p, prediction="noise")
    with pytest.raises(ValueError, match="t_eps"):
        DenoisingLoss(p, t_eps=2.0)
    with pytest.raises(ShapeError):
        DenoisingLoss(p)(lambda x, t: x, torch.zeros(4, 3), DenseSpace((4, 2)))
