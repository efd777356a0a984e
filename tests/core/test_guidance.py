"""Guidance checked against exact answers from the Gaussian-mixture test bed.

* CFG: ``w = 0`` is the conditional sampler bit for bit (DenseSpace and GraphSpace); ``w > 0``
  sharpens the class; the interval variant is the plain conditional model outside its interval;
  one batched inner call per NFE.
* Classifier guidance with the exact Bayes classifier turns the exact unconditional denoiser into
  the exact conditional one (Tweedie + Bayes), to float64 round-off.
* Inpainting keeps the known entries exactly; on a correlated 4-D Gaussian the free entries move
  toward the exact conditional ``N(mu_u + S_uk S_kk^-1 (y - mu_k), S_uu - S_uk S_kk^-1 S_ku)``, and
  RePaint is much closer than replacement on the same grid.
* DPS on a linear measurement reduces the measurement residual.
"""
from __future__ import annotations

import pytest
import torch

from multidiff import VP, Flow, GraphSpace, make_grid
from multidiff.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    Inpaint,
    InpaintDenoiser,
    ReconstructionGuidance,
    repaint_schedule,
    sample_repaint,
)
from multidiff.samplers import sample_ancestral, sample_ddim, sample_edm_stochastic, sample_euler, sample_heun
from multidiff.space import ShapeError
from multidiff.testing import GaussianMixture, IsotropicGaussian

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Conditioned:
    """The plain conditional model: the reference CFG with w = 0 must reproduce."""

    def __init__(self, model, **cond):
        self.model, self.cond, self.process = model, cond, model.process

    def __call__(self, x, t, space):
        return self.model(x, t, space, **self.cond)


class CallLog:
    """Records the batch size of every inner call."""

    def __init__(self, model):
        self.model, self.process, self.sizes = model, model.process, []

    def __call__(self, x, t, space, **cond):
        self.sizes.append(x.shape[0])
        return self.model(x, t, space, **cond)


class LabelledGraphGaussian:
    """A graph target with a per-item label: centred positions (channels 0-2) ~ N(0, I) and
    features (channels 3-4) ~ N(m, I) with m = 1.5 * label (0 for label -1). Exact denoiser;
    it reads ``space.batch`` to spread the item labels to nodes, so a wrong batch vector breaks it."""

    def __init__(self, process):
        self.process = process

    def __call__(self, x, t, space, label=None):
        a = space.expand(self.process.alpha(t.to(F64))).to(x.dtype)
        s = space.expand(self.process.sigma(t.to(F64))).to(x.dtype)
        gain = a / (a**2 + s**2)
        m = torch.zeros_like(x)
        if label is not None:
            m[:, 3:] = (1.5 * label.clamp(min=0).to(x.dtype))[space.batch].unsqueeze(-1)
        return m + gain * (x - a * m)


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [sample_ddim, sample_heun])
def test_cfg_zero_scale_is_the_conditional_sampler_dense(sampler):
    p = VP.linear()
    den = GaussianMixture.ring().denoiser(p)
    b = 64
    x_t = torch.randn(b, 2, generator=gen(1), dtype=F64)
    label = torch.arange(b) % 8
    ts = make_grid("log_snr", p, 12)
    cfg = ClassifierFreeGuidance(den, {"label": label}, {"label": torch.full((b,), -1)}, scale=0.0)
    ref = sampler(Conditioned(den, label=label), x_t, ts)
    out = sampler(cfg, x_t, ts)
    assert torch.equal(out.x, ref.x)
    assert out.nfe == ref.nfe


