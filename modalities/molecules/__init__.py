"""Molecule modality: QM9 and SDF/XYZ files as EDM's equivariant representation, RDKit out.

>>> from multidiff.modalities.molecules import load_fixture, MoleculeDataset
>>> data = MoleculeDataset.from_qm9(load_fixture(), "all", properties=["gap"])
>>> batch = data.batch(range(4))            # x [N, 9], batch [N], GraphSpace, properties [4, 1]
>>> batch.x.shape[1], batch.properties.shape
(9, torch.Size([4, 1]))
"""
from __future__ import annotations

from .data import (
    AtomCountDistribution,
    MoleculeBatch,
    MoleculeDataset,
    PropertyNormalizer,
    collate_molecules,
    decode_features,
    molecule_features,
    molecule_space,
    num_atoms_histogram,
    split_molecules,
)
from .io import (
    BOND_METHODS,
    from_rdkit,
    invalid_reason,
    is_sanitized,
    mol_to_smiles,
    molecule_grid,
    save_3d_view,
    to_rdkit,
    to_rdkit_batch,
    write_sdf,
    write_xyz,
)
from .metrics import (
    check_stability,
    check_validity,
    evaluate_molecules,
    novelty,
    stability,
    uniqueness,
    validity,
)
from .modality import MoleculesModality
from .pipeline import MoleculeDiffusion
from .networks import build_network
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
from .readers import (
    NoConformerError,
    ReadResult,
    SkippedRecord,
    UnreadableRecordError,
    read_molecules,
    read_sdf,
    read_xyz,
)
from .vocab import (
    ATOM_SYMBOLS,
    ATOMIC_NUMBERS,
    NUM_FEATURES,
    MoleculeDataError,
    MoleculeRecord,
    TooManyAtomsError,
    UnknownElementError,
)

__all__ = [
    "MoleculeDiffusion",
    "MoleculesModality",
    "build_network",
    "check_stability",
    "check_validity",
    "evaluate_molecules",
    "novelty",
    "stability",
    "uniqueness",
    "validity",
    "ATOMIC_NUMBERS",
    "ATOM_SYMBOLS",
    "BOND_METHODS",
    "HARTREE_TO_MEV",
    "NUM_FEATURES",
    "PROPERTY_NAMES",
    "PROPERTY_UNITS",
    "QM9",
    "QM9_SPLITS",
    "AtomCountDistribution",
    "MoleculeBatch",
    "MoleculeDataError",
    "MoleculeDataset",
    "MoleculeRecord",
    "NoConformerError",
    "PropertyNormalizer",
    "QM9CacheError",
    "QM9NotInstalledError",
    "ReadResult",
    "SkippedRecord",
    "TooManyAtomsError",
    "UnknownElementError",
    "UnreadableRecordError",
    "collate_molecules",
    "decode_features",
    "from_rdkit",
    "invalid_reason",
    "is_sanitized",
    "load_fixture",
    "load_qm9",
    "mol_to_smiles",
    "molecule_features",
    "molecule_grid",
    "molecule_space",
    "num_atoms_histogram",
    "read_molecules",
    "read_sdf",
    "read_xyz",
    "save_3d_view",
    "split_molecules",
    "to_rdkit",
    "to_rdkit_batch",
    "write_sdf",
    "write_xyz",
]
