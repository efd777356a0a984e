"""Spaces: what the core knows about the structure of a batch.

The core works on one tensor ``x`` and a Space. A Space draws noise, broadcasts
per-item scalars, sums per item, counts degrees of freedom and projects onto the
subspace the data lives in. Samplers, losses, guidance and the likelihood go through
these methods only, so none of them knows which modality it serves.

* :class:`DenseSpace`: a ``[B, ...]`` tensor (images, audio, vectors).
* :class:`GraphSpace`: flat nodes ``[N, F]`` with a PyG-style ``batch`` vector; optional
  zero centre of mass on chosen channels (positions), which removes ``len(channels)``
  degrees of freedom per item (Hoogeboom et al. 2022; Satorras et al. 2021).
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Space", "DenseSpace", "GraphSpace", "ShapeError"]


class ShapeError(ValueError):
    """A tensor does not match the Space it is used with."""


@runtime_checkable
class Space(Protocol):
    batch_size: int
    device: torch.device
    dtype: torch.dtype

    def noise(self, generator: torch.Generator | None = None) -> Tensor: ...
    def expand(self, c: Tensor) -> Tensor: ...
    def sum(self, v: Tensor) -> Tensor: ...
    def dof(self) -> Tensor: ...
    def project(self, x: Tensor) -> Tensor: ...
    def check(self, x: Tensor, what: str = "x") -> Tensor: ...
    def model_kwargs(self) -> dict: ...
    def repeat(self, k: int) -> "Space": ...


def _randn(shape, generator, device, dtype) -> Tensor:
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(
            f"the generator is on {generator.device} but the Space is on {device}: "
            f"make it with torch.Generator(device={str(device)!r})"
        )
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


class DenseSpace:
    """A dense batch of shape ``[B, *item_shape]``."""

    def __init__(self, shape: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) < 2 or min(self.shape) < 1:
            raise ShapeError(f"a DenseSpace needs a shape [B, ...] with positive sizes, got {self.shape}")
        self.batch_size = self.shape[0]
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def like(cls, x: Tensor) -> "DenseSpace":
        return cls(x.shape, x.device, x.dtype)

    def noise(self, generator: torch.Generator | None = None) -> Tensor:
        return _randn(self.shape, generator, self.device, self.dtype)

    def expand(self, c: Tensor) -> Tensor:
        c = torch.as_tensor(c, device=self.device)
        if c.ndim == 0:
            c = c.expand(self.batch_size)
        return c.reshape(self.batch_size, *([1] * (len(self.shape) - 1)))

    def sum(self, v: Tensor) -> Tensor:
        return v.reshape(v.shape[0], -1).sum(1)

    def dof(self) -> Tensor:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return torch.full((self.batch_size,), float(n), device=self.device)

    def project(self, x: Tensor) -> Tensor:
        return x

    def check(self, x: Tensor, what: str = "x") -> Tensor:
        if tuple(x.shape) != self.shape:
            raise ShapeError(f"{what} has shape {tuple(x.shape)} but the Space expects {self.shape}")
        return x

    def model_kwargs(self) -> dict:
        return {}

    def repeat(self, k: int) -> "DenseSpace":
        return DenseSpace((self.shape[0] * k, *self.shape[1:]), self.device, self.dtype)

    def __repr__(self) -> str:
        return f"DenseSpace(shape={self.shape}, device={self.device}, dtype={self.dtype})"


class GraphSpace:
    """Flat node features ``[N, F]`` of ``B`` graphs, node ``i`` belonging to item ``batch[i]``.

    ``com_channels`` (for instance ``range(3)`` for positions) are kept at zero centre of
    mass per item: noise is drawn on that subspace, :meth:`project` removes the mean, and
    :meth:`dof` counts ``n_i * F - len(com_channels)``. ``batch`` must be sorted (PyG's
    ``Batch`` convention) so items are contiguous.
    """

    def __init__(
        self,
        batch: Tensor,
        num_features: int,
        com_channels: Sequence[int] | None = None,
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        batch = torch.as_tensor(batch)
        if batch.ndim != 1 or batch.numel() == 0:
            raise ShapeError(f"batch must be a non-empty 1-D index vector, got shape {tuple(batch.shape)}")
        if batch.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"batch must hold integer item indices, got {batch.dtype}")
        batch = batch.long()
        if bool((batch[1:] < batch[:-1]).any()):
            raise ShapeError("batch must be sorted so that each item's nodes are contiguous")
        self.batch = batch
        self.batch_size = int(batch_size if batch_size is not None else int(batch.max()) + 1)
        self.counts = torch.bincount(batch, minlength=self.batch_size)
        if bool((self.counts == 0).any()):
            empty = torch.nonzero(self.counts == 0).flatten().tolist()
            raise ShapeError(f"items {empty[:10]} have no nodes: every item needs at least one")
        self.num_features = int(num_features)
        self.com_channels = tuple(com_channels) if com_channels is not None else ()
        if any(c < 0 or c >= self.num_features for c in self.com_channels):
            raise ShapeError(f"com_channels {self.com_channels} out of range for {self.num_features} features")
        self.device = batch.device
        self.dtype = dtype

    @classmethod
    def from_counts(
        cls,
        counts: Sequence[int] | Tensor,
        num_features: int,
        com_channels: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "GraphSpace":
        counts = torch.as_tensor(counts, dtype=torch.long, device=device)
        if counts.ndim != 1 or counts.numel() == 0 or bool((counts < 1).any()):
            raise ShapeError(f"counts must be a non-empty list of positive node counts, got {counts.tolist()}")
        batch = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        return cls(batch, num_features, com_channels, len(counts), dtype)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch.numel(), self.num_features)

    def noise(self, generator: torch.Generator | None = None) -> Tensor:
        return self.project(_randn(self.shape, generator, self.device, self.dtype))

    def expand(self, c: Tensor) -> Tensor:
        c = torch.as_tensor(c, device=self.device)
        if c.ndim == 0:
            return c.reshape(1, 1)
        return c[self.batch].unsqueeze(-1)

    def sum(self, v: Tensor) -> Tensor:
        per_node = v.reshape(v.shape[0], -1).sum(1)
        out = torch.zeros(self.batch_size, dtype=per_node.dtype, device=per_node.device)
        return out.index_add_(0, self.batch, per_node)

    def mean(self, v: Tensor) -> Tensor:
        """Per-item mean over nodes, ``[B, F]``."""
        out = torch.zeros(self.batch_size, v.shape[1], dtype=v.dtype, device=v.device)
        out.index_add_(0, self.batch, v)
        return out / self.counts.to(v.dtype).unsqueeze(-1)

    def dof(self) -> Tensor:
        return (self.counts * self.num_features - len(self.com_channels)).to(torch.float32)

    def project(self, x: Tensor) -> Tensor:
        if not self.com_channels:
            return x
        ch = list(self.com_channels)
        com = self.mean(x[:, ch])
        out = x.clone()
        out[:, ch] = x[:, ch] - com[self.batch]
        return out

    def com(self, x: Tensor) -> Tensor:
        """Per-item centre of mass of the ``com_channels``, ``[B, len(com_channels)]``."""
        return self.mean(x[:, list(self.com_channels)])

    def check(self, x: Tensor, what: str = "x") -> Tensor:
        if tuple(x.shape) != self.shape:
            raise ShapeError(f"{what} has shape {tuple(x.shape)} but the GraphSpace expects {self.shape} (nodes, features)")
        return x

    def model_kwargs(self) -> dict:
        return {"batch": self.batch}

    def repeat(self, k: int) -> "GraphSpace":
        offsets = torch.arange(k, device=self.device).repeat_interleave(self.batch.numel()) * self.batch_size
        batch = self.batch.repeat(k) + offsets
        return GraphSpace(batch, self.num_features, self.com_channels, self.batch_size * k, self.dtype)

    def __repr__(self) -> str:
        return (
            f"GraphSpace(items={self.batch_size}, nodes={self.batch.numel()}, features={self.num_features}, "
            f"com_channels={self.com_channels})"
        )
