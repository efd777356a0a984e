"""EMA: the fixed-decay recursion exactly, and the EDM2 power profile's sigma_rel relation measured."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multidiff.training.ema import (
    EMA,
    SIGMA_REL_MAX,
    power_beta,
    sigma_rel_of_gamma,
    sigma_rel_to_gamma,
)


class Scalars(nn.Module):
    def __init__(self, n: int = 2):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.29])
def test_sigma_rel_gamma_inverse(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g > (math.sqrt(5) - 3) / 2
    assert sigma_rel_of_gamma(g) == pytest.approx(sigma_rel, rel=1e-10)
    # the cubic (g + 2)^2 (g + 3) sigma_rel^2 = g + 1
    assert (g + 2) ** 2 * (g + 3) * sigma_rel**2 == pytest.approx(g + 1, rel=1e-9)


def test_sigma_rel_range():
    assert SIGMA_REL_MAX == pytest.approx(max(sigma_rel_of_gamma(-0.9 + 0.001 * k) for k in range(5000)), rel=1e-6)
    for bad in (0.0, SIGMA_REL_MAX, 0.4, -0.1):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_fixed_decay_recursion_exact():
    model = Scalars()
    ema = EMA(model, "fixed", decay=0.9)
    with torch.no_grad():
        model.p.fill_(1.0)
    for n in range(1, 6):
        assert ema.update(model) == 0.9
        assert ema.module.p[0].item() == pytest.approx(1.0 - 0.9**n, rel=1e-14)
    model.count.fill_(3.0)
    ema.update(model)
    assert ema.module.count.item() == 3.0  # buffers are copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("sigma_rel", [0.05, 0.15])
def test_power_profile_has_the_stated_relative_width(sigma_rel):
    """Average theta(t) = t and t^2 over T steps: the EMA is the mean and second moment of the
    averaging profile, whose std / T must be sigma_rel (up to O(1/T) discretisation)."""
    T = 4000
    model = Scalars()
    ema = EMA(model, "power", sigma_rel=sigma_rel)
    for t in range(1, T + 1):
        with torch.no_grad():
            model.p.copy_(torch.tensor([t / T, (t / T) ** 2], dtype=torch.float64))
        beta = ema.update(model)
        if t == 1:
            assert beta == 0.0 and ema.module.p[0].item() == 1 / T  # starts at the weights
    mean, second = ema.module.p.tolist()
    assert math.sqrt(second - mean**2) == pytest.approx(sigma_rel, rel=5e-3)
    g = ema.gamma
    assert mean == pytest.approx((g + 1) / (g + 2), rel=1e-3)  # mean of (g+1) tau^g on [0, 1]
    assert power_beta(10, g) == pytest.approx((1 - 1 / 10) ** (g + 1))
