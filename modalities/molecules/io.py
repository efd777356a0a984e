"""Molecules out: positions + types -> RDKit Mol with a 3D conformer and bonds, SMILES, SDF and
XYZ files, a grid of 2-D depictions and a 3-D view.

**Bonds.** ``method="edm"`` uses EDM's distance rule (:func:`.bonds.bond_order_matrix`: typical
bond lengths plus margins give orders 0..3 per pair; Hoogeboom et al. 2022, ``qm9/bond_analyze.py``),
as EDM's ``build_molecule`` does: atoms carry no charges unless ``charges`` are given, and RDKit
may add implicit hydrogens to atoms below their default valence when it sanitises, as in EDM's
validity check. ``method="rdkit"`` uses ``rdkit.Chem.rdDetermineBonds.DetermineBonds``
(connectivity from covalent radii, then bond orders and formal charges by the xyz2mol method of
Kim & Kim 2015 for the given total charge).

**Invalid structures are kept.** Every function here returns a Mol for every input. When RDKit
cannot sanitise it (or cannot assign bond orders), the unsanitised Mol is returned with the
properties ``sanitized = False`` and ``invalid_reason`` (RDKit's message); valid ones carry
``sanitized = True`` and stereochemistry assigned from the 3D coordinates. Writers write both
kinds (the reason travels as an SD field / in the XYZ comment line).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .vocab import (
    ATOM_SYMBOLS,
    NUM_TYPES,
    MoleculeDataError,
    MoleculeRecord,
    TooManyAtomsError,
    UnknownElementError,
)

__all__ = [
    "BOND_METHODS",
    "from_rdkit",
    "invalid_reason",
    "is_sanitized",
    "mol_to_smiles",
    "molecule_grid",
    "save_3d_view",
    "to_rdkit",
    "to_rdkit_batch",
    "write_sdf",
    "write_xyz",
]

BOND_METHODS = ("edm", "rdkit")
# CPK-like colours for the 3-D view
ELEMENT_COLOURS = {"H": "#d9d9d9", "C": "#404040", "N": "#3050f8", "O": "#ff0d0d", "F": "#90e050"}
ELEMENT_SIZES = {"H": 40, "C": 110, "N": 110, "O": 110, "F": 100}


def _quiet_rdkit():
    from rdkit import rdBase

    return rdBase.BlockLogs()


def _as_arrays(positions, types) -> tuple[np.ndarray, np.ndarray]:
    pos = (positions.detach().cpu().double().numpy() if isinstance(positions, Tensor)
           else np.asarray(positions, dtype=np.float64))
    typ = (types.detach().cpu().long().numpy() if isinstance(types, Tensor) else np.asarray(types, dtype=np.int64))
    if pos.ndim != 2 or pos.shape[1] != 3 or typ.shape != (pos.shape[0],) or pos.shape[0] == 0:
        raise ValueError(f"a molecule needs positions [n, 3] and types [n] with n >= 1, got {pos.shape} and {typ.shape}")
    if typ.min() < 0 or typ.max() >= NUM_TYPES:
        raise UnknownElementError(f"type indices must be in 0..{NUM_TYPES - 1} ({list(ATOM_SYMBOLS)}), got {sorted(set(typ.tolist()))}")
    if not np.isfinite(pos).all():
        raise ValueError("positions contain NaN or inf")
    return pos, typ


def _mark(mol, ok: bool, reason: str = "", method: str = ""):
    mol.SetBoolProp("sanitized", ok)
    if method:
        mol.SetProp("bond_method", method)
    if ok:
        if mol.HasProp("invalid_reason"):
            mol.ClearProp("invalid_reason")
    else:
        mol.SetProp("invalid_reason", reason or "RDKit could not sanitize the molecule")
    return mol


def to_rdkit(positions, types, charges=None, method: str = "edm", *, sanitize: bool = True):
    """An RDKit Mol with one 3D conformer (Å) and bonds from the geometry (module docstring).

    ``positions [n, 3]``, ``types [n]`` vocabulary indices (0..4 = H C N O F), optional per-atom
    formal ``charges [n]`` (with ``"rdkit"`` only their sum is used, as the total charge).
    Never None: an unsanitisable result is returned unsanitised, ``invalid_reason`` set.
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    if method not in BOND_METHODS:
        raise ValueError(f"unknown bond method {method!r}; valid: {', '.join(map(repr, BOND_METHODS))}")
    pos, typ = _as_arrays(positions, types)
    n = len(typ)
    fc = np.zeros(n, dtype=np.int64) if charges is None else np.asarray(torch.as_tensor(charges).cpu(), dtype=np.int64)
    if fc.shape != (n,):
        raise ValueError(f"charges must be [{n}], got {fc.shape}")
    rw = Chem.RWMol()
    for t, c in zip(typ.tolist(), fc.tolist()):
        atom = Chem.Atom(ATOM_SYMBOLS[t])
        if method == "edm":
            atom.SetFormalCharge(int(c))
        rw.AddAtom(atom)
    conf = Chem.Conformer(n)
    for i, (x, y, z) in enumerate(pos.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    conf.Set3D(True)
    rw.AddConformer(conf, assignId=True)

    if method == "edm":
        from .bonds import bond_order_matrix

        orders = bond_order_matrix(pos, typ)
        kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
        for i, j in zip(*np.nonzero(np.triu(orders, 1))):
            rw.AddBond(int(i), int(j), kinds[int(orders[i, j])])
        mol = rw.GetMol()
    else:
        from rdkit.Chem import rdDetermineBonds

        mol = rw.GetMol()
        try:
            with _quiet_rdkit():
                rdDetermineBonds.DetermineBonds(mol, charge=int(fc.sum()))
        except Exception as e:  # bond orders impossible for this charge (e.g. an odd electron count)
            mol = rw.GetMol()
            try:
                rdDetermineBonds.DetermineConnectivity(mol)
            except Exception:
                pass
            mol.UpdatePropertyCache(strict=False)
            return _mark(mol, False, f"rdDetermineBonds could not assign bond orders: {e}", method)
    if not sanitize:
        mol.UpdatePropertyCache(strict=False)
        return _mark(mol, False, "not sanitized (sanitize=False)", method)
    return _sanitized_or_marked(mol, method)


def _sanitized_or_marked(mol, method: str = ""):
    from rdkit import Chem

    candidate = Chem.Mol(mol)
    try:
        with _quiet_rdkit():
            Chem.SanitizeMol(candidate)
    except Exception as e:
        mol.UpdatePropertyCache(strict=False)
        return _mark(mol, False, str(e).strip() or type(e).__name__, method)
    Chem.AssignStereochemistryFrom3D(candidate)
    return _mark(candidate, True, "", method)


def to_rdkit_batch(x: Tensor, batch: Tensor, method: str = "edm", charges: Tensor | None = None) -> list:
    """One Mol per molecule of a flat feature batch ``x [N, 9]`` (types by argmax, see :func:`.data.split_molecules`)."""
    from .data import split_molecules

    parts = split_molecules(x, batch)
    fc = [None] * len(parts) if charges is None else torch.as_tensor(charges).split([len(t) for _, t in parts])
    return [to_rdkit(p, t, c, method) for (p, t), c in zip(parts, fc)]


def is_sanitized(mol) -> bool:
    """True for a Mol from :func:`to_rdkit` that RDKit sanitised (other Mols: sanitisation is tried on a copy)."""
    if mol.HasProp("sanitized"):
        return mol.GetBoolProp("sanitized")
    return invalid_reason(mol) is None


def invalid_reason(mol) -> str | None:
    """Why RDKit cannot sanitise ``mol`` (None when it can)."""
    from rdkit import Chem

    if mol.HasProp("sanitized"):
        return None if mol.GetBoolProp("sanitized") else mol.GetProp("invalid_reason")
    try:
        with _quiet_rdkit():
            Chem.SanitizeMol(Chem.Mol(mol))
    except Exception as e:
        return str(e).strip() or type(e).__name__
    return None


def mol_to_smiles(mol, *, isomeric: bool = True, largest_fragment: bool = False) -> str | None:
    """Canonical SMILES without explicit hydrogens, or None for a Mol RDKit cannot sanitise.

    With ``isomeric`` the stereo assigned from 3D is kept, and so are hydrogens RDKit needs to
    state a double bond's geometry (``[H]/N=C...``); without it every hydrogen is folded in."""
    from rdkit import Chem

    if invalid_reason(mol) is not None:
        return None
    with _quiet_rdkit():
        m = Chem.Mol(mol)
        Chem.SanitizeMol(m)
        if isomeric:
            m = Chem.RemoveHs(m)
        else:
            params = Chem.RemoveHsParameters()
            params.removeDefiningBondStereo = True
            m = Chem.RemoveHs(m, params)
        if largest_fragment:
            frags = Chem.GetMolFrags(m, asMols=True, sanitizeFrags=False)
            m = max(frags, key=lambda f: f.GetNumAtoms())
        return Chem.MolToSmiles(m, isomericSmiles=isomeric)


def from_rdkit(mol, *, max_atoms: int | None = None, name: str = "molecule") -> MoleculeRecord:
    """A :class:`.vocab.MoleculeRecord` from a Mol with a 3D conformer (e.g. a fragment to keep fixed).
    Hydrogens count only if they are explicit atoms."""
    if mol is None:
        raise MoleculeDataError(f"{name}: got None instead of an RDKit Mol (a failed parse?)")
    symbols = [a.GetSymbol() for a in mol.GetAtoms()]
    bad = sorted({s for s in symbols if s not in ATOM_SYMBOLS})
    if bad:
        raise UnknownElementError(f"{name}: elements {bad} are outside the vocabulary {list(ATOM_SYMBOLS)}")
    if not symbols:
        raise MoleculeDataError(f"{name}: the molecule has no atoms")
    if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
        raise MoleculeDataError(f"{name}: no 3D conformer")
    if max_atoms is not None and len(symbols) > max_atoms:
        raise TooManyAtomsError(f"{name}: {len(symbols)} atoms, more than max_atoms = {max_atoms}")
    return MoleculeRecord(torch.tensor(mol.GetConformer().GetPositions(), dtype=torch.float32),
                          [ATOM_SYMBOLS.index(s) for s in symbols], [a.GetFormalCharge() for a in mol.GetAtoms()],
                          name=mol.GetProp("_Name") if mol.HasProp("_Name") else name)


# -- files ---------------------------------------------------------------------------------------


def _check_mols(mols) -> list:
    mols = list(mols)
    nones = [i for i, m in enumerate(mols) if m is None]
    if nones:
        raise ValueError(f"items {nones[:10]} are None, not molecules")
    return mols


def _atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    from multidiff.training.checkpoint import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return path


def write_sdf(mols: Sequence, path: str | os.PathLike) -> Path:
    """All ``mols`` to one SDF file (atomic write), unsanitisable ones included (kekulisation off
    for them); their SD fields include ``sanitized`` and ``invalid_reason``."""
    import io as _io

    from rdkit import Chem

    mols = _check_mols(mols)
    buf = _io.StringIO()
    writer = Chem.SDWriter(buf)
    for i, mol in enumerate(mols):
        ok = is_sanitized(mol)
        writer.SetKekulize(ok)
        m = Chem.Mol(mol)
        if not m.HasProp("_Name") or not m.GetProp("_Name"):
            m.SetProp("_Name", f"molecule_{i}")
        if not ok:
            m.UpdatePropertyCache(strict=False)
        with _quiet_rdkit():
            writer.write(m)
    writer.close()
    return _atomic_write_text(path, buf.getvalue())


def _xyz_parts(item) -> tuple[list[str], np.ndarray, str]:
    if isinstance(item, MoleculeRecord):
        return item.symbols, item.positions.double().numpy(), item.name or item.smiles
    if isinstance(item, tuple) and len(item) == 2:
        pos, typ = _as_arrays(*item)
        return [ATOM_SYMBOLS[t] for t in typ.tolist()], pos, ""
    if hasattr(item, "GetConformer"):
        if item.GetNumConformers() == 0:
            raise ValueError("a Mol without a conformer cannot be written as XYZ")
        smiles = mol_to_smiles(item)
        comment = smiles if smiles is not None else f"invalid: {invalid_reason(item)}"
        return [a.GetSymbol() for a in item.GetAtoms()], item.GetConformer().GetPositions(), comment
    raise TypeError(f"cannot write {type(item).__name__} as XYZ: give Mols, MoleculeRecords or (positions, types) pairs")


def write_xyz(mols: Sequence, path: str | os.PathLike, comments: Sequence[str] | None = None) -> Path:
    """A multi-frame XYZ file (atomic write) of Mols, :class:`MoleculeRecord` s or ``(positions, types)``
    pairs; coordinates to 1e-6 Å. The comment line is ``comments[i]`` or the SMILES / ``invalid: reason``."""
    items = _check_mols(mols)
    if comments is not None and len(comments) != len(items):
        raise ValueError(f"{len(comments)} comments for {len(items)} molecules")
    out = []
    for i, item in enumerate(items):
        symbols, pos, comment = _xyz_parts(item)
        comment = comments[i] if comments is not None else comment
        out.append(f"{len(symbols)}\n{' '.join(str(comment).split())}\n")
        out.extend(f"{s:<2} {x:14.6f} {y:14.6f} {z:14.6f}\n" for s, (x, y, z) in zip(symbols, pos.tolist()))
    return _atomic_write_text(path, "".join(out))


# -- pictures ------------------------------------------------------------------------------------


def _legend(mol, limit: int = 48) -> str:
    smiles = mol_to_smiles(mol)
    text = smiles if smiles is not None else f"invalid: {invalid_reason(mol)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _drawable_2d(mol):
    """A copy with 2-D coordinates, hydrogens folded in where RDKit can (never raises)."""
    from rdkit import Chem
    from rdkit.Chem import rdDepictor

    with _quiet_rdkit():
        try:
            m = Chem.Mol(mol)
            if is_sanitized(mol):
                Chem.SanitizeMol(m)
                m = Chem.RemoveHs(m)
            else:
                m.UpdatePropertyCache(strict=False)
                Chem.FastFindRings(m)
            m.RemoveAllConformers()
            rdDepictor.Compute2DCoords(m)
            return m
        except Exception:
            return Chem.Mol()


def molecule_grid(mols: Sequence, legends: Sequence[str] | None = None, *, per_row: int = 5,
                  size: tuple[int, int] = (250, 250), path: str | os.PathLike | None = None):
    """A PIL image of 2-D depictions in a grid, each with a legend: ``legends[i]`` (e.g. metrics),
    else its SMILES or ``invalid: reason``. Saved as PNG when ``path`` is given."""
    from rdkit.Chem import Draw

    mols = _check_mols(mols)
    if not mols:
        raise ValueError("no molecules to draw")
    if legends is not None and len(legends) != len(mols):
        raise ValueError(f"{len(legends)} legends for {len(mols)} molecules")
    legends = list(legends) if legends is not None else [_legend(m) for m in mols]
    drawn = [_drawable_2d(m) for m in mols]
    with _quiet_rdkit():
        img = Draw.MolsToGridImage(drawn, molsPerRow=min(per_row, len(mols)), subImgSize=size, legends=legends,
                                   returnPNG=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img.save(str(path), format="PNG")
    return img


def save_3d_view(mols, path: str | os.PathLike, *, titles: Sequence[str] | None = None, per_row: int = 4,
                 panel_size: float = 3.0, dpi: int = 100) -> Path:
    """PNG of 3-D ball-and-stick views (matplotlib): atoms coloured by element, bonds as lines.
    ``mols`` is one Mol or a list; titles default to SMILES / ``invalid: reason``."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

    mols = _check_mols([mols] if hasattr(mols, "GetAtoms") else mols)
    if not mols:
        raise ValueError("no molecules to draw")
    titles = list(titles) if titles is not None else [_legend(m, 36) for m in mols]
    cols = min(per_row, len(mols))
    rows = math.ceil(len(mols) / cols)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows), dpi=dpi)
    for k, mol in enumerate(mols):
        ax = fig.add_subplot(rows, cols, k + 1, projection="3d")
        pos = mol.GetConformer().GetPositions() if mol.GetNumConformers() else np.zeros((mol.GetNumAtoms(), 3))
        symbols = [a.GetSymbol() for a in mol.GetAtoms()]
        for b in mol.GetBonds():
            i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
            width = {1.0: 1.5, 1.5: 2.2, 2.0: 3.0, 3.0: 4.5}.get(b.GetBondTypeAsDouble(), 1.5)
            ax.plot(*pos[[i, j]].T, color="#808080", linewidth=width, zorder=1)
        for s in sorted(set(symbols)):
            idx = [i for i, t in enumerate(symbols) if t == s]
            ax.scatter(*pos[idx].T, s=ELEMENT_SIZES.get(s, 80), c=ELEMENT_COLOURS.get(s, "#ff00ff"),
                       edgecolors="black", linewidths=0.5, depthshade=True, label=s, zorder=2)
        centre, half = pos.mean(0), max(float(np.abs(pos - pos.mean(0)).max()), 1.0)
        for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            setter(c - half, c + half)
        ax.set_box_aspect((1, 1, 1))
        ax.set_axis_off()
        ax.set_title(titles[k], fontsize=7)
    import io as _io

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    from multidiff.training.checkpoint import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
