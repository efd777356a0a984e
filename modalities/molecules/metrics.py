"""Quality metrics for 3-D molecules, computed the way EDM computes them.

Hoogeboom et al. (2022), "Equivariant Diffusion for Molecule Generation in 3D", Sec. 5.1 and
``qm9/analyze.py`` / ``qm9/rdkit_functions.py`` of github.com/ehoogeboom/e3_diffusion_for_molecules:

* **Atom / molecule stability** (:func:`check_stability`). Every pair of atoms gets EDM's bond
  order from its distance (:func:`.bonds.bond_order_matrix`); an atom is stable when the sum of
  its orders equals its element's valence (H 1, C 4, N 3, O 2, F 1); a molecule is stable when
  all its atoms are. Atom stability = stable atoms / all atoms, molecule stability = stable
  molecules / all molecules (pooled over the set, as EDM pools them).
* **Validity** (:func:`check_validity`). An RDKit molecule is built from the same bonds (atoms
  without charges, bonds single / double / triple; RDKit may add implicit hydrogens to atoms
  below their default valence, as in EDM). It is valid when ``Chem.SanitizeMol`` accepts the
  whole molecule; its SMILES is then the canonical SMILES of the largest fragment. The reason
  RDKit gives is kept for every invalid molecule.
* **Uniqueness** = distinct SMILES / valid SMILES; **novelty** = unique valid SMILES absent from
  the training SMILES / unique valid SMILES. EDM's training SMILES are those of the training
  molecules put through the same builder (:func:`reference_smiles`).
* **Geometry** (not in EDM's tables): bond lengths per bond type (``"C-H"``, ``"C=O"``, ...)
  and bond angles per element triple (``"C-C-O"``, centre atom in the middle) over the EDM bonds,
  compared with the data's by the 1-D Wasserstein distance (``scipy.stats.wasserstein_distance``,
  in Å and degrees).

Molecules are records (:class:`.vocab.MoleculeRecord`, ``(positions, types)`` pairs or dicts with
``"positions"`` [n, 3] in Å and ``"types"`` [n] indices into H C N O F) or RDKit ``Mol`` objects
with a conformer. A Mol is judged by its atoms and coordinates only: its own bonds are ignored
and only explicit hydrogen atoms count, exactly as for records.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .bonds import ALLOWED_VALENCE, bond_order_matrix, bond_symbol
from .vocab import ATOM_SYMBOLS, MoleculeDataError, types_from_atomic_numbers

__all__ = [
    "GeometryDistributions",
    "StabilityCheck",
    "ValidityCheck",
    "build_molecule",
    "check_stability",
    "check_validity",
    "evaluate_molecules",
    "geometry_distributions",
    "geometry_wasserstein",
    "novelty",
    "positions_and_types",
    "reference_smiles",
    "stability",
    "uniqueness",
    "validity",
]

_VALENCE = np.array([ALLOWED_VALENCE[s] for s in ATOM_SYMBOLS], dtype=np.int64)


# ----------------------------------------------------------------------------- inputs
def positions_and_types(item: Any, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(positions [n, 3] float64 Å, types [n] int64)`` of one molecule in any accepted form.

    ``index`` only names the item in error messages."""
    where = "molecule" if index is None else f"molecule {index}"
    try:
        if hasattr(item, "GetConformer") and hasattr(item, "GetAtoms"):
            if item.GetNumConformers() == 0:
                raise MoleculeDataError(f"{where}: the RDKit Mol has no conformer (3-D coordinates are needed)")
            positions = item.GetConformer().GetPositions()
            types = types_from_atomic_numbers([a.GetAtomicNum() for a in item.GetAtoms()]).numpy()
        elif hasattr(item, "positions") and hasattr(item, "types"):
            positions, types = item.positions, item.types
        elif isinstance(item, Mapping):
            positions, types = item["positions"], item["types"]
        else:
            positions, types = item
    except MoleculeDataError as exc:
        if index is not None and not str(exc).startswith(where):
            raise type(exc)(f"{where}: {exc}") from None
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise MoleculeDataError(
            f"{where}: expected a MoleculeRecord, a (positions, types) pair, a dict with 'positions' and "
            f"'types', or an RDKit Mol with a conformer; got {type(item).__name__} ({exc})"
        ) from None
    if isinstance(positions, torch.Tensor):
        positions = positions.detach().cpu().numpy()
    if isinstance(types, torch.Tensor):
        types = types.detach().cpu().numpy()
    positions = np.asarray(positions, dtype=np.float64)
    types = np.asarray(types)
    n = types.shape[0] if types.ndim == 1 else -1
    if n < 1 or positions.shape != (n, 3):
        raise MoleculeDataError(f"{where}: needs types [n] and positions [n, 3] with n >= 1, got {types.shape} and {positions.shape}")
    if not np.issubdtype(types.dtype, np.integer) or types.min() < 0 or types.max() >= len(ATOM_SYMBOLS):
        raise MoleculeDataError(f"{where}: types must be integer indices into {list(ATOM_SYMBOLS)}, got {types.tolist()}")
    if not np.isfinite(positions).all():
        raise MoleculeDataError(f"{where}: positions contain NaN or inf")
    return positions, types.astype(np.int64)


