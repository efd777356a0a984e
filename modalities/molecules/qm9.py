"""QM9 (Ramakrishnan et al. 2014) from the ``qm9pack`` package, parsed once into a cached tensor file.

**Source.** ``qm9pack`` (PyPI, MIT; data CC BY 4.0) ships QM9 as three CSV files in its
``data/`` folder. Its own ``import qm9pack`` fails on current setuptools (it imports
``pkg_resources``), so the CSVs are located with ``importlib.util.find_spec`` and read with the
standard ``csv`` module. They hold 130,831 rows, indices 1..133,885: the 3,054 molecules QM9
marks as failing its geometry consistency check ("uncharacterized.txt") are already absent, so
the rows are exactly the 130,831 molecules EDM keeps after removing that list.

**Contents.** Positions (``XYZ_Ang``, Å), types H C N O F, per-atom formal charges (from the
row's SMILES, whose heavy atoms come in the same order as the XYZ block; a molecule whose order
differs gets zeros and is counted in ``info["formal_charge_mismatches"]``: none in qm9pack 1.0.3), SMILES, the QM9
index and the six properties EDM conditions on, in EDM's units:

=========  ============================  ==============================
name       column                        unit
=========  ============================  ==============================
alpha      Polarizability_bohr3          bohr^3
gap        HOMO_LUMO_gap_au * 27211.4    meV
homo       HOMO_au * 27211.4             meV
lumo       LUMO_au * 27211.4             meV
mu         Dipole_debye                  debye
Cv         Heatcapacity_Cv_cal_mol_K     cal / (mol K)
=========  ============================  ==============================

(EDM's loader multiplies the energies by 27.2114, i.e. works in eV, and its paper reports
meV; models see mean/MAD-normalised values, which do not depend on the unit.)

**Splits, as EDM's ``gen_splits_gdb9``.** With ``M = 130,831`` molecules in index order,
``perm = numpy.random.RandomState(0).permutation(M)``; ``perm[:100000]`` is train, the next
``M - 100000 - int(0.1 M) = 17,748`` valid and the last ``int(0.1 M) = 13,083`` test. EDM reads
each split back in archive order (ascending index), so a split's molecules are in index order.
**Halves** ("Ga"/"Gb", EDM's ``qm9_first_half``/``qm9_second_half``): over the train split in
index order, ``p = RandomState(42).permutation(100000)``; Ga = ``train[p[:50000]]`` (EDM trains
its property classifiers on it), Gb = ``train[p[50000:]]`` (EDM trains its conditional
generative models on it and normalises their properties with the *valid* split's mean/MAD).
This reproduces EDM's split under one assumption: that EDM's source archive lists its files in
name (= index) order, as the split code indexes archive members by position.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .vocab import ATOM_SYMBOLS, MoleculeDataError, MoleculeRecord, UnknownElementError

__all__ = [
    "FIXTURE_PATH",
    "HARTREE_TO_MEV",
    "PROPERTY_NAMES",
    "PROPERTY_UNITS",
    "QM9",
    "QM9_SPLITS",
    "QM9CacheError",
    "QM9NotInstalledError",
    "default_cache_dir",
    "edm_halves",
    "edm_split_labels",
    "export_edm_npz",
    "load_fixture",
    "load_qm9",
    "make_fixture",
    "qm9pack_data_dir",
]

HARTREE_TO_MEV = 27211.4
PROPERTY_NAMES: tuple[str, ...] = ("alpha", "gap", "homo", "lumo", "mu", "Cv")
PROPERTY_UNITS = {"alpha": "bohr^3", "gap": "meV", "homo": "meV", "lumo": "meV", "mu": "debye", "Cv": "cal/(mol K)"}
_PROPERTY_COLUMNS = {
    "alpha": ("Polarizability_bohr3", 1.0),
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_MEV),
    "homo": ("HOMO_au", HARTREE_TO_MEV),
    "lumo": ("LUMO_au", HARTREE_TO_MEV),
    "mu": ("Dipole_debye", 1.0),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),
}
QM9_SPLITS = ("train", "valid", "test", "Ga", "Gb", "all")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
_HALF_CODE = {"Ga": 0, "Gb": 1}
EDM_TRAIN_SIZE = 100_000
SPLIT_SEED = 0
HALF_SEED = 42
_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_FORMAT = "multidiff-qm9"
_VERSION = "1"
FIXTURE_PATH = Path(__file__).resolve().parents[2] / "tests" / "modalities" / "molecules" / "fixtures" / "qm9_300.safetensors"


class QM9NotInstalledError(ImportError):
    """The optional ``qm9pack`` package (the ``[data]`` extra) is not installed."""


class QM9CacheError(MoleculeDataError):
    """A cached QM9 tensor file that is unreadable, of another format version, or inconsistent."""


def default_cache_dir() -> Path:
    """``$MULTIDIFF_CACHE`` if set, else ``$XDG_CACHE_HOME/multidiff`` (``~/.cache/multidiff``)."""
    if os.environ.get("MULTIDIFF_CACHE"):
        return Path(os.environ["MULTIDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multidiff"


def qm9pack_data_dir() -> Path:
    """The ``data/`` folder of the installed ``qm9pack`` (found without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise QM9NotInstalledError(
            "QM9 needs the optional package 'qm9pack': pip install 'multidiff-toolkit[data]' (or pip install qm9pack)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [f for f in _CSV_FILES if not (folder / f).is_file()]
    if missing:
        raise QM9NotInstalledError(f"qm9pack is installed but {folder} lacks {missing}: reinstall qm9pack")
    return folder


def edm_split_labels(num_molecules: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Split code per molecule (0 train, 1 valid, 2 test) by EDM's rule (module docstring)."""
    n_test = int(0.1 * num_molecules)
    n_valid = num_molecules - EDM_TRAIN_SIZE - n_test
    if n_valid < 0:
        raise ValueError(f"EDM's split needs more than {EDM_TRAIN_SIZE + n_test} molecules, got {num_molecules}")
    perm = np.random.RandomState(seed).permutation(num_molecules)
    labels = np.empty(num_molecules, dtype=np.int8)
    labels[perm[:EDM_TRAIN_SIZE]] = 0
    labels[perm[EDM_TRAIN_SIZE:EDM_TRAIN_SIZE + n_valid]] = 1
    labels[perm[EDM_TRAIN_SIZE + n_valid:]] = 2
    return labels


def edm_halves(split_labels: np.ndarray, seed: int = HALF_SEED) -> np.ndarray:
    """Half code per molecule (0 = Ga, 1 = Gb, -1 = not in train) by EDM's rule (module docstring)."""
    train = np.nonzero(split_labels == 0)[0]  # index order, as EDM reads the split back
    perm = np.random.RandomState(seed).permutation(len(train))
    halves = np.full(len(split_labels), -1, dtype=np.int8)
    halves[train[perm[: len(train) // 2]]] = 0
    halves[train[perm[len(train) // 2:]]] = 1
    return halves


@dataclass
class QM9:
    """QM9 as flat tensors: molecule ``i`` owns atoms ``offsets[i]:offsets[i+1]``.

    ``positions [A, 3]`` float32 Å, ``types [A]`` long (H C N O F -> 0..4), ``formal_charges [A]``
    long, ``num_atoms [M]`` long, ``index [M]`` long (QM9 numbers, 1-based), ``properties [M, 6]``
    float32 in the order of :data:`PROPERTY_NAMES`, ``split [M]`` (0/1/2 = train/valid/test),
    ``half [M]`` (0 = Ga, 1 = Gb, -1 outside train), ``smiles`` (M strings), ``info`` (provenance).
    """

    positions: Tensor
    types: Tensor
    formal_charges: Tensor
    num_atoms: Tensor
    index: Tensor
    properties: Tensor
    split: Tensor
    half: Tensor
    smiles: list[str]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.offsets = torch.zeros(len(self.num_atoms) + 1, dtype=torch.long)
        torch.cumsum(self.num_atoms, 0, out=self.offsets[1:])
        m, a = len(self.num_atoms), int(self.offsets[-1])
        problems = []
        if tuple(self.positions.shape) != (a, 3) or self.types.shape != (a,) or self.formal_charges.shape != (a,):
            problems.append(f"atom tensors {tuple(self.positions.shape)}, {tuple(self.types.shape)}, "
                            f"{tuple(self.formal_charges.shape)} do not match sum(num_atoms) = {a}")
        for name in ("index", "split", "half"):
            if getattr(self, name).shape != (m,):
                problems.append(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({m},)")
        if tuple(self.properties.shape) != (m, len(PROPERTY_NAMES)) or len(self.smiles) != m:
            problems.append(f"properties {tuple(self.properties.shape)} / {len(self.smiles)} SMILES for {m} molecules")
        if problems:
            raise QM9CacheError("inconsistent QM9 tensors: " + "; ".join(problems))

    property_names = PROPERTY_NAMES

    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])

    def indices(self, split: str = "all") -> Tensor:
        """Row numbers (ascending) of ``split``: one of train, valid, test, Ga, Gb, all."""
        if split == "all":
            return torch.arange(len(self))
        if split in _SPLIT_CODE:
            return torch.nonzero(self.split == _SPLIT_CODE[split]).flatten()
        if split in _HALF_CODE:
            return torch.nonzero(self.half == _HALF_CODE[split]).flatten()
        raise ValueError(f"unknown QM9 split {split!r}; valid: {', '.join(QM9_SPLITS)}")

    def record(self, i: int) -> MoleculeRecord:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return MoleculeRecord(
            positions=self.positions[s:e].clone(), types=self.types[s:e].clone(),
            formal_charges=self.formal_charges[s:e].clone(),
            properties={k: float(v) for k, v in zip(PROPERTY_NAMES, self.properties[i].tolist())},
            name=f"gdb_{int(self.index[i])}", smiles=self.smiles[i], source=self.info.get("source", "QM9"), record=i,
        )

    def atom_rows(self, rows: Tensor) -> Tensor:
        """Flat atom indices of molecules ``rows`` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        counts = self.num_atoms[rows]
        starts = torch.repeat_interleave(self.offsets[rows], counts)
        local = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return starts + local

    def subset(self, rows) -> QM9:
        """The molecules ``rows`` (in that order) as a new :class:`QM9` (split labels kept)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        atoms = self.atom_rows(rows)
        return QM9(self.positions[atoms], self.types[atoms], self.formal_charges[atoms], self.num_atoms[rows],
                   self.index[rows], self.properties[rows], self.split[rows], self.half[rows],
                   [self.smiles[i] for i in rows.tolist()], dict(self.info))

    def dataset(self, split: str = "train", properties=(), normalizer=None):
        """A :class:`~.data.MoleculeDataset` of ``split`` with the named ``properties`` (normalised
        by ``normalizer``, by default fitted on this split as EDM does for its "qm9" runs)."""
        from .data import MoleculeDataset

        return MoleculeDataset.from_qm9(self, split, properties=properties, normalizer=normalizer)

    # -- storage ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """One safetensors file (atomic write); SMILES and provenance in its JSON metadata."""
        import safetensors.torch

        from multidiff.training.checkpoint import atomic_write_bytes

        tensors = {
            "positions": self.positions.float(), "types": self.types.to(torch.uint8),
            "formal_charges": self.formal_charges.to(torch.int8), "num_atoms": self.num_atoms.to(torch.int16),
            "index": self.index.to(torch.int32), "properties": self.properties.float(),
            "split": self.split.to(torch.int8), "half": self.half.to(torch.int8),
        }
        meta = {"format": _FORMAT, "version": _VERSION,
                "json": json.dumps({"info": self.info, "property_names": list(PROPERTY_NAMES),
                                    "property_units": PROPERTY_UNITS, "atom_symbols": list(ATOM_SYMBOLS),
                                    "smiles": self.smiles})}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> QM9:
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                raise QM9CacheError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                    f"expected {_FORMAT!r} version {_VERSION!r}", path)
            doc = json.loads(meta["json"])
            if tuple(doc["property_names"]) != PROPERTY_NAMES or tuple(doc["atom_symbols"]) != ATOM_SYMBOLS:
                raise QM9CacheError(f"{path}: property names or vocabulary differ from this version's", path)
            return cls(tensors["positions"], tensors["types"].long(), tensors["formal_charges"].long(),
                       tensors["num_atoms"].long(), tensors["index"].long(), tensors["properties"],
                       tensors["split"].long(), tensors["half"].long(), list(doc["smiles"]), doc["info"])
        except QM9CacheError:
            raise
        except Exception as e:  # a truncated or foreign file: say which, and why
            raise QM9CacheError(f"{path}: not a readable QM9 tensor file ({type(e).__name__}: {e})", path) from None


# -- parsing qm9pack's CSV files -----------------------------------------------------------------


def _numbers(text: str) -> np.ndarray:
    # "[[x,y,z],[...]]" -> flat floats; QM9's own files write exponents as "*^"
    return np.array(text.replace("[", "").replace("]", "").replace("*^", "e").split(","), dtype=np.float64)


def _formal_charges(smiles: str, heavy_symbols: list[str]):
    """Per-heavy-atom formal charges from the SMILES, or None if they cannot be matched to the
    XYZ atoms (a charged SMILES whose heavy-atom order differs from the XYZ block's)."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    charges = [a.GetFormalCharge() for a in mol.GetAtoms()]
    if not any(charges) and len(charges) == len(heavy_symbols):
        return charges  # a neutral molecule: zeros whatever the atom order
    if [a.GetSymbol() for a in mol.GetAtoms()] != heavy_symbols:
        return None
    return charges


def parse_qm9pack(data_dir: str | Path | None = None, limit: int | None = None) -> QM9:
    """Read qm9pack's CSV files into a :class:`QM9` (about a minute for all 130,831 rows)."""
    from rdkit import RDLogger

    folder = Path(data_dir) if data_dir is not None else qm9pack_data_dir()
    csv.field_size_limit(sys.maxsize)
    symbol_index = {s: i for i, s in enumerate(ATOM_SYMBOLS)}
    pos, types, charges, counts, index, props, smiles = [], [], [], [], [], [], []
    mismatches = 0
    RDLogger.DisableLog("rdApp.*")
    try:
        for name in _CSV_FILES:
            path = folder / name
            with open(path, newline="") as f:
                for line_no, row in enumerate(csv.DictReader(f), start=2):
                    if limit is not None and len(counts) >= limit:
                        break
                    where = f"{path} line {line_no} (QM9 index {row.get('Index')})"
                    try:
                        symbols = [s.strip().strip("'\"") for s in row["Elements"].strip("[]").split(",")]
                        xyz = _numbers(row["XYZ_Ang"]).reshape(-1, 3)
                        n = int(row["N_atoms"])
                        values = [float(row[col].replace("*^", "e")) * scale for col, scale in _PROPERTY_COLUMNS.values()]
                    except (KeyError, ValueError) as e:
                        raise MoleculeDataError(f"{where}: unreadable row ({type(e).__name__}: {e})", path, line_no) from None
                    if len(symbols) != n or xyz.shape[0] != n:
                        raise MoleculeDataError(f"{where}: N_atoms {n} but {len(symbols)} elements and {xyz.shape[0]} positions", path, line_no)
                    bad = [s for s in symbols if s not in symbol_index]
                    if bad:
                        raise UnknownElementError(f"{where}: elements {bad} outside {list(ATOM_SYMBOLS)}", path, line_no)
                    fc = _formal_charges(row["SMILES"], [s for s in symbols if s != "H"])
                    if fc is None:
                        mismatches += 1
                        fc_all = [0] * n
                    else:
                        it = iter(fc)
                        fc_all = [0 if s == "H" else next(it) for s in symbols]
                    pos.append(xyz)
                    types.extend(symbol_index[s] for s in symbols)
                    charges.extend(fc_all)
                    counts.append(n)
                    index.append(int(row["Index"]))
                    props.append(values)
                    smiles.append(row["SMILES"])
    finally:
        RDLogger.EnableLog("rdApp.*")
    order = np.argsort(np.asarray(index), kind="stable")
    if not (order == np.arange(len(order))).all():
        raise MoleculeDataError(f"{folder}: rows are not in ascending QM9 index order; the split would differ from EDM's")
    if len(set(index)) != len(index):
        raise MoleculeDataError(f"{folder}: duplicate QM9 indices")
    split = edm_split_labels(len(counts)) if len(counts) > EDM_TRAIN_SIZE else np.zeros(len(counts), np.int8)
    half = edm_halves(split)
    try:
        from importlib.metadata import version

        source_version = version("qm9pack")
    except Exception:
        source_version = "unknown"
    info = {"source": f"qm9pack {source_version}", "molecules": len(counts),
            "formal_charge_mismatches": mismatches, "split_seed": SPLIT_SEED, "half_seed": HALF_SEED,
            "hartree_to_mev": HARTREE_TO_MEV}
    return QM9(torch.from_numpy(np.concatenate(pos)).float(), torch.tensor(types), torch.tensor(charges),
               torch.tensor(counts), torch.tensor(index), torch.tensor(props, dtype=torch.float32),
               torch.from_numpy(split).long(), torch.from_numpy(half).long(), smiles, info)


def load_qm9(cache_dir: str | Path | None = None, *, rebuild: bool = False) -> QM9:
    """All of QM9 with EDM's splits (module docstring). The first call parses qm9pack's CSVs
    and writes ``<cache_dir>/molecules/qm9_v1.safetensors`` (atomically); later calls read it
    in about a second. ``cache_dir`` defaults to :func:`default_cache_dir`. A cache file of
    another format version or a corrupt one is rebuilt with a warning."""
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / "molecules" / f"qm9_v{_VERSION}.safetensors"
    if path.is_file() and not rebuild:
        try:
            return QM9.load(path)
        except QM9CacheError as e:
            warnings.warn(f"rebuilding the QM9 cache: {e}", stacklevel=2)
    data = parse_qm9pack()
    data.save(path)
    return data


def load_fixture(path: str | Path | None = None) -> QM9:
    """The committed 300-molecule QM9 sample (``tests/modalities/molecules/fixtures``), no qm9pack needed.
    Its split/half labels are the molecules' labels in the full data set."""
    path = Path(path) if path is not None else FIXTURE_PATH
    if not path.is_file():
        raise FileNotFoundError(f"the QM9 fixture {path} is missing (it lives in the source tree's tests/ folder)")
    return QM9.load(path)


def make_fixture(qm9: QM9, path: str | Path = FIXTURE_PATH, n: int = 300, seed: int = 1) -> QM9:
    """Write ``n`` molecules drawn without replacement by ``RandomState(seed)`` (kept in index order).
    Not seed 0: ``RandomState(0).choice`` takes the head of the very permutation EDM's split uses,
    so every molecule would come from the training split."""
    rows = np.sort(np.random.RandomState(seed).choice(len(qm9), size=n, replace=False))
    sub = qm9.subset(torch.from_numpy(rows))
    sub.info = dict(qm9.info, fixture={"n": n, "seed": seed, "drawn_from": len(qm9)})
    sub.save(path)
    return sub


def export_edm_npz(qm9: QM9, folder: str | Path, max_atoms: int = 29) -> dict[str, Path]:
    """Write ``folder/{train,valid,test}.npz`` in the layout EDM's QM9 loader reads (it skips its
    download when they exist under ``qm9/temp/qm9/``), so EDM's code trains on this split:
    ``num_atoms``, ``charges`` (atomic numbers, 0 = padding), ``positions`` (Å, zero-padded to
    ``max_atoms``), ``index`` and the six properties in QM9's raw units (HOMO, LUMO and gap in
    Hartree: EDM's loader converts them itself). Each split is in index order, as EDM's own."""
    from .vocab import ATOMIC_NUMBERS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    z_table = torch.tensor(ATOMIC_NUMBERS)
    raw_scale = torch.tensor([1.0 / _PROPERTY_COLUMNS[p][1] for p in PROPERTY_NAMES], dtype=torch.float64)
    out = {}
    for split in ("train", "valid", "test"):
        rows = qm9.indices(split)
        if int(qm9.num_atoms[rows].max()) > max_atoms:
            raise ValueError(f"{split}: a molecule has more than max_atoms = {max_atoms} atoms")
        m = len(rows)
        charges = np.zeros((m, max_atoms), dtype=np.int64)
        positions = np.zeros((m, max_atoms, 3), dtype=np.float32)
        for k, i in enumerate(rows.tolist()):
            s, e = int(qm9.offsets[i]), int(qm9.offsets[i + 1])
            charges[k, : e - s] = z_table[qm9.types[s:e]].numpy()
            positions[k, : e - s] = qm9.positions[s:e].numpy()
        props = (qm9.properties[rows].double() * raw_scale).float().numpy()
        arrays = {"num_atoms": qm9.num_atoms[rows].numpy(), "charges": charges, "positions": positions,
                  "index": qm9.index[rows].numpy()}
        arrays.update({name: props[:, j] for j, name in enumerate(PROPERTY_NAMES)})
        path = folder / f"{split}.npz"
        tmp = folder / f".tmp-{split}.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        out[split] = path
    return out
