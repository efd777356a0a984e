"""Molecules from SDF and XYZ files, validated record by record.

Every record is checked before it becomes a :class:`~.vocab.MoleculeRecord`:

* readable (RDKit parses the SDF block; an XYZ block has an atom count, a comment line and that
  many ``symbol x y z`` lines with finite numbers),
* every element in the vocabulary (H C N O F),
* a 3D conformer (SDF: at least one conformer that RDKit marks 3D; a molfile written as 2D is
  refused, since its positions are a drawing, not a geometry),
* at most ``max_atoms`` atoms (hydrogens included).

A file that cannot be opened at all (missing, empty, not text) is an error whatever ``on_error``
says, since there is no record to skip. ``on_error="raise"`` stops at the first bad record with a :class:`~.vocab.MoleculeDataError`
subclass whose message names the file, the record (counted from 0) and the reason.
``on_error="skip"`` leaves the record out, lists it in :attr:`ReadResult.skipped` with the same
information and warns once per file: nothing is dropped silently.

SDF goes through RDKit's ``SDMolSupplier(removeHs=False, sanitize=...)``; sanitisation is off
by default so that unusual but well-formed structures are read as they are. XYZ is parsed here
(RDKit's ``MolFromXYZFile`` reads one molecule per file; this reader takes concatenated frames).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .vocab import (
    ATOM_SYMBOLS,
    MoleculeDataError,
    MoleculeRecord,
    TooManyAtomsError,
    UnknownElementError,
)

__all__ = [
    "SDF_SUFFIXES",
    "XYZ_SUFFIXES",
    "NoConformerError",
    "ReadResult",
    "SkippedRecord",
    "UnreadableRecordError",
    "read_molecules",
    "read_sdf",
    "read_xyz",
]

SDF_SUFFIXES = (".sdf", ".sd", ".mol")
XYZ_SUFFIXES = (".xyz",)
ON_ERROR = ("raise", "skip")
_VOCAB = set(ATOM_SYMBOLS)
_Z_TO_SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


class UnreadableRecordError(MoleculeDataError):
    """A record the reader cannot parse (corrupt or truncated block)."""


class NoConformerError(MoleculeDataError):
    """A record without 3D coordinates."""


@dataclass(frozen=True)
class SkippedRecord:
    path: str
    record: int
    reason: str
    kind: str = "MoleculeDataError"

    def __str__(self) -> str:
        return f"{self.path} record {self.record}: {self.reason}"


@dataclass
class ReadResult:
    """The molecules read from ``path`` and the records skipped (with reasons); iterates over the molecules."""

    path: str
    records: list[MoleculeRecord] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def report(self) -> str:
        """A human-readable summary: how many read, and each skipped record with its reason."""
        lines = [f"{self.path}: {len(self.records)} molecules read, {len(self.skipped)} skipped"]
        lines += [f"  record {s.record}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


class _Collector:
    """Applies ``on_error`` to each failure: raise it, or record it as skipped."""

    def __init__(self, path: Path, on_error: str, max_atoms: int | None):
        if on_error not in ON_ERROR:
            raise ValueError(f"unknown on_error {on_error!r}; valid: {', '.join(map(repr, ON_ERROR))}")
        if max_atoms is not None and (not isinstance(max_atoms, int) or max_atoms < 1):
            raise ValueError(f"max_atoms must be a positive int or None, got {max_atoms!r}")
        self.path, self.on_error, self.max_atoms = path, on_error, max_atoms
        self.result = ReadResult(str(path))

    def fail(self, cls: type[MoleculeDataError], record: int, reason: str) -> None:
        if self.on_error == "raise":
            raise cls(f"{self.path}, record {record} (counting from 0): {reason}", self.path, record)
        self.result.skipped.append(SkippedRecord(str(self.path), record, reason, cls.__name__))

    def check_and_add(self, record: int, symbols: list[str], positions, formal_charges=None, **meta) -> None:
        bad = sorted({s for s in symbols if s not in _VOCAB})
        if bad:
            first = next(i for i, s in enumerate(symbols) if s in bad)
            return self.fail(UnknownElementError, record, f"elements {bad} are outside the vocabulary "
                             f"{list(ATOM_SYMBOLS)} (first at atom {first})")
        if self.max_atoms is not None and len(symbols) > self.max_atoms:
            return self.fail(TooManyAtomsError, record, f"{len(symbols)} atoms, more than max_atoms = {self.max_atoms}")
        pos = torch.as_tensor(positions, dtype=torch.float64)
        if not bool(torch.isfinite(pos).all()):
            return self.fail(UnreadableRecordError, record, "coordinates contain NaN or inf")
        types = torch.tensor([ATOM_SYMBOLS.index(s) for s in symbols], dtype=torch.long)
        self.result.records.append(MoleculeRecord(pos.float(), types, formal_charges, source=str(self.path),
                                                  record=record, **meta))

    def finish(self, stacklevel: int = 3) -> ReadResult:
        res = self.result
        if res.skipped:
            first = "; ".join(f"record {s.record}: {s.reason}" for s in res.skipped[:3])
            more = f" (and {len(res.skipped) - 3} more)" if len(res.skipped) > 3 else ""
            warnings.warn(f"{self.path}: skipped {len(res.skipped)} of {len(res.records) + len(res.skipped)} "
                          f"records: {first}{more}; see ReadResult.skipped", stacklevel=stacklevel)
        return res


@contextmanager
def _rdkit_errors():
    """Capture RDKit's error log (the reason a record failed), where this RDKit version can."""
    from rdkit import rdBase

    if hasattr(rdBase, "CaptureErrorLog"):
        with rdBase.CaptureErrorLog() as log:
            yield log
    else:  # older RDKit: no reason text, but keep stderr quiet
        class _NoText:
            messages = ""

        with rdBase.BlockLogs():
            yield _NoText()


