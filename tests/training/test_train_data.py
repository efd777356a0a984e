"""The index stream and its shards: epochs are permutations, batches are resumable, ranks split
every global batch."""
from __future__ import annotations

import pytest

from multidiff.training.data import (
    ResumableBatchSampler,
    derive_seed,
    shard_batch,
    stream_indices,
)


def test_every_epoch_is_a_permutation_and_batches_straddle_epochs():
    n, b = 10, 4
    s = ResumableBatchSampler(n, b, seed=3)
    flat = [i for _ in range(10) for _, idx in s.next_step() for i in idx]  # 40 items = 4 epochs
    epochs = [flat[k * n:(k + 1) * n] for k in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled each epoch
    assert s.position == 40 and s.epoch == 4


def test_deterministic_and_seeded():
    assert stream_indices(50, 1, True, 0, 120) == stream_indices(50, 1, True, 0, 120)
    assert stream_indices(50, 1, True, 0, 50) != stream_indices(50, 2, True, 0, 50)
    assert stream_indices(7, 1, False, 5, 9) == [5, 6, 0, 1, 2, 3, 4, 5, 6]
    whole = stream_indices(13, 4, True, 0, 100)
    assert stream_indices(13, 4, True, 37, 20) == whole[37:57]  # any slice, computed from scratch


def test_resume_from_state_continues_the_same_batches():
    a = ResumableBatchSampler(23, 6, seed=5, accum=2)
    for _ in range(7):
        a.next_step()
    b = ResumableBatchSampler(23, 6, seed=5, accum=2)
    b.load_state_dict(a.state_dict())
    assert [a.next_step() for _ in range(9)] == [b.next_step() for _ in range(9)]


def test_ranks_split_every_global_batch():
    n, b, world, accum = 40, 12, 2, 3
    ranks = [ResumableBatchSampler(n, b, seed=1, rank=r, world_size=world, accum=accum) for r in range(world)]
    single = ResumableBatchSampler(n, b, seed=1, accum=world * accum)
    for _ in range(8):
        parts = [shard for r in ranks for shard in r.next_step()]
        ref = single.next_step()
        assert parts == ref  # same shard ids, same indices, on W ranks as on one with W*A micro-batches
        assert [sid for sid, _ in parts] == list(range(world * accum))
        assert all(len(idx) == b // (world * accum) for _, idx in parts)
    assert ranks[0].position == ranks[1].position == single.position == 8 * b


def test_iteration_yields_micro_batches():
    s = ResumableBatchSampler(9, 4, seed=0, accum=2)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    assert [len(x) for x in first] == [2, 2, 2, 2] and s.position == 8


def test_errors():
    with pytest.raises(ValueError, match="multiple of world_size \\* grad_accum = 2 \\* 2"):
        ResumableBatchSampler(10, 6, world_size=2, accum=2)
    with pytest.raises(ValueError, match="empty"):
        ResumableBatchSampler(0, 4)
    with pytest.raises(ValueError, match="cannot be cut"):
        shard_batch([1, 2, 3], 2)
    s = ResumableBatchSampler(10, 2, seed=1)
    with pytest.raises(ValueError, match="size=11"):
        ResumableBatchSampler(11, 2, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seed=1"):
        ResumableBatchSampler(10, 2, seed=2).load_state_dict(s.state_dict())


def test_derive_seed_streams_are_distinct_and_stable():
    seeds = {derive_seed(0, "loss", step, shard) for step in range(50) for shard in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2) != derive_seed(1, "a", 3)
