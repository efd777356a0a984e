"""Sampler benchmark: multidiff's solvers side by side with diffusers' schedulers.

Both drive the very same exact denoiser ``E[x0 | x_t]`` of a Gaussian mixture
(:mod:`multidiff.testing`) under DDPM's discrete linear process (``beta 1e-4 -> 0.02``,
``T = 1000``), from the same starting noise, and are measured against the same exact
probability-flow ODE endpoint. Run ``python benchmarks/samplers.py`` (full, < 20 min on two
shared cores) or ``--quick`` (a smoke check, < 1 min). See benchmarks/README.md for the
conventions and the measured table.

What is measured, per target (2-D ring of 8 Gaussians; 64-D mixture of random full-covariance
Gaussians) and NFE budget (5, 10, 20, 50):

* the **endpoint error**: median over samples of ``|x - x_ref|_2``, where ``x_ref`` is the exact
  PF-ODE solution from the same ``x_T`` (adaptive RK45, rtol = atol = 1e-9, float64) down to the
  table's first step ``t_min = 1/1000`` followed by the denoising step ``x0 = D(x, t_min)``;
* the **sliced Wasserstein-2 distance** (128 fixed random directions) between the samples and a
  large independent draw from the target.

Conventions that make the comparison fair (details in the README):

* time: diffusers' 0-based integer timestep ``k`` is our ``t = (k + 1) / T``
  (:meth:`~multidiff.process.DiscreteVP.step_of`); ``alpha_bar`` is exact there on both sides;
* the model: at every call the scheduler is given the exact ``eps`` (``v`` for IPNDM) at the noise
  level the scheduler itself assigns to that call (its ``alphas_cumprod[k]`` for DDIM, its
  ``sigmas[j]`` for the sigma-space schedulers), so no scheduler is charged for a mismatch
  between its time convention and ours;
* the start: ``x_T ~ N(0, I)`` at ``t = 1`` (``k = 999``), multiplied by ``init_noise_sigma`` for
  the schedulers that work in the EDM scaling (Euler, Heun);
* NFE: model calls are counted in the model function, for both sides.
"""
from __future__ import annotations

import argparse
import inspect
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

import multidiff
from multidiff.process import EDM, DiscreteVP
from multidiff.samplers import SOLVERS
from multidiff.schedules import GRIDS, explicit, make_grid
from multidiff.space import DenseSpace
from multidiff.testing import GaussianMixture, sliced_wasserstein

try:  # the lead keeps the per-solver evaluation costs here
    from multidiff.sampling import steps_for_nfe as _steps_for_nfe
except ImportError:  # pragma: no cover
    _steps_for_nfe = None

HERE = Path(__file__).resolve().parent
T_TRAIN = 1000
NFES_FULL = (5, 10, 20, 50)
NFES_QUICK = (5, 10)
TARGET_NFE = 20  # the 0.8x target applies at every NFE <= this
RATIO_TARGET = 0.8

#: solvers that draw fresh noise (endpoint error is meaningless for them); anything else
#: registered is probed once (two generators, same x_T) and classified by the result
KNOWN_STOCHASTIC = {"ancestral", "edm_stochastic", "dpmpp_2m_sde", "euler_maruyama", "pc"}
#: option variants worth a row, applied only if the solver takes that keyword
OUR_VARIANTS: dict[str, list[dict]] = {
    "unipc": [dict(order=o, variant=v) for o in (2, 3) for v in ("bh1", "bh2")],
    "deis": [dict(order=2), dict(order=3), dict(order=4, variable="t"), dict(order=3, variable="t", corrector=True),
             dict(order=4, variable="t", corrector=True)],
    "ipndm": [dict(max_order=3), dict(max_order=4)],
}
RK45_TOLERANCES = (1e-2, 1e-3, 1e-4)


# ----------------------------------------------------------------------------------------------
# the exact model, fast: two GEMMs per call
# ----------------------------------------------------------------------------------------------
class ExactMixture:
    """``E[x0 | x = a x0 + s eps]`` of a :class:`GaussianMixture` at one scalar ``(a, s)`` for the
    whole batch, in float64. The same maths as ``GaussianMixture.posterior_mean`` (checked
    against it at start-up), arranged as two matrix products so the model costs far less
    than the solvers' bookkeeping would otherwise be hidden behind."""

    def __init__(self, mixture: GaussianMixture):
        k, d = mixture.num_components, mixture.dim
        self.mixture = mixture
        self.k, self.d = k, d
        self.means = mixture.means
        self.evals = mixture.evals  # [K, D]
        self.log_w = torch.log(mixture.weights)
        # x @ U_flat = [U_1^T x, ..., U_K^T x]
        self.u_flat = mixture.evecs.permute(1, 0, 2).reshape(d, k * d).contiguous()
        self.u_mu = torch.einsum("kde,kd->ke", mixture.evecs, mixture.means)  # U_k^T mu_k

    def x0(self, x: Tensor, a: float, s: float) -> Tensor:
        x = x.to(torch.float64)
        b = x.shape[0]
        y = (x @ self.u_flat).view(b, self.k, self.d) - a * self.u_mu
        v = a * a * self.evals + s * s
        logits = -0.5 * ((y * y / v).sum(-1) + torch.log(v).sum(-1)) + self.log_w
        r = torch.softmax(logits, -1)
        gain = (a * self.evals / v) * y * r.unsqueeze(-1)
        return r @ self.means + gain.reshape(b, self.k * self.d) @ self.u_flat.T

    def check(self, process) -> float:
        """Largest deviation from the reference implementation at a few noise levels."""
        g = torch.Generator().manual_seed(123)
        worst = 0.0
        for t in (0.002, 0.05, 0.3, 0.9):
            tt = torch.tensor(t, dtype=torch.float64)
            a, s = float(process.alpha(tt)), float(process.sigma(tt))
            x = a * self.mixture.sample(64, generator=g) + s * torch.randn(64, self.d, generator=g, dtype=torch.float64)
            ref = self.mixture.posterior_mean(x, a, s)
            worst = max(worst, float((self.x0(x, a, s) - ref).abs().max()))
        return worst


