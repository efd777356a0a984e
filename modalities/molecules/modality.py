"""The registered molecule modality: QM9 (or the committed fixture) through the shared engine.

Molecules are flat node tensors ``[N, 9]`` (EDM's representation: positions, one-hot H C N O F
times 0.25, atomic number times 0.1) on a :class:`~multidiff.space.GraphSpace` with zero centre
of mass on the positions. ``config.data``: ``{"name": "qm9" | "fixture", "properties": [...],
"num_atoms_histogram": [...], "normalizer": {...}}`` (the last two are filled in from the data
when training starts, so a checkpoint samples atom counts and reads property units on its own).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from multidiff.registry import Modality
from multidiff.training.config import EMAConfig, OptimConfig, RunConfig, TrainConfig
from multidiff.training.distributed import unwrap_model

from .data import AtomCountDistribution, MoleculeDataset, PropertyNormalizer, collate_molecules, molecule_space, split_molecules
from .vocab import NUM_FEATURES

__all__ = ["MoleculesModality", "PRETRAINED_DIR"]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


class MoleculesModality(Modality):
    name = "molecules"
    description = "3D molecules (QM9 with hydrogens; SDF/XYZ in and out), E(3)-equivariant EGNN or e3nn networks"

    # -- training ------------------------------------------------------------------------
    def default_config(self) -> TrainConfig:
        return TrainConfig(
            model={"kind": "egnn", "num_features": NUM_FEATURES, "hidden": 128, "num_layers": 6},
            process={"name": "vp-polynomial", "options": {"power": 2.0, "precision": 1e-5}, "prediction": "eps"},
            loss={"weighting": "simple", "time_sampling": "uniform"},
            data={"name": "qm9", "properties": [], "property_dropout": 0.1},
            optim=OptimConfig(lr=5e-4, warmup_steps=500, schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0),
            ema=EMAConfig(kind="power", sigma_rel=0.05),
            run=RunConfig(out_dir="runs/qm9", steps=200_000, batch_size=64, ckpt_every=500, log_every=25),
        )

    def build_network(self, config: TrainConfig) -> nn.Module:
        from .networks import build_network

        return build_network(_network_config(config))

    def dataset(self, config: TrainConfig, split: str = "train"):
        data = config.data
        props = list(data.get("properties", []))
        name = data.get("name", "qm9")
        if name == "qm9":
            from .qm9 import load_qm9

            qm9 = load_qm9(data.get("cache_dir"))
            split = {"holdout": "test"}.get(split, split)
            normalizer = PropertyNormalizer.from_qm9(qm9, props, split="train") if props else None
            ds = MoleculeDataset.from_qm9(qm9, split, properties=props, normalizer=normalizer)
        elif name == "fixture":
            from .qm9 import load_fixture

            ds = MoleculeDataset.from_qm9(load_fixture(), "all", properties=props)
        else:
            raise ValueError(f"unknown molecule data {name!r}; valid: 'qm9', 'fixture'")
        if split == "train":
            data["num_atoms_histogram"] = ds.num_atoms_histogram().tolist()
            if props and ds.normalizer is not None:
                data["normalizer"] = ds.normalizer.to_config()
        return ds

    def collate(self, items: Sequence[dict]):
        return collate_molecules(items)

    def training_batch(self, net: nn.Module, batch: Any, generator: torch.Generator, config: TrainConfig):
        device = next(unwrap_model(net).parameters()).device
        batch = batch.to(device)
        cond = {}
        if config.data.get("properties"):
            cond["properties"] = unwrap_model(net).drop_properties(batch.properties, generator)
        return batch.x, batch.space, cond

    # -- sampling ------------------------------------------------------------------------
    def num_classes(self, config: TrainConfig) -> int:
        return 0

    def atom_counts(self, config: TrainConfig, n: int, n_atoms=None, generator: torch.Generator | None = None) -> Tensor:
        """Atom counts for ``n`` molecules: given (one int or one per molecule) or drawn from the
        training histogram stored in the checkpoint."""
        hist = config.data.get("num_atoms_histogram")
        max_atoms = len(hist) - 1 if hist else None
        if n_atoms is None:
            if not hist:
                raise ValueError("the checkpoint has no atom-count histogram: pass n_atoms")
            gen = generator if generator is None or generator.device.type == "cpu" else None
            return AtomCountDistribution(hist).sample(n, gen)
        counts = torch.as_tensor(n_atoms, dtype=torch.long).reshape(-1)
        if counts.numel() == 1:
            counts = counts.expand(n)
        if counts.numel() != n:
            raise ValueError(f"got {counts.numel()} atom counts for {n} molecules")
        bad = ((counts < 1) | (counts > (max_atoms or 10**9))).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"n_atoms {int(counts[i])} of molecule {i} is out of range: this model was trained on "
                             f"1..{max_atoms} atoms")
        return counts.clone()

    def space(self, config: TrainConfig, n: int, device="cpu", dtype=torch.float32, n_atoms=None,
              generator: torch.Generator | None = None, **request: Any):
        counts = self.atom_counts(config, n, n_atoms, generator).to(device)
        batch = torch.repeat_interleave(torch.arange(n, device=device), counts)
        return molecule_space(batch, n, dtype)

    def condition(self, config: TrainConfig, n: int, device="cpu", properties: dict | None = None, **request: Any):
        if not properties:
            return None
        names = list(config.data.get("properties", []))
        unknown = sorted(set(properties) - set(names))
        if unknown:
            raise ValueError(f"this checkpoint was not trained on the properties {unknown}; it knows {names or 'none'}")
        missing = [p for p in names if p not in properties]
        if missing:
            raise ValueError(f"give a target for every conditioning property; missing {missing}")
        norm = PropertyNormalizer.from_config(config.data["normalizer"])
        raw = torch.stack([torch.as_tensor(properties[p], dtype=torch.float32).reshape(-1).expand(n) for p in names], -1)
        cond = norm.normalize(raw).to(device)
        null = torch.full_like(cond, float("nan"))
        return {"properties": cond}, {"properties": null}

    def decode(self, x: Tensor, space, config: TrainConfig) -> list:
        from .io import to_rdkit

        return [to_rdkit(pos, types) for pos, types in split_molecules(x.detach().float().cpu(), space.batch.cpu())]

    # -- evaluation and files --------------------------------------------------------------
    def evaluate(self, objects: list, config: TrainConfig, training_smiles=None, **options: Any) -> dict:
        from .metrics import evaluate_molecules

        return evaluate_molecules(objects, training_smiles=training_smiles, **options)

    def save(self, objects: list, out: str | Path, config: TrainConfig, picture: bool = False) -> list[Path]:
        from .io import molecule_grid, write_sdf, write_xyz

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "molecules.sdf", out / "molecules.xyz"]
        write_sdf(objects, paths[0])
        write_xyz(objects, paths[1])
        if picture:
            paths.append(out / "grid.png")
            molecule_grid(objects[:48], path=paths[-1])
        return paths

    def pretrained(self) -> dict[str, Path]:
        if not PRETRAINED_DIR.is_dir():
            return {}
        return {p.name: p for p in sorted(PRETRAINED_DIR.iterdir()) if (p / "state.json").is_file()}


def _network_config(config: TrainConfig) -> dict:
    """The network config: ``config.model`` with the number of conditioning properties (and
    their dropout) taken from ``config.data``, so they cannot disagree."""
    return {**config.model, "num_properties": len(config.data.get("properties", [])),
            "property_dropout": float(config.data.get("property_dropout", 0.1))}