def test_cfg_zero_scale_is_the_conditional_sampler_graph():
    p = VP.cosine()
    model = LabelledGraphGaussian(p)
    space = GraphSpace.from_counts([3, 5, 4], num_features=5, com_channels=range(3))
    x_t = space.noise(gen(2))
    label = torch.tensor([0, 2, 1])
    ts = make_grid("log_snr", p, 10)
    log = CallLog(model)
    cfg = ClassifierFreeGuidance(log, {"label": label}, {"label": torch.full((3,), -1)}, scale=0.0)
    ref = sample_ddim(Conditioned(model, label=label), x_t, ts, space)
    out = sample_ddim(cfg, x_t, ts, space)
    assert torch.equal(out.x, ref.x)
    assert log.sizes == [2 * space.shape[0]] * out.nfe  # one doubled call per NFE
    # w > 0 on a graph: the combination of centred predictions stays centred
    cfg2 = ClassifierFreeGuidance(model, {"label": label}, {"label": torch.full((3,), -1)}, scale=2.0)
    x = sample_heun(cfg2, x_t, ts, space).x
    assert space.com(x).abs().max() < 1e-6
    # the denoiser is affine in m, so CFG is the exact denoiser of N((1 + w) m_c - w m_u, I) on the
    # features: item means of the guided samples sit at 3 * 1.5 * label (std <= 0.41 here)
    feat = space.mean(x)[:, 3:].mean(1)
    assert torch.allclose(feat, 3.0 * 1.5 * label.to(feat.dtype), atol=1.5), feat


def test_cfg_one_batched_call_per_evaluation():
    p = VP.linear()
    log = CallLog(GaussianMixture.ring().denoiser(p))
    b = 32
    cfg = ClassifierFreeGuidance(log, {"label": torch.zeros(b, dtype=torch.long)}, {"label": torch.full((b,), -1)}, 1.5)
    x_t = torch.randn(b, 2, generator=gen(3), dtype=F64)
    out = sample_heun(cfg, x_t, make_grid("karras", p, 8))
    assert out.nfe == 15 and log.model.calls == out.nfe
    assert log.sizes == [2 * b] * out.nfe


def test_cfg_positive_scale_sharpens_the_class():
    # two overlapping classes: conditional samples are often ambiguous, guided ones much less
    means = torch.tensor([[-0.6, 0.0], [0.6, 0.0]], dtype=F64)
    covs = 0.5 * torch.eye(2, dtype=F64).expand(2, 2, 2)
    gm = GaussianMixture(means, covs)
    p = VP.linear()
    den = gm.denoiser(p)
    b = 2000
    x_t = torch.randn(b, 2, generator=gen(4), dtype=F64)
    label = torch.ones(b, dtype=torch.long)
    ts = make_grid("log_snr", p, 25)
    prob = {}
    for w in (0.0, 1.0, 3.0):
        cfg = ClassifierFreeGuidance(den, {"label": label}, {"label": torch.full((b,), -1)}, w)
        x = sample_ddim(cfg, x_t, ts).x
        prob[w] = gm.responsibilities(x, 1.0, 0.0)[:, 1].mean().item()
    # measured: mean p(y | x0) = 0.73 (w=0), 0.88 (w=1), 0.97 (w=3)
    assert prob[0.0] < 0.82
    assert prob[1.0] > prob[0.0] + 0.08
    assert prob[3.0] > prob[1.0] + 0.03