@dataclass
class _Molecule:
    """One molecule with its EDM bond orders, computed once and shared by all metrics."""

    positions: np.ndarray
    types: np.ndarray
    orders: np.ndarray


def _prepare(mols: Iterable[Any]) -> list[_Molecule]:
    out = []
    for i, item in enumerate(mols):
        if isinstance(item, _Molecule):
            out.append(item)
            continue
        positions, types = positions_and_types(item, i)
        out.append(_Molecule(positions, types, bond_order_matrix(positions, types)))
    return out


# ----------------------------------------------------------------------------- stability
@dataclass(frozen=True)
class StabilityCheck:
    """EDM's stability of one molecule: per-atom bond-order sums, allowed valences and verdicts."""

    valences: np.ndarray  # [n] sum of EDM bond orders at each atom
    allowed: np.ndarray  # [n] the element's allowed valence
    stable_atoms: np.ndarray  # [n] bool

    @property
    def molecule_stable(self) -> bool:
        return bool(self.stable_atoms.all())

    @property
    def num_stable_atoms(self) -> int:
        return int(self.stable_atoms.sum())

    @property
    def unstable_atoms(self) -> list[int]:
        return np.flatnonzero(~self.stable_atoms).tolist()


def _stability_of(orders: np.ndarray, types: np.ndarray) -> StabilityCheck:
    valences = orders.sum(axis=1)
    allowed = _VALENCE[types]
    return StabilityCheck(valences, allowed, valences == allowed)


def check_stability(positions, types) -> StabilityCheck:
    """EDM's ``check_stability`` for one molecule (``positions`` [n, 3] Å, ``types`` [n])."""
    positions, types = positions_and_types((positions, types))
    return _stability_of(bond_order_matrix(positions, types), types)


def stability(mols: Iterable[Any]) -> dict[str, float]:
    """``atom_stability`` (stable atoms / atoms) and ``molecule_stability`` (stable molecules /
    molecules) pooled over ``mols``, with the counts ``num_atoms`` and ``num_molecules``."""
    prepared = _prepare(mols)
    if not prepared:
        raise ValueError("stability needs at least one molecule, got none")
    checks = [_stability_of(m.orders, m.types) for m in prepared]
    atoms = sum(c.stable_atoms.size for c in checks)
    return {
        "atom_stability": sum(c.num_stable_atoms for c in checks) / atoms,
        "molecule_stability": sum(c.molecule_stable for c in checks) / len(checks),
        "num_atoms": atoms,
        "num_molecules": len(checks),
    }


# ----------------------------------------------------------------------------- RDKit validity
def _chem():
    try:
        from rdkit import Chem
    except ImportError as exc:  # pragma: no cover - rdkit is in the [molecules] extra
        raise ImportError("validity, uniqueness and novelty need RDKit: pip install 'multidiff-toolkit[molecules]'") from exc
    return Chem


def _quiet_rdkit():
    """A context that keeps RDKit's sanitization messages off stderr (the reasons are returned)."""
    _chem()
    from rdkit import rdBase

    return rdBase.BlockLogs()


def build_molecule(positions, types, orders: np.ndarray | None = None, conformer: bool = True):
    """An unsanitized ``Chem.RWMol`` with EDM's bonds (``orders``: a precomputed
    :func:`.bonds.bond_order_matrix`) and, if ``conformer``, the 3-D coordinates."""
    Chem = _chem()
    positions, types = positions_and_types((positions, types))
    if orders is None:
        orders = bond_order_matrix(positions, types)
    bond_types = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    mol = Chem.RWMol()
    for t in types.tolist():
        mol.AddAtom(Chem.Atom(ATOM_SYMBOLS[t]))
    for i, j in zip(*np.nonzero(np.triu(orders, k=1))):
        mol.AddBond(int(i), int(j), bond_types[int(orders[i, j])])
    if conformer:
        conf = Chem.Conformer(len(types))
        for i, p in enumerate(positions.tolist()):
            conf.SetAtomPosition(i, p)
        conf.Set3D(True)
        mol.AddConformer(conf, assignId=True)
    return mol


