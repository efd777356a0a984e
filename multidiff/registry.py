"""Modalities: what an adapter provides, and how the core finds it.

A modality is a subclass of :class:`Modality` exposed through the entry-point group
``multidiff.modalities`` (``name = "package.module:ClassName"`` in its ``pyproject.toml``).
The built-in adapters register exactly the same way a third-party package does, so
``multidiff list``, ``multidiff train NAME`` and :class:`~multidiff.pipeline.DiffusionPipeline`
treat them alike. The core never imports a modality by name.

What the core asks of a modality (everything else is the adapter's business):

============================  ==================================================================
method                        job
============================  ==================================================================
``default_config()``          a :class:`~multidiff.training.config.TrainConfig` that trains a
                              sensible model (its ``model``/``process``/``loss``/``data`` sections)
``build_network(config)``     the denoiser network (an ``nn.Module``) described by ``config.model``
``dataset(config, split)``    a map-style dataset of items
``collate(items)``            items -> a batch
``training_batch(...)``       a batch -> ``(x0, space, cond)`` for the loss (label dropout here)
``space(config, n, ...)``     the Space of ``n`` items to sample (shapes, atom counts, ...)
``condition(config, ...)``    ``(cond, uncond)`` keyword tensors for conditional sampling / CFG
``num_classes(config)``       the number of classes of a class-conditional model (0: none)
``decode(x, space, config)``  sampled tensors -> domain objects (images, molecules, waveforms)
``evaluate(objects, ...)``    quality figures as a dict
``save(objects, out, ...)``   files (and a picture on request); returns the paths written
``pretrained()``              shipped checkpoints by name -> directory
``add_commands(sub)``         optional extra CLI verbs under ``multidiff NAME ...``
============================  ==================================================================
"""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ENTRY_POINT_GROUP", "Modality", "ModalityError", "available_modalities", "get_modality"]

ENTRY_POINT_GROUP = "multidiff.modalities"


class ModalityError(LookupError):
    """An unknown or broken modality."""


class Modality:
    """Base class of modality adapters; see the module docstring for the contract."""

    #: the registered name, also the ``kind`` recorded in checkpoints
    name: str = ""
    description: str = ""

    # -- training ------------------------------------------------------------------------
    def default_config(self):
        raise NotImplementedError

    def build_network(self, config) -> nn.Module:
        raise NotImplementedError

    def dataset(self, config, split: str = "train"):
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def training_batch(self, net: nn.Module, batch: Any, generator: torch.Generator, config) -> tuple[Tensor, Any, dict]:
        raise NotImplementedError

    # -- sampling ------------------------------------------------------------------------
    def space(self, config, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None, **request: Any):
        """The Space of ``n`` items to sample; random structure (atom counts) from ``generator``."""
        raise NotImplementedError

    def condition(self, config, n: int, device: torch.device | str = "cpu", **request: Any) -> tuple[dict, dict] | None:
        """``(cond, uncond)`` for a conditional request (e.g. ``labels=[...]``), or ``None``."""
        return None

    def num_classes(self, config) -> int:
        """Classes of a class-conditional model (``labels="all"`` cycles through them); 0 if none."""
        return 0

    def decode(self, x: Tensor, space, config) -> list:
        raise NotImplementedError

    def evaluate(self, objects: list, config, **options: Any) -> dict:
        raise NotImplementedError

    def save(self, objects: list, out: str | Path, config, picture: bool = False) -> list[Path]:
        raise NotImplementedError

    def pretrained(self) -> dict[str, Path]:
        return {}

    def add_commands(self, subparsers) -> None:
        """Register modality verbs (``multidiff NAME VERB``) on an argparse sub-parser set."""

    def __repr__(self) -> str:
        return f"<modality {self.name!r}>"


def _entry_points():
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_modalities() -> list[str]:
    """Names of the installed modalities (built-in and third-party), sorted."""
    return sorted(_entry_points())


def get_modality(name: str) -> Modality:
    """Instantiate the modality registered under ``name``."""
    eps = _entry_points()
    if name not in eps:
        close = difflib.get_close_matches(name, list(eps), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModalityError(
            f"unknown modality {name!r}{hint}; installed: {', '.join(sorted(eps)) or 'none'}. "
            f"A modality registers itself under the entry-point group {ENTRY_POINT_GROUP!r}."
        )
    try:
        cls = eps[name].load()
    except Exception as err:  # the adapter is installed but broken: say which and why
        raise ModalityError(f"modality {name!r} ({eps[name].value}) failed to load: {err}") from err
    obj = cls() if isinstance(cls, type) else cls
    if not isinstance(obj, Modality):
        raise ModalityError(f"entry point {name!r} ({eps[name].value}) is not a multidiff.registry.Modality")
    if not obj.name:
        obj.name = name
    return obj
