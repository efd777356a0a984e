"""Deterministic, resumable batches over a map-style dataset, on one process or many.

**The stream.** Training reads one endless stream of item indices: epoch ``e`` is a permutation
of ``range(size)`` drawn from a generator seeded by ``derive_seed(seed, "epoch", e)`` (identity
without shuffling), and the epochs follow each other. Global batch ``k`` is the stream slice
``[position, position + batch_size)``; a batch may straddle two epochs, so every batch is full and
every item is seen once per epoch. The whole state is one integer, ``position`` — checkpoint it
and the batches after a restart are the ones an uninterrupted run would have drawn. Every index
is a pure function of ``(size, seed, shuffle, position)``, so DataLoader workers can compute
their own batches (no shared iterator state, no worker-order nondeterminism).

**Shards.** A global batch is cut into ``world_size * accum`` equal micro-batches ("shards"),
numbered ``0 .. world_size * accum - 1`` in stream order; rank ``r`` takes shards
``r * accum .. (r + 1) * accum - 1``. The randomness of a shard (noise, times, augmentation,
dropout) is seeded by ``derive_seed(seed, <stream>, step, shard)``, so a run depends on the shard
count only: 2 processes x 1 micro-batch reproduce 1 process x 2 micro-batches (up to the order of
the gradient sums).
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

import torch

__all__ = ["ResumableBatchSampler", "derive_seed", "shard_batch", "stream_indices"]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels (SHA-256 of their ``repr``): independent streams
    for (seed, "epoch", 3), (seed, "loss", step, shard), ... that are stable across runs,
    platforms and Python hash randomisation."""
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=4)
def _epoch_order(size: int, seed: int, shuffle: bool, epoch: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(size)
    g = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(size, generator=g)


def stream_indices(size: int, seed: int, shuffle: bool, position: int, count: int) -> list[int]:
    """Items ``[position, position + count)`` of the index stream (see the module docstring)."""
    if size < 1:
        raise ValueError("the dataset is empty: nothing to train on")
    if position < 0 or count < 0:
        raise ValueError(f"position and count must be >= 0, got {position}, {count}")
    out: list[int] = []
    while count > 0:
        epoch, offset = divmod(position, size)
        take = min(count, size - offset)
        out.extend(_epoch_order(size, seed, shuffle, epoch)[offset:offset + take].tolist())
        position += take
        count -= take
    return out


def shard_batch(indices: list[int], num_shards: int) -> list[list[int]]:
    """Cut a global batch into ``num_shards`` equal consecutive micro-batches."""
    if num_shards < 1 or len(indices) % num_shards:
        raise ValueError(f"a batch of {len(indices)} cannot be cut into {num_shards} equal shards")
    m = len(indices) // num_shards
    return [indices[i * m:(i + 1) * m] for i in range(num_shards)]


class ResumableBatchSampler:
    """This rank's micro-batches of every global batch of the stream.

    ``next_step()`` returns ``[(shard_id, indices), ...]`` (``accum`` entries) for the next global
    batch and advances ``position`` by ``batch_size``; iterating yields the index lists alone,
    so it also works as a ``batch_sampler`` of a ``torch.utils.data.DataLoader``. ``state_dict``
    / ``load_state_dict`` save and restore the position (checked against the dataset size and
    seed: a restart on other data is an error, not a silent reshuffle).
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, *, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, accum: int = 1, position: int = 0):
        if size < 1:
            raise ValueError("the dataset is empty: nothing to train on")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if accum < 1 or batch_size < 1 or batch_size % (world_size * accum):
            raise ValueError(f"the global batch size {batch_size} must be a positive multiple of "
                             f"world_size * grad_accum = {world_size} * {accum}")
        self.size, self.batch_size, self.seed, self.shuffle = int(size), int(batch_size), int(seed), bool(shuffle)
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.position = int(position)

    @property
    def num_shards(self) -> int:
        return self.world_size * self.accum

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.num_shards

    @property
    def epoch(self) -> int:
        return self.position // self.size

    def shards_at(self, position: int) -> list[tuple[int, list[int]]]:
        """This rank's ``(shard_id, indices)`` of the global batch starting at ``position``."""
        shards = shard_batch(stream_indices(self.size, self.seed, self.shuffle, position, self.batch_size), self.num_shards)
        first = self.rank * self.accum
        return [(s, shards[s]) for s in range(first, first + self.accum)]

    def next_step(self) -> list[tuple[int, list[int]]]:
        out = self.shards_at(self.position)
        self.position += self.batch_size
        return out

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            for _, idx in self.next_step():
                yield idx

    def state_dict(self) -> dict:
        return {"position": self.position, "size": self.size, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's data stream has {key}={state[key]!r} but this run has "
                                 f"{key}={getattr(self, key)!r}: resuming would not continue the same batches")
        self.position = int(state["position"])
