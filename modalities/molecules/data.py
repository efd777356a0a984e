"""Molecules as tensors: EDM's per-atom features, datasets, batches, atom-count and property statistics.

A batch of ``B`` molecules is one flat tensor ``x [N, 9]`` (``N`` = total atoms) with a sorted
PyG-style ``batch [N]`` vector and a :class:`~multidiff.space.GraphSpace` keeping the position
channels at zero centre of mass per molecule (Hoogeboom et al. 2022, sec. 3; Satorras et al.
2021). Per atom (see :mod:`.vocab`)::

    x = [ r - mean_molecule(r) (3) , onehot(type) * 0.25 (5) , Z * 0.1 (1) ]

Conditioning properties are normalised as EDM does, ``(v - mean) / MAD`` with the mean absolute
deviation ``MAD = mean |v - mean|`` over a reference set (EDM: the training split for its "qm9"
runs, the *valid* split for runs on the Gb half); :class:`PropertyNormalizer` holds the numbers
and exports them to a checkpoint config. Atom counts for sampling come from the training set's
histogram (:class:`AtomCountDistribution`, EDM's ``DistributionNodes``).

Data sources: :func:`load_qm9` / :func:`load_fixture` (:mod:`.qm9`) and any SDF or XYZ file
through :func:`read_molecules` (:mod:`.readers`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from multidiff.space import GraphSpace

from .qm9 import (
    HARTREE_TO_MEV,
    PROPERTY_NAMES,
    PROPERTY_UNITS,
    QM9,
    QM9_SPLITS,
    QM9CacheError,
    QM9NotInstalledError,
    load_fixture,
    load_qm9,
)
from .readers import ReadResult, SkippedRecord, read_molecules, read_sdf, read_xyz
from .vocab import (
    ATOMIC_NUMBER_SCALE,
    NUM_FEATURES,
    NUM_TYPES,
    ONE_HOT_CHANNELS,
    ONE_HOT_SCALE,
    POSITION_CHANNELS,
    MoleculeDataError,
    MoleculeRecord,
    atomic_numbers_of,
)

__all__ = [
    "HARTREE_TO_MEV",
    "PROPERTY_NAMES",
    "PROPERTY_UNITS",
    "QM9",
    "QM9_SPLITS",
    "AtomCountDistribution",
    "MoleculeBatch",
    "MoleculeDataset",
    "PropertyNormalizer",
    "QM9CacheError",
    "QM9NotInstalledError",
    "ReadResult",
    "SkippedRecord",
    "collate_molecules",
    "decode_features",
    "load_fixture",
    "load_qm9",
    "molecule_features",
    "molecule_space",
    "num_atoms_histogram",
    "read_molecules",
    "read_sdf",
    "read_xyz",
    "split_molecules",
]


# -- features ------------------------------------------------------------------------------------


def molecule_features(positions: Tensor, types: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """EDM's ``[n, 9]`` atom features ``[r, onehot * 0.25, Z * 0.1]`` (positions taken as given)."""
    dtype = dtype or (positions.dtype if positions.is_floating_point() else torch.float32)
    types = types.long()
    onehot = torch.nn.functional.one_hot(types, NUM_TYPES).to(dtype) * ONE_HOT_SCALE
    z = atomic_numbers_of(types).to(dtype).unsqueeze(-1) * ATOMIC_NUMBER_SCALE
    return torch.cat([positions.to(dtype), onehot, z], dim=-1)


