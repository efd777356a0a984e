"""The atom vocabulary, EDM's per-atom feature layout, molecule records and data errors.

Vocabulary (QM9 with hydrogens, as in Hoogeboom et al. 2022, "Equivariant Diffusion for
Molecule Generation in 3D"): H, C, N, O, F -> type indices 0..4, atomic numbers 1, 6, 7, 8, 9.

EDM's representation of one atom is the 9-vector

    x = [ r (3 positions, Å) , onehot(type) * 0.25 (5) , Z * 0.1 (1) ]

EDM calls the atomic number ``Z`` its "charges" feature and divides the one-hot part by 4
and ``Z`` by 10 (its ``normalize_factors = [1, 4, 10]``); here the scaled atomic number is
called :data:`ATOMIC_NUMBER_SCALE` so it is not mistaken for a formal charge.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "ATOMIC_NUMBERS",
    "ATOMIC_NUMBER_CHANNEL",
    "ATOMIC_NUMBER_SCALE",
    "ATOM_SYMBOLS",
    "NUM_FEATURES",
    "NUM_TYPES",
    "ONE_HOT_CHANNELS",
    "ONE_HOT_SCALE",
    "POSITION_CHANNELS",
    "MoleculeDataError",
    "MoleculeRecord",
    "TooManyAtomsError",
    "UnknownElementError",
    "atomic_numbers_of",
    "type_index",
    "types_from_atomic_numbers",
    "types_from_symbols",
]

ATOM_SYMBOLS: tuple[str, ...] = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS: tuple[int, ...] = (1, 6, 7, 8, 9)
NUM_TYPES = len(ATOM_SYMBOLS)
ONE_HOT_SCALE = 0.25  # EDM normalize_factors[1] = 4
ATOMIC_NUMBER_SCALE = 0.1  # EDM normalize_factors[2] = 10 (its "charges" = atomic numbers)
POSITION_CHANNELS = (0, 1, 2)
ONE_HOT_CHANNELS = tuple(range(3, 3 + NUM_TYPES))
ATOMIC_NUMBER_CHANNEL = 3 + NUM_TYPES
NUM_FEATURES = 3 + NUM_TYPES + 1

_SYMBOL_TO_INDEX = {s: i for i, s in enumerate(ATOM_SYMBOLS)}
_Z_TO_INDEX = {z: i for i, z in enumerate(ATOMIC_NUMBERS)}


class MoleculeDataError(ValueError):
    """Molecule data that cannot be used. ``path`` and ``record`` (0-based) name the culprit when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, record: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.record = record


class UnknownElementError(MoleculeDataError):
    """An element outside the vocabulary (H, C, N, O, F)."""


class TooManyAtomsError(MoleculeDataError):
    """A molecule with more atoms than the model allows."""


def type_index(symbol: str) -> int:
    """Vocabulary index of an element symbol (case-insensitive: ``"c"`` and ``"C"`` are carbon)."""
    key = symbol.strip().capitalize()
    if key not in _SYMBOL_TO_INDEX:
        raise UnknownElementError(f"element {symbol!r} is not in the vocabulary {list(ATOM_SYMBOLS)}")
    return _SYMBOL_TO_INDEX[key]


def types_from_symbols(symbols) -> Tensor:
    """``[n]`` long type indices from element symbols; :class:`UnknownElementError` names the first bad one."""
    return torch.tensor([type_index(s) for s in symbols], dtype=torch.long)


def types_from_atomic_numbers(z) -> Tensor:
    """``[n]`` long type indices from atomic numbers (1, 6, 7, 8, 9)."""
    out = []
    for v in torch.as_tensor(z).tolist():
        if v not in _Z_TO_INDEX:
            raise UnknownElementError(f"atomic number {v} is not in the vocabulary {list(ATOMIC_NUMBERS)}")
        out.append(_Z_TO_INDEX[v])
    return torch.tensor(out, dtype=torch.long)


def atomic_numbers_of(types: Tensor) -> Tensor:
    """Atomic numbers ``[n]`` (long) of type indices ``[n]``."""
    table = torch.tensor(ATOMIC_NUMBERS, dtype=torch.long, device=types.device)
    return table[types.long()]


@dataclass
class MoleculeRecord:
    """One molecule: ``positions [n, 3]`` float32 in Å, ``types [n]`` long indices into
    :data:`ATOM_SYMBOLS`, per-atom ``formal_charges [n]`` (long, zeros when unknown), named
    scalar ``properties`` (e.g. ``{"gap": 6800.0}``), and where it came from (``name``,
    ``smiles``, ``source`` = file path or dataset, ``record`` = 0-based position in it)."""

    positions: Tensor
    types: Tensor
    formal_charges: Tensor | None = None
    properties: dict[str, float] = field(default_factory=dict)
    name: str = ""
    smiles: str = ""
    source: str = ""
    record: int = -1

    def __post_init__(self):
        self.positions = torch.as_tensor(self.positions, dtype=torch.float32)
        self.types = torch.as_tensor(self.types, dtype=torch.long)
        n = self.types.shape[0] if self.types.ndim == 1 else -1
        if self.types.ndim != 1 or n == 0 or tuple(self.positions.shape) != (n, 3):
            raise MoleculeDataError(
                f"{self.location}: a molecule needs types [n] and positions [n, 3] with n >= 1, got types "
                f"{tuple(self.types.shape)} and positions {tuple(self.positions.shape)}"
            )
        if bool(((self.types < 0) | (self.types >= NUM_TYPES)).any()):
            raise UnknownElementError(f"{self.location}: type indices must be in 0..{NUM_TYPES - 1}, got {self.types.tolist()}")
        if not bool(torch.isfinite(self.positions).all()):
            raise MoleculeDataError(f"{self.location}: positions contain NaN or inf")
        if self.formal_charges is None:
            self.formal_charges = torch.zeros(n, dtype=torch.long)
        else:
            self.formal_charges = torch.as_tensor(self.formal_charges, dtype=torch.long)
            if tuple(self.formal_charges.shape) != (n,):
                raise MoleculeDataError(f"{self.location}: formal_charges must be [{n}], got {tuple(self.formal_charges.shape)}")

    @property
    def location(self) -> str:
        """Where the record came from, for messages: ``"<source> record <k>"`` or ``"molecule"``."""
        where = self.source or "molecule"
        return f"{where} record {self.record}" if self.record >= 0 else where

    @property
    def num_atoms(self) -> int:
        return int(self.types.shape[0])

    @property
    def symbols(self) -> list[str]:
        return [ATOM_SYMBOLS[t] for t in self.types.tolist()]
