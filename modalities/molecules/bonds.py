"""Bond orders from interatomic distances: EDM's lookup rule for QM9.

Hoogeboom et al. (2022), "Equivariant Diffusion for Molecule Generation in 3D", judge a
generated molecule by the bonds its geometry implies. Source of the rule and the numbers:
``qm9/bond_analyze.py`` (``bonds1``, ``bonds2``, ``bonds3``, ``margin1..3``, ``allowed_bonds``,
``get_bond_order``) in github.com/ehoogeboom/e3_diffusion_for_molecules; EDM in turn took the
typical bond lengths from the wiredchemist.com and chemistry-reference.com tables. Only the
entries for this vocabulary's elements H, C, N, O, F are kept here.

For atoms a, b at distance ``d`` (in pm = 100 * Å) with typical single / double / triple bond
lengths ``l1, l2, l3`` (double and triple exist only for some pairs)::

    order = 0                        if d >= l1 + m1
          = 1                        if d <  l1 + m1   (and not shorter than below)
          = 2                        if d <  l1 + m1 and d < l2 + m2
          = 3                        if d <  l1 + m1 and d < l2 + m2 and d < l3 + m3

with EDM's margins ``m1, m2, m3 = 10, 5, 3`` pm ("tuned to maximize the stability of the QM9 true
samples"). All comparisons are strict and made, as EDM makes them, after scaling the distance
to pm. An atom is *stable* when the sum of the orders of its bonds equals its allowed valence
(H 1, C 4, N 3, O 2, F 1). Distances here are computed in float64; EDM computes them in the
dtype of its tensors (float32), which can only differ for a pair within ~1e-5 pm of a threshold.
"""
from __future__ import annotations

import numpy as np

from .vocab import ATOM_SYMBOLS, NUM_TYPES, UnknownElementError

__all__ = [
    "ALLOWED_VALENCE",
    "BOND_LENGTH_DOUBLE_PM",
    "BOND_LENGTH_SINGLE_PM",
    "BOND_LENGTH_TRIPLE_PM",
    "BOND_MARGINS_PM",
    "bond_order",
    "bond_order_matrix",
    "bond_symbol",
    "thresholds_angstrom",
]

# Typical bond lengths in pm (EDM's bonds1 / bonds2 / bonds3, restricted to H C N O F).
# Each unordered pair is written once; the lookup below is symmetric.
BOND_LENGTH_SINGLE_PM: dict[frozenset, int] = {
    frozenset(("H",)): 74, frozenset(("H", "C")): 109, frozenset(("H", "N")): 101,
    frozenset(("H", "O")): 96, frozenset(("H", "F")): 92,
    frozenset(("C",)): 154, frozenset(("C", "N")): 147, frozenset(("C", "O")): 143,
    frozenset(("C", "F")): 135,
    frozenset(("N",)): 145, frozenset(("N", "O")): 140, frozenset(("N", "F")): 136,
    frozenset(("O",)): 148, frozenset(("O", "F")): 142,
    frozenset(("F",)): 142,
}
BOND_LENGTH_DOUBLE_PM: dict[frozenset, int] = {
    frozenset(("C",)): 134, frozenset(("C", "N")): 129, frozenset(("C", "O")): 120,
    frozenset(("N",)): 125, frozenset(("N", "O")): 121,
    frozenset(("O",)): 121,
}
BOND_LENGTH_TRIPLE_PM: dict[frozenset, int] = {
    frozenset(("C",)): 120, frozenset(("C", "N")): 116, frozenset(("C", "O")): 113,
    frozenset(("N",)): 110,
}
# EDM's margin1, margin2, margin3 (pm), added to the single / double / triple lengths.
BOND_MARGINS_PM: tuple[int, int, int] = (10, 5, 3)
# EDM's allowed_bonds for the vocabulary: the total bond order a stable atom carries.
ALLOWED_VALENCE: dict[str, int] = {"H": 1, "C": 4, "N": 3, "O": 2, "F": 1}

_BOND_SYMBOLS = {1: "-", 2: "=", 3: "#"}


def _symbol(atom) -> str:
    """Element symbol from a vocabulary index (int / numpy int) or a symbol string."""
    if isinstance(atom, str):
        key = atom.strip().capitalize()
        if key not in ALLOWED_VALENCE:
            raise UnknownElementError(f"element {atom!r} is not in the vocabulary {list(ATOM_SYMBOLS)}")
        return key
    index = int(atom)
    if not 0 <= index < NUM_TYPES:
        raise UnknownElementError(f"atom type index {index} is not in 0..{NUM_TYPES - 1} ({list(ATOM_SYMBOLS)})")
    return ATOM_SYMBOLS[index]


