"""Gradient guidance: a classifier's log p(y | x_t) and DPS reconstruction guidance."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..space import ShapeError
from ._util import GuidedModel, _input_with_grad, _space, _tweedie_gain

__all__ = ['ClassifierGuidance', 'ReconstructionGuidance']


class ClassifierGuidance(GuidedModel):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1 in score form; Song et al. 2021b, eq. 14).

    ``score'(x_t) = score(x_t) + scale * grad_x log p(y | x_t)``, i.e.
    ``x0' = x0 + scale * (sigma^2 / alpha) * grad_x log p(y | x_t)``. With ``scale = 1`` and the
    exact classifier this is the exact conditional model, since
    ``grad log p_t(x | y) = grad log p_t(x) + grad log p(y | x_t)``.

    ``log_prob_fn(x, t)`` returns ``log p(y | x_t)`` per item (``[B]``; ``t`` per item, float64);
    with ``pass_space=True`` it is called as ``log_prob_fn(x, t, space)`` (graph classifiers need
    the ``batch`` vector). The gradient is taken by autograd, so the sampler must not run under
    ``torch.inference_mode()``.
    """

    def __init__(self, model, log_prob_fn: Callable[..., Tensor], scale: float = 1.0, pass_space: bool = False):
        self.model = model
        self.log_prob_fn = log_prob_fn
        self.scale = float(scale)
        self.pass_space = pass_space

    def __call__(self, x: Tensor, t: Tensor, space=None, **cond: Any) -> Tensor:
        space = _space(space, x)
        x0 = self.model(x, t, space, **cond)
        if self.scale == 0.0:
            return x0
        xg = _input_with_grad(x)
        with torch.enable_grad():
            lp = self.log_prob_fn(xg, t, space) if self.pass_space else self.log_prob_fn(xg, t)
            if lp.shape != (space.batch_size,):
                raise ShapeError(f"log_prob_fn must return one value per item, shape ({space.batch_size},), got {tuple(lp.shape)}")
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        step = self.scale * _tweedie_gain(self.process, t, space, x.dtype) * space.project(grad.to(x.dtype))
        return (x0 + step).detach()


def _per_item(v: Tensor, space, num_nodes: int) -> Tensor:
    """Per-item sum of a per-node (``[N, ...]``) or per-item (``[B, ...]``) tensor."""
    if v.shape[0] == num_nodes:
        return space.sum(v)
    if v.shape[0] == space.batch_size:
        return v.reshape(v.shape[0], -1).sum(1)
    raise ShapeError(
        f"the measurement must be per node ({num_nodes}, ...) or per item ({space.batch_size}, ...), got {tuple(v.shape)}"
    )


class ReconstructionGuidance(GuidedModel):
    """Diffusion posterior sampling (DPS; Chung et al. 2023, Alg. 1) for ``y = A(x0) + noise``.

    With the residual ``r(x_t) = y - A(x0_hat(x_t))`` (``x0_hat`` of the wrapped model,
    differentiated through it) the score is corrected per item by::

        score' = score - zeta * grad_{x_t} ||r||^2,   zeta = scale / ||r||   (normalize=True)
                                                      zeta = scale           (normalize=False)

    and returned as ``x0' = x0_hat - zeta (sigma^2 / alpha) grad_{x_t} ||r||^2``. ``normalize=True``
    is DPS's step size ``zeta_i = zeta' / ||y - A(x0_hat)||``; ``normalize=False`` is the Gaussian
    likelihood ``log p(y | x_t) ~ -||r||^2 / (2 sigma_y^2)`` with ``scale = 1 / (2 sigma_y^2)``.

    DPS applies its step directly to ``x_{i-1}`` after every ancestral step; written as a score
    correction it becomes a drift that every sampler integrates, and one ancestral step
    ``t -> s`` moves ``x`` by about ``sigma_{t|s}^2 * zeta * grad`` (``beta_t`` on the DDPM grid), so
    DPS's fixed ``zeta'`` on ``T`` steps corresponds to ``scale ~ zeta' / beta_t`` here. In this form
    ``scale`` does not depend on the number of steps.

    ``measure(x0)`` returns ``A(x0)`` per item (``[B, ...]``) or per node (``[N, ...]`` on a
    GraphSpace), the same shape as ``y``. Cost: one forward and one backward pass per NFE.
    """

    def __init__(self, model, measure: Callable[[Tensor], Tensor], y: Tensor, scale: float = 1.0,
                 normalize: bool = True, eps: float = 1e-12):
        self.model = model
        self.measure = measure
        self.y = y
        self.scale = float(scale)
        self.normalize = normalize
        self.eps = eps

    def __call__(self, x: Tensor, t: Tensor, space=None, **cond: Any) -> Tensor:
        space = _space(space, x)
        xg = _input_with_grad(x)
        with torch.enable_grad():
            x0 = self.model(xg, t, space, **cond)
            y_hat = self.measure(x0)
            if y_hat.shape != self.y.shape:
                raise ShapeError(f"measure(x0) has shape {tuple(y_hat.shape)} but y has {tuple(self.y.shape)}")
            sq = _per_item((self.y.to(y_hat.dtype) - y_hat) ** 2, space, x.shape[0])
            (grad,) = torch.autograd.grad(sq.sum(), xg)
        sq = sq.detach()
        zeta = self.scale / torch.sqrt(sq).clamp(min=self.eps) if self.normalize else torch.full_like(sq, self.scale)
        step = space.expand(zeta).to(x.dtype) * _tweedie_gain(self.process, t, space, x.dtype)
        return (x0.detach() - step * space.project(grad.to(x.dtype))).detach()
