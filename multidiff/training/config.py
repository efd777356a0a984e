"""Training configuration: dataclasses, JSON/YAML files and ``--section.field value`` overrides.

A :class:`TrainConfig` groups three typed sections the engine reads (:class:`OptimConfig`,
:class:`EMAConfig`, :class:`RunConfig`) and four free-form dictionaries that a modality fills
and reads itself (``model``, ``process``, ``loss``, ``data``). The whole object is saved inside
every checkpoint (``state.json``) so a checkpoint says how it was made.

Overrides map command-line flags onto it: ``--optim.lr 1e-3``, ``--run.steps=500``,
``--model.channels 64``, ``--model.unet.depth 2`` (dotted keys nest inside free-form sections).
Typed fields convert to their declared type and reject anything else; free-form values are read
as JSON when they parse (numbers, booleans, ``null``, lists) and kept as strings otherwise.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EMA_KINDS",
    "SCHEDULES",
    "ConfigError",
    "EMAConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_overrides",
    "save_config",
]

SCHEDULES = ("constant", "cosine")
EMA_KINDS = ("fixed", "power")
FREE_SECTIONS = ("model", "process", "loss", "data")
TYPED_SECTIONS = ("optim", "ema", "run")


class ConfigError(ValueError):
    """A configuration value, file or override is invalid; the message names it."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with a linear warm-up and a constant or cosine schedule.

    The learning rate at (0-based) step ``s`` of ``S`` total steps, warm-up ``W``, peak ``lr`` and
    floor ``lr_min = min_lr_ratio * lr``:

        lr(s) = lr * (s + 1) / W                                       for s < W
        lr(s) = lr                                                     (constant), or
        lr(s) = lr_min + (lr - lr_min) * (1 + cos(pi * p)) / 2,  p = (s - W) / max(1, S - W)   (cosine)

    ``grad_clip`` is the max global L2 norm of the gradient (``None``: no clipping);
    ``grad_accum`` micro-batches are accumulated per optimiser step on every process.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON and YAML give lists
        _require(self.lr > 0 and math.isfinite(self.lr), f"optim.lr must be a positive number, got {self.lr}")
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.schedule in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip is None or self.grad_clip > 0,
                 f"optim.grad_clip must be positive or null, got {self.grad_clip}")
        _require(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of 0-based optimiser step ``step`` (see the class docstring)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        lr_min = self.min_lr_ratio * self.lr
        p = min(1.0, (step - self.warmup_steps) / max(1, total_steps - self.warmup_steps))
        return lr_min + (self.lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (see :mod:`multidiff.training.ema`).

    ``kind="fixed"``: constant ``decay``. ``kind="power"``: the EDM2 power-function profile
    (Karras et al. 2024) with relative standard deviation ``sigma_rel``; ``decay`` is unused.
    """

    kind: str = "fixed"
    decay: float = 0.999
    sigma_rel: float = 0.05

    def __post_init__(self) -> None:
        from .ema import SIGMA_REL_MAX

        _require(self.kind in EMA_KINDS, f"ema.kind must be one of {', '.join(EMA_KINDS)}, got {self.kind!r}")
        _require(0.0 <= self.decay < 1.0, f"ema.decay must lie in [0, 1), got {self.decay}")
        _require(0.0 < self.sigma_rel < SIGMA_REL_MAX,
                 f"ema.sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {self.sigma_rel}")


@dataclass
class RunConfig:
    """Where and how long to train.

    ``batch_size`` is the *global* batch of one optimiser step: it is cut into
    ``world_size * optim.grad_accum`` equal micro-batches (shards), so it must be divisible by
    that number. ``device="auto"`` picks ``cuda:<local rank>`` when CUDA is available, else CPU.
    ``bf16`` turns on bfloat16 autocast for the forward pass (on CPU too when asked; on a GPU
    without bf16 support it is turned off with a warning). ``ckpt_every``/``sample_every``/
    ``log_every`` are in optimiser steps (``sample_every=0``: never); the final step is always
    checkpointed. ``keep_last`` checkpoints are kept.
    """

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    shuffle: bool = True
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    ckpt_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "keep_last", "log_every"):
            _require(getattr(self, name) >= 1, f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "num_workers", "seed"):
            _require(getattr(self, name) >= 0, f"run.{name} must be >= 0, got {getattr(self, name)}")
        _require(bool(self.out_dir), "run.out_dir must not be empty")


_SECTION_TYPES = {"optim": OptimConfig, "ema": EMAConfig, "run": RunConfig}


@dataclass
class TrainConfig:
    """Everything a training run needs; ``model``/``process``/``loss``/``data`` belong to the modality."""

    model: dict[str, Any] = field(default_factory=dict)
    process: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> TrainConfig:
        """Build from a (possibly partial) dictionary; unknown sections or fields are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of sections, got {type(d).__name__}")
        valid = FREE_SECTIONS + TYPED_SECTIONS
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name not in valid:
                raise ConfigError(f"{where}: unknown section {name!r}{_suggest(name, valid)}; valid: {', '.join(valid)}")
            if name in FREE_SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: section {name!r} must be a mapping, got {type(value).__name__}")
                kwargs[name] = dict(value)
            else:
                kwargs[name] = _build_section(name, value or {}, where)
        return cls(**kwargs)

    def replace(self, **sections: Any) -> TrainConfig:
        return dataclasses.replace(self, **sections)


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build_section(name: str, values: dict[str, Any], where: str):
    cls = _SECTION_TYPES[name]
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section {name!r} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown field {name}.{key}{_suggest(key, list(hints))}; "
                              f"valid: {', '.join(hints)}")
        out[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**out)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, name: str) -> Any:
    """Check/convert a parsed value (from JSON, YAML or a CLI string) to the declared type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = next(a for a in args if a is not type(None))
        return _coerce(value, inner, name)
    if origin is tuple:
        if isinstance(value, str):
            value = _parse_list(value, name)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} expects {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} expects a boolean (true/false), got {value!r}")
    if tp is int or tp is float:
        kind = "an integer" if tp is int else "a number"
        ok = (int,) if tp is int else (int, float)
        if isinstance(value, ok) and not isinstance(value, bool):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} expects {kind}, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} expects a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _parse_list(text: str, name: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: cannot read {text!r} as a list ({e})") from None
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_free(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# -- files ---------------------------------------------------------------------------------

def _yaml():
    try:
        import yaml
    except ImportError:
        raise ConfigError("reading or writing YAML needs PyYAML (pip install pyyaml); JSON works without it") from None
    return yaml


def load_config(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) file. The file may be partial: it
    updates ``base`` (default: all defaults; e.g. a modality's defaults) key by key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _yaml().safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: unknown extension {suffix!r}; use .json, .yaml or .yml")
    except ConfigError:
        raise
    except Exception as e:  # the parsers' own errors carry line and column
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {e}") from None
    merged = _merge(base.to_dict() if base is not None else TrainConfig().to_dict(), data, str(path))
    return TrainConfig.from_dict(merged, where=str(path))


def _merge(base: dict, update: Any, where: str) -> dict:
    """``update`` over ``base``, mappings merged key by key at every depth (a file that sets
    ``model.channels`` keeps the other ``model`` defaults)."""
    if not isinstance(update, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(update).__name__}")
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v, where) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as JSON or YAML (by extension)."""
    path = Path(path)
    d = config.to_dict()
    if path.suffix.lower() in (".yaml", ".yml"):
        path.write_text(_yaml().safe_dump(d, sort_keys=False))
    elif path.suffix.lower() == ".json":
        path.write_text(json.dumps(d, indent=2) + "\n")
    else:
        raise ConfigError(f"config file {path}: unknown extension {path.suffix!r}; use .json, .yaml or .yml")


