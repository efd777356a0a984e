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
                 generator: torch.Generator | None = None, batch_size: int | None = 256, fragment=None,
                 **options: Any) -> list:
        """``n`` molecules. ``n_atoms``: one count or one per molecule (default: drawn from the
        training histogram); ``properties``: targets in the units of
        :data:`~multidiff.modalities.molecules.PROPERTY_UNITS` for a property-conditional model,
        with classifier-free guidance of scale ``guidance``; ``fragment`` (an RDKit Mol with a
        conformer, or a :class:`MoleculeRecord`): grow every molecule around it (see :meth:`_grow`)."""
        if fragment is not None:
            return self._grow(n, fragment, n_atoms, nfe=nfe, solver=solver, generator=generator, **options)
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

    @torch.no_grad()
    def _grow(self, n: int, fragment, n_atoms, nfe: int, solver: str, generator, **options: Any) -> list:
        """Fragment inpainting: atoms ``0..k-1`` of every molecule are the fragment's, kept by
        replacement after every step (:class:`multidiff.guidance.Inpaint`); the rest is generated.

        Centre of mass, exactly: the fragment is written in its own centred frame, and the state
        keeps the molecule's centre of mass at zero by shifting only the generated atoms. So the
        fragment's atoms come out with exactly the given types and the given coordinates up to one
        rigid translation (its relative coordinates are exact); the generated atoms' centre of mass
        sits at minus ``k / (n - k)`` times the fragment's, which is zero here."""
        from multidiff.guidance import Inpaint
        from multidiff.sampling import sample

        from .data import molecule_features
        from .io import from_rdkit
        from .vocab import MoleculeRecord

        record = fragment if isinstance(fragment, MoleculeRecord) else from_rdkit(fragment, name="fragment")
        pos = torch.as_tensor(record.positions, dtype=torch.float32)
        types = torch.as_tensor(record.types, dtype=torch.long)
        k = len(types)
        counts = self.modality.atom_counts(self.config, n, n_atoms, generator)
        small = (counts < k).nonzero().flatten()
        if small.numel():
            raise ValueError(f"the fragment has {k} atoms but molecule {int(small[0])} has only "
                             f"{int(counts[small[0]])}: pass n_atoms >= {k}")
        space = self.modality.space(self.config, n, self.device, n_atoms=counts)
        feats = molecule_features(pos - pos.mean(0), types)
        starts = torch.cumsum(counts, 0) - counts
        idx = (starts[:, None] + torch.arange(k)[None]).flatten().to(self.device)
        mask = torch.zeros(space.shape, dtype=torch.bool, device=self.device)
        known = torch.zeros(space.shape, device=self.device)
        mask[idx] = True
        known[idx] = feats.to(self.device).repeat(n, 1)
        hook = Inpaint(mask, known, self.process, generator, space=space)
        out = sample(self.denoiser, space, solver=solver, nfe=nfe, generator=generator, constrain=hook.constrain, **options)
        return self.modality.decode(out.x, space, self.config)