def test_cfg_interval_is_conditional_outside_and_guided_inside():
    p = VP.linear()
    log = CallLog(GaussianMixture.ring().denoiser(p))
    b = 16
    label = torch.arange(b) % 8
    cond, uncond = {"label": label}, {"label": torch.full((b,), -1)}
    full = ClassifierFreeGuidance(log, cond, uncond, 2.0)
    lim = ClassifierFreeGuidance(log, cond, uncond, 2.0, interval=(0.3, 2.0))
    x = 2 * torch.randn(b, 2, generator=gen(5), dtype=F64)
    t_in = p.t_from_sigma_edm(torch.tensor(1.0, dtype=F64))
    t_out = p.t_from_sigma_edm(torch.tensor(5.0, dtype=F64))
    # outside: the conditional model, from one call on the original batch only
    log.sizes.clear()
    out = lim(x, t_out.expand(b), None)
    assert torch.equal(out, log.model(x, t_out.expand(b), None, label=label))
    assert log.sizes == [b]
    # inside: full guidance
    assert torch.equal(lim(x, t_in.expand(b), None), full(x, t_in.expand(b), None))
    # items at different noise levels: each gets its own rule
    t_mix = torch.where(torch.arange(b) % 2 == 0, t_in, t_out)
    mixed = lim(x, t_mix, None)
    assert torch.equal(mixed[0::2], full(x, t_mix, None)[0::2])
    assert torch.equal(mixed[1::2], log.model(x, t_mix, None, label=label)[1::2])
    assert not torch.allclose(mixed[0::2], log.model(x, t_mix, None, label=label)[0::2])
    # in a sampler: an interval holding no grid point is the conditional sampler exactly
    ts = make_grid("log_snr", p, 10)
    x_t = torch.randn(b, 2, generator=gen(6), dtype=F64)
    nowhere = ClassifierFreeGuidance(log, cond, uncond, 2.0, interval=(1e3, 1e4))
    sig = p.sigma_edm(ts[:-1])
    assert not bool(((sig >= 1e3) & (sig <= 1e4)).any())
    assert torch.equal(sample_ddim(nowhere, x_t, ts).x, sample_ddim(Conditioned(log.model, label=label), x_t, ts).x)


def test_cfg_rejects_mismatched_conditions():
    den = GaussianMixture.ring().denoiser(VP.linear())
    with pytest.raises(ValueError, match="same keyword"):
        ClassifierFreeGuidance(den, {"label": torch.zeros(2)}, {}, 1.0)
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(den, {}, {}, 1.0, interval=(2.0, 1.0))


# --------------------------------------------------------------------------------------------
# Classifier guidance
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", [VP.linear(), Flow()], ids=["vp", "flow"])
def test_classifier_guidance_with_bayes_classifier_is_the_conditional_denoiser(process):
    gm = GaussianMixture.random(dim=3, components=4, seed=7)
    den = gm.denoiser(process)
    b = 200
    label = torch.arange(b) % 4
    guided = ClassifierGuidance(den, lambda x, t: den.log_class_prob(x, t, label), scale=1.0)
    g = gen(8)
    worst = 0.0
    for t in (0.02, 0.2, 0.5, 0.8, 0.97):
        tb = torch.full((b,), t, dtype=F64)
        a, s = process.alpha(tb[:1]), process.sigma(tb[:1])
        x = a * gm.sample(b, g) + s * torch.randn(b, 3, generator=g, dtype=F64)
        err = (guided(x, tb, None) - den(x, tb, None, label=label)).abs().max().item()
        worst = max(worst, err)
    assert worst < 1e-8, worst  # measured 2.8e-13 (VP), 8e-14 (flow)


def test_classifier_guided_sampling_reproduces_the_component():
    gm = GaussianMixture.ring()
    p = VP.linear()
    den = gm.denoiser(p)
    b = 2000
    label = torch.full((b,), 2)
    guided = ClassifierGuidance(den, lambda x, t: den.log_class_prob(x, t, label), scale=1.0)
    x_t = torch.randn(b, 2, generator=gen(9), dtype=F64)
    ts = make_grid("log_snr", p, 30)
    x = sample_heun(guided, x_t, ts).x
    ref = sample_heun(Conditioned(den, label=label), x_t, ts).x
    assert (x - ref).abs().max() < 1e-8  # measured 1.3e-15
    assert (x.mean(0) - gm.means[2]).norm() < 0.02  # measured 0.0047; std 0.15 per axis, standard error 0.0034


