"""Rebuild the committed QM9 test fixture (needs ``qm9pack``):

    python -m multidiff.modalities.molecules.make_fixture [--n 300] [--seed 1] [--out PATH]

It draws ``n`` molecules from all 130,831 with ``numpy.random.RandomState(seed).choice`` (no
replacement, kept in QM9 index order) and writes them, with their EDM split/half labels, to
``tests/modalities/molecules/fixtures/qm9_300.safetensors``.
"""
from __future__ import annotations

import argparse

from .qm9 import FIXTURE_PATH, load_qm9, make_fixture


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(FIXTURE_PATH))
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    sub = make_fixture(load_qm9(args.cache_dir), args.out, n=args.n, seed=args.seed)
    print(f"wrote {len(sub)} molecules ({int(sub.num_atoms.sum())} atoms) to {args.out}")


if __name__ == "__main__":
    main()
