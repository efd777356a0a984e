"""The ``multidiff`` command.

``multidiff list`` prints the processes, predictions, solvers and time grids;
``multidiff demo`` runs :mod:`multidiff.demo`.
"""
from __future__ import annotations

import argparse
import sys

from .prediction import PREDICTIONS
from .process import PROCESSES
from .samplers import SOLVERS
from .schedules import GRIDS


def _list(_args) -> int:
    print("processes:   " + ", ".join(sorted(PROCESSES)))
    print("predictions: " + ", ".join(PREDICTIONS))
    print("solvers:     " + ", ".join(sorted(SOLVERS)))
    print("time grids:  " + ", ".join(sorted(GRIDS)))
    return 0


def _demo(args) -> int:
    from . import demo

    demo.main(["--out", str(args.out), "-n", str(args.n)])
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="multidiff", description="Multi-modal diffusion toolkit.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", help="list processes, predictions, solvers and time grids")
    p.set_defaults(func=_list)
    p = sub.add_parser("demo", help="sample an analytic 2-D target with several solvers and write a picture")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("-n", type=int, default=2000, help="samples per solver")
    p.set_defaults(func=_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
