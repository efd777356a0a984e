"""DenseSpace and GraphSpace: every method against a direct computation."""
from __future__ import annotations

import pytest
import torch

from multidiff import DenseSpace, GraphSpace
from multidiff.space import ShapeError, Space

F64 = torch.float64


def test_dense_space_methods():
    space = DenseSpace((3, 2, 4, 5), dtype=F64)
    assert isinstance(space, Space)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    assert space.expand(c).shape == (3, 1, 1, 1)
    assert space.expand(torch.tensor(2.0)).shape == (3, 1, 1, 1)
    v = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(space.sum(v), torch.stack([v[i].sum() for i in range(3)]))
    torch.testing.assert_close(space.expand(c) * v, torch.stack([c[i] * v[i] for i in range(3)]))
    assert torch.equal(space.dof(), torch.full((3,), 40.0))
    assert space.project(v) is v
    assert space.model_kwargs() == {}
    rep = space.repeat(4)
    assert rep.shape == (12, 2, 4, 5) and rep.batch_size == 12 and rep.dtype == F64
    noise = space.noise(torch.Generator().manual_seed(1))
    assert noise.shape == space.shape and noise.dtype == F64
    # same generator state, same noise
    assert torch.equal(noise, space.noise(torch.Generator().manual_seed(1)))
    assert space.check(v) is v
    with pytest.raises(ShapeError, match=r"\(3, 2, 4\).*expects \(3, 2, 4, 5\)"):
        space.check(v[..., 0])


def test_dense_like_and_bad_shapes():
    x = torch.zeros(7, 3)
    s = DenseSpace.like(x)
    assert s.shape == (7, 3) and s.dtype == torch.float32
    with pytest.raises(ShapeError):
        DenseSpace((5,))
    with pytest.raises(ShapeError):
        DenseSpace((0, 3))


def graph(counts=(3, 1, 4, 6), features=5, com=(0, 1, 2), dtype=F64):
    return GraphSpace.from_counts(list(counts), features, com_channels=com, dtype=dtype)


def test_graph_space_expand_sum_dof():
    counts = [3, 1, 4, 6]
    space = graph(counts)
    assert isinstance(space, Space)
    assert space.shape == (14, 5) and space.batch_size == 4
    assert torch.equal(space.batch, torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]))
    c = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    e = space.expand(c)
    assert e.shape == (14, 1)
    assert torch.equal(e[:, 0], torch.repeat_interleave(c, torch.tensor(counts)))
    v = torch.randn(14, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    sums = torch.stack([chunk.sum() for chunk in torch.split(v, counts)])
    torch.testing.assert_close(space.sum(v), sums)
    # dof = n F - 3 with zero centre of mass on three position channels
    assert torch.equal(space.dof(), torch.tensor([3 * 5 - 3, 1 * 5 - 3, 4 * 5 - 3, 6 * 5 - 3], dtype=torch.float32))
    assert torch.equal(graph(counts, com=None).dof(), torch.tensor([15.0, 5.0, 20.0, 30.0]))
    assert space.model_kwargs()["batch"] is space.batch


def test_graph_space_project_removes_com_on_chosen_channels_only():
    counts = [3, 1, 4, 6]
    space = graph(counts)
    v = torch.randn(14, 5, generator=torch.Generator().manual_seed(1), dtype=F64) + 3.0
    p = space.project(v)
    for chunk_p, chunk_v in zip(torch.split(p, counts), torch.split(v, counts)):
        torch.testing.assert_close(chunk_p[:, :3], chunk_v[:, :3] - chunk_v[:, :3].mean(0))
        assert torch.equal(chunk_p[:, 3:], chunk_v[:, 3:])
    assert float(space.com(p).abs().max()) < 1e-12
    torch.testing.assert_close(space.project(p), p)  # a projection


def test_graph_noise_zero_com_and_variance_on_the_subspace():
    """Noise on a GraphSpace has zero CoM to 1e-6 (float32) and E[sum eps^2] = dof per item
    (2,000 replicas of the items; tolerance 5 standard errors)."""
    space = graph(dtype=torch.float32)
    noise = space.noise(torch.Generator().manual_seed(2))
    assert noise.dtype == torch.float32
    assert float(space.com(noise).abs().max()) < 1e-6
    big = graph(counts=(3, 1, 4, 6) * 2000)
    sq = big.sum(big.noise(torch.Generator().manual_seed(3)) ** 2).reshape(2000, 4).mean(0)
    dof = torch.tensor([12.0, 2.0, 17.0, 27.0], dtype=F64)
    # sum eps^2 ~ chi^2(dof): std sqrt(2 dof / 2000) for the mean
    assert bool(((sq - dof).abs() < 5 * torch.sqrt(2 * dof / 2000)).all()), sq


def test_graph_repeat():
    counts = [2, 3]
    space = graph(counts)
    rep = space.repeat(3)
    assert rep.batch_size == 6 and rep.shape == (15, 5)
    assert torch.equal(rep.counts, torch.tensor([2, 3, 2, 3, 2, 3]))
    assert rep.com_channels == space.com_channels
    assert torch.equal(rep.dof(), space.dof().repeat(3))
    v = torch.randn(5, 5, dtype=F64)
    torch.testing.assert_close(rep.sum(v.repeat(3, 1)), space.sum(v).repeat(3))


def test_graph_space_bad_input():
    with pytest.raises(ShapeError, match="sorted"):
        GraphSpace(torch.tensor([0, 1, 0]), 3)
    with pytest.raises(ShapeError, match="no nodes"):
        GraphSpace(torch.tensor([0, 0, 2]), 3)
    with pytest.raises(ShapeError, match="integer"):
        GraphSpace(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ShapeError, match="out of range"):
        GraphSpace.from_counts([2, 2], 3, com_channels=(0, 1, 3))
    with pytest.raises(ShapeError, match="positive"):
        GraphSpace.from_counts([2, 0], 3)
    space = graph()
    with pytest.raises(ShapeError, match=r"\(14, 4\).*\(14, 5\)"):
        space.check(torch.zeros(14, 4))
