"""What every molecule network shares: the call contract, property conditioning, configs.

Contract (the one :class:`multidiff.Denoiser` relies on; GraphSpace passes ``batch``)::

    net(x [N, F], t [B], batch=batch [N], properties=None | [B, P]) -> [N, F]

* ``x`` is EDM's per-atom vector ``[position (3), features (F - 3)]`` of ``B`` molecules laid
  out flat with a sorted ``batch`` vector. For ``F = 3`` (positions only, e.g. point clouds)
  the network sees a constant feature 1 per node, as EDM does.
* ``t`` is any float time input, one per molecule (a scalar is broadcast); it enters as one
  extra input feature of every atom (EDM's ``condition_time``).
* The output is EDM's dynamics output: columns ``0:3`` a position-space vector per atom with
  zero mean over each molecule (the network's prediction lives on the zero-centre-of-mass
  subspace, like the noise), columns ``3:F`` per-atom scalars.
* Parameters stay float32 unless converted (``net.double()``); the input is cast to the
  parameters' dtype and the output back to the dtype of ``x``.

**Properties and classifier-free guidance** (Ho & Salimans 2022). A network built with
``num_properties = P > 0`` takes normalised properties ``[B, P]``; they are appended to every
atom's input features (EDM's ``context``). A molecule whose row is entirely NaN, and every
molecule when ``properties=None``, gets a learned null vector instead: the unconditional model
of CFG. NaN rows make a batch that mixes conditional and unconditional molecules one tensor,
which is what :class:`multidiff.guidance.ClassifierFreeGuidance` concatenates
(``uncond = {"properties": null_properties(B, P)}``). A row with only some NaNs is an error.
Training-time dropout is drawn outside ``forward`` by :meth:`MoleculeNetwork.drop_properties`
with an explicit generator, so the forward pass stays a pure function of its inputs.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from multidiff.networks import ConfigError, ConfigurableNetwork, config_from_dict
from torch import Tensor, nn

from .graph import check_batch, fully_connected_edges, radius_edges, remove_mean

__all__ = [
    "ConfigError",
    "MoleculeNetwork",
    "PropertyError",
    "config_from_dict",
    "drop_properties",
    "null_properties",
]

POSITION_DIMS = 3


class PropertyError(ValueError):
    """Properties that do not fit the network (shape, partial NaN, given to an unconditional net)."""


def null_properties(num_items: int, num_properties: int, device=None, dtype=torch.float32) -> Tensor:
    """``[B, P]`` of NaN: "no properties" (the null vector) for every molecule."""
    return torch.full((num_items, num_properties), float("nan"), device=device, dtype=dtype)


def drop_properties(properties: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each molecule's property row by NaN (= the learned null vector) with probability
    ``p`` (classifier-free guidance training, Ho & Salimans 2022, Algorithm 1). The mask comes from
    ``generator`` (on the properties' device) or, if ``None``, from torch's global RNG."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"property dropout must be a probability in [0, 1], got {p}")
    if properties.ndim != 2:
        raise PropertyError(f"properties must have shape [B, P], got {list(properties.shape)}")
    if p == 0.0:
        return properties
    drop = torch.rand(properties.shape[0], generator=generator, device=properties.device) < p
    return properties.masked_fill(drop[:, None], float("nan"))


def check_config_ints(config: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{type(config).__name__}.{name} must be an integer >= {minimum}, got {v!r}")


def check_common_config(config: Any) -> None:
    """Checks shared by every molecule network config (features, properties, radius)."""
    check_config_ints(config, ("num_features",), POSITION_DIMS)
    check_config_ints(config, ("num_properties",), 0)
    if not 0.0 <= config.property_dropout <= 1.0:
        raise ConfigError(f"{type(config).__name__}.property_dropout must be in [0, 1], got {config.property_dropout}")
    if config.radius is not None and not config.radius > 0:
        raise ConfigError(f"{type(config).__name__}.radius must be positive or None (fully connected), got {config.radius}")


class MoleculeNetwork(ConfigurableNetwork):
    """Base class: configs, the input contract, property conditioning and the output layout."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_features = int(config.num_features)
        self.num_properties = int(config.num_properties)
        # features of the input atoms (F - 3, or EDM's constant 1 when there are none),
        # the time, and the properties or the null vector
        self.num_scalar_out = self.num_features - POSITION_DIMS
        self.num_scalar_in = max(self.num_scalar_out, 1) + 1 + self.num_properties
        if self.num_properties:
            self.null_vector = nn.Parameter(torch.zeros(self.num_properties))

    # -- configs -----------------------------------------------------------------------
    def edges(self, pos: Tensor, batch: Tensor) -> Tensor:
        """The graph the network uses for these positions: all pairs, or the radius graph."""
        if self.config.radius is None:
            return fully_connected_edges(batch)
        return radius_edges(pos, batch, self.config.radius)

    # -- properties --------------------------------------------------------------------
    @property
    def property_dropout(self) -> float:
        return float(self.config.property_dropout)

    def drop_properties(self, properties: Tensor | None, generator: torch.Generator | None = None) -> Tensor | None:
        """Training-time dropout to the null vector with probability ``config.property_dropout``
        when the module is in training mode; identity in eval mode, for unconditional networks
        and for ``properties=None``."""
        if properties is None or self.num_properties == 0 or not self.training:
            return properties
        return drop_properties(properties, self.property_dropout, generator)

    def _context(self, properties: Tensor | None, num_items: int, dtype: torch.dtype, device) -> Tensor | None:
        """Per-molecule conditioning ``[B, P]`` with null rows filled by the learned vector."""
        p = self.num_properties
        if p == 0:
            if properties is not None:
                raise PropertyError("this network is unconditional (num_properties=0) but properties were given; pass None")
            return None
        null = self.null_vector.to(dtype)
        if properties is None:
            return null.expand(num_items, p)
        properties = torch.as_tensor(properties, device=device)
        if not properties.dtype.is_floating_point:
            raise PropertyError(f"properties must be a float tensor, got {properties.dtype}")
        if properties.shape != (num_items, p):
            raise PropertyError(
                f"properties must have shape [{num_items}, {p}] (molecules, properties), got {list(properties.shape)}"
            )
        nan = torch.isnan(properties)
        is_null = nan.all(dim=1)
        partial = nan.any(dim=1) & ~is_null
        if bool(partial.any()):
            i = int(partial.nonzero()[0, 0])
            raise PropertyError(f"properties of molecule {i} are partly NaN: give all values or an all-NaN row for 'none'")
        inf = torch.isinf(properties).any(dim=1)
        if bool(inf.any()):
            raise PropertyError(f"properties of molecule {int(inf.nonzero()[0, 0])} are infinite")
        return torch.where(is_null[:, None], null, properties.to(dtype))

    # -- input / output ----------------------------------------------------------------
    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _inputs(self, x: Tensor, t: Tensor | float, batch: Tensor | None, properties: Tensor | None):
        """Validate and split the input: ``(pos [N, 3], scalars [N, S], batch, B)`` in the
        parameters' dtype; ``scalars = [features, t, properties or null]`` per atom."""
        f = self.num_features
        if x.ndim != 2 or x.shape[1] != f:
            raise ValueError(f"{type(self).__name__} expects x of shape [N, {f}] (atoms, features), got {list(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a float tensor, got {x.dtype}")
        dtype = self.param_dtype
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            batch = check_batch(batch, x.shape[0], x.device)
            num_items = int(batch[-1]) + 1
            t = t.expand(num_items)
        elif t.ndim == 1:
            num_items = t.shape[0]
            batch = check_batch(batch, x.shape[0], x.device, num_items)
        else:
            raise ValueError(f"t must have shape [B] (one time per molecule) or be a scalar, got {list(t.shape)}")
        h = x[:, POSITION_DIMS:].to(dtype) if f > POSITION_DIMS else x.new_ones(x.shape[0], 1, dtype=dtype)
        parts = [h, t.to(dtype)[batch, None]]
        context = self._context(properties, num_items, dtype, x.device)
        if context is not None:
            parts.append(context[batch])
        return x[:, :POSITION_DIMS].to(dtype), torch.cat(parts, dim=1), batch, num_items

    def _output(self, vectors: Tensor, scalars: Tensor | None, batch: Tensor, num_items: int, dtype: torch.dtype) -> Tensor:
        """``[vectors with zero mean per molecule, scalars]`` in ``dtype``."""
        vectors = remove_mean(vectors, batch, num_items)
        out = vectors if scalars is None else torch.cat([vectors, scalars.to(vectors.dtype)], dim=1)
        return out.to(dtype)