class ProtocolModel:
    """The exact denoiser in multidiff's model protocol (``process``, ``(x, t[B], space) -> x0``).
    Samplers call it with one time for the whole batch; ``(alpha, sigma)`` are cached per time."""

    def __init__(self, exact: ExactMixture, process):
        self.exact = exact
        self.process = process
        self.calls = 0
        self._cache: dict[float, tuple[float, float]] = {}

    def __call__(self, x: Tensor, t: Tensor, space=None) -> Tensor:
        self.calls += 1
        tv = float(t[0])
        ab = self._cache.get(tv)
        if ab is None:
            tt = torch.tensor(tv, dtype=torch.float64)
            ab = self._cache[tv] = (float(self.process.alpha(tt)), float(self.process.sigma(tt)))
        return self.exact.x0(x, *ab).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# targets, reference endpoints, metrics
# ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    mixture: GaussianMixture
    n: int  # samples per run
    n_ref_sample: int  # independent target draw for the distribution distance
    x_T: Tensor = None
    x_ref: Tensor = None
    x_ref0: Tensor = None
    target_sample: Tensor = None
    sw: SlicedW2 = None
    notes: dict = field(default_factory=dict)


def endpoint_error(x: Tensor, ref: Tensor) -> float:
    return float((x.to(torch.float64) - ref).norm(dim=1).median())


