"""``MoleculeDiffusion``: the molecule pipeline with chemists' verbs.

>>> model = MoleculeDiffusion.load("runs/qm9")                      # or from_pretrained(name)
>>> mols = model.generate(100, nfe=50, solver="dpmpp_2m", generator=torch.Generator().manual_seed(0))
>>> model.write_sdf(mols, "out.sdf"); model.evaluate(mols)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from multidiff.pipeline import DiffusionPipeline
from multidiff.registry import get_modality

__all__ = ["MoleculeDiffusion"]


class MoleculeDiffusion(DiffusionPipeline):
    """A molecule model: ``generate`` returns RDKit Mols with a 3-D conformer (every sample is
    returned; structures RDKit cannot sanitise carry ``sanitized=False`` and ``invalid_reason``)."""

    @classmethod
    def load(cls, path, device=None, weights: str = "ema", modality=None) -> "MoleculeDiffusion":
        return super().load(path, device=device, weights=weights, modality=modality or get_modality("molecules"))

    @classmethod
    def from_pretrained(cls, name_or_path, device=None, modality=None) -> "MoleculeDiffusion":
        return super().from_pretrained(name_or_path, device=device, modality=modality or "molecules")

    def generate(self, n: int, nfe: int = 50, solver: str = "dpmpp_2m", *, n_atoms: int | Sequence[int] | None = None,
                 properties: dict[str, float] | None = None, guidance: float = 0.0,
                 generator: torch.Generator | None = None, batch_size: int | None = 256, **options: Any) -> list:
        """``n`` molecules. ``n_atoms``: one count or one per molecule (default: drawn from the
        training histogram); ``properties``: targets in the units of
        :data:`~multidiff.modalities.molecules.PROPERTY_UNITS` for a property-conditional model,
        with classifier-free guidance of scale ``guidance``."""
        request: dict[str, Any] = {}
        if n_atoms is not None:
            request["n_atoms"] = n_atoms
        if properties:
            request["properties"] = properties
        return self.sample(n, solver=solver, nfe=nfe, guidance=guidance, generator=generator,
                           batch_size=batch_size, **request, **options)

    def write_sdf(self, mols: list, path: str | Path) -> Path:
        from .io import write_sdf

        return write_sdf(mols, path)
