"""The E(n)-equivariant graph network (EGNN; Satorras et al. 2021) as EDM uses it.

EDM's dynamics network (Hoogeboom et al. 2022, sec. 3 and appendix B) is an EGNN over the
fully connected graph of each molecule, whose layers are "equivariant blocks". With ``h`` the
node features (embedded from ``[atom features, t, properties]``), ``x`` the positions, ``x^0``
the input positions and edges ``j -> i``:

* edge attributes ``a_ij = [d_ij^2, (d_ij^0)^2]``: the current and the input squared distance
  (or their sinusoid features, EDM's ``sin_embedding`` option, off by default);
* ``inv_sublayers`` invariant graph convolutions (GCL, Satorras et al. eq. 3, 5, 6)::

      m_ij = phi_e(h_i, h_j, a_ij)                              # Linear-SiLU-Linear-SiLU
      m_ij = m_ij * sigmoid(Linear(m_ij))                       # attention gate (EDM: on)
      h_i  = h_i + phi_h(h_i, sum_j m_ij / Z)                   # Linear-SiLU-Linear, Z = 1

* one coordinate update (Satorras et al. eq. 4 with EDM's normalisation and tanh)::

      x_i = x_i + sum_j (x_i - x_j) / (sqrt(d_ij^2 + 1e-8) + C) * tanh(phi_x(h_i, h_j, a_ij)) * R / Z

  with ``C = norm_constant = 1`` and ``R = coords_range = 15``; ``phi_x`` ends in a bias-free
  linear map initialised with gain 0.001, so the network starts near the identity on ``x``.

After the blocks ``h`` is mapped to the ``F - 3`` output features, and the network's output is
``[x_out - x_in`` with its per-molecule mean removed, ``h_out]`` (EDM's ``EGNN_dynamics_QM9``):
the position part is a translation-invariant, rotation/reflection-equivariant vector field on
the zero-centre-of-mass subspace.

**Equivariance: E(3)** (rotations, reflections and translations), exactly: the layers see
positions only through distances and difference vectors. Permuting the atoms of a molecule
permutes the output; molecules in one batch never exchange messages.

With ``radius`` set, the graph holds only pairs closer than ``radius`` in the input positions
and every message (both the ``m_ij`` into the sum and the coordinate term) is multiplied by the
cosine cutoff of that input distance, so the output stays continuous when atoms cross the radius.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import ConfigError, MoleculeNetwork, check_common_config, check_config_ints
from .embeddings import DistanceSinusoids, cosine_cutoff
from .graph import scatter_sum

__all__ = ["EGNN", "EGNNConfig"]


@dataclass(frozen=True)
class EGNNConfig:
    """Everything that defines an :class:`EGNN`; stored in checkpoints as a dict.

    Defaults follow EDM's QM9 model (attention, tanh, ``coords_range=15``, ``norm_constant=1``,
    ``normalization_factor=1``, one invariant sublayer per block) at a CPU size: ``hidden=128``,
    ``num_layers=6`` (EDM: 256 and 9): 895,756 parameters for QM9 features, about 0.7 s for a
    forward and backward pass over 64 molecules of 18 atoms on one CPU thread (EDM's size: 5.34 M,
    about 2.9 s; ``hidden=64, num_layers=4``: 151 k, about 0.2 s).
    """

    num_features: int = 9
    num_properties: int = 0
    property_dropout: float = 0.1
    hidden: int = 128
    num_layers: int = 6
    inv_sublayers: int = 1
    attention: bool = True
    tanh: bool = True
    coords_range: float = 15.0
    norm_constant: float = 1.0
    normalization_factor: float = 1.0
    sin_embedding: bool = False
    radius: float | None = None

    def __post_init__(self):
        check_common_config(self)
        check_config_ints(self, ("hidden", "num_layers", "inv_sublayers"))
        for name in ("coords_range", "normalization_factor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"EGNNConfig.{name} must be positive, got {getattr(self, name)}")
        if not self.norm_constant >= 0:
            raise ConfigError(f"EGNNConfig.norm_constant must be >= 0, got {self.norm_constant}")


def _mlp(n_in: int, hidden: int, n_out: int, final_act: bool) -> nn.Sequential:
    layers = [nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_out)]
    return nn.Sequential(*layers, nn.SiLU()) if final_act else nn.Sequential(*layers)


def edge_mlp(mlp: nn.Sequential, h: Tensor, edges: Tensor, edge_attr: Tensor) -> Tensor:
    """``mlp(cat[h_i, h_j, a_ij])`` over edges ``j -> i`` without building the concatenation: the
    first linear map splits as ``W_1 h_i + W_2 h_j + W_3 a_ij + b``, and ``W_1 h``, ``W_2 h`` are
    computed once per atom instead of once per edge (about half the cost of an EGNN layer)."""
    src, dst = edges
    first, rest = mlp[0], mlp[1:]
    n = h.shape[1]
    w = first.weight
    per_atom = h @ torch.cat([w[:, :n], w[:, n:2 * n]], dim=0).T  # [N, 2 * out]
    to_target, from_source = per_atom.chunk(2, dim=1)
    pre = torch.addmm(first.bias, edge_attr, w[:, 2 * n:].T) + to_target[dst] + from_source[src]
    return rest(pre)


class GCL(nn.Module):
    """One invariant graph convolution with optional attention gating (see module doc)."""

    def __init__(self, hidden: int, edge_dim: int, attention: bool, normalization_factor: float):
        super().__init__()
        self.edge_mlp = _mlp(2 * hidden + edge_dim, hidden, hidden, final_act=True)
        self.node_mlp = _mlp(2 * hidden, hidden, hidden, final_act=False)
        self.gate = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None
        self.normalization_factor = normalization_factor

    def forward(self, h: Tensor, edges: Tensor, edge_attr: Tensor, edge_weight: Tensor | None) -> Tensor:
        dst = edges[1]
        m = edge_mlp(self.edge_mlp, h, edges, edge_attr)
        if self.gate is not None:
            m = m * self.gate(m)
        if edge_weight is not None:
            m = m * edge_weight
        agg = scatter_sum(m, dst, h.shape[0]) / self.normalization_factor
        return h + self.node_mlp(torch.cat([h, agg], dim=1))


class CoordinateUpdate(nn.Module):
    """``x_i += sum_j unit-ish(x_i - x_j) * tanh(phi_x) * R / Z`` (see module doc)."""

    def __init__(self, hidden: int, edge_dim: int, tanh: bool, coords_range: float, normalization_factor: float):
        super().__init__()
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # start near x_out = x_in (EDM)
        self.coord_mlp = nn.Sequential(_mlp(2 * hidden + edge_dim, hidden, hidden, final_act=True), last)
        self.tanh, self.coords_range, self.normalization_factor = tanh, coords_range, normalization_factor

    def forward(self, h, x, edges, direction, edge_attr, edge_weight):
        phi = self.coord_mlp[1](edge_mlp(self.coord_mlp[0], h, edges, edge_attr))
        dst = edges[1]
        if self.tanh:
            phi = torch.tanh(phi) * self.coords_range
        step = direction * phi
        if edge_weight is not None:
            step = step * edge_weight
        return x + scatter_sum(step, dst, x.shape[0]) / self.normalization_factor


class EquivariantBlock(nn.Module):
    """``inv_sublayers`` GCLs on ``h`` then one coordinate update, all with edge attributes
    ``[d^2, (d^0)^2]`` (or their sinusoids)."""

    def __init__(self, config: EGNNConfig, edge_dim: int, sinusoids: DistanceSinusoids | None):
        super().__init__()
        c = config
        self.gcls = nn.ModuleList(GCL(c.hidden, edge_dim, c.attention, c.normalization_factor) for _ in range(c.inv_sublayers))
        self.coords = CoordinateUpdate(c.hidden, edge_dim, c.tanh, c.coords_range, c.normalization_factor)
        self.norm_constant = c.norm_constant
        self.sinusoids = sinusoids

    def forward(self, h, x, edges, d2_input, edge_weight):
        src, dst = edges
        diff = x[dst] - x[src]
        d2 = diff.square().sum(dim=1, keepdim=True)
        direction = diff / (torch.sqrt(d2 + 1e-8) + self.norm_constant)
        if self.sinusoids is not None:
            d2 = self.sinusoids(d2)
        edge_attr = torch.cat([d2, d2_input], dim=1)
        for gcl in self.gcls:
            h = gcl(h, edges, edge_attr, edge_weight)
        return h, self.coords(h, x, edges, direction, edge_attr, edge_weight)


class EGNN(MoleculeNetwork):
    """``EGNN(config)(x [N, F], t [B], batch=batch, properties=None) -> [N, F]``; see module doc."""

    kind = "egnn"
    config_class = EGNNConfig

    def __init__(self, config: EGNNConfig):
        super().__init__(config)
        c = config
        self.sinusoids = DistanceSinusoids() if c.sin_embedding else None
        edge_dim = 2 * self.sinusoids.dim if self.sinusoids is not None else 2
        self.embedding = nn.Linear(self.num_scalar_in, c.hidden)
        self.blocks = nn.ModuleList(EquivariantBlock(c, edge_dim, self.sinusoids) for _ in range(c.num_layers))
        self.embedding_out = nn.Linear(c.hidden, self.num_scalar_out) if self.num_scalar_out else None

    def forward(self, x: Tensor, t: Tensor | float, batch: Tensor | None = None, properties: Tensor | None = None) -> Tensor:
        pos, scalars, batch, num_items = self._inputs(x, t, batch, properties)
        edges = self.edges(pos, batch)
        src, dst = edges
        d2_input = (pos[dst] - pos[src]).square().sum(dim=1, keepdim=True)
        edge_weight = None
        if self.config.radius is not None:
            edge_weight = cosine_cutoff(torch.sqrt(d2_input + 1e-8), self.config.radius)
        if self.sinusoids is not None:
            d2_input = self.sinusoids(d2_input)
        h, y = self.embedding(scalars), pos
        for block in self.blocks:
            h, y = block(h, y, edges, d2_input, edge_weight)
        h_out = self.embedding_out(h) if self.embedding_out is not None else None
        return self._output(y - pos, h_out, batch, num_items, x.dtype)
