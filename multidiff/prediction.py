"""What a network predicts, and how to turn one prediction into another.

With ``x = alpha x0 + sigma eps`` (all quantities per item, broadcast):

=========  ==========================================  ===================================
kind       definition                                  to x0
=========  ==========================================  ===================================
x0         ``x0``                                      ``x0``
eps        ``eps``                                     ``(x - sigma eps) / alpha``
v          ``alpha eps - sigma x0`` (Salimans & Ho)    ``(alpha x - sigma v) / (alpha^2 + sigma^2)``
score      ``grad log p_t(x) = -eps / sigma``          ``(x + sigma^2 score) / alpha``
velocity   ``dx/dt = alpha' x0 + sigma' eps``          ``(sigma' x - sigma velocity) / (sigma' alpha - sigma alpha')``
=========  ==========================================  ===================================

``velocity`` needs the time derivatives ``alpha'`` and ``sigma'`` (for the linear
interpolant ``alpha' = -1, sigma' = 1`` so ``velocity = eps - x0``).

The EDM preconditioning (Karras et al. 2022, Table 1) wraps a raw network ``F`` into
``D(x~, s) = c_skip(s) x~ + c_out(s) F(c_in(s) x~, c_noise(s))`` on the scaled state
``x~ = x / alpha`` with ``s = sigma / alpha``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PREDICTIONS", "to_x0", "from_x0", "convert", "EDMPreconditioning", "check_prediction"]

PREDICTIONS = ("x0", "eps", "v", "score", "velocity", "edm")


def check_prediction(kind: str) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")
    return kind


def to_x0(
    kind: str,
    value: Tensor,
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
) -> Tensor:
    """Convert a prediction of ``kind`` at state ``x`` to the clean-data estimate ``x0``."""
    if kind == "x0" or kind == "edm":
        return value
    if kind == "eps":
        return (x - sigma * value) / alpha
    if kind == "v":
        return (alpha * x - sigma * value) / (alpha**2 + sigma**2)
    if kind == "score":
        return (x + sigma**2 * value) / alpha
    if kind == "velocity":
        _need_derivatives(dalpha, dsigma)
        # x = a x0 + s e, u = a' x0 + s' e  =>  s' x - s u = (s' a - s a') x0
        return (dsigma * x - sigma * value) / (dsigma * alpha - sigma * dalpha)
    raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")


def from_x0(
    kind: str,
    x0: Tensor,
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
) -> Tensor:
    """The prediction of ``kind`` implied by ``x0`` at state ``x``."""
    if kind == "x0" or kind == "edm":
        return x0
    eps = (x - alpha * x0) / sigma
    if kind == "eps":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "score":
        return -eps / sigma
    if kind == "velocity":
        _need_derivatives(dalpha, dsigma)
        return dalpha * x0 + dsigma * eps
    raise ValueError(f"unknown prediction {kind!r}; valid: {', '.join(PREDICTIONS)}")


def convert(
    value: Tensor,
    src: str,
    dst: str,
    x: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    dalpha: Tensor | None = None,
    dsigma: Tensor | None = None,
) -> Tensor:
    """Convert a prediction from ``src`` to ``dst`` kind (any of :data:`PREDICTIONS`)."""
    check_prediction(src)
    check_prediction(dst)
    if src == dst:
        return value
    x0 = to_x0(src, value, x, alpha, sigma, dalpha, dsigma)
    return from_x0(dst, x0, x, alpha, sigma, dalpha, dsigma)


def _need_derivatives(dalpha, dsigma) -> None:
    if dalpha is None or dsigma is None:
        raise ValueError("the 'velocity' prediction needs dalpha and dsigma (Process.derivatives(t))")


@dataclass(frozen=True)
class EDMPreconditioning:
    """Karras et al. 2022, Table 1 ("Ours" column), row by row, for noise level ``sigma``."""

    sigma_data: float = 0.5

    def c_skip(self, sigma: Tensor) -> Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: Tensor) -> Tensor:
        return sigma * self.sigma_data / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1.0 / torch.sqrt(sigma**2 + self.sigma_data**2)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return 0.25 * torch.log(sigma)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = 1 / c_out^2`` (Karras et al. 2022, Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net, x_scaled: Tensor, sigma: Tensor, expand, **kwargs) -> Tensor:
        """``D(x~, sigma)``: ``sigma`` per item ``[B]``, ``expand`` broadcasts it to ``x``."""
        s = expand(sigma).to(x_scaled.dtype)
        out = net(self.c_in(s) * x_scaled, self.c_noise(sigma), **kwargs)
        return self.c_skip(s) * x_scaled + self.c_out(s) * out.to(x_scaled.dtype)

