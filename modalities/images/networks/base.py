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

from typing import ClassVar

import torch
from multidiff.networks import ConfigError, ConfigurableNetwork, config_from_dict
from torch import Tensor

from .embeddings import check_labels, drop_labels

__all__ = ["ConfigError", "ImageNetwork", "config_from_dict"]


class ImageNetwork(ConfigurableNetwork):
    """Base class: config handling, the label contract and classifier-free-guidance dropout."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_classes = int(config.num_classes)

    # -- configs -----------------------------------------------------------------------
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