# -- command-line overrides ----------------------------------------------------------------

def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """``["--optim.lr", "1e-3", "--run.steps=5"]`` -> ``[("optim.lr", "1e-3"), ("run.steps", "5")]``."""
    out: list[tuple[str, str]] = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) <= 2:
            raise ConfigError(f"expected a flag of the form --section.field, got {a!r}")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"flag --{key} needs a value")
            i += 1
            value = args[i]
        if "." not in key:
            raise ConfigError(f"flag --{key} must name a section and a field, e.g. --optim.lr; "
                              f"sections: {', '.join(FREE_SECTIONS + TYPED_SECTIONS)}")
        out.append((key, value))
        i += 1
    return out


def apply_overrides(config: TrainConfig, args: Sequence[str] | Sequence[tuple[str, str]]) -> TrainConfig:
    """A new config with ``--section.field value`` overrides applied (``config`` is unchanged).

    Raises :class:`ConfigError` naming the flag for an unknown section or field (with the closest
    valid name) or a value of the wrong type.
    """
    pairs = parse_overrides(args) if args and isinstance(args[0], str) else list(args)
    d = config.to_dict()
    valid = FREE_SECTIONS + TYPED_SECTIONS
    for key, value in pairs:
        section, _, rest = key.partition(".")
        if section not in valid:
            raise ConfigError(f"--{key}: unknown section {section!r}{_suggest(section, valid)}; valid: {', '.join(valid)}")
        if section in FREE_SECTIONS:
            node = d[section]
            *parents, leaf = rest.split(".")
            for p in parents:
                if not isinstance(node.get(p, {}), dict):
                    raise ConfigError(f"--{key}: {section}.{p} is a value, not a mapping")
                node = node.setdefault(p, {})
            node[leaf] = _parse_free(value)
            continue
        hints = typing.get_type_hints(_SECTION_TYPES[section])
        if rest not in hints:
            raise ConfigError(f"--{key}: unknown field {rest!r} of section {section!r}{_suggest(rest, list(hints))}; "
                              f"valid: {', '.join(hints)}")
        d[section][rest] = _coerce(value, hints[rest], f"--{key}")
    return TrainConfig.from_dict(d, where="overrides")
