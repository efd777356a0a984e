"""Analytic targets: Gaussian mixtures with their exact denoisers and exact marginal densities.

For ``x0 ~ sum_k w_k N(mu_k, S_k)`` and ``x_t = alpha x0 + sigma eps`` every marginal is a
mixture again, ``p_t = sum_k w_k N(alpha mu_k, C_k)``, ``C_k = alpha^2 S_k + sigma^2 I``,
and the posterior mean is (Bishop 2006, eq. 2.116 per component)::

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha S_k C_k^{-1} (x_t - alpha mu_k)),
    r_k(x_t) = w_k N(x_t; alpha mu_k, C_k) / p_t(x_t).

With ``S_k = U_k diag(l_k) U_k^T`` every ``C_k`` shares the eigenvectors ``U_k`` and all of
this costs one rotation per component. The denoiser follows the sampler protocol
(``process`` attribute, ``__call__(x, t[B], space)``), so samplers, guidance and the
likelihood can be checked against exact answers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..process import Process

__all__ = ["GaussianMixture", "MixtureDenoiser", "IsotropicGaussian"]


class GaussianMixture:
    """A ``D``-dimensional Gaussian mixture with full covariances, in float64.

    ``means [K, D]``, ``covs [K, D, D]`` (symmetric positive definite), ``weights [K]``.
    """

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | Sequence[float] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, D], got {tuple(self.means.shape)}")
        k, d = self.means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must be [K, D, D] = {(k, d, d)}, got {tuple(covs.shape)}")
        self.covs = 0.5 * (covs + covs.transpose(-1, -2))
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError("weights must be K positive numbers")
        self.weights = w / w.sum()
        self.evals, self.evecs = torch.linalg.eigh(self.covs)  # [K, D], [K, D, D]
        if bool((self.evals <= 0).any()):
            raise ValueError("every covariance must be positive definite")
        self.num_components, self.dim = k, d

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def ring(cls, components: int = 8, radius: float = 2.0, std: float = 0.15, anisotropy: float = 1.0) -> "GaussianMixture":
        """``components`` Gaussians on a circle in 2-D (tangential std ``std * anisotropy``)."""
        ang = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
        means = radius * torch.stack([ang.cos(), ang.sin()], -1)
        rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], -1), torch.stack([ang.sin(), ang.cos()], -1)], -2)
        diag = torch.diag(torch.tensor([std**2, (std * anisotropy) ** 2], dtype=torch.float64))
        covs = rot @ diag @ rot.transpose(-1, -2)
        return cls(means, covs)

    @classmethod
    def random(cls, dim: int, components: int, seed: int = 0, scale: float = 1.0, spread: float = 3.0) -> "GaussianMixture":
        """Random means (std ``spread``), random full covariances (eigenvalues in
        ``[0.05, 1] * scale^2``) and random weights, from a fixed seed."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(components, dim, dim, generator=g, dtype=torch.float64))
        ev = scale**2 * (0.05 + 0.95 * torch.rand(components, dim, generator=g, dtype=torch.float64))
        covs = q @ torch.diag_embed(ev) @ q.transpose(-1, -2)
        w = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, covs, w)

    # -- the target ----------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)
        x = self.means[k] + (chol[k] @ z.unsqueeze(-1)).squeeze(-1)
        return (x, k) if return_labels else x

    def _component_terms(self, x: Tensor, alpha: Tensor, sigma: Tensor):
        """Per item and component: rotated residual ``y``, variances ``v`` and log-densities."""
        x = x.to(torch.float64)
        a = alpha.to(torch.float64).reshape(-1, 1, 1)
        s = sigma.to(torch.float64).reshape(-1, 1, 1)
        resid = x.unsqueeze(1) - a * self.means.unsqueeze(0)  # [B, K, D]
        y = torch.einsum("kde,bkd->bke", self.evecs, resid)  # U_k^T r
        v = a**2 * self.evals.unsqueeze(0) + s**2  # [B, K, D]
        logn = -0.5 * ((y**2 / v).sum(-1) + torch.log(v).sum(-1) + self.dim * math.log(2 * math.pi))
        return y, v, logn, a

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, sigma: Tensor | float = 0.0) -> Tensor:
        """``log p_t(x)`` of the marginal with ``(alpha, sigma)`` (per item or scalar); ``alpha=1,
        sigma=0`` is the target itself."""
        alpha, sigma = self._ab(x, alpha, sigma)
        _, _, logn, _ = self._component_terms(x, alpha, sigma)
        return torch.logsumexp(logn + torch.log(self.weights), -1)

    def responsibilities(self, x: Tensor, alpha, sigma) -> Tensor:
        """``r_k(x) = p(component k | x_t = x)``, ``[B, K]``."""
        alpha, sigma = self._ab(x, alpha, sigma)
        _, _, logn, _ = self._component_terms(x, alpha, sigma)
        return torch.softmax(logn + torch.log(self.weights), -1)

    def posterior_mean(self, x: Tensor, alpha, sigma, component: Tensor | None = None) -> Tensor:
        """``E[x0 | x_t = x]``; with ``component`` (``[B]`` indices, ``-1`` = whole mixture)
        the mean under that single component."""
        alpha, sigma = self._ab(x, alpha, sigma)
        y, v, logn, a = self._component_terms(x, alpha, sigma)
        # mu_k + alpha U_k diag(l_k / v) y
        gain = a * self.evals.unsqueeze(0) / v * y
        cond_means = self.means.unsqueeze(0) + torch.einsum("kde,bke->bkd", self.evecs, gain)
        logits = logn + torch.log(self.weights)
        if component is not None:
            component = torch.as_tensor(component, device=logits.device).reshape(-1)
            onehot = torch.nn.functional.one_hot(component.clamp(min=0), self.num_components).bool()
            sel = component.unsqueeze(-1) >= 0
            logits = torch.where(sel & ~onehot, torch.full_like(logits, -math.inf), logits)
        r = torch.softmax(logits, -1)
        return (r.unsqueeze(-1) * cond_means).sum(1)

    def marginal_moments(self, alpha: float = 1.0, sigma: float = 0.0) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the marginal ``p_t``."""
        mu = (self.weights.unsqueeze(-1) * self.means).sum(0)
        second = (self.weights.reshape(-1, 1, 1) * (self.covs + self.means.unsqueeze(-1) * self.means.unsqueeze(-2))).sum(0)
        cov = second - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        return alpha * mu, alpha**2 * cov + sigma**2 * torch.eye(self.dim, dtype=torch.float64)

    def denoiser(self, process: Process) -> "MixtureDenoiser":
        """The exact ``E[x0 | x_t]`` under ``process``, as a sampler-ready model."""
        return MixtureDenoiser(self, process)

    @staticmethod
    def _ab(x: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).expand(b) if not isinstance(alpha, Tensor) or alpha.ndim == 0 else alpha
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(b) if not isinstance(sigma, Tensor) or sigma.ndim == 0 else sigma
        return alpha, sigma


class MixtureDenoiser:
    """The exact data prediction of a :class:`GaussianMixture` under a process.

    Keyword ``label`` (``[B]`` component indices, ``-1`` for none) gives the conditional
    denoiser of that component, so classifier-free guidance can be tested exactly; the
    Bayes classifier ``log p(label | x_t)`` is :meth:`log_class_prob`.
    """

    def __init__(self, mixture: GaussianMixture, process: Process):
        self.mixture = mixture
        self.process = process
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, space=None, label: Tensor | None = None) -> Tensor:
        self.calls += 1
        a = self.process.alpha(t.to(torch.float64))
        s = self.process.sigma(t.to(torch.float64))
        return self.mixture.posterior_mean(x, a, s, label).to(x.dtype)

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        """Exact ``log p_t(x)`` at per-item times ``t``."""
        return self.mixture.log_prob(x, self.process.alpha(t), self.process.sigma(t))

    def log_class_prob(self, x: Tensor, t: Tensor, label: Tensor) -> Tensor:
        """Exact ``log p(label | x_t = x)`` (the Bayes classifier)."""
        r = self.mixture.responsibilities(x, self.process.alpha(t), self.process.sigma(t))
        return torch.log(r.gather(1, label.reshape(-1, 1)).squeeze(1))


class IsotropicGaussian:
    """``x0 ~ N(0, scale^2 I)`` on any Space's subspace (zero centre of mass on a GraphSpace).

    Exact denoiser ``E[x0 | x_t] = alpha scale^2 / (alpha^2 scale^2 + sigma^2) x_t`` (isotropic,
    hence E(n)-equivariant) and exact ``log p_t`` on ``space.dof()`` degrees of freedom.
    """

    def __init__(self, process: Process, scale: float = 1.0):
        self.process = process
        self.scale = float(scale)

    def sample(self, space, generator: torch.Generator | None = None) -> Tensor:
        return self.scale * space.noise(generator)

    def __call__(self, x: Tensor, t: Tensor, space) -> Tensor:
        a = self.process.alpha(t.to(torch.float64))
        s = self.process.sigma(t.to(torch.float64))
        gain = a * self.scale**2 / (a**2 * self.scale**2 + s**2)
        return space.expand(gain).to(x.dtype) * x

    def log_prob(self, x: Tensor, t: Tensor, space) -> Tensor:
        a = self.process.alpha(t.to(torch.float64))
        s = self.process.sigma(t.to(torch.float64))
        var = a**2 * self.scale**2 + s**2
        sq = space.sum(x.to(torch.float64) ** 2)
        dof = space.dof().to(torch.float64)
        return -0.5 * dof * torch.log(2 * math.pi * var) - 0.5 * sq / var
