"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, App. D.2; Chen et al. 2018).

Along a solution ``x(t)`` of the probability-flow ODE ``dx/dt = v(x, t)`` the marginal density
obeys the instantaneous change of variables ``d log p_t(x(t)) / dt = -div v(x(t), t)``, so

    log p_{t0}(x(t0)) = log p_T(x(T)) + int_{t0}^{T} div v(x(t), t) dt.

What is computed, exactly: starting from ``x(t0) = alpha(t0) x0`` at ``t0 = t_min`` (default
the process's ``t_min``), the ODE and the divergence integral are solved together up to
``T = t_max`` with :func:`~multidiff.integrate.dopri5`, and ``log p_T`` is replaced by the
process's prior ``N(0, sigma(T)^2 I)``. This gives ``log p_{t0}(alpha(t0) x0)``, the density of
the (slightly noised) marginal at the point ``x0`` maps to, up to the ODE tolerance and the
prior mismatch ``p_T != prior``. The reported ``nats`` add the change of variables of
``x0 = x_{t0} / alpha(t0)``: ``nats = log p_{t0}(alpha x0) + dof log alpha(t0)``, a proper density
in ``x0`` (integrating to one over the data space). No dequantisation: this is the continuous
density; for 8-bit data add the usual uniform-dequantisation offset yourself.

The velocity is the form of :mod:`~multidiff.samplers.rk45`, ``v = alpha' x0_hat + sigma' eps_hat``.
Its divergence is taken on ``v`` as a whole, not split as ``(sigma'/sigma) dof`` plus a multiple
of ``div x0_hat``: near ``t = 0`` those two parts are large and cancel (``x0_hat -> x / alpha``),
and a Gaussian probe's variance, ``2 ||J||_F^2``, would pay for the uncancelled diagonal.

* ``divergence="exact"``: the trace of the Jacobian from one reverse-mode pass per coordinate
  of an item (``D`` passes; fine for small ``D``);
* ``divergence="hutchinson"``: ``E[z^T J z]`` (Hutchinson 1989; FFJORD, Grathwohl et al. 2019)
  with ``probes`` Rademacher or Gaussian probes drawn once per solve (fixed along the
  trajectory, so the ODE stays smooth for the adaptive solver). The estimate of ``log p`` is
  unbiased; its spread shrinks as ``1/sqrt(probes)``.

On a Space with a constrained subspace (a :class:`~multidiff.space.GraphSpace` with zero centre
of mass) the density lives on the ``dof()``-dimensional subspace: the divergence there is
``tr(P J P)`` with ``P`` the Space's projection, computed exactly from projected basis vectors
or estimated with projected probes, and the prior is counted on ``dof()`` dimensions.

The model must treat the items of a batch independently (every denoiser does) and be
differentiable in ``x``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .integrate import dopri5
from .samplers.common import Evaluator
from .samplers.rk45 import pf_ode_coefficients
from .space import DenseSpace, GraphSpace

__all__ = ["DIVERGENCES", "PROBES", "LikelihoodResult", "log_likelihood", "dataset_likelihood"]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


class LikelihoodResult(NamedTuple):
    """Per-item results, all ``[B]`` float64.

    * ``nats``: ``log p(x0)`` in nats (the log-likelihood; higher is better), equal to
      ``prior_log_prob + delta_log_prob + dof log alpha(t_min)``;
    * ``bits_per_dim``: the negative log-likelihood in bits per degree of freedom,
      ``-nats / (dof ln 2)`` (the usual "bpd"; lower is better), ``dof = space.dof()``;
    * ``prior_log_prob``: ``log N(x_T; 0, sigma(T)^2 I)`` on ``dof`` dimensions;
    * ``delta_log_prob``: ``int_{t_min}^{T} div v dt``, so that
      ``prior_log_prob + delta_log_prob = log p_{t_min}(alpha(t_min) x0)``;
    * ``nfe``: the exact number of model calls.
    """

    nats: Tensor
    bits_per_dim: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    nfe: int


def _probes(space, x: Tensor, probes: int, dist: str, generator) -> list[Tensor]:
    out = []
    for _ in range(probes):
        if generator is not None and generator.device.type != x.device.type:
            raise ValueError(f"the generator is on {generator.device} but x0 is on {x.device}")
        w = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if dist == "rademacher":
            w = torch.sign(w)
            w = torch.where(w == 0, torch.ones_like(w), w)
        out.append(space.project(w))
    return out


def _local_basis(space, x: Tensor) -> tuple[list[Tensor], int]:
    """One-hot masks, each selecting the same local coordinate in every item that has it.

    Dense ``[B, ...]``: coordinate ``j`` of every item. Graph ``[N, F]``: feature ``f`` of the
    ``k``-th node of every item with more than ``k`` nodes. Returns the boolean masks and their
    number (the largest per-item coordinate count; the exact divergence is for small ``D``).
    """
    if isinstance(space, GraphSpace):
        counts = space.counts
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(space.batch.numel(), device=x.device) - starts[space.batch]
        n_max, feats = int(counts.max()), space.num_features
        masks = []
        for k in range(n_max):
            node = local == k
            for f in range(feats):
                m = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
                m[node, f] = True
                masks.append(m)
        return masks, n_max * feats
    flat = x.reshape(x.shape[0], -1)
    d = flat.shape[1]
    masks = []
    for j in range(d):
        m = torch.zeros_like(flat, dtype=torch.bool)
        m[:, j] = True
        masks.append(m.reshape(x.shape))
    return masks, d


def log_likelihood(
    model,
    x0: Tensor,
    space=None,
    *,
    t_min: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "exact",
    probes: int = 1,
    probe_dist: str = "rademacher",
    generator: torch.Generator | None = None,
    max_steps: int = 100_000,
) -> LikelihoodResult:
    """Per-item ``log p(x0)`` through the probability-flow ODE (see the module docstring for the
    exact quantity). Runs in the dtype of ``x0`` (float64 recommended) on its device.

    Args:
        model: a data predictor (``model.process``, ``model(x, t[B], space) -> x0_hat``),
            differentiable in ``x``.
        x0: data ``[B, ...]`` (or ``[N, F]`` nodes of a GraphSpace), on the Space's subspace.
        space: the batch structure; a DenseSpace of ``x0``'s shape by default.
        t_min: where the ODE starts; the process's ``t_min`` by default.
        rtol, atol: tolerances of the adaptive solver (state and log-density alike).
        divergence: ``"exact"`` (one backward pass per coordinate) or ``"hutchinson"``.
        probes, probe_dist, generator: Hutchinson probes: how many, ``"rademacher"`` or
            ``"gaussian"``, and the generator they are drawn from.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if probe_dist not in PROBES:
        raise ValueError(f"unknown probe_dist {probe_dist!r}; valid: {', '.join(PROBES)}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if not hasattr(model, "process"):
        raise TypeError("model must carry its noise process (model.process) and map (x, t[B], space) -> x0")
    if not torch.is_floating_point(x0):
        raise TypeError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    process = model.process
    if space is None:
        space = DenseSpace.like(x0)
    space.check(x0, "x0")
    x0 = x0.detach()
    off = (space.project(x0) - x0).abs().max()
    tol = 1e3 * torch.finfo(x0.dtype).eps * (1.0 + float(x0.abs().max()))
    if float(off) > tol:
        raise ValueError(
            f"x0 is off the Space's subspace by {float(off):.3g} (e.g. a non-zero centre of mass); "
            "project it with space.project(x0) first: the density lives on the subspace"
        )
    t_lo = process.t_min if t_min is None else float(t_min)
    t_hi = float(process.t_max)
    if not 0.0 < t_lo < t_hi:
        raise ValueError(f"need 0 < t_min < t_max = {t_hi}, got t_min={t_lo}")

    model_x0 = Evaluator(model, space)
    dof = space.dof().to(device=x0.device, dtype=torch.float64)
    if divergence == "exact":
        masks, _ = _local_basis(space, x0)
        vectors = [space.project(m.to(x0.dtype)) for m in masks]
    else:
        vectors = _probes(space, x0, probes, probe_dist, generator)
        masks = None

    def augmented(t: float, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(v, div v)``: the velocity and its per-item divergence on the subspace."""
        x, _ = state
        a, s, da, ds = pf_ode_coefficients(process, t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0_hat = model_x0(xg, t)
            # velocity form: alpha' x0_hat + sigma' eps_hat (see multidiff.samplers.rk45)
            v = space.project(da * x0_hat + ds * (xg - a * x0_hat) / s)
            div = torch.zeros(space.batch_size, dtype=torch.float64, device=x.device)
            for n, u in enumerate(vectors):
                (vjp,) = torch.autograd.grad(v, xg, u, retain_graph=n + 1 < len(vectors))
                if masks is not None:
                    # exact: [J^T P e_j]_j = (P e_j)^T J e_j; the sum over j is tr(P J) = tr(P J P)
                    div = div + space.sum(torch.where(masks[n], vjp, torch.zeros_like(vjp)).to(torch.float64))
                else:
                    div = div + space.sum((vjp * u).to(torch.float64))
        if masks is None:
            div = div / len(vectors)
        return v.detach(), div.to(x.dtype)

    a_lo = float(process.alpha(torch.tensor(t_lo, dtype=torch.float64)))
    x_lo = a_lo * x0
    delta0 = torch.zeros(space.batch_size, dtype=x0.dtype, device=x0.device)
    (x_T, delta), _ = dopri5(augmented, (x_lo, delta0), t_lo, t_hi, rtol=rtol, atol=atol, max_steps=max_steps)
    prior = process.prior_log_prob(x_T, space).to(torch.float64)
    delta = delta.to(torch.float64)
    nats = prior + delta + dof * math.log(a_lo)
    bpd = -nats / (dof * math.log(2.0))
    return LikelihoodResult(nats, bpd, prior, delta, model_x0.nfe)


def dataset_likelihood(
    pipeline,
    split: str = "holdout",
    n: int = 200,
    *,
    batch_size: int = 50,
    divergence: str = "hutchinson",
    probes: int = 1,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> dict:
    """Unconditional log-likelihood of the first ``n`` items of a data split under a
    :class:`~multidiff.pipeline.DiffusionPipeline`, in batches: mean nats per item and bits per
    dimension of the continuous density in the model's data space (no dequantisation), with
    the standard error over items. The items go through the modality's ``training_batch`` with
    the network in eval mode (no label dropout); conditioning is not passed, so a
    class-conditional network is evaluated on its null class."""
    modality, config = pipeline.modality, pipeline.config
    data = modality.dataset(config, split)
    count = min(int(n), len(data))
    if count < 1:
        raise ValueError(f"the {split!r} split is empty")
    nats, bpd, nfe = [], [], 0
    starts = range(0, count, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="likelihood", unit="batch")
    pipeline.net.eval()
    for lo in starts:
        batch = modality.collate([data[i] for i in range(lo, min(count, lo + batch_size))])
        batch = _to_device(batch, pipeline.device)
        x0, space, _ = modality.training_batch(pipeline.net, batch, generator, config)
        res = log_likelihood(pipeline.denoiser, x0, space, divergence=divergence, probes=probes,
                             rtol=rtol, atol=atol, generator=generator)
        nats.append(res.nats.detach().cpu())
        bpd.append(res.bits_per_dim.detach().cpu())
        nfe += res.nfe
    nats_t, bpd_t = torch.cat(nats), torch.cat(bpd)
    sem = lambda v: float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")  # noqa: E731
    return {"split": split, "items": count, "divergence": divergence, "probes": probes, "rtol": rtol,
            "log_likelihood_nats": float(nats_t.mean()), "log_likelihood_sem": sem(nats_t),
            "bits_per_dim": float(bpd_t.mean()), "bits_per_dim_sem": sem(bpd_t), "nfe": nfe}


def _to_device(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
