"""What every adapter's networks share: a dataclass config that rebuilds the network.

A network class sets ``kind`` and ``config_class`` (a dataclass) and subclasses
:class:`ConfigurableNetwork`; ``net.config_dict()`` is what a checkpoint stores and
:func:`build_from_config` rebuilds it from a ``{kind: class}`` table, rejecting unknown kinds and
unknown fields by name. Adapters (built in or a user's) use it so that their checkpoints load
without pickling any code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from torch import nn

__all__ = ["ConfigError", "ConfigurableNetwork", "config_from_dict", "build_from_config"]


class ConfigError(ValueError):
    """A network config with an unknown key or an invalid value."""


def config_from_dict(cls: type, data: Mapping[str, Any], kind: str | None = None) -> Any:
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
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class ConfigurableNetwork(nn.Module):
    """An ``nn.Module`` fully described by a dataclass config."""

    kind: ClassVar[str]
    config_class: ClassVar[type]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "ConfigurableNetwork":
        """Rebuild from a config dataclass or its dict (as stored in a checkpoint)."""
        if isinstance(config, Mapping):
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


def build_from_config(networks: Mapping[str, type], config: Mapping[str, Any], what: str = "network") -> nn.Module:
    """Rebuild a network from ``net.config_dict()`` using the ``{kind: class}`` table ``networks``."""
    kind = config.get("kind") if isinstance(config, Mapping) else None
    if kind not in networks:
        raise ConfigError(f"unknown {what} kind {kind!r}; valid: {', '.join(networks)}")
    return networks[kind].from_config(config)