def _threshold_table_pm() -> np.ndarray:
    """``[3, T, T]`` float64: for each bond order k = 1, 2, 3 and type pair, the length + margin
    below which the order is reached (``-inf`` where EDM has no such bond, so it never is)."""
    table = np.full((3, NUM_TYPES, NUM_TYPES), -np.inf)
    lengths = (BOND_LENGTH_SINGLE_PM, BOND_LENGTH_DOUBLE_PM, BOND_LENGTH_TRIPLE_PM)
    for k, (bond_lengths, margin) in enumerate(zip(lengths, BOND_MARGINS_PM)):
        for i, a in enumerate(ATOM_SYMBOLS):
            for j, b in enumerate(ATOM_SYMBOLS):
                length = bond_lengths.get(frozenset((a, b)))
                if length is not None:
                    table[k, i, j] = length + margin
    return table


_THRESHOLDS_PM = _threshold_table_pm()


def thresholds_angstrom() -> np.ndarray:
    """``[3, 5, 5]`` copy of the order-k thresholds (length + margin) in Å, ``-inf`` = no such bond."""
    return _THRESHOLDS_PM / 100.0


def bond_order(type_i, type_j, distance: float) -> int:
    """EDM's bond order (0 none, 1 single, 2 double, 3 triple) of two atoms ``distance`` Å apart.

    ``type_i``/``type_j`` are vocabulary indices (0..4 = H C N O F) or element symbols. Follows
    ``get_bond_order`` with its default margins: the double bond is tested only inside the
    single-bond range, the triple only inside the double-bond range, all with ``<``.
    """
    a, b = _symbol(type_i), _symbol(type_j)
    d_pm = 100.0 * float(distance)  # EDM compares in pm ("We change the metric")
    pair = frozenset((a, b))
    m1, m2, m3 = BOND_MARGINS_PM
    if not d_pm < BOND_LENGTH_SINGLE_PM[pair] + m1:
        return 0
    if pair not in BOND_LENGTH_DOUBLE_PM or not d_pm < BOND_LENGTH_DOUBLE_PM[pair] + m2:
        return 1
    if pair not in BOND_LENGTH_TRIPLE_PM or not d_pm < BOND_LENGTH_TRIPLE_PM[pair] + m3:
        return 2
    return 3


def bond_order_matrix(positions, types) -> np.ndarray:
    """``[n, n]`` int64 symmetric matrix of EDM bond orders for one molecule, zero diagonal.

    ``positions`` ``[n, 3]`` in Å, ``types`` ``[n]`` vocabulary indices (numpy, torch or lists).
    Equal entry by entry to :func:`bond_order` on every pair (the nested tests of EDM's rule
    become the product of the three indicator matrices).
    """
    pos = np.asarray(positions, dtype=np.float64)
    typ = np.asarray(types, dtype=np.int64)
    if pos.ndim != 2 or pos.shape[1] != 3 or typ.shape != (pos.shape[0],):
        raise ValueError(f"bond_order_matrix needs positions [n, 3] and types [n], got {pos.shape} and {typ.shape}")
    if typ.size and (typ.min() < 0 or typ.max() >= NUM_TYPES):
        raise UnknownElementError(f"type indices must be in 0..{NUM_TYPES - 1}, got {sorted(set(typ.tolist()))}")
    diff = pos[:, None, :] - pos[None, :, :]
    d_pm = 100.0 * np.sqrt((diff * diff).sum(-1))
    thr = _THRESHOLDS_PM[:, typ[:, None], typ[None, :]]  # [3, n, n]
    within = d_pm[None] < thr
    single = within[0]
    double = single & within[1]
    triple = double & within[2]
    order = single.astype(np.int64) + double + triple
    np.fill_diagonal(order, 0)
    return order


def bond_symbol(type_i, type_j, order: int) -> str:
    """A readable bond key such as ``"C-H"``, ``"C=O"``, ``"C#N"``: heavy atoms by atomic number,
    hydrogen last, joined by ``-``, ``=`` or ``#`` for orders 1, 2, 3."""
    rank = {s: (s == "H", i) for i, s in enumerate(ATOM_SYMBOLS)}
    a, b = sorted((_symbol(type_i), _symbol(type_j)), key=rank.__getitem__)
    if order not in _BOND_SYMBOLS:
        raise ValueError(f"bond order must be 1, 2 or 3, got {order}")
    return f"{a}{_BOND_SYMBOLS[order]}{b}"