class SlicedW2:
    """:func:`multidiff.testing.sliced_wasserstein` against one fixed target sample, with the
    target's projected quantiles computed once (that sort dominates the cost otherwise). The same
    128 directions serve every row, so rows differ only by their samples."""

    def __init__(self, target_sample: Tensor, n: int, projections: int = 128, seed: int = 7):
        self.target_sample, self.projections, self.seed = target_sample, projections, seed
        dirs = torch.randn(target_sample.shape[1], projections, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        py, _ = torch.sort(target_sample @ self.dirs, dim=0)
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        self.n = n
        self.qy = torch.quantile(py, levels, dim=0) if py.shape[0] != n else py

    def __call__(self, x: Tensor) -> float:
        if x.shape[0] != self.n:
            raise ValueError(f"expected {self.n} samples, got {x.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            return math.inf
        px, _ = torch.sort(x.to(torch.float64) @ self.dirs, dim=0)
        return float(((px - self.qy) ** 2).mean().sqrt())

    def check(self, x: Tensor) -> float:
        """Deviation from the library function on ``x``."""
        lib = sliced_wasserstein(x, self.target_sample, projections=self.projections,
                                 generator=torch.Generator().manual_seed(self.seed))
        return abs(lib - self(x))


def sw_distance(x: Tensor, target: Target) -> float:
    return target.sw(x)


def _pf_ode_endpoint(model, x: Tensor, s_end: float, rtol: float, fine: bool = False) -> tuple[Tensor, int, str]:
    """PF-ODE from the EDM model's ``sigma_max`` to ``s_end``, then the denoising step: with our RK45
    if it exists, else (stand-in) Heun on a fine Karras grid."""
    edm = model.process
    try:
        from multidiff.samplers.rk45 import sample_rk45
    except ImportError:
        grid = make_grid("karras", edm, 4000 if fine else 2000, sigma_min=s_end)
        out = SOLVERS["heun"](model, x, grid)
        return out.x, out.nfe, f"heun, karras grid, {len(grid) - 1} steps"
    out = sample_rk45(model, x, explicit(edm, [edm.sigma_max, s_end, 0.0]), rtol=rtol, atol=rtol)
    return out.x, out.nfe, f"rk45, rtol = atol = {rtol:g}"


def build_reference(target: Target, process: DiscreteVP, exact: ExactMixture, quick: bool) -> None:
    """Exact endpoints from ``x_T``.

    ``x_ref`` (the primary reference): the PF-ODE from ``t = 1`` to the table's first step
    ``t_min = 1/T``, then the denoising step ``x0 = D(x, t_min)``: where every grid of ours and
    diffusers' linspace DDIM / Euler / Heun / Karras schedules end. ``x_ref0``: the same ODE
    solved on to ``sigma = 1e-6`` before denoising (``x(s) - x(0) = O(s^2)``), i.e. the ODE's own
    endpoint at ``sigma = 0``, which a high-order final step into ``sigma = 0`` approaches instead.
    The two differ by ``O(sigma_min^2 / var)`` (reported as the t_min floor).

    The ODE is solved in the EDM variables (``x~ = x / alpha`` against ``s = sigma / alpha``), where the
    trajectory is the same for every process with the same noise levels; there the coefficients
    are smooth, while DDPM's table interpolated in log-SNR has a kink at each of its 1000 steps
    that an adaptive solver must resolve one by one. A subset is cross-checked in full mode
    against RK45 on the discrete process itself."""
    tt = torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    s_max, s_min = process.sigma_edm(tt).tolist()
    a_top = float(process.alpha(tt[:1]))
    model = ProtocolModel(exact, EDM(sigma_min=s_min, sigma_max=s_max))
    rtol = 1e-6 if quick else 1e-9
    x_tilde = target.x_T / a_top
    ref, nfe, how = _pf_ode_endpoint(model, x_tilde.clone(), s_min, rtol)
    check, _, how2 = _pf_ode_endpoint(model, x_tilde.clone(), s_min, rtol * 1e-2, fine=True)
    d = (ref - check).norm(dim=1)
    target.x_ref = ref
    target.x_ref0, _, _ = _pf_ode_endpoint(model, x_tilde.clone(), 1e-6, rtol)
    target.notes["reference"] = how
    target.notes["reference_nfe"] = nfe
    target.notes["reference_self_error"] = (float(d.median()), float(d.max()), how2)
    target.notes["t_min_floor"] = endpoint_error(target.x_ref0, ref)
    if quick:
        return
    try:
        from multidiff.samplers.rk45 import sample_rk45
    except ImportError:
        return
    m = min(64, target.n)
    out = sample_rk45(ProtocolModel(exact, process), target.x_T[:m].clone(),
                      make_grid("uniform", process, 2), rtol=1e-8, atol=1e-8)
    dd = (out.x - ref[:m]).norm(dim=1)
    target.notes["discrete_check"] = (m, out.nfe, float(dd.median()), float(dd.max()))


# ----------------------------------------------------------------------------------------------
# our solvers
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    side: str  # "ours" | "diffusers"
    method: str  # solver (+options) or scheduler (+options)
    grid: str  # our grid or diffusers' spacing
    stochastic: bool = False
    cells: dict = field(default_factory=dict)  # nfe budget -> (actual nfe, endpoint err, sw)
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.method} / {self.grid}"


def _accepts(fn: Callable, key: str) -> bool:
    return key in inspect.signature(fn).parameters


def our_configs() -> list[tuple[str, dict]]:
    out = []
    for name in sorted(SOLVERS):
        if name == "rk45":
            continue
        fn = SOLVERS[name]
        variants = [v for v in OUR_VARIANTS.get(name, []) if all(_accepts(fn, k) for k in v)]
        for opts in variants or [{}]:
            out.append((name, opts))
    return out


def _opts_label(name: str, opts: dict) -> str:
    if not opts:
        return name
    return name + "(" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")"


def steps_for(name: str, nfe: int, opts: dict) -> int:
    if _steps_for_nfe is not None:
        try:
            return _steps_for_nfe(name, nfe, **opts)
        except (ValueError, TypeError):
            pass
    return (nfe + 1) // 2 if name in ("heun", "edm_stochastic") else nfe


def run_ours(name: str, opts: dict, grid: str, nfe: int, model: ProtocolModel, x_T: Tensor,
             generator_seed: int = 0) -> tuple[Tensor, int]:
    """Run a solver within an NFE budget; if the budget rule under-counts, shrink the step count."""
    fn = SOLVERS[name]
    steps = steps_for(name, nfe, opts)
    while steps >= 1:
        ts = make_grid(grid, model.process, steps)
        g = torch.Generator().manual_seed(generator_seed)
        model.calls = 0
        out = fn(model, x_T.clone(), ts, DenseSpace.like(x_T), g, **opts)
        if model.calls != out.nfe:
            warnings.warn(f"{name}: reported nfe={out.nfe} but the model was called {model.calls} times", stacklevel=2)
        if model.calls <= nfe:
            return out.x, model.calls
        steps -= 1
    raise RuntimeError(f"{name} cannot run within {nfe} evaluations")


def default_solver() -> tuple[str, str] | None:
    """``(solver, grid)`` that ``multidiff.sample`` uses when given neither."""
    sample = getattr(multidiff, "sample", None)
    if sample is None:
        return None
    solver = inspect.signature(sample).parameters["solver"].default
    if solver not in SOLVERS:
        return None
    from multidiff.sampling import default_grid

    return solver, default_grid(solver, DiscreteVP.from_schedule("linear", T_TRAIN))


def is_stochastic(name: str, opts: dict, model: ProtocolModel, x_T: Tensor) -> bool:
    if name in KNOWN_STOCHASTIC:
        return True
    x = x_T[:8]
    a, _ = run_ours(name, opts, "uniform", 6, model, x, generator_seed=1)
    b, _ = run_ours(name, opts, "uniform", 6, model, x, generator_seed=2)
    return not torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# diffusers' schedulers
# ----------------------------------------------------------------------------------------------
TABLE = dict(num_train_timesteps=T_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@dataclass
class DiffusersSpec:
    """One scheduler configuration on one spacing.

    ``kind``: ``"ddim"`` (noise level = ``alphas_cumprod[timestep]``), ``"sigma"`` (noise level =
    ``sigmas[j]`` at the j-th call, EDM scaling ``sigma = sqrt((1 - ab) / ab)``) or ``"ipndm"``
    (``alphas[j]``, ``betas[j]`` of IPNDMScheduler, which takes a v-prediction)."""

    cls: str
    method: str
    spacing: str  # linspace | trailing | karras
    kind: str = "sigma"
    kwargs: dict = field(default_factory=dict)
    heun: bool = False
    x0_out: bool = False  # return the last call's x0 prediction instead of the last step's output

    def steps(self, nfe: int) -> int:
        return (nfe + 1) // 2 if self.heun else nfe

    def build(self, steps: int):
        import diffusers

        spacing = dict(use_karras_sigmas=True) if self.spacing == "karras" else dict(timestep_spacing=self.spacing)
        if self.kind == "ipndm":
            # IPNDMScheduler has its own cosine-like schedule from alpha = 0 (infinite noise), with
            # no option to start at the top of a trained table; its `trained_betas` hook takes the
            # sigma of each inference step (plus the final 0), so it is given the same sigmas as
            # EulerDiscreteScheduler with this spacing (VP scaling: sigma_vp = s / sqrt(1 + s^2)).
            ref = diffusers.EulerDiscreteScheduler(**TABLE, **spacing)
            ref.set_timesteps(steps)
            s = ref.sigmas.to(torch.float64)
            sig_vp = (s / torch.sqrt(1 + s * s)).tolist()
            sch = diffusers.IPNDMScheduler(num_train_timesteps=T_TRAIN, trained_betas=sig_vp)
            sch.set_timesteps(steps)
            return sch
        if self.kind == "ddim":
            sch = diffusers.DDIMScheduler(**TABLE, clip_sample=False, set_alpha_to_one=True, **spacing)
        else:
            sch = getattr(diffusers, self.cls)(**TABLE, **self.kwargs, **spacing)
        sch.set_timesteps(steps)
        return sch


def diffusers_specs() -> list[DiffusersSpec]:
    three = ("linspace", "trailing", "karras")
    specs = [DiffusersSpec("DDIMScheduler", "DDIM", sp, kind="ddim") for sp in ("linspace", "trailing")]
    specs += [DiffusersSpec("EulerDiscreteScheduler", "Euler", sp) for sp in three]
    specs += [DiffusersSpec("HeunDiscreteScheduler", "Heun", sp, heun=True) for sp in three]
    for order in (2, 3):
        kw = dict(solver_order=order, algorithm_type="dpmsolver++", lower_order_final=True, final_sigmas_type="zero")
        specs += [DiffusersSpec("DPMSolverMultistepScheduler", f"DPMSolverMultistep {order}M", sp, kwargs=kw) for sp in three]
    for order in (2, 3):
        for st in ("bh1", "bh2"):
            # bh1 with final_sigmas_type="zero" returns NaN/inf in diffusers (B(h) = h is infinite on the
            # step into sigma = 0), so bh1 stops at the table's sigma_min instead, as DEIS does
            final = "zero" if st == "bh2" else "sigma_min"
            kw = dict(solver_order=order, solver_type=st, lower_order_final=True, final_sigmas_type=final)
            specs += [DiffusersSpec("UniPCMultistepScheduler", f"UniPC(order={order}, {st})", sp, kwargs=kw) for sp in three]
    for order in (2, 3):
        kw = dict(solver_order=order, lower_order_final=True)
        specs += [DiffusersSpec("DEISMultistepScheduler", f"DEIS(order={order})", sp, kwargs=kw) for sp in three]
        # DEIS ends at sigma_min, and with Karras sigmas its last step is sigma_min -> sigma_min:
        # also score the x0 prediction of that last call (free: no extra evaluation)
        specs.append(DiffusersSpec("DEISMultistepScheduler", f"DEIS(order={order}) +x0 out", "karras", kwargs=kw, x0_out=True))
    specs += [DiffusersSpec("IPNDMScheduler", "IPNDM", sp, kind="ipndm") for sp in three]
    return specs


def run_diffusers(spec: DiffusersSpec, nfe: int, exact: ExactMixture, x_T: Tensor, dtype: torch.dtype,
                  null_output: Tensor | None = None, scheduler=None) -> tuple[Tensor, int]:
    """The standard diffusers loop (scale_model_input, model, step) with a call-counting model.
    ``null_output``: return this tensor instead of evaluating the mixture (overhead timing);
    ``scheduler``: reuse this one (built by ``spec.build``) and only call its ``set_timesteps``,
    as a pipeline does on every call."""
    if scheduler is None:
        sch = spec.build(spec.steps(nfe))
    else:
        sch = scheduler
        sch.set_timesteps(spec.steps(nfe))
    x = x_T.to(dtype) * float(getattr(sch, "init_noise_sigma", 1.0))
    calls = 0
    x0 = None
    sig = sch.sigmas.tolist() if spec.kind == "sigma" else None
    for j, t in enumerate(sch.timesteps):
        x_in = sch.scale_model_input(x, t)
        calls += 1
        if null_output is not None:
            out = null_output
        else:
            if spec.kind == "ddim":
                ab = float(sch.alphas_cumprod[int(t)])
                a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
            elif spec.kind == "sigma":
                a = 1.0 / math.sqrt(1.0 + sig[j] ** 2)
                s = sig[j] * a
            else:
                a, s = float(sch.alphas[j]), float(sch.betas[j])
            x0 = exact.x0(x_in, a, s)
            eps = (x_in.to(torch.float64) - a * x0) / s
            out = (a * eps - s * x0) if spec.kind == "ipndm" else eps
            out = out.to(dtype)
        x = sch.step(out, t, x).prev_sample
    if spec.x0_out and x0 is not None:
        x = x0.to(dtype)
    return x, calls


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
def make_targets(quick: bool) -> list[Target]:
    g = torch.Generator().manual_seed(2024)
    ring = Target("2-D ring (8 components)", GaussianMixture.ring(), 200 if quick else 2000, 4000 if quick else 20000)
    gmm = Target("64-D mixture (8 components)", GaussianMixture.random(64, components=8, seed=0),
                 100 if quick else 1000, 3000 if quick else 10000)
    for tg in (ring, gmm):
        tg.x_T = torch.randn(tg.n, tg.mixture.dim, generator=g, dtype=torch.float64)
        tg.target_sample = tg.mixture.sample(tg.n_ref_sample, generator=g)
        tg.sw = SlicedW2(tg.target_sample, tg.n)
    return [ring, gmm]


def bench_target(tg: Target, process: DiscreteVP, nfes: tuple[int, ...], quick: bool) -> tuple[list[Row], list[tuple]]:
    exact = ExactMixture(tg.mixture)
    dev = exact.check(process)
    if dev > 1e-9:
        raise AssertionError(f"fast exact denoiser deviates from GaussianMixture.posterior_mean by {dev:.3g}")
    dev = tg.sw.check(tg.x_T[:, :])
    if dev > 1e-12:
        raise AssertionError(f"cached sliced W2 deviates from multidiff.testing.sliced_wasserstein by {dev:.3g}")
    build_reference(tg, process, exact, quick)
    tg.notes["reference_sw"] = sw_distance(tg.x_ref, tg)
    model = ProtocolModel(exact, process)

    rows: list[Row] = []
    jobs = []
    default = default_solver()
    if default is not None:
        rows.append(Row("ours", f"default: {default[0]}", default[1], default[0] in KNOWN_STOCHASTIC))
        jobs.append(("default", rows[-1], None))
    for name, opts in our_configs():
        stoch = is_stochastic(name, opts, model, tg.x_T)
        for grid in GRIDS:
            rows.append(Row("ours", _opts_label(name, opts), grid, stoch))
            jobs.append(("ours", rows[-1], (name, opts, grid)))
    for spec in diffusers_specs():
        rows.append(Row("diffusers", spec.method, spec.spacing))
        jobs.append(("diffusers", rows[-1], spec))

    bar = tqdm(total=len(jobs) * len(nfes), desc=tg.name, leave=False, file=sys.stderr)
    for side, row, job in jobs:
        for nfe in nfes:
            try:
                if side == "ours":
                    name, opts, grid = job
                    x, used = run_ours(name, opts, grid, nfe, model, tg.x_T)
                elif side == "default":
                    model.calls = 0
                    x = multidiff.sample(model, DenseSpace.like(tg.x_T), nfe=nfe, x_T=tg.x_T.clone(),
                                         generator=torch.Generator().manual_seed(0)).x
                    used = model.calls
                else:
                    x, used = run_diffusers(job, nfe, exact, tg.x_T, torch.float64)
                err = math.nan if row.stochastic else endpoint_error(x, tg.x_ref)
                err0 = math.nan if row.stochastic else endpoint_error(x, tg.x_ref0)
                if not bool(torch.isfinite(x).all()):
                    err = err0 = math.inf
                row.cells[nfe] = (used, err, sw_distance(x, tg), err0)
            except Exception as e:  # a failing configuration is reported, not fatal
                row.cells[nfe] = None
                row.note = f"{type(e).__name__}: {str(e)[:80]}"
            bar.update(1)
    bar.close()

    rk_rows = []
    if "rk45" in SOLVERS:
        for tol in RK45_TOLERANCES:
            model.calls = 0
            out = SOLVERS["rk45"](model, tg.x_T.clone(), make_grid("uniform", process, 2), rtol=tol, atol=tol)
            rk_rows.append((tol, out.nfe, endpoint_error(out.x, tg.x_ref), sw_distance(out.x, tg)))
    return rows, rk_rows


# ----------------------------------------------------------------------------------------------
# overhead outside the model
# ----------------------------------------------------------------------------------------------
class NullModel:
    """A model that costs nothing: returns one preallocated tensor."""

    def __init__(self, process, out: Tensor):
        self.process = process
        self.out = out

    def __call__(self, x, t, space=None):
        return self.out


OVERHEAD_PAIRS = [
    ("ddim", {}, "DDIM", "linspace"),
    ("euler", {}, "Euler", "linspace"),
    ("heun", {}, "Heun", "linspace"),
    ("dpmpp_2m", {}, "DPMSolverMultistep 2M", "linspace"),
    ("dpmpp_3m", {}, "DPMSolverMultistep 3M", "linspace"),
    ("unipc", {}, "UniPC(order=2, bh2)", "linspace"),
    ("deis", {}, "DEIS(order=3)", "linspace"),
    ("ipndm", dict(max_order=4), "IPNDM", "linspace"),  # diffusers' IPNDM keeps 4 derivatives
]


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _ours_timed(fn, model, process, x_T: Tensor, steps: int, opts: dict):
    """One of our sampling calls as users make it: build the grid, then sample."""

    def run(check: bool = True):
        return fn(model, x_T, make_grid("uniform", process, steps), None, None, check_finite=check, **opts)

    return run


def time_overhead(dtype: torch.dtype, nfe: int = 20, batch: int = 1000, dim: int = 64, repeats: int = 7) -> list[tuple]:
    """Wall time of a whole sampling call (grid / set_timesteps included) with a free model, per step."""
    process = DiscreteVP.from_schedule("linear", T_TRAIN)
    x_T = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    const = 0.1 * torch.randn(batch, dim, generator=torch.Generator().manual_seed(1), dtype=dtype)
    specs = {(s.method, s.spacing): s for s in diffusers_specs()}
    rows = []
    for name, opts, method, spacing in OVERHEAD_PAIRS:
        if name not in SOLVERS:
            continue
        spec = specs[(method, spacing)]
        steps_o = steps_for(name, nfe, opts)
        steps_d = spec.steps(nfe)
        ours_run = _ours_timed(SOLVERS[name], NullModel(process, const), process, x_T, steps_o, opts)
        scheduler = spec.build(steps_d)  # built once, outside the clock; set_timesteps is timed

        def theirs_run(spec=spec, scheduler=scheduler):
            return run_diffusers(spec, nfe, None, x_T, dtype, null_output=const, scheduler=scheduler)

        t_o, t_n, t_d = [], [], []
        try:
            ours_run(), ours_run(False), theirs_run()  # warm-up
            for _ in range(repeats):  # interleaved, so background load hits all alike
                t_o.append(_seconds(ours_run))
                t_n.append(_seconds(ours_run, False))
                t_d.append(_seconds(theirs_run))
        except Exception as e:
            note = f"{type(e).__name__}: {str(e)[:60]}"
            rows.append((name, method, steps_o, steps_d, math.nan, math.nan, math.nan, note))
            continue
        # the minimum over repeats: the machine is shared, and load only ever adds time
        rows.append((name, method, steps_o, steps_d, min(t_o) / steps_o * 1e6, min(t_n) / steps_o * 1e6,
                     min(t_d) / steps_d * 1e6, ""))
    return rows


def time_model(batch: int = 1000, dim: int = 64, repeats: int = 20) -> float:
    mix = GaussianMixture.random(dim, components=8, seed=0)
    exact = ExactMixture(mix)
    x = torch.randn(batch, dim, dtype=torch.float64)
    exact.x0(x, 0.5, 0.8)
    t0 = time.perf_counter()
    for _ in range(repeats):
        exact.x0(x, 0.5, 0.8)
    return (time.perf_counter() - t0) / repeats * 1e6


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if math.isinf(v):
        return "inf"
    return f"{v:.2e}" if v < 0.01 else f"{v:.3f}"


def _best(rows: list[Row], side: str, nfe: int, col: int = 1):
    """The deterministic row of ``side`` with the smallest error (column ``col`` of a cell) at ``nfe``."""
    cands = [r for r in rows if r.side == side and r.cells.get(nfe) and not r.stochastic]
    cands = [r for r in cands if math.isfinite(r.cells[nfe][col])]
    return min(cands, key=lambda r: r.cells[nfe][col]) if cands else None


def render_notes(tg: Target) -> str:
    n = tg.notes
    out = [
        f"{tg.n} samples. Reference: {n['reference']} ({n['reference_nfe']} evaluations); its own error "
        f"(against {n['reference_self_error'][2]}): median {n['reference_self_error'][0]:.1e}, "
        f"max {n['reference_self_error'][1]:.1e}. Sliced W2 of the reference endpoints themselves "
        f"(the sampling floor of that column): {n['reference_sw']:.3f}."
    ]
    out.append(f"t_min floor: median distance between the reference (denoised at t_min) and the same ODE "
               f"solved on to sigma = 0: {n['t_min_floor']:.1e}.")
    if "discrete_check" in n:
        m, nfe_c, med, mx = n["discrete_check"]
        out.append(f"Cross-check: RK45 (rtol 1e-8) on the discrete process itself, {m} samples, {nfe_c} "
                   f"evaluations: median {med:.1e}, max {mx:.1e} from the reference.")
    return " ".join(out)


def render_full(tg: Target, rows: list[Row], nfes: tuple[int, ...]) -> str:
    out = [f"#### {tg.name}: every row", "",
           "Cells: median endpoint error against the primary reference (in brackets: against the ODE's "
           "endpoint at sigma = 0) / sliced W2 to the target; `[n]` = evaluations actually spent when "
           "fewer than the budget; stochastic solvers: distribution distance only. **Bold**: best of each side.", "",
           "| side | solver / grid | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
           "|---|---|" + "---|" * len(nfes)]
    best = {(side, k): _best(rows, side, k) for side in ("ours", "diffusers") for k in nfes}
    for r in rows:
        cells = []
        for k in nfes:
            c = r.cells.get(k)
            if c is None:
                cells.append("fail")
                continue
            used, err, sw, err0 = c
            e = _fmt(err)
            if best[(r.side, k)] is r:
                e = f"**{e}**"
            extra = f" [{used}]" if used != k else ""
            cells.append(f"{e} ({_fmt(err0)}) / {_fmt(sw)}{extra}" if not r.stochastic else f"— / {_fmt(sw)}{extra}")
        note = f" ({r.note})" if r.note else ""
        out.append(f"| {r.side} | {r.label}{' (stochastic)' if r.stochastic else ''}{note} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_rk45(rk_rows: list[tuple]) -> str:
    if not rk_rows:
        return ""
    out = ["Adaptive RK45 (ours) on the discrete process, grid `[1, t_min, 0]`, by tolerance (rtol = atol):", "",
           "| tolerance | NFE | endpoint error | SW |", "|---|---|---|---|"]
    out += [f"| {tol:g} | {nfe} | {_fmt(err)} | {_fmt(sw)} |" for tol, nfe, err, sw in rk_rows]
    return "\n".join(out)


def render_compact(tg: Target, rows: list[Row], nfes: tuple[int, ...]) -> str:
    """One row per solver (with options) or scheduler: its best grid / spacing at each NFE."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.side, r.method), []).append(r)
    out = [f"#### {tg.name}: best grid per solver", "",
           "Median endpoint error (stochastic solvers: sliced W2, marked SW) on the best grid at each NFE, "
           f"grid in brackets. Sampling floor of SW: {tg.notes['reference_sw']:.3f}.", "",
           "| side | solver | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    best = {(side, k): _best(rows, side, k) for side in ("ours", "diffusers") for k in nfes}
    for (side, method), rs in groups.items():
        cells = []
        for k in nfes:
            ok = [r for r in rs if r.cells.get(k)]
            if not ok:
                cells.append("fail")
                continue
            col = 2 if rs[0].stochastic else 1
            r = min(ok, key=lambda r: r.cells[k][col] if math.isfinite(r.cells[k][col]) else math.inf)
            v = _fmt(r.cells[k][col])
            if best[(side, k)] is r:
                v = f"**{v}**"
            used = r.cells[k][0]
            cells.append(f"{v} ({r.grid}{', ' + str(used) + ' NFE' if used != k else ''})" + (" SW" if col == 2 else ""))
        out.append(f"| {side} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_summary(rows: list[Row], nfes: tuple[int, ...], col: int = 1) -> str:
    """Best of each side per NFE, the ratio and the verdict on the 0.8x target, against the primary
    reference (``col = 1``) or the ODE's endpoint at ``sigma = 0`` (``col = 3``)."""
    best = {(side, k): _best(rows, side, k, col) for side in ("ours", "diffusers") for k in nfes}
    default = next((r for r in rows if r.method.startswith("default: ")), None)
    what = ("the primary reference (ODE to t_min, then denoised)" if col == 1
            else "the ODE's own endpoint at sigma = 0")
    out = [f"Best per NFE against {what}; deterministic solvers, median endpoint error; the target applies "
           f"at NFE ≤ {TARGET_NFE}:", "",
           "| NFE | ours: best | error | diffusers: best | error | ratio | ≤ 0.8 |"
           + (f" `multidiff.sample()` default ({default.method[9:]} / {default.grid}) | ratio |" if default else ""),
           "|---|---|---|---|---|---|---|" + ("---|---|" if default else "")]
    for k in nfes:
        o, d = best[("ours", k)], best[("diffusers", k)]
        if o is None or d is None:
            continue
        ref = d.cells[k][col]
        ratio = o.cells[k][col] / ref
        verdict = ("yes" if ratio <= RATIO_TARGET else "**no**") if k <= TARGET_NFE else "(n/a)"
        line = f"| {k} | {o.label} | {_fmt(o.cells[k][col])} | {d.label} | {_fmt(ref)} | {ratio:.2f} | {verdict} |"
        if default:
            c = default.cells.get(k)
            line += f" {_fmt(c[col])} | {c[col] / ref:.2f} |" if c and not default.stochastic else " — | — |"
        out.append(line)
    return "\n".join(out)


def render_choice(per_target: list[tuple[Target, list[Row]]], nfes: tuple[int, ...]) -> str:
    """Which grid, and which solver + grid, do best over both targets at every NFE <= TARGET_NFE.

    Score of a deterministic row: the geometric mean over targets and NFE of its error divided by
    diffusers' best error there (so each target and NFE weighs the same); its worst ratio too."""
    ks = [k for k in nfes if k <= TARGET_NFE]
    scores: dict[tuple[str, str], list[float]] = {}
    for _, rows in per_target:
        for k in ks:
            d = _best(rows, "diffusers", k)
            if d is None:
                continue
            for r in rows:
                if r.side != "ours" or r.stochastic or r.method.startswith("default: ") or not r.cells.get(k):
                    continue
                e = r.cells[k][1]
                ratio = e / d.cells[k][1] if math.isfinite(e) else math.inf
                scores.setdefault((r.method, r.grid), []).append(ratio)
    full = {key: v for key, v in scores.items() if len(v) == len(ks) * len(per_target)}
    if not full:
        return ""

    def gmean(v):
        return math.exp(sum(math.log(max(x, 1e-300)) for x in v) / len(v)) if all(map(math.isfinite, v)) else math.inf

    out = ["### Choosing the defaults", "",
           f"Score: geometric mean over both targets and NFE {', '.join(map(str, ks))} of the endpoint error "
           "divided by diffusers' best there (lower is better; the target is every single ratio ≤ 0.8).", "",
           "Best grid per solver:", "", "| solver | best grid | score | worst ratio | other grids |",
           "|---|---|---|---|---|"]
    for name in sorted({m for m, _ in full}):
        cand = sorted((gmean(v), g, max(v)) for (m, g), v in full.items() if m == name)
        sc, g, worst = cand[0]
        others = ", ".join(f"{gg} {ss:.2f}" for ss, gg, _ in cand[1:])
        out.append(f"| {name} | {g} | {sc:.2f} | {max(full[(name, g)]):.2f} | {others} |")
    ranked = sorted((gmean(v), max(v), m, g) for (m, g), v in full.items())
    out += ["", "Best solver + grid overall (any options):", "", "| rank | solver / grid | score | worst ratio | ratios |",
            "|---|---|---|---|---|"]
    for i, (sc, worst, m, g) in enumerate(ranked[:8]):
        out.append(f"| {i + 1} | {m} / {g} | {sc:.2f} | {worst:.2f} | {', '.join(f'{x:.2f}' for x in full[(m, g)])} |")
    out.append("")
    out.append("(ratios listed target by target, NFE ascending.)")
    return "\n".join(out)


def render_overhead(rows32, rows64, model_us: float) -> str:
    out = ["### Time per step outside the model", "",
           "Batch 1000 x 64, NFE budget 20, one whole sampling call (our grid + sampler; diffusers' "
           "`set_timesteps` + loop, the scheduler object built beforehand) with a model that returns a "
           "preallocated tensor; the fastest of "
           "interleaved repeats, divided by each side's step count. `ours` is the default "
           "(`check_finite=True`: every model output is checked for NaN/inf), `no check` is "
           "`check_finite=False`; diffusers does not check. For scale: one call of the exact 64-D mixture "
           f"denoiser costs {model_us:.0f} µs (float64).", "",
           "| ours | diffusers | steps ours / theirs | fp32 ours | fp32 no check | fp32 diffusers "
           "| fp64 ours | fp64 no check | fp64 diffusers |",
           "|---|---|---|---|---|---|---|---|---|"]
    by64 = {r[0]: r for r in rows64}
    for r in rows32:
        r64 = by64.get(r[0], (None,) + (math.nan,) * 6 + ("",))
        note = f" ({r[7] or r64[7]})" if (r[7] or r64[7]) else ""
        out.append(f"| {r[0]} | {r[1]}{note} | {r[2]} / {r[3]} | {r[4]:.0f} µs | {r[5]:.0f} µs | {r[6]:.0f} µs "
                   f"| {r64[4]:.0f} µs | {r64[5]:.0f} µs | {r64[6]:.0f} µs |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# --sweep: where the grids should end (t_min), for the strongest multistep solvers
# ----------------------------------------------------------------------------------------------
SWEEP_SOLVERS = [("ipndm", dict(max_order=3)), ("ipndm", dict(max_order=4)), ("deis", dict(order=3)),
                 ("unipc", dict(order=3, variant="bh2")), ("dpmpp_2m", {}), ("dpmpp_3m", {})]
SWEEP_T_MIN = (1e-3, 3e-3, 1e-2, "1/steps")
SWEEP_NFES = (10, 20)


def sweep_grid(name: str, process, steps: int, t_min) -> Tensor:
    """Our grid ``name`` ending at ``t_min`` (``"1/steps"``: uniform in t, that is diffusers' "trailing")."""
    t_min = 1.0 / steps if t_min == "1/steps" else t_min
    if name == "karras":
        sig = float(process.sigma_edm(torch.tensor(t_min, dtype=torch.float64)))
        return make_grid("karras", process, steps, sigma_min=sig)
    return make_grid(name, process, steps, t_min=t_min)


def run_sweep(process) -> str:
    out = ["### Where the grid ends: t_min sweep", "",
           "Median endpoint error (primary reference) with our grids ending at other t_min before the "
           "denoising step (default: the table's first step 1/1000). `1/steps` on the uniform grid is "
           "diffusers' \"trailing\" spacing. Last row: diffusers' best at that NFE (any scheduler and spacing).", ""]
    targets = make_targets(False)
    cols = [(tg, k) for tg in targets for k in SWEEP_NFES]
    out.append("| solver | grid | t_min | " + " | ".join(f"{tg.name.split(' (')[0]}, NFE {k}" for tg, k in cols) + " |")
    out.append("|---|---|---|" + "---|" * len(cols))
    results: dict[tuple, list[float]] = {}
    best_d: list[float] = []
    for tg in targets:
        exact = ExactMixture(tg.mixture)
        build_reference(tg, process, exact, quick=False)
        model = ProtocolModel(exact, process)
        jobs = [(n, o, g, tm) for n, o in SWEEP_SOLVERS if n in SOLVERS for g in GRIDS for tm in SWEEP_T_MIN]
        for k in SWEEP_NFES:
            errs = []
            for spec in diffusers_specs():
                try:
                    errs.append(endpoint_error(run_diffusers(spec, k, exact, tg.x_T, torch.float64)[0], tg.x_ref))
                except Exception as e:  # a failing configuration just has no say in "best"
                    warnings.warn(f"{spec.method} / {spec.spacing} failed at NFE {k}: {type(e).__name__}: {e}", stacklevel=2)
            best_d.append(min(e for e in errs if math.isfinite(e)))
        for name, opts, grid, tm in tqdm(jobs, desc=f"sweep {tg.name}", leave=False, file=sys.stderr):
            for k in SWEEP_NFES:
                ts = sweep_grid(grid, process, steps_for(name, k, opts), tm)
                x = SOLVERS[name](model, tg.x_T.clone(), ts, None, None, **opts).x
                results.setdefault((_opts_label(name, opts), grid, tm), []).append(endpoint_error(x, tg.x_ref))
    for (label, grid, tm), errs in results.items():
        cells = [f"**{_fmt(e)}**" if e <= RATIO_TARGET * d else _fmt(e) for e, d in zip(errs, best_d, strict=True)]
        out.append(f"| {label} | {grid} | {tm} | " + " | ".join(cells) + " |")
    out.append("| diffusers: best | | | " + " | ".join(_fmt(d) for d in best_d) + " |")
    out += ["", "**Bold**: ≤ 0.8 × diffusers' best."]
    return "\n".join(out)


README_START = "<!-- results:start (written by benchmarks/samplers.py) -->"
README_END = "<!-- results:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few samples, NFE 5 and 10 only (smoke check, < 1 min)")
    ap.add_argument("--out", type=Path, default=None,
                    help="markdown output (default: benchmarks/results_samplers.md for a full run; none for --quick)")
    ap.add_argument("--no-readme", action="store_true", help="do not update the results block of benchmarks/README.md")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--no-timing", action="store_true", help="skip the per-step overhead measurement")
    ap.add_argument("--sweep", action="store_true",
                    help="only the t_min sweep of the strongest multistep solvers (NFE 10 and 20, ~2 min)")
    args = ap.parse_args(argv)

    import diffusers

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    nfes = NFES_QUICK if args.quick else NFES_FULL
    process = DiscreteVP.from_schedule("linear", T_TRAIN)
    t_start = time.time()
    if args.sweep:
        text = run_sweep(process)
        print(text)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return 0

    short, full, per_target = [], [], []
    for tg in make_targets(args.quick):
        rows, rk_rows = bench_target(tg, process, nfes, args.quick)
        per_target.append((tg, rows))
        parts = [f"### {tg.name}", render_notes(tg), render_compact(tg, rows, nfes), render_rk45(rk_rows),
                 render_summary(rows, nfes), render_summary(rows, nfes, col=3)]
        short.append("\n\n".join(p for p in parts if p))
        full.append(render_full(tg, rows, nfes))
        print(short[-1] + "\n", flush=True)
    choice = render_choice(per_target, nfes)
    if choice:
        short.append(choice)
        print(choice + "\n", flush=True)
    if not args.no_timing:
        reps = 3 if args.quick else 15
        rows32 = time_overhead(torch.float32, repeats=reps)
        rows64 = time_overhead(torch.float64, repeats=reps)
        short.append(render_overhead(rows32, rows64, time_model()))
        print(short[-1] + "\n", flush=True)

    cmd = "python benchmarks/samplers.py" + (" --quick" if args.quick else "")
    header = (
        f"Command: `{cmd}` ({time.time() - t_start:.0f} s wall). multidiff {multidiff.__version__}, "
        f"diffusers {diffusers.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{args.threads} torch thread(s). Our registered solvers: {', '.join(sorted(SOLVERS))}."
    )
    body = header + "\n\n" + "\n\n".join(short) + "\n"
    out = args.out if args.out is not None else (None if args.quick else HERE / "results_samplers.md")
    if out is not None:
        out.write_text("## Sampler benchmark: results\n\n" + body + "\n## Every row\n\n" + "\n\n".join(full) + "\n")
        print(f"written to {out}")
    readme = HERE / "README.md"
    if not args.quick and not args.no_readme and readme.exists():
        text = readme.read_text()
        if README_START in text and README_END in text:
            head, rest = text.split(README_START, 1)
            _, tail = rest.split(README_END, 1)
            readme.write_text(head + README_START + "\n" + body + README_END + tail)
            print(f"results block of {readme} updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