def decode_features(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(positions [n, 3], types [n])`` from features ``[n, 9]``: types by argmax over the one-hot part."""
    if x.ndim != 2 or x.shape[1] != NUM_FEATURES:
        raise ValueError(f"molecule features must be [n, {NUM_FEATURES}], got {tuple(x.shape)}")
    return x[:, list(POSITION_CHANNELS)], x[:, list(ONE_HOT_CHANNELS)].argmax(dim=1)


def molecule_space(batch: Tensor, batch_size: int | None = None, dtype: torch.dtype = torch.float32) -> GraphSpace:
    """The GraphSpace of molecule features: 9 channels, zero centre of mass on the positions."""
    return GraphSpace(batch, NUM_FEATURES, com_channels=POSITION_CHANNELS, batch_size=batch_size, dtype=dtype)


def _centred(positions: Tensor, batch: Tensor, batch_size: int, dtype: torch.dtype) -> Tensor:
    # the mean is taken in float64 so the float32 result has zero CoM up to one rounding per atom
    p = positions.to(torch.float64)
    com = torch.zeros(batch_size, 3, dtype=torch.float64, device=p.device).index_add_(0, batch, p)
    com = com / torch.bincount(batch, minlength=batch_size).to(torch.float64).unsqueeze(-1)
    return (p - com[batch]).to(dtype)


# -- batches -------------------------------------------------------------------------------------


@dataclass
class MoleculeBatch:
    """``B`` molecules as the network sees them: ``x [N, 9]``, ``batch [N]``, ``space``,
    ``num_atoms [B]``, normalised ``properties [B, P]`` (None without conditioning),
    ``formal_charges [N]`` and ``rows [B]`` (dataset item numbers, -1 when unknown)."""

    x: Tensor
    batch: Tensor
    space: GraphSpace
    num_atoms: Tensor
    properties: Tensor | None
    formal_charges: Tensor
    rows: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def positions(self) -> Tensor:
        return self.x[:, list(POSITION_CHANNELS)]

    @property
    def types(self) -> Tensor:
        return decode_features(self.x)[1]

    def cond(self) -> dict[str, Tensor]:
        """Keyword arguments for the network call ``net(x, t, batch=batch, **cond)``."""
        return {} if self.properties is None else {"properties": self.properties}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MoleculeBatch:
        x = self.x.to(device=device, dtype=dtype or self.x.dtype)
        batch = self.batch.to(device)
        props = None if self.properties is None else self.properties.to(device=device, dtype=dtype or self.properties.dtype)
        return MoleculeBatch(x, batch, molecule_space(batch, self.batch_size, x.dtype), self.num_atoms.to(device), props,
                             self.formal_charges.to(device), self.rows.to(device))


def _make_batch(positions: Tensor, types: Tensor, counts: Tensor, properties: Tensor | None, formal_charges: Tensor,
                rows: Tensor, dtype: torch.dtype) -> MoleculeBatch:
    b = int(counts.shape[0])
    if b == 0:
        raise ValueError("cannot make a batch of zero molecules")
    batch = torch.repeat_interleave(torch.arange(b, device=counts.device), counts)
    x = molecule_features(_centred(positions, batch, b, dtype), types, dtype)
    props = None if properties is None else properties.to(dtype)
    return MoleculeBatch(x, batch, molecule_space(batch, b, dtype), counts.clone(), props, formal_charges.long(), rows)


def collate_molecules(items: Sequence[dict], dtype: torch.dtype = torch.float32) -> MoleculeBatch:
    """Stack dataset items (dicts with ``positions``, ``types`` and optionally ``properties``,
    ``formal_charges``, ``row``) into a :class:`MoleculeBatch`, centring each molecule's positions."""
    if len(items) == 0:
        raise ValueError("cannot collate an empty list of molecules")
    has_props = ["properties" in it for it in items]
    if any(has_props) and not all(has_props):
        raise ValueError(f"items {[i for i, h in enumerate(has_props) if not h][:10]} lack 'properties' that others have")
    counts = torch.tensor([int(it["types"].shape[0]) for it in items], dtype=torch.long)
    positions = torch.cat([torch.as_tensor(it["positions"]) for it in items])
    types = torch.cat([torch.as_tensor(it["types"]).long() for it in items])
    fc = torch.cat([torch.as_tensor(it.get("formal_charges", torch.zeros(len(it["types"]), dtype=torch.long)))
                    for it in items]).long()
    props = torch.stack([torch.as_tensor(it["properties"]) for it in items]) if all(has_props) else None
    rows = torch.tensor([int(it.get("row", -1)) for it in items], dtype=torch.long)
    return _make_batch(positions, types, counts, props, fc, rows, dtype)


def split_molecules(x: Tensor, batch: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The inverse of collation: per molecule ``(positions [n, 3], types [n])``, types by argmax
    over the one-hot channels. ``batch`` must be sorted (each molecule's atoms contiguous)."""
    batch = torch.as_tensor(batch)
    if batch.ndim != 1 or batch.shape[0] != x.shape[0]:
        raise ValueError(f"batch must be [N] with N = {x.shape[0]} atoms, got {tuple(batch.shape)}")
    if batch.numel() and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted so that each molecule's atoms are contiguous")
    positions, types = decode_features(x)
    counts = torch.bincount(batch, minlength=int(batch.max()) + 1 if batch.numel() else 0).tolist()
    return list(zip(positions.split(counts), types.split(counts)))


# -- property normalisation ----------------------------------------------------------------------


class PropertyNormalizer:
    """EDM's property normalisation ``(v - mean) / MAD`` per named property (float64 statistics)."""

    def __init__(self, names: Sequence[str], mean: Sequence[float] | Tensor, mad: Sequence[float] | Tensor):
        self.names = tuple(names)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.mad = torch.as_tensor(mad, dtype=torch.float64).reshape(-1)
        if len(self.names) != len(set(self.names)) or self.mean.shape != (len(self.names),) or self.mad.shape != self.mean.shape:
            raise ValueError(f"need one mean and one MAD per distinct property name, got {self.names}, "
                             f"{tuple(self.mean.shape)}, {tuple(self.mad.shape)}")
        if bool((self.mad <= 0).any()):
            bad = [n for n, m in zip(self.names, self.mad.tolist()) if m <= 0]
            raise ValueError(f"properties {bad} have zero spread: they cannot be normalised")

    @classmethod
    def fit(cls, values: Tensor, names: Sequence[str]) -> PropertyNormalizer:
        """Mean and MAD of ``values [M, P]`` (the reference set, e.g. the training split)."""
        v = torch.as_tensor(values, dtype=torch.float64)
        if v.ndim != 2 or v.shape[1] != len(names) or v.shape[0] == 0:
            raise ValueError(f"values must be [M >= 1, {len(names)}], got {tuple(v.shape)}")
        mean = v.mean(0)
        return cls(names, mean, (v - mean).abs().mean(0))

    @classmethod
    def from_qm9(cls, qm9: QM9, names: Sequence[str], split: str = "train") -> PropertyNormalizer:
        """Statistics of QM9 properties over ``split`` (EDM: "train" for models trained on all of
        the training split, "valid" for its conditional models trained on the Gb half)."""
        unknown = [p for p in names if p not in PROPERTY_NAMES]
        if unknown:
            raise ValueError(f"unknown QM9 properties {unknown}; valid: {', '.join(PROPERTY_NAMES)}")
        cols = [PROPERTY_NAMES.index(p) for p in names]
        return cls.fit(qm9.properties[qm9.indices(split)][:, cols], names)

    def _check(self, values: Tensor) -> None:
        if values.shape[-1] != len(self.names):
            raise ValueError(f"values have {values.shape[-1]} columns but the normaliser has {list(self.names)}")

    def normalize(self, values: Tensor) -> Tensor:
        self._check(values)
        return ((values.to(torch.float64) - self.mean.to(values.device)) / self.mad.to(values.device)).to(
            values.dtype if values.is_floating_point() else torch.float32)

    def denormalize(self, values: Tensor) -> Tensor:
        self._check(values)
        return (values.to(torch.float64) * self.mad.to(values.device) + self.mean.to(values.device)).to(values.dtype)

    def to_config(self) -> dict:
        """JSON-ready ``{name: {"mean": m, "mad": d}}`` for a checkpoint config."""
        return {n: {"mean": float(m), "mad": float(d)} for n, m, d in zip(self.names, self.mean.tolist(), self.mad.tolist())}

    @classmethod
    def from_config(cls, config: dict) -> PropertyNormalizer:
        names = list(config)
        return cls(names, [config[n]["mean"] for n in names], [config[n]["mad"] for n in names])

    def __repr__(self) -> str:
        return f"PropertyNormalizer({self.to_config()})"


# -- atom counts ---------------------------------------------------------------------------------


def num_atoms_histogram(num_atoms: Tensor | Sequence[int], max_atoms: int | None = None) -> Tensor:
    """Counts ``h[n]`` of molecules with ``n`` atoms, ``n = 0..max_atoms`` (long ``[max_atoms + 1]``)."""
    n = torch.as_tensor(num_atoms, dtype=torch.long).reshape(-1)
    if n.numel() == 0 or bool((n < 1).any()):
        raise ValueError("atom counts must be a non-empty list of positive integers")
    top = int(n.max())
    if max_atoms is not None and top > max_atoms:
        raise ValueError(f"a molecule has {top} atoms, more than max_atoms = {max_atoms}")
    return torch.bincount(n, minlength=(max_atoms if max_atoms is not None else top) + 1)


class AtomCountDistribution:
    """Atom counts drawn from a histogram ``h[n]`` with probability ``h[n] / sum(h)`` (EDM's ``DistributionNodes``)."""

    def __init__(self, histogram: Tensor | Sequence[float]):
        h = torch.as_tensor(histogram, dtype=torch.float64).reshape(-1)
        if h.numel() < 2 or bool((h < 0).any()) or float(h[1:].sum()) <= 0 or float(h[0]) != 0:
            raise ValueError("the histogram must be non-negative, with h[0] = 0 and at least one molecule of >= 1 atom")
        self.histogram = h

    @classmethod
    def from_counts(cls, num_atoms: Tensor | Sequence[int], max_atoms: int | None = None) -> AtomCountDistribution:
        return cls(num_atoms_histogram(num_atoms, max_atoms))

    @property
    def probs(self) -> Tensor:
        return self.histogram / self.histogram.sum()

    @property
    def max_atoms(self) -> int:
        return int(torch.nonzero(self.histogram).max())

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` atom counts (long ``[n]``), reproducible with ``generator`` (a CPU generator)."""
        return torch.multinomial(self.probs, n, replacement=True, generator=generator)

    def log_prob(self, counts: Tensor) -> Tensor:
        counts = torch.as_tensor(counts, dtype=torch.long)
        p = torch.zeros(counts.shape, dtype=torch.float64)
        ok = (counts >= 0) & (counts < self.histogram.numel())
        p[ok] = self.probs[counts[ok]]
        return p.log()

    def to_config(self) -> dict:
        return {"histogram": [int(v) if float(v).is_integer() else float(v) for v in self.histogram.tolist()]}

    @classmethod
    def from_config(cls, config: dict) -> AtomCountDistribution:
        return cls(config["histogram"])


# -- the dataset ---------------------------------------------------------------------------------


class MoleculeDataset(torch.utils.data.Dataset):
    """Map-style molecules over flat tensors (molecule ``i`` owns atoms ``offsets[i]:offsets[i+1]``).

    ``ds[i]`` is a dict: ``positions [n, 3]`` float32 Å (as stored, not centred), ``types [n]``,
    ``formal_charges [n]``, ``row`` (= i), ``smiles``, ``name`` and, with conditioning,
    ``properties [P]`` float32 normalised by :attr:`normalizer`. Use :func:`collate_molecules`
    as a DataLoader's ``collate_fn``, or :meth:`batch` (vectorised, same result) on index lists.
    """

    def __init__(self, positions: Tensor, types: Tensor, num_atoms: Tensor, *, formal_charges: Tensor | None = None,
                 properties: Tensor | None = None, property_names: Sequence[str] = (), smiles: Sequence[str] | None = None,
                 names: Sequence[str] | None = None, normalizer: PropertyNormalizer | None = None):
        self.positions = torch.as_tensor(positions, dtype=torch.float32)
        self.types = torch.as_tensor(types, dtype=torch.long)
        self.num_atoms = torch.as_tensor(num_atoms, dtype=torch.long)
        m = int(self.num_atoms.shape[0])
        self.offsets = torch.zeros(m + 1, dtype=torch.long)
        torch.cumsum(self.num_atoms, 0, out=self.offsets[1:])
        a = int(self.offsets[-1])
        if tuple(self.positions.shape) != (a, 3) or tuple(self.types.shape) != (a,):
            raise MoleculeDataError(f"positions {tuple(self.positions.shape)} and types {tuple(self.types.shape)} "
                                    f"do not match sum(num_atoms) = {a}")
        self.formal_charges = torch.zeros(a, dtype=torch.long) if formal_charges is None else torch.as_tensor(formal_charges).long()
        self.smiles = list(smiles) if smiles is not None else [""] * m
        self.names = list(names) if names is not None else [""] * m
        self.property_names = tuple(property_names)
        self.raw_properties = None
        self.properties = None
        self.normalizer = None
        if self.property_names:
            self.raw_properties = torch.as_tensor(properties, dtype=torch.float32)
            if tuple(self.raw_properties.shape) != (m, len(self.property_names)):
                raise MoleculeDataError(f"properties must be [{m}, {len(self.property_names)}], got {tuple(self.raw_properties.shape)}")
            if normalizer is None:
                normalizer = PropertyNormalizer.fit(self.raw_properties, self.property_names)
            elif normalizer.names != self.property_names:
                raise ValueError(f"the normaliser is for {list(normalizer.names)}, the dataset has {list(self.property_names)}")
            self.normalizer = normalizer
            self.properties = normalizer.normalize(self.raw_properties)

    @classmethod
    def from_records(cls, records: Sequence[MoleculeRecord], properties: Sequence[str] = (),
                     normalizer: PropertyNormalizer | None = None) -> MoleculeDataset:
        """Molecules from :class:`MoleculeRecord` s; every record must carry the named ``properties``."""
        if len(records) == 0:
            raise MoleculeDataError("no molecules: the list of records is empty")
        props = None
        if properties:
            rows = []
            for i, r in enumerate(records):
                missing = [p for p in properties if p not in r.properties]
                if missing:
                    raise MoleculeDataError(f"{r.location} (item {i}) lacks properties {missing}; it has "
                                            f"{sorted(r.properties)}", r.source or None, r.record if r.record >= 0 else i)
                rows.append([float(r.properties[p]) for p in properties])
            props = torch.tensor(rows, dtype=torch.float32)
        return cls(torch.cat([r.positions for r in records]), torch.cat([r.types for r in records]),
                   torch.tensor([r.num_atoms for r in records]), formal_charges=torch.cat([r.formal_charges for r in records]),
                   properties=props, property_names=properties, smiles=[r.smiles for r in records],
                   names=[r.name for r in records], normalizer=normalizer)

    @classmethod
    def from_qm9(cls, qm9: QM9, split: str = "train", properties: Sequence[str] = (),
                 normalizer: PropertyNormalizer | None = None) -> MoleculeDataset:
        """A QM9 split (train, valid, test, Ga, Gb, all) with the named properties (:data:`PROPERTY_NAMES`)."""
        unknown = [p for p in properties if p not in PROPERTY_NAMES]
        if unknown:
            raise ValueError(f"unknown QM9 properties {unknown}; valid: {', '.join(PROPERTY_NAMES)}")
        rows = qm9.indices(split)
        atoms = qm9.atom_rows(rows)
        cols = [PROPERTY_NAMES.index(p) for p in properties]
        return cls(qm9.positions[atoms], qm9.types[atoms], qm9.num_atoms[rows], formal_charges=qm9.formal_charges[atoms],
                   properties=qm9.properties[rows][:, cols] if cols else None, property_names=tuple(properties),
                   smiles=[qm9.smiles[i] for i in rows.tolist()],
                   names=[f"gdb_{i}" for i in qm9.index[rows].tolist()], normalizer=normalizer)

    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])

    def __getitem__(self, i: int) -> dict:
        m = len(self)
        if not -m <= i < m:
            raise IndexError(f"index {i} out of range for a dataset of {m} molecules")
        i = i % m
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        item = {"positions": self.positions[s:e], "types": self.types[s:e], "formal_charges": self.formal_charges[s:e],
                "row": i, "smiles": self.smiles[i], "name": self.names[i]}
        if self.normalizer is not None:
            item["properties"] = self.properties[i]
        return item

    def record(self, i: int) -> MoleculeRecord:
        it = self[i]
        props = {} if self.raw_properties is None else dict(zip(self.property_names, self.raw_properties[i].tolist()))
        return MoleculeRecord(it["positions"].clone(), it["types"].clone(), it["formal_charges"].clone(), props,
                              it["name"], it["smiles"], "dataset", int(it["row"]))

    def batch(self, indices: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> MoleculeBatch:
        """The molecules ``indices`` as a :class:`MoleculeBatch` without per-item Python work
        (identical to ``collate_molecules([ds[i] for i in indices])``)."""
        rows = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < -len(self) or int(rows.max()) >= len(self)):
            raise IndexError(f"indices outside 0..{len(self) - 1}")
        rows = rows % max(len(self), 1)
        counts = self.num_atoms[rows]
        starts = torch.repeat_interleave(self.offsets[rows], counts)
        local = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        atoms = starts + local
        props = self.properties[rows] if self.normalizer is not None else None
        return _make_batch(self.positions[atoms], self.types[atoms], counts, props, self.formal_charges[atoms], rows, dtype)

    collate = staticmethod(collate_molecules)

    @property
    def max_atoms(self) -> int:
        return int(self.num_atoms.max())

    def num_atoms_histogram(self, max_atoms: int | None = None) -> Tensor:
        return num_atoms_histogram(self.num_atoms, max_atoms)

    def atom_count_distribution(self) -> AtomCountDistribution:
        return AtomCountDistribution(self.num_atoms_histogram())