@dataclass(frozen=True)
class ValidityCheck:
    """One molecule's RDKit verdict: canonical SMILES of the largest fragment if the whole molecule
    sanitizes, else ``None`` and RDKit's ``reason``."""

    smiles: str | None
    reason: str | None = None
    num_fragments: int = 0

    @property
    def valid(self) -> bool:
        return self.smiles is not None


def _validity_of(mol: _Molecule) -> ValidityCheck:
    Chem = _chem()
    rd = build_molecule(mol.positions, mol.types, mol.orders, conformer=False)
    try:
        Chem.SanitizeMol(rd)
    except ValueError as exc:  # MolSanitizeException (valence, kekulization, ...) is a ValueError
        return ValidityCheck(None, str(exc).strip() or type(exc).__name__)
    # EDM re-sanitizes the fragments and keeps the first largest one. (Should a fragment fail
    # where the whole passed, EDM would count a valid molecule with SMILES None; here it is invalid.)
    try:
        fragments = Chem.GetMolFrags(rd, asMols=True)
    except ValueError as exc:
        return ValidityCheck(None, f"a fragment failed sanitization: {str(exc).strip()}")
    largest = max(fragments, key=lambda m: m.GetNumAtoms())
    return ValidityCheck(Chem.MolToSmiles(largest), None, len(fragments))


def check_validity(positions, types) -> ValidityCheck:
    """EDM's RDKit validity of one molecule (``positions`` [n, 3] Å, ``types`` [n])."""
    prepared = _prepare([(positions, types)])[0]
    with _quiet_rdkit():
        return _validity_of(prepared)


def validity(mols: Iterable[Any]) -> list[ValidityCheck]:
    """:class:`ValidityCheck` per molecule (in order); the validity is the fraction with ``.valid``."""
    prepared = _prepare(mols)
    with _quiet_rdkit():
        return [_validity_of(m) for m in prepared]


def uniqueness(valid_smiles: Sequence[str]) -> float:
    """Distinct SMILES / valid SMILES (EDM: ``len(set(valid)) / len(valid)``); 0 when none is valid."""
    return len(set(valid_smiles)) / len(valid_smiles) if len(valid_smiles) else 0.0


def novelty(valid_smiles: Iterable[str], training_smiles: Iterable[str]) -> float:
    """Fraction of the distinct valid SMILES that are not in ``training_smiles``; 0 when none."""
    unique = set(valid_smiles)
    known = training_smiles if isinstance(training_smiles, (set, frozenset)) else set(training_smiles)
    return sum(s not in known for s in unique) / len(unique) if unique else 0.0


def reference_smiles(mols: Iterable[Any]) -> set[str]:
    """The training-set SMILES as EDM makes them (``compute_qm9_smiles``): each molecule through
    the same bond rule and ``SanitizeMol``, canonical SMILES of the whole molecule; invalid ones
    are left out."""
    Chem = _chem()
    out = set()
    with _quiet_rdkit():
        for m in _prepare(mols):
            rd = build_molecule(m.positions, m.types, m.orders, conformer=False)
            try:
                Chem.SanitizeMol(rd)
            except ValueError:
                continue
            out.add(Chem.MolToSmiles(rd))
    return out


# ----------------------------------------------------------------------------- geometry
@dataclass
class GeometryDistributions:
    """Samples of bond lengths (Å) per bond key (``"C-H"``, ``"C=O"``, ``"C#N"``) and bond angles
    (degrees) per element triple (``"C-C-O"``: centre atom in the middle, ends ordered C N O F H)."""

    bond_lengths: dict[str, np.ndarray] = field(default_factory=dict)
    bond_angles: dict[str, np.ndarray] = field(default_factory=dict)


_RANK = np.array([4, 0, 1, 2, 3])  # ordering of ends in keys: C N O F, hydrogen last