def test_classifier_guidance_keeps_zero_com_on_graphs():
    p = VP.linear()
    space = GraphSpace.from_counts([4, 6, 5], num_features=4, com_channels=range(3), dtype=F64)
    target = torch.tensor([2.0, -1.0, 0.5, 1.0], dtype=F64)

    def log_prob(x, t, sp):  # not translation invariant: its gradient has a centre of mass
        return -0.5 * sp.sum((x - target) ** 2)

    guided = ClassifierGuidance(IsotropicGaussian(p), log_prob, scale=1.0, pass_space=True)
    x = sample_ddim(guided, space.noise(gen(10)), make_grid("log_snr", p, 20), space).x
    assert space.com(x).abs().max() < 1e-10
    assert (x[:, 3] - 1.0).abs().mean() < (space.noise(gen(11))[:, 3] - 1.0).abs().mean()


# --------------------------------------------------------------------------------------------
# Inpainting
# --------------------------------------------------------------------------------------------
def correlated_gaussian():
    """One 4-D Gaussian with strong correlations; coordinates 0, 1 known at y = mu_k + (1.5, -1)."""
    chol = torch.tensor([[1.0, 0, 0, 0], [0.5, 1, 0, 0], [0.8, -0.6, 0.5, 0], [-0.7, 0.4, 0.3, 0.4]], dtype=F64)
    cov = chol @ chol.T
    mu = torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=F64)
    k, u = [0, 1], [2, 3]
    y = mu[k] + torch.tensor([1.5, -1.0], dtype=F64)
    s_uk, s_kk = cov[u][:, k], cov[k][:, k]
    mean_u = mu[u] + s_uk @ torch.linalg.solve(s_kk, y - mu[k])
    cov_u = cov[u][:, u] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)
    return GaussianMixture(mu[None], cov[None]), y, mean_u, cov_u


def inpaint_problem(n):
    gm, y, mean_u, cov_u = correlated_gaussian()
    mask = torch.zeros(n, 4, dtype=torch.bool)
    mask[:, :2] = True
    known = torch.zeros(n, 4, dtype=F64)
    known[:, :2] = y
    return gm, mask, known, mean_u, cov_u


def cond_errors(x, mean_u, cov_u):
    xu = x[:, 2:]
    return (xu.mean(0) - mean_u).norm().item(), torch.linalg.matrix_norm(torch.cov(xu.T) - cov_u).item()


@pytest.mark.parametrize("sampler", [sample_ddim, sample_euler, sample_heun, sample_ancestral, sample_edm_stochastic])
@pytest.mark.parametrize("noise", ["fresh", "fixed"])
def test_inpainting_keeps_known_values_exactly(sampler, noise):
    p = VP.linear()
    n = 500
    gm, mask, known, mean_u, cov_u = inpaint_problem(n)
    g = gen(12)
    inp = Inpaint(mask, known, p, g, noise=noise)
    x = sampler(gm.denoiser(p), torch.randn(n, 4, generator=g, dtype=F64), make_grid("uniform", p, 20), None, g,
                constrain=inp.constrain).x
    assert torch.equal(x[mask], known[mask])
    # and the free part has left the unconditional distribution for the conditional one
    uncond_mean_err = (gm.means[0, 2:] - mean_u).norm().item()
    assert cond_errors(x, mean_u, cov_u)[0] < 0.75 * uncond_mean_err


def test_inpaint_denoiser_replaces_known_entries():
    p = VP.linear()
    n = 50
    gm, mask, known, *_ = inpaint_problem(n)
    wrapped = Inpaint(mask, known, p).denoiser(gm.denoiser(p))
    assert isinstance(wrapped, InpaintDenoiser) and wrapped.process is p
    x = torch.randn(n, 4, generator=gen(13), dtype=F64)
    x0 = wrapped(x, torch.full((n,), 0.4, dtype=F64), None)
    assert torch.equal(x0[mask], known[mask])
    assert torch.equal(x0[~mask], gm.denoiser(p)(x, torch.full((n,), 0.4, dtype=F64))[~mask])


