"""Small helpers shared by the guides."""
from __future__ import annotations


import torch
from torch import Tensor

from ..space import DenseSpace

__all__ = ["GuidedModel", '_space', '_tweedie_gain', '_input_with_grad']


def _space(space, x: Tensor):
    return DenseSpace.like(x) if space is None else space


def _tweedie_gain(process, t: Tensor, space, dtype: torch.dtype) -> Tensor:
    """Per-item ``sigma^2 / alpha`` (0 where ``alpha = 0``), broadcast: the factor that turns a
    score correction into an ``x0`` correction."""
    t64 = t.to(torch.float64)
    a = process.alpha(t64)
    s = process.sigma(t64)
    gain = torch.where(a > 0, s**2 / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
    return space.expand(gain).to(dtype)


def _input_with_grad(x: Tensor) -> Tensor:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "gradient guidance needs autograd: run the sampler under torch.no_grad() or plain mode, "
            "not torch.inference_mode()"
        )
    return x.detach().clone().requires_grad_(True)


class GuidedModel:
    """Base of the model wrappers: a wrapper samples on its inner model's process."""

    model: object

    @property
    def process(self):
        return self.model.process
