"""Edges and per-molecule reductions for flat node batches, in plain torch.

A batch is ``N`` nodes with a sorted PyG-style ``batch`` vector (``batch[i]`` is the item of node
``i``; each item's nodes are contiguous). Edges are ``edge_index = [source; target]`` of shape
``[2, E]`` (PyG's ``"source_to_target"`` flow): a message travels from ``edge_index[0]`` to
``edge_index[1]`` and is summed at the target.

* :func:`fully_connected_edges`: every ordered pair ``(j, i)``, ``j != i``, inside one item, as
  EDM does for QM9 (Hoogeboom et al. 2022; the diagonal of its edge mask is off). ``sum_b
  n_b (n_b - 1)`` edges.
* :func:`radius_edges`: the pairs with ``||x_i - x_j|| < r`` inside one item, for molecules too
  large for all pairs. Built item-chunk by item-chunk (at most ``max_pairs`` candidate pairs
  in memory at once) and without a neighbour cap, because a cap would make the graph depend
  on the order of the atoms.

Both return edges grouped by target (ascending) and, within a target, by source.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "GraphError",
    "check_batch",
    "fully_connected_edges",
    "radius_edges",
    "remove_mean",
    "scatter_sum",
]


class GraphError(ValueError):
    """A ``batch`` vector or positions that do not describe a valid graph batch."""


def check_batch(batch: Tensor | None, num_nodes: int, device: torch.device, num_items: int | None = None) -> Tensor:
    """Validate ``batch`` (``None``: one item holding all nodes) and return it as a long tensor.

    It must be 1-D of length ``num_nodes``, sorted (items contiguous) and, if ``num_items`` is
    given, index items ``0..num_items-1`` with none empty."""
    if batch is None:
        return torch.zeros(num_nodes, dtype=torch.long, device=device)
    batch = torch.as_tensor(batch, device=device)
    if batch.ndim != 1 or batch.numel() != num_nodes:
        raise GraphError(f"batch must have shape [{num_nodes}] (one item index per node), got {list(batch.shape)}")
    if batch.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise GraphError(f"batch must hold integer item indices, got {batch.dtype}")
    batch = batch.long()
    if num_nodes == 0:
        raise GraphError("the batch has no nodes")
    if bool((batch[1:] < batch[:-1]).any()) or int(batch[0]) < 0:
        raise GraphError("batch must be sorted with indices >= 0 so that each item's nodes are contiguous")
    if num_items is not None:
        counts = torch.bincount(batch, minlength=num_items)
        if counts.numel() > num_items:
            raise GraphError(f"batch indexes item {int(batch[-1])} but there are only {num_items} items (from t)")
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise GraphError(f"items {empty[:10]} have no nodes: every item needs at least one")
    return batch


def fully_connected_edges(batch: Tensor) -> Tensor:
    """All ordered pairs of distinct nodes inside each item, ``[2, sum_b n_b (n_b - 1)]``."""
    device = batch.device
    num_nodes = batch.numel()
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    per_target = counts[batch]  # candidates per target: the whole item, self included
    target = torch.repeat_interleave(torch.arange(num_nodes, device=device), per_target)
    first_pair = torch.cumsum(per_target, 0) - per_target
    rank = torch.arange(target.numel(), device=device) - first_pair[target]
    source = starts[batch[target]] + rank
    keep = source != target
    return torch.stack([source[keep], target[keep]])


def radius_edges(pos: Tensor, batch: Tensor, radius: float, max_pairs: int = 1 << 22) -> Tensor:
    """Ordered pairs ``(j, i)``, ``j != i``, of one item with ``||pos_i - pos_j|| < radius``.

    Candidates are the item's pairs, so the cost is ``O(sum_b n_b^2)`` time but at most about
    ``max_pairs`` pairs in memory (items are processed in chunks; one item larger than that is
    its own chunk). The selection is not differentiated (it is a set of indices)."""
    if not radius > 0:
        raise GraphError(f"the radius must be positive, got {radius}")
    if pos.ndim != 2 or pos.shape[0] != batch.numel():
        raise GraphError(f"positions must be [{batch.numel()}, D], got {list(pos.shape)}")
    pos = pos.detach()
    counts = torch.bincount(batch)
    ends = torch.cumsum(counts, 0).tolist()
    # item chunks [lo, hi) whose candidate pairs fit the budget (a big item goes alone)
    chunks, lo, budget = [], 0, 0
    for b, n in enumerate(counts.tolist()):
        if b > lo and budget + n * n > max_pairs:
            chunks.append((lo, b))
            lo, budget = b, 0
        budget += n * n
    chunks.append((lo, len(ends)))
    r2 = float(radius) ** 2
    out = []
    for lo, hi in chunks:
        node_lo = ends[lo - 1] if lo > 0 else 0
        node_hi = ends[hi - 1]
        e = fully_connected_edges(batch[node_lo:node_hi] - lo)
        p = pos[node_lo:node_hi]
        d2 = (p[e[1]] - p[e[0]]).square().sum(-1)
        out.append(e[:, d2 < r2] + node_lo)
    return torch.cat(out, dim=1)


def scatter_sum(values: Tensor, index: Tensor, num: int) -> Tensor:
    """``out[k] = sum_{e : index[e] = k} values[e]``, shape ``[num, *values.shape[1:]]``."""
    out = values.new_zeros((num, *values.shape[1:]))
    return out.index_add_(0, index, values)


def remove_mean(v: Tensor, batch: Tensor, num_items: int) -> Tensor:
    """Subtract each item's mean over its nodes: the zero-centre-of-mass projection."""
    counts = torch.bincount(batch, minlength=num_items).to(v.dtype).clamp_min(1)
    mean = scatter_sum(v, batch, num_items) / counts[:, None]
    return v - mean[batch]