def test_repaint_is_closer_to_the_exact_conditional_than_replacement():
    """Measured on 8000 samples, VP linear, 50 uniform steps (the exact conditional mean lies
    2.85 from the unconditional sample mean):

    ==========================================  =====  ==========  =========================
    method                                       NFE    mean error  covariance error (Frob.)
    ==========================================  =====  ==========  =========================
    unconditional ancestral                      50     2.85        1.39
    replacement, ancestral                       50     1.22        0.32
    replacement, ancestral, 400 steps            400    1.12        0.32   (a bias, not step error)
    replacement, DDIM eta=0 / Heun               50/99  1.67/1.72   0.56/0.65
    RePaint jump 10, 10 resamplings              410    0.52        0.19
    RePaint jump 5, 5 resamplings                230    0.32        0.12
    RePaint jump 1, 10 resamplings               491    0.12        0.14
    ==========================================  =====  ==========  =========================
    """
    p = VP.linear()
    n = 8000
    gm, mask, known, mean_u, cov_u = inpaint_problem(n)
    den = gm.denoiser(p)
    ts = make_grid("uniform", p, 50)
    x_t = torch.randn(n, 4, generator=gen(14), dtype=F64)
    g = gen(15)
    rep = sample_ancestral(den, x_t, ts, None, g, constrain=Inpaint(mask, known, p, g).constrain)
    rep_mean, rep_cov = cond_errors(rep.x, mean_u, cov_u)
    g = gen(15)
    rp = sample_repaint(den, x_t, ts, None, g, mask=mask, known=known, jump_length=10, resamplings=10)
    rp_mean, rp_cov = cond_errors(rp.x, mean_u, cov_u)
    g = gen(15)
    rp5 = sample_repaint(den, x_t, ts, None, g, mask=mask, known=known, jump_length=5, resamplings=5)
    rp5_mean, rp5_cov = cond_errors(rp5.x, mean_u, cov_u)
    assert torch.equal(rp.x[mask], known[mask]) and torch.equal(rp5.x[mask], known[mask])
    assert rp.nfe == 50 + 9 * 10 * 4 and rp5.nfe == 50 + 4 * 5 * 9
    assert 0.9 < rep_mean < 1.6 and rep_cov > 0.2  # replacement is biased
    assert rp_mean < 0.6 * rep_mean and rp_cov < 0.8 * rep_cov
    assert rp5_mean < 0.4 * rep_mean and rp5_cov < 0.6 * rep_cov


def test_repaint_schedule_walk():
    walk = repaint_schedule(30, jump_length=5, resamplings=3)
    assert walk[0] == 0 and walk[-1] == 30
    assert all(abs(b - a) == 1 for a, b in zip(walk, walk[1:]))
    downs = sum(b == a + 1 for a, b in zip(walk, walk[1:]))
    assert downs == 30 + 2 * 5 * 5  # jump points 29, 24, 19, 14, 9
    assert repaint_schedule(7, 1, 1) == list(range(8))
    with pytest.raises(ValueError, match="jump_length"):
        repaint_schedule(10, 0, 2)


def test_inpainting_on_a_graph_keeps_known_values_and_zero_com():
    p = VP.linear()
    space = GraphSpace.from_counts([4, 6], num_features=4, com_channels=range(3), dtype=F64)
    model = IsotropicGaussian(p)
    mask = torch.zeros(space.shape, dtype=torch.bool)
    mask[[0, 1, 4, 5, 6], :] = True  # two known nodes in item 0, three in item 1
    known = torch.zeros(space.shape, dtype=F64)
    known[mask] = torch.randn(int(mask.sum()), generator=gen(16), dtype=F64)
    ts = make_grid("uniform", p, 20)
    for out in (
        sample_ddim(model, space.noise(gen(17)), ts, space, constrain=Inpaint(mask, known, p, gen(18), space=space).constrain),
        sample_repaint(model, space.noise(gen(17)), ts, space, gen(18), mask=mask, known=known, jump_length=5, resamplings=3),
    ):
        assert torch.equal(out.x[mask], known[mask])
        assert space.com(out.x).abs().max() < 1e-12


