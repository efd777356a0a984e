"""Demo: sample an analytic 2-D target with several solvers and write a picture.

``python -m multidiff.demo --out out/demo`` samples the 8-component ring mixture through its
exact denoiser with each solver at a few NFE budgets, prints the sliced Wasserstein
distance of each sample set to the target, and writes ``samplers.png`` (one panel per
solver and budget) and ``results.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .process import VP
from .samplers import SOLVERS
from .sampling import sample
from .space import DenseSpace
from .testing import GaussianMixture, sliced_wasserstein

DEMO_SOLVERS = ("ddim", "ancestral", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis", "pc")


def run(out: Path, n: int = 2000, budgets=(5, 10, 20), seed: int = 0) -> dict:
    from tqdm import tqdm

    target = GaussianMixture.ring()
    model = target.denoiser(VP.linear())
    reference = target.sample(20000, torch.Generator().manual_seed(seed + 1))
    space = DenseSpace((n, 2), dtype=torch.float64)
    solvers = [s for s in DEMO_SOLVERS if s in SOLVERS]
    results: dict[str, dict[int, dict]] = {}
    samples: dict[tuple[str, int], torch.Tensor] = {}
    for name in tqdm(solvers, desc="solvers"):
        results[name] = {}
        for nfe in budgets:
            g = torch.Generator().manual_seed(seed)
            try:
                res = sample(model, space, solver=name, nfe=nfe, generator=g)
            except ValueError as err:  # a budget too small for the solver
                results[name][nfe] = {"error": str(err)}
                continue
            sw = sliced_wasserstein(res.x, reference, generator=torch.Generator().manual_seed(2))
            results[name][nfe] = {"nfe": res.nfe, "sliced_w2": sw}
            samples[(name, nfe)] = res.x
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _picture(out / "samplers.png", solvers, budgets, samples, reference, results)
    return results


def _picture(path: Path, solvers, budgets, samples, reference, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(budgets), len(solvers) + 1, figsize=(2.2 * (len(solvers) + 1), 2.3 * len(budgets)),
                             squeeze=False)
    for r, nfe in enumerate(budgets):
        ax = axes[r][0]
        ax.scatter(reference[:2000, 0], reference[:2000, 1], s=1, c="k", alpha=0.4)
        ax.set_title("target" if r == 0 else "", fontsize=9)
        ax.set_ylabel(f"NFE {nfe}")
        for c, name in enumerate(solvers, start=1):
            ax = axes[r][c]
            x = samples.get((name, nfe))
            if x is not None:
                ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
                info = results[name][nfe]
                ax.set_title(f"{name}\nSW2 {info['sliced_w2']:.3f}", fontsize=8)
            else:
                ax.set_title(f"{name}\n(n/a)", fontsize=8)
    for ax in axes.flat:
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    ap.add_argument("-n", type=int, default=2000, help="samples per solver (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    results = run(args.out, n=args.n, seed=args.seed)
    print(f"{'solver':<12}" + "".join(f"  NFE {b:<3} SW2" for b in (5, 10, 20)))
    for name, row in results.items():
        cells = "".join(
            f"  {row[b]['sliced_w2']:>11.4f}" if "sliced_w2" in row.get(b, {}) else f"  {'n/a':>11}" for b in (5, 10, 20)
        )
        print(f"{name:<12}{cells}")
    print(f"picture: {args.out / 'samplers.png'}")


if __name__ == "__main__":
    main()