def _clean_log(text: str) -> str:
    lines = [re.sub(r"^\[\d\d:\d\d:\d\d\]\s*(ERROR:\s*)?", "", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("moving to the beginning of the next molecule")]
    return "; ".join(dict.fromkeys(lines))


def _numeric_props(mol) -> dict[str, float]:
    out = {}
    for key in mol.GetPropNames():
        try:
            v = float(mol.GetProp(key))
        except ValueError:
            continue
        if math.isfinite(v):
            out[key] = v
    return out


def read_sdf(path: str | os.PathLike, *, on_error: str = "raise", max_atoms: int | None = None,
             sanitize: bool = False, _stacklevel: int = 3) -> ReadResult:
    """Every record of an SDF/MOL file (see the module docstring). Numeric SD fields become ``properties``."""
    from rdkit import Chem

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    col = _Collector(path, on_error, max_atoms)
    if path.stat().st_size == 0:
        raise MoleculeDataError(f"{path}: the file is empty, no molecules to read", path)
    try:
        supplier = Chem.SDMolSupplier(str(path), removeHs=False, sanitize=sanitize)
    except OSError as e:  # a file-level failure: there is no record to skip
        raise MoleculeDataError(f"{path}: RDKit cannot open it as SDF ({e})", path) from None
    record = 0
    while not supplier.atEnd():
        with _rdkit_errors() as log:
            try:
                mol = next(supplier)
            except StopIteration:
                break
            except Exception as e:  # RDKit raises on some malformed blocks instead of returning None
                mol, err = None, f"{type(e).__name__}: {e}"
            else:
                err = ""
        if mol is None:
            reason = _clean_log(log.messages) or err or "RDKit could not parse the record"
            col.fail(UnreadableRecordError, record, f"unreadable record ({reason})")
        elif mol.GetNumAtoms() == 0:
            col.fail(UnreadableRecordError, record, "the record has no atoms")
        elif mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
            what = "no conformer" if mol.GetNumConformers() == 0 else "only 2D coordinates"
            col.fail(NoConformerError, record, f"no 3D conformer ({what})")
        else:
            symbols = [a.GetSymbol() for a in mol.GetAtoms()]
            pos = mol.GetConformer().GetPositions()
            charges = torch.tensor([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=torch.long)
            name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
            col.check_and_add(record, symbols, pos, charges, name=name, properties=_numeric_props(mol))
        record += 1
    return col.finish(_stacklevel)


def _xyz_symbol(token: str) -> str:
    if token.isdigit():  # some writers give atomic numbers
        return _Z_TO_SYMBOL.get(int(token), f"Z={token}")
    return token.capitalize()


def read_xyz(path: str | os.PathLike, *, on_error: str = "raise", max_atoms: int | None = None,
             _stacklevel: int = 3) -> ReadResult:
    """Every frame of a (multi-frame) XYZ file: ``n``, a comment line (kept as ``name``), ``n``
    lines ``symbol x y z [ignored columns]``. A bad atom count stops the reading (the next
    frame cannot be found); the rest of the file is reported as one skipped record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    col = _Collector(path, on_error, max_atoms)
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise MoleculeDataError(f"{path}: not a text file ({e})", path) from None
    if not any(ln.strip() for ln in lines):
        raise MoleculeDataError(f"{path}: the file is empty, no molecules to read", path)
    i, record = 0, 0
    while i < len(lines):
        if not lines[i].strip():  # blank lines between frames
            i += 1
            continue
        head = lines[i].split()
        if len(head) != 1 or not head[0].isdigit() or int(head[0]) < 1:
            col.fail(UnreadableRecordError, record, f"line {i + 1} should hold a positive atom count, got "
                     f"{lines[i][:40]!r}; reading stopped, lines {i + 1}..{len(lines)} were not read")
            break
        n = int(head[0])
        block = lines[i + 2:i + 2 + n]
        comment = lines[i + 1].strip() if i + 1 < len(lines) else ""
        start, i = i, i + 2 + n
        if len(block) < n:
            col.fail(UnreadableRecordError, record, f"truncated: the count on line {start + 1} says {n} atoms, "
                     f"the file ends after {len(block)}")
            break
        symbols, pos, bad = [], [], None
        for k, ln in enumerate(block):
            tok = ln.split()
            try:
                if len(tok) < 4:
                    raise ValueError("fewer than 4 columns")
                pos.append([float(t.replace("*^", "e")) for t in tok[1:4]])
                symbols.append(_xyz_symbol(tok[0]))
            except ValueError as e:
                bad = f"line {start + 3 + k}: expected 'symbol x y z', got {ln.strip()[:60]!r} ({e})"
                break
        if bad is not None:
            col.fail(UnreadableRecordError, record, bad)
        else:
            col.check_and_add(record, symbols, pos, name=comment)
        record += 1
    return col.finish(_stacklevel)


def read_molecules(path: str | os.PathLike, *, on_error: str = "raise", max_atoms: int | None = None,
                   sanitize: bool = False) -> ReadResult:
    """Molecules from an SDF (``.sdf``, ``.sd``, ``.mol``) or XYZ (``.xyz``) file, chosen by suffix.
    ``sanitize`` applies to SDF only (RDKit sanitisation while reading; a failure is an unreadable record)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SDF_SUFFIXES:
        return read_sdf(path, on_error=on_error, max_atoms=max_atoms, sanitize=sanitize, _stacklevel=4)
    if suffix in XYZ_SUFFIXES:
        return read_xyz(path, on_error=on_error, max_atoms=max_atoms, _stacklevel=4)
    raise MoleculeDataError(f"{path}: unknown molecule file type {suffix!r}; valid: "
                            f"{', '.join(SDF_SUFFIXES + XYZ_SUFFIXES)}", path)
