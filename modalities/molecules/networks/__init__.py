"""Equivariant denoising networks for molecules, behind one interface.

``net(x [N, F], t [B], batch=batch [N], properties=None | [B, P]) -> [N, F]`` (see :mod:`.base`):

* ``"egnn"``: :class:`EGNN`, EDM's E(n)-equivariant graph network (Satorras et al. 2021;
  Hoogeboom et al. 2022). E(3)-equivariant.
* ``"tfn"``: :class:`TensorFieldNetwork`, an e3nn tensor-field convolution network with
  irreps features and gated nonlinearities (NequIP / SE(3)-transformer style). E(3)-equivariant.

:func:`build_network` rebuilds either from a checkpoint's ``net.config_dict()``.
"""
from __future__ import annotations

from typing import Any

from multidiff.networks import build_from_config

from .base import (
    ConfigError,
    MoleculeNetwork,
    PropertyError,
    config_from_dict,
    drop_properties,
    null_properties,
)
from .egnn import EGNN, EGNNConfig
from .graph import (
    GraphError,
    fully_connected_edges,
    radius_edges,
    remove_mean,
    scatter_sum,
)
from .se3 import TensorFieldConfig, TensorFieldNetwork

__all__ = [
    "NETWORKS",
    "ConfigError",
    "EGNN",
    "EGNNConfig",
    "GraphError",
    "MoleculeNetwork",
    "PropertyError",
    "TensorFieldConfig",
    "TensorFieldNetwork",
    "build_network",
    "config_from_dict",
    "drop_properties",
    "fully_connected_edges",
    "null_properties",
    "radius_edges",
    "remove_mean",
    "scatter_sum",
]

NETWORKS: dict[str, type[MoleculeNetwork]] = {"egnn": EGNN, "tfn": TensorFieldNetwork}


def build_network(config: dict[str, Any]) -> MoleculeNetwork:
    """Rebuild a network from ``net.config_dict()`` (``{"kind": "egnn" | "tfn", ...}``)."""
    return build_from_config(NETWORKS, config, "molecule network")
