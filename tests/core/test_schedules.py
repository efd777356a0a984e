"""Time grids: shape, ends, closed forms, and the errors of bad grids."""
from __future__ import annotations

import math

import pytest
import torch

from multidiff import EDM, VP, DiscreteVP, make_grid, make_process
from multidiff.process import PROCESSES
from multidiff.schedules import GRIDS, GridError, check_grid, explicit, from_betas, from_sigmas, karras

F64 = torch.float64
GRID_NAMES = sorted(GRIDS)


@pytest.mark.parametrize("pname", sorted(PROCESSES))
@pytest.mark.parametrize("grid", GRID_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_shape_and_ends(pname, grid, steps):
    """steps + 1 points from t_max down to exactly 0, strictly decreasing, float64."""
    process = make_process(pname)
    ts = make_grid(grid, process, steps)
    assert ts.dtype == F64 and ts.shape == (steps + 1,)
    assert float(ts[0]) == process.t_max
    assert float(ts[-1]) == 0.0
    assert bool((ts[1:] < ts[:-1]).all())
    if steps > 1 and grid != "trailing":  # the last positive point is the process's smallest time
        assert math.isclose(float(ts[-2]), process.t_min, rel_tol=1e-8)


@pytest.mark.parametrize("steps", [1, 4, 20, 1000])
def test_trailing_grid_visits_diffusers_trailing_timesteps(steps):
    """Lin et al. 2024's trailing spacing: t_i = 1 - i/n, i.e. DDPM timesteps k = 999, 999 - 1000/n, ...
    (t = (k + 1) / 1000) down to 1000/n - 1, then t = 0; at n = T it is the whole table."""
    proc = DiscreteVP.from_schedule("linear", 1000)
    ts = make_grid("trailing", proc, steps)
    k = proc.step_of(ts[:-1])
    expected = torch.arange(999, -1, -1000 / steps, dtype=F64)[:steps]  # np.round(arange(T, 0, -T/n)) - 1
    torch.testing.assert_close(k, expected.round(), rtol=0, atol=1e-9)
    assert float(ts[-2]) == pytest.approx(1.0 / steps, rel=1e-12) and float(ts[-1]) == 0.0


@pytest.mark.parametrize("steps", [2, 5, 18, 40])
def test_karras_grid_on_edm_is_the_closed_form(steps):
    """Karras et al. 2022 eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
    then sigma_n = 0; on the EDM process t = sigma. Agreement to 1e-13 relative (float64 round-off)."""
    process = EDM(sigma_min=0.002, sigma_max=80.0)
    rho = 7.0
    i = torch.arange(steps, dtype=F64)
    closed = (80.0 ** (1 / rho) + i / (steps - 1) * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    ts = karras(process, steps, rho=rho)
    torch.testing.assert_close(ts[:-1], closed, rtol=1e-13, atol=0)
    assert float(ts[-1]) == 0.0


@pytest.mark.parametrize("pname", sorted(PROCESSES))
def test_log_snr_grid_is_uniform_in_lambda(pname):
    """Equal steps in log-SNR over all points but the final t = 0 (for the linear interpolant,
    whose lambda is -inf at t = 1, over all but the first one too)."""
    process = make_process(pname)
    ts = make_grid("log_snr", process, 12)
    lam = process.log_snr(ts[:-1])
    if not math.isfinite(float(lam[0])):
        lam = lam[1:]
    d = lam[1:] - lam[:-1]
    assert bool((d > 0).all())
    torch.testing.assert_close(d, torch.full_like(d, float(d.mean())), rtol=1e-7, atol=0)


def test_from_betas_reproduces_diffwave_fast_schedule():
    """DiffWave (Kong et al. 2021): training betas linspace(1e-4, 0.05, 50); the fast sampler's
    betas [1e-4, 1e-3, 1e-2, 5e-2, 0.2, 0.5] have alpha_bar_s = prod (1 - beta). The grid places
    its 6 steps where the training process has exactly those alpha_bar (to 1e-10)."""
    process = DiscreteVP(torch.linspace(1e-4, 0.05, 50, dtype=F64))
    fast = torch.tensor([1e-4, 1e-3, 1e-2, 5e-2, 0.2, 0.5], dtype=F64)
    alpha_bar_fast = torch.cumprod(1 - fast, 0)
    ts = from_betas(process, fast)
    assert ts.shape == (7,) and float(ts[-1]) == 0.0
    torch.testing.assert_close(process.alpha(ts[:-1]) ** 2, alpha_bar_fast.flip(0), rtol=1e-10, atol=0)
    # the first fast beta equals the first training beta: that step sits on training step 1
    assert math.isclose(float(ts[-2]), 1 / 50, rel_tol=1e-9)


def test_explicit_and_from_sigmas():
    process = VP.linear()
    ts = explicit(process, [1.0, 0.5, 0.1], final_zero=True)
    assert ts.tolist() == [1.0, 0.5, 0.1, 0.0]
    edm = EDM()
    ts = from_sigmas(edm, [80.0, 10.0, 1.0, 0.0])
    torch.testing.assert_close(ts, torch.tensor([80.0, 10.0, 1.0, 0.0], dtype=F64), rtol=1e-13, atol=0)
    ts = from_sigmas(process, [10.0, 1.0, 0.1, 0.0])
    torch.testing.assert_close(process.sigma_edm(ts[:-1]), torch.tensor([10.0, 1.0, 0.1], dtype=F64), rtol=1e-9, atol=0)


def test_bad_grids_raise_grid_error():
    process = VP.linear()
    with pytest.raises(GridError, match=r"decrease strictly; t\[1\]=0.5 is followed by t\[2\]=0.7"):
        check_grid([1.0, 0.5, 0.7, 0.0], process)
    with pytest.raises(GridError, match=r"decrease strictly"):
        check_grid([1.0, 0.5, 0.5, 0.0], process)
    with pytest.raises(GridError, match=r"must lie in \[0, 1.0\]"):
        check_grid([2.0, 0.5, 0.0], process)
    with pytest.raises(GridError, match=r"must lie in \[0, 1.0\]"):
        check_grid([0.5, 0.1, -0.1], process)
    with pytest.raises(GridError, match="non-finite"):
        check_grid([1.0, float("nan"), 0.0], process)
    with pytest.raises(GridError, match="non-finite"):
        check_grid([float("inf"), 0.5, 0.0], process)
    with pytest.raises(GridError, match="at least two points"):
        check_grid([1.0], process)
    for name in GRID_NAMES:
        for steps in (0, -3, 2.5):
            with pytest.raises(GridError, match="positive integer"):
                make_grid(name, process, steps)
    with pytest.raises(GridError, match="t_min"):
        make_grid("uniform", process, 10, t_min=2.0)
    with pytest.raises(GridError, match="non-negative"):
        from_sigmas(process, [1.0, float("nan"), 0.0])
    with pytest.raises(GridError, match=r"\(0, 1\)"):
        from_betas(process, [0.1, 1.5])
    with pytest.raises(ValueError):  # GridError is a ValueError
        check_grid([1.0, 1.0], process)