def test_inpaint_rejects_bad_input():
    p = VP.linear()
    with pytest.raises(TypeError, match="boolean"):
        Inpaint(torch.ones(3, 2), torch.zeros(3, 2), p)
    with pytest.raises(ShapeError):
        Inpaint(torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 3), p)
    with pytest.raises(ValueError, match="fresh"):
        Inpaint(torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 2), p, noise="sometimes")


# --------------------------------------------------------------------------------------------
# Reconstruction guidance (DPS)
# --------------------------------------------------------------------------------------------
def test_dps_moves_samples_toward_a_linear_measurement():
    """Measured (1000 samples, 30 uniform steps, y = A x_true without noise, A 2 x 4), scale 0 -> 1:
    mean residual ||A x - y|| 1.93 -> 0.52 (ancestral), 2.02 -> 0.44 (DDIM); distance of the
    sample mean to the exact posterior mean 2.23 -> 0.40 (ancestral), 2.34 -> 0.40 (DDIM)."""
    gm, *_ = correlated_gaussian()
    p = VP.linear()
    den = gm.denoiser(p)
    a_mat = torch.tensor([[1.0, 0.5, -0.3, 0.2], [0.0, -0.4, 1.0, 0.7]], dtype=F64)
    x_true = gm.sample(1, gen(19))[0]
    n = 1000
    y = (a_mat @ x_true).expand(n, 2)
    mu, cov = gm.means[0], gm.covs[0]
    post_mean = mu + cov @ a_mat.T @ torch.linalg.solve(a_mat @ cov @ a_mat.T, a_mat @ (x_true - mu))
    ts = make_grid("uniform", p, 30)
    x_t = torch.randn(n, 4, generator=gen(20), dtype=F64)
    for sampler in (sample_ancestral, sample_ddim):
        res, mean_err = {}, {}
        for scale in (0.0, 1.0):
            dps = ReconstructionGuidance(den, lambda x0: x0 @ a_mat.T, y, scale)
            out = sampler(dps, x_t, ts, None, gen(21))
            assert out.nfe == 30
            res[scale] = (out.x @ a_mat.T - y).norm(dim=1).mean().item()
            mean_err[scale] = (out.x.mean(0) - post_mean).norm().item()
        assert res[1.0] < 0.4 * res[0.0], (sampler.__name__, res)
        assert mean_err[1.0] < 0.5 * mean_err[0.0], (sampler.__name__, mean_err)


def test_dps_on_graphs_keeps_zero_com_and_fits_the_measurement():
    p = VP.linear()
    space = GraphSpace.from_counts([3, 5], num_features=4, com_channels=range(3), dtype=F64)
    y = torch.full((space.shape[0], 1), 1.2, dtype=F64)  # measure the feature channel of every node
    dps = ReconstructionGuidance(IsotropicGaussian(p), lambda x0: x0[:, 3:], y, scale=2.0)
    x_t = space.noise(gen(22))
    ts = make_grid("uniform", p, 20)
    x = sample_ddim(dps, x_t, ts, space).x
    plain = sample_ddim(IsotropicGaussian(p), x_t, ts, space).x
    assert space.com(x).abs().max() < 1e-12
    assert (x[:, 3:] - y).abs().mean() < 0.3 * (plain[:, 3:] - y).abs().mean()


def test_gradient_guidance_refuses_inference_mode():
    den = GaussianMixture.ring().denoiser(VP.linear())
    guided = ClassifierGuidance(den, lambda x, t: den.log_class_prob(x, t, torch.zeros(4, dtype=torch.long)))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        guided(torch.zeros(4, 2, dtype=F64), torch.full((4,), 0.5, dtype=F64), None)
