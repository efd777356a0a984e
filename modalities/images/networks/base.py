"""What every image network shares: the forward contract, labels, and config round trips.

Contract (the one :class:`multidiff.Denoiser` relies on)::

    net(x [B, C, H, W], t [B], labels: LongTensor[B] | None = None) -> [B, C, H, W]

* ``t`` is any float time input (see :mod:`.embeddings`); ``x`` may be any float dtype, the
  output has the dtype of ``x`` (parameters stay float32; under ``torch.autocast`` the inner
  arithmetic is bf16).
* ``labels``: ``0..num_classes-1`` for a class, ``num_classes`` for the learned null class;
  ``None`` means null for every item. Unconditional networks (``num_classes=0``) take
  ``labels=None`` only.
* The forward pass is deterministic. Label dropout for classifier-free guidance is **not** drawn
  inside ``forward``: the training loss calls :meth:`ImageNetwork.drop_labels` (active only in
  training mode, with an explicit generator) and passes the result as ``labels``. Keeping the
  random mask out of ``forward`` keeps the network a pure function of its inputs, so a run is
  reproducible from the loss's generator alone and DDP replicas see the labels they are given.

A config dataclass describes the architecture completely, so a checkpoint rebuilds the network
with :func:`build_network` (``{"kind": "unet" | "dit", ...}``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .embeddings import check_labels, drop_labels

__all__ = ["ConfigError", "ImageNetwork", "config_from_dict"]


class ConfigError(ValueError):
    """A network config with an unknown key or an invalid value."""


def config_from_dict(cls: type, data: dict[str, Any], kind: str | None = None) -> Any:
    """Build the dataclass ``cls`` from a (JSON-decoded) dict: unknown keys are an error, lists
    become tuples, and a ``"kind"`` entry must equal ``kind``."""
    data = dict(data)
    given = data.pop("kind", None)
    if given is not None and kind is not None and given != kind:
        raise ConfigError(f"this is a {given!r} config, not a {kind!r} one")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; valid: {', '.join(sorted(names))}")
    for name, value in data.items():
        if isinstance(value, list):
            data[name] = tuple(value)
    return cls(**data)


class ImageNetwork(nn.Module):
    """Base class: config handling, the label contract and classifier-free-guidance dropout."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_classes = int(config.num_classes)

    # -- configs -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any] | Any) -> ImageNetwork:
        """Rebuild from a config dataclass or its dict (as stored in a checkpoint)."""
        if isinstance(config, dict):
            config = config_from_dict(cls.config_class, config, cls.kind)
        if not isinstance(config, cls.config_class):
            raise ConfigError(f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}")
        return cls(config)

    def config_dict(self) -> dict[str, Any]:
        """JSON-ready description of the architecture, ``{"kind": ..., <config fields>}``."""
        d = dataclasses.asdict(self.config)
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- labels ------------------------------------------------------------------------
    @property
    def null_label(self) -> int:
        """Index of the learned null class (``num_classes``)."""
        return self.num_classes

    @property
    def label_dropout(self) -> float:
        return float(self.config.label_dropout)

    def drop_labels(self, labels: Tensor | None, generator: torch.Generator | None = None) -> Tensor | None:
        """Training-time label dropout: each label becomes the null class with probability
        ``config.label_dropout`` when the module is in training mode; identity in eval mode,
        for unconditional networks and for ``labels=None``."""
        if labels is None or self.num_classes == 0 or not self.training:
            return labels
        return drop_labels(labels, self.label_dropout, self.null_label, generator)

    def _labels(self, labels: Tensor | None, x: Tensor) -> Tensor | None:
        return check_labels(labels, x.shape[0], self.num_classes, x.device)

    def _check_input(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Validate ``x`` and return ``t`` as a ``[B]`` tensor (a scalar time is broadcast)."""
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"{type(self).__name__} expects x of shape [B, {c}, H, W], got {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a float tensor, got {x.dtype}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}] (one time per item) or be a scalar, got {list(t.shape)}")
        return t
