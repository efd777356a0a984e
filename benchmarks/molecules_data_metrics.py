"""QM9 itself through the molecule metrics, beside the figures EDM reports for the data.

    .venv/bin/python benchmarks/molecules_data_metrics.py                   # all 130,831 molecules
    .venv/bin/python benchmarks/molecules_data_metrics.py --subset 20000    # a random subset (seed 0)

EDM (Hoogeboom et al. 2022, Table 1 and Table 2, row "Data", QM9 with hydrogens) reports atom
stability 99.0 %, molecule stability 95.2 %, validity 97.7 % and valid-and-unique 97.7 % for the
data set. This script computes the same quantities with
:mod:`multidiff.modalities.molecules.metrics` on the DFT geometries of QM9 (qm9pack's CSVs, read by
:func:`multidiff.modalities.molecules.data.load_qm9`, cached after the first call) for the whole
set and for EDM's train and test splits, and adds what EDM does not report: novelty of the test
split against the train split's SMILES, the Wasserstein distances between the test and train
bond-length / bond-angle distributions (the floor a perfect generator would reach with this many
molecules), and what makes the unstable atoms and invalid molecules fail.
"""
from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from multidiff.modalities.molecules.data import load_qm9
from multidiff.modalities.molecules.metrics import (
    check_stability,
    geometry_distributions,
    geometry_wasserstein,
    novelty,
    reference_smiles,
    uniqueness,
    validity,
)
from multidiff.modalities.molecules.vocab import ATOM_SYMBOLS

EDM_DATA = {"atom_stability": 99.0, "molecule_stability": 95.2, "validity": 97.7, "valid_and_unique": 97.7}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", type=int, default=0, help="evaluate this many random molecules (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown tables to this file")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    qm9 = load_qm9()
    t_load = time.perf_counter() - t0
    rows = np.arange(len(qm9))
    if args.subset and args.subset < len(qm9):
        # not RandomState(seed).choice: for seed 0 that is the first rows of EDM's own split
        # permutation (RandomState(0).permutation), i.e. train molecules only
        rows = np.sort(np.random.default_rng(args.seed).choice(len(qm9), size=args.subset, replace=False))
    positions, types, offsets = qm9.positions.numpy(), qm9.types.numpy(), qm9.offsets.numpy()
    split = qm9.split.numpy()[rows]
    mols = [(positions[offsets[i]:offsets[i + 1]], types[offsets[i]:offsets[i + 1]]) for i in rows.tolist()]
    print(f"QM9: {len(qm9)} molecules loaded in {t_load:.1f} s; evaluating {len(mols)}")

    # stability, molecule by molecule, keeping what the unstable atoms look like
    t0 = time.perf_counter()
    n_atoms = np.empty(len(mols), dtype=np.int64)
    n_stable = np.empty(len(mols), dtype=np.int64)
    unstable_kinds: Counter = Counter()
    for k, (pos, typ) in enumerate(mols):
        check = check_stability(pos, typ)
        n_atoms[k], n_stable[k] = check.stable_atoms.size, check.num_stable_atoms
        for a in check.unstable_atoms:
            unstable_kinds[(ATOM_SYMBOLS[typ[a]], int(check.valences[a]))] += 1
    mol_stable = n_stable == n_atoms
    t_stab = time.perf_counter() - t0

    t0 = time.perf_counter()
    checks = validity(mols)
    t_valid = time.perf_counter() - t0
    smiles = [c.smiles for c in checks]
    reasons = Counter(re.sub(r"atom # \d+ ", "", c.reason) for c in checks if not c.valid)

    subset = f" (random subset, seed {args.seed})" if len(mols) < len(qm9) else ""
    edm = EDM_DATA
    lines = [f"QM9 with hydrogens, {len(mols):,} molecules{subset}; percentages.", "",
             "| molecules | n | atom stability | molecule stability | validity | uniqueness | valid and unique |",
             "|---|---|---|---|---|---|---|",
             (f"| EDM Table 1/2, \"Data\" | — | {edm['atom_stability']} | {edm['molecule_stability']} | "
              f"{edm['validity']} | — | {edm['valid_and_unique']} |")]
    for name, mask in (("all", np.ones(len(mols), bool)), ("train split", split == 0), ("test split", split == 2)):
        if not mask.any():
            continue
        valid = [s for s, m in zip(smiles, mask) if m and s is not None]
        count = int(mask.sum())
        lines.append(f"| ours, {name} | {count:,} | {_pct(n_stable[mask].sum() / n_atoms[mask].sum())} | "
                     f"{_pct(mol_stable[mask].mean())} | {_pct(len(valid) / count)} | {_pct(uniqueness(valid))} | "
                     f"{_pct(len(set(valid)) / count)} |")

    t0 = time.perf_counter()
    train = [m for m, s in zip(mols, split) if s == 0]
    test = [m for m, s in zip(mols, split) if s == 2]
    extra = []
    if train and test:
        train_smiles = reference_smiles(train)
        test_valid = [s for s, sp in zip(smiles, split) if sp == 2 and s is not None]
        w = geometry_wasserstein(geometry_distributions(test), geometry_distributions(train))
        extra += ["", (f"Test split against the train split: novelty {_pct(novelty(test_valid, train_smiles))} % "
                       f"({len(train_smiles):,} distinct train SMILES); Wasserstein distance of the bond lengths "
                       f"{w['bond_length_w1_mean']:.5f} Å and of the bond angles {w['bond_angle_w1_mean']:.3f}° "
                       "(means over bond / angle types weighted by the train counts).")]
    t_extra = time.perf_counter() - t0

    total_unstable = sum(unstable_kinds.values())
    extra += ["", f"Unstable atoms ({total_unstable:,}) by element and EDM bond-order sum: "
              + ", ".join(f"{el} {v}: {c:,}" for (el, v), c in unstable_kinds.most_common(8)) + ".",
              "", f"Invalid molecules ({sum(reasons.values()):,}) by RDKit's reason: "
              + "; ".join(f"{r} ({c:,})" for r, c in reasons.most_common(6)) + "."]
    timing = (f"Time: load {t_load:.1f} s, stability {t_stab:.1f} s, validity {t_valid:.1f} s, "
              f"train SMILES + novelty + geometry {t_extra:.1f} s (one core).")
    text = "\n".join(lines + extra + ["", timing])
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