def geometry_distributions(mols: Iterable[Any]) -> GeometryDistributions:
    """Bond lengths and bond angles over the EDM bonds of ``mols`` (any accepted form)."""
    t = len(ATOM_SYMBOLS)
    lengths, length_codes, angles, angle_codes = [], [], [], []
    for m in _prepare(mols):
        bonded = m.orders > 0
        i, j = np.nonzero(np.triu(bonded, k=1))
        if i.size:
            a, b = m.types[i], m.types[j]
            lo = np.where(_RANK[a] <= _RANK[b], a, b)
            hi = np.where(_RANK[a] <= _RANK[b], b, a)
            lengths.append(np.linalg.norm(m.positions[i] - m.positions[j], axis=1))
            length_codes.append((m.orders[i, j] * t + lo) * t + hi)
        # triples i - c - k with i < k, both bonded to the centre c
        e1, c, e2 = np.nonzero(bonded[:, :, None] & bonded[None, :, :])
        keep = e1 < e2
        e1, c, e2 = e1[keep], c[keep], e2[keep]
        if e1.size:
            u = m.positions[e1] - m.positions[c]
            v = m.positions[e2] - m.positions[c]
            cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
            angles.append(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
            a, b = m.types[e1], m.types[e2]
            lo = np.where(_RANK[a] <= _RANK[b], a, b)
            hi = np.where(_RANK[a] <= _RANK[b], b, a)
            angle_codes.append((lo * t + m.types[c]) * t + hi)
    out = GeometryDistributions()
    if lengths:
        values, codes = np.concatenate(lengths), np.concatenate(length_codes)
        for code in np.unique(codes):
            order, rest = divmod(int(code), t * t)
            key = bond_symbol(rest // t, rest % t, order)
            out.bond_lengths[key] = values[codes == code]
    if angles:
        values, codes = np.concatenate(angles), np.concatenate(angle_codes)
        for code in np.unique(codes):
            lo, rest = divmod(int(code), t * t)
            centre, hi = divmod(rest, t)
            key = f"{ATOM_SYMBOLS[lo]}-{ATOM_SYMBOLS[centre]}-{ATOM_SYMBOLS[hi]}"
            out.bond_angles[key] = values[codes == code]
    return out


def _wasserstein_table(generated: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> tuple[dict[str, float], float]:
    from scipy.stats import wasserstein_distance

    table = {k: float(wasserstein_distance(generated[k], reference[k]))
             for k in sorted(reference) if k in generated and len(generated[k]) and len(reference[k])}
    weights = {k: len(reference[k]) for k in table}
    total = sum(weights.values())
    mean = sum(table[k] * weights[k] for k in table) / total if total else float("nan")
    return table, mean


def geometry_wasserstein(generated: GeometryDistributions, reference: GeometryDistributions) -> dict[str, Any]:
    """1-D Wasserstein distance per bond key (Å) and per angle key (degrees) present in both,
    and their means weighted by the reference counts (``nan`` when no key is shared)."""
    lengths, length_mean = _wasserstein_table(generated.bond_lengths, reference.bond_lengths)
    angles, angle_mean = _wasserstein_table(generated.bond_angles, reference.bond_angles)
    return {"bond_length_w1": lengths, "bond_length_w1_mean": length_mean,
            "bond_angle_w1": angles, "bond_angle_w1_mean": angle_mean}


# ----------------------------------------------------------------------------- all together
def evaluate_molecules(mols_or_records: Iterable[Any], training_smiles: Iterable[str] | None = None,
                       reference: GeometryDistributions | Iterable[Any] | None = None) -> dict[str, Any]:
    """All metrics of a set of molecules in one dict.

    Keys: ``num_molecules``, ``num_atoms``, ``atom_stability``, ``molecule_stability``,
    ``validity``, ``uniqueness`` (among valid), ``valid_and_unique`` (distinct valid / all, EDM's
    "Valid and Unique" column), ``novelty`` (``None`` without ``training_smiles``), ``smiles``
    (per molecule, ``None`` if invalid), ``invalid`` (``[{"index", "reason"}]``, RDKit's reason per
    invalid molecule), ``unstable`` (indices of molecules that are not stable); with a
    ``reference`` (data molecules or their :class:`GeometryDistributions`) also the Wasserstein
    entries of :func:`geometry_wasserstein`.
    """
    prepared = _prepare(mols_or_records)
    if not prepared:
        raise ValueError("evaluate_molecules needs at least one molecule, got none")
    result: dict[str, Any] = stability(prepared)
    checks = validity(prepared)
    valid = [c.smiles for c in checks if c.valid]
    n = len(prepared)
    result["validity"] = len(valid) / n
    result["uniqueness"] = uniqueness(valid)
    result["valid_and_unique"] = len(set(valid)) / n
    result["novelty"] = None if training_smiles is None else novelty(valid, training_smiles)
    result["smiles"] = [c.smiles for c in checks]
    result["invalid"] = [{"index": i, "reason": c.reason} for i, c in enumerate(checks) if not c.valid]
    result["unstable"] = [i for i, m in enumerate(prepared) if not _stability_of(m.orders, m.types).molecule_stable]
    if reference is not None:
        if not isinstance(reference, GeometryDistributions):
            reference = geometry_distributions(reference)
        result.update(geometry_wasserstein(geometry_distributions(prepared), reference))
    return result
