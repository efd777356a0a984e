"""Checkpoints: safetensors + JSON, written atomically, verified on load, never pickled.

A run directory holds one directory per checkpoint, ``ckpt-{step:08d}/``::

    model.safetensors       the network's state dict
    ema.safetensors         the moving average's state dict (same keys)
    optimizer.safetensors   optimiser state tensors, keyed "<parameter name>/<slot>" (e.g.
                            "net.0.weight/exp_avg"), so keys do not depend on parameter order
    rng.safetensors         torch RNG states as uint8 tensors
    loss.safetensors        (optional) tensors of a stateful loss, e.g. an importance-sampling history
    state.json              format version, kind, config, step, data position, optimiser
                            hyper-parameters, EMA and RNG metadata, library version, and the
                            size and SHA-256 of every tensor file

**Atomic writes.** Everything is written into a temporary sibling directory; every file is
flushed and ``fsync``'d, then the directory, then it is renamed into place and the parent
directory is ``fsync``'d. ``state.json`` is written last, so a directory without a complete
manifest is never a checkpoint. An existing directory of the same step is moved aside only after
the new one is complete, and old checkpoints are pruned (``keep_last``) only after that. A crash at
any moment leaves every earlier checkpoint intact.

**Loading** reads only JSON and safetensors (no pickle, no ``torch.load``). The format version
must not be newer than :data:`FORMAT_VERSION`; the model kind and the state-dict keys and shapes
are compared with what the caller expects, naming what differs. Loading a run directory picks the
newest *valid* checkpoint: a newest checkpoint with a missing file, a wrong hash or bad JSON is
skipped with a :class:`CheckpointFallbackWarning` naming the file and the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from .config import ConfigError, TrainConfig

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CheckpointVersionError",
    "LoadedCheckpoint",
    "atomic_write_bytes",
    "check_architecture",
    "checkpoint_name",
    "export_checkpoint",
    "fsync_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "read_checkpoint",
    "remove_stale",
    "write_checkpoint",
    "write_checkpoint_dir",
]

FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(RuntimeError):
    """Base class of checkpoint problems."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path, or no valid one in a run directory."""


class CheckpointCorruptError(CheckpointError):
    """A file is missing, truncated, has the wrong hash or cannot be parsed."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds another kind of model or another architecture."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint was written by a newer format version."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unusable and an older one is used."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{int(step):08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``ckpt-XXXXXXXX`` directory, oldest first (valid or not)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return sorted(out)


# -- durable writes ------------------------------------------------------------------------

def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling, fsync and rename: readers see the old
    file or the complete new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _prepare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, no shared storage (safetensors refuses aliased tensors, e.g. tied weights)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{k}: expected a tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _library_version() -> str:
    try:
        import multidiff

        return str(multidiff.__version__)
    except Exception:  # pragma: no cover - partially initialised package
        return "unknown"


def write_checkpoint(run_dir: str | Path, step: int, files: dict[str, dict[str, Tensor]], state: dict[str, Any],
                     keep_last: int | None = None) -> Path:
    """Write ``run_dir/ckpt-{step:08d}`` atomically (see the module docstring), then prune the run
    directory to its ``keep_last`` newest checkpoints.

    ``files`` maps a file stem (``"model"``, ``"ema"``, ...) to a flat dict of tensors;
    ``state`` is JSON-ready metadata, completed with the format version, step, library and torch
    versions, time and the manifest of the tensor files.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = write_checkpoint_dir(run_dir / checkpoint_name(step), step, files, state)
    if keep_last is not None:
        _prune(run_dir, keep_last, final)
    return final


def write_checkpoint_dir(final: str | Path, step: int, files: dict[str, dict[str, Tensor]], state: dict[str, Any]) -> Path:
    """Write one checkpoint directory at ``final`` atomically; an existing one is replaced only
    once the new one is complete (see :func:`write_checkpoint`)."""
    final = Path(final)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.with_name(f".tmp-{final.name}-{tag}")
    aside = final.with_name(f".old-{final.name}-{tag}")
    tmp.mkdir()
    try:
        manifest = {}
        for stem, tensors in files.items():
            data = safetensors.torch.save(_prepare(tensors))
            _write_durable(tmp / f"{stem}.safetensors", data)
            manifest[f"{stem}.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        full = {"format_version": FORMAT_VERSION, "step": int(step), **state, "files": manifest,
                "library_version": _library_version(), "torch_version": torch.__version__, "time": time.time()}
        # the manifest goes last: a directory without a complete state.json is never a checkpoint
        _write_durable(tmp / "state.json", (json.dumps(full, indent=1, allow_nan=False) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. after a fallback): swap only now
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside.exists() and not final.exists():
                os.rename(aside, final)
            raise
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return final


def _remove_dir(path: Path) -> None:
    """Rename away first so an interrupted delete never leaves a half checkpoint under its name."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(run_dir: Path, keep_last: int, newest: Path) -> None:
    ckpts = list_checkpoints(run_dir)
    for _, path in ckpts[: max(0, len(ckpts) - keep_last)]:
        if path != newest:
            _remove_dir(path)
    fsync_dir(run_dir)


def remove_stale(run_dir: str | Path) -> None:
    """Delete leftovers of interrupted writes or deletes (never a checkpoint)."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith((".tmp-ckpt-", ".trash-ckpt-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------

@dataclass
class LoadedCheckpoint:
    """What :func:`read_checkpoint` returns: the parsed ``state.json``, the config and the tensors
    of every file read (``tensors["model"]``, ``tensors["ema"]``, ...), on ``map_location``."""

    path: Path
    state: dict[str, Any]
    config: TrainConfig
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def kind(self) -> str:
        return str(self.state.get("kind"))

    @property
    def model_state(self) -> dict[str, Tensor]:
        return self.tensors["model"]

    @property
    def ema_state(self) -> dict[str, Tensor]:
        return self.tensors["ema"]


def _read_state(path: Path) -> dict[str, Any]:
    sj = path / "state.json"
    if not sj.is_file():
        raise CheckpointCorruptError(f"{sj}: missing (the checkpoint was not completed)")
    try:
        state = json.loads(sj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{sj}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "step" not in state:
        raise CheckpointCorruptError(f"{sj}: not a checkpoint manifest (no 'files' or 'step')")
    version = state.get("format_version")
    if not isinstance(version, int):
        raise CheckpointCorruptError(f"{sj}: no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(f"{path} has checkpoint format version {version}, but this multidiff "
                                     f"({_library_version()}) reads versions up to {FORMAT_VERSION}: upgrade multidiff")
    return state


def _read_tensor_file(path: Path, fname: str, entry: dict, map_location) -> dict[str, Tensor]:
    f = path / fname
    if not f.is_file():
        raise CheckpointCorruptError(f"{f}: missing")
    data = f.read_bytes()
    if len(data) != entry.get("bytes"):
        raise CheckpointCorruptError(f"{f}: {len(data)} bytes, the manifest says {entry.get('bytes')} (truncated?)")
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CheckpointCorruptError(f"{f}: SHA-256 does not match the manifest")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointCorruptError(f"{f}: not a valid safetensors file ({e})") from None
    return {k: v.to(map_location) for k, v in tensors.items()}


def read_checkpoint(path: str | Path, *, files: Iterable[str] | None = None, map_location="cpu",
                    kind: str | None = None) -> LoadedCheckpoint:
    """Read and verify one checkpoint directory. ``files``: the stems to read (default: all)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint directory at {path}")
    state = _read_state(path)
    if kind is not None and state.get("kind") != kind:
        raise CheckpointMismatchError(f"{path} holds a {state.get('kind')!r} model, but a {kind!r} model was expected")
    try:
        config = TrainConfig.from_dict(state.get("config", {}), where=f"{path}/state.json config")
    except ConfigError as e:  # readable JSON of another schema: a version problem, not a bad disk
        raise CheckpointMismatchError(f"the config saved in {path} does not fit this multidiff ({e})") from None
    manifest = state["files"]
    stems = [f[: -len(".safetensors")] for f in manifest] if files is None else list(files)
    tensors = {}
    for stem in stems:
        fname = f"{stem}.safetensors"
        if fname not in manifest:
            raise CheckpointCorruptError(f"{path}: no {fname} in the manifest (has: {', '.join(manifest) or 'none'})")
        tensors[stem] = _read_tensor_file(path, fname, manifest[fname], map_location)
    return LoadedCheckpoint(path, state, config, tensors)


def load_latest(run_dir: str | Path, **kwargs) -> tuple[LoadedCheckpoint | None, list[tuple[Path, str]]]:
    """The newest readable checkpoint of a run directory (``None`` if there is none) and the newer
    ones skipped as corrupt, ``[(path, reason)]``, each also reported by a warning. A checkpoint of
    the wrong kind or a newer format version is an error, not a reason to fall back."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = read_checkpoint(path, **kwargs)
        except CheckpointCorruptError as e:
            skipped.append((path, str(e)))
            warnings.warn(f"skipping checkpoint {path.name}: {e}; falling back to an older one",
                          CheckpointFallbackWarning, stacklevel=2)
            continue
        return ckpt, skipped
    return None, skipped


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Path of the newest valid checkpoint in ``run_dir`` (fully verified), or ``None``."""
    ckpt, _ = load_latest(run_dir)
    return None if ckpt is None else ckpt.path


def check_architecture(model: nn.Module, state: dict[str, Tensor], where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``model``'s state-dict
    keys and shapes; the message lists what is missing, unexpected and differently shaped."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = [f"{k}: checkpoint {theirs[k]} vs model {mine[k]}" for k in mine if k in theirs and theirs[k] != mine[k]]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                             ("shape differs", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {'; '.join(items[:5])}{more}")
        raise CheckpointMismatchError(f"{where} does not fit this model (another architecture?): " + " | ".join(parts))


def load_checkpoint(path: str | Path, model: nn.Module | None = None, *, kind: str | None = None,
                    weights: str = "ema", files: Iterable[str] | None = None, map_location="cpu") -> LoadedCheckpoint:
    """Load a checkpoint directory, or the newest valid one of a run directory (with fallback).

    With ``model``, its keys and shapes are checked and ``weights`` (``"ema"`` or ``"model"``)
    are loaded into it. ``kind`` is checked when given. Returns the :class:`LoadedCheckpoint`
    (``.config``, ``.state``, ``.tensors``). Usable on its own for sampling::

        ckpt = load_checkpoint("runs/digits", net, kind="images", files=("ema",))
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    if files is not None and model is not None and weights not in files:
        files = list(files) + [weights]
    if (path / "state.json").exists() or _CKPT_RE.match(path.name):
        ckpt = read_checkpoint(path, files=files, map_location=map_location, kind=kind)
    else:
        if not path.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint or run directory at {path}")
        ckpt, skipped = load_latest(path, files=files, map_location=map_location, kind=kind)
        if ckpt is None:
            why = "; ".join(f"{p.name}: {r}" for p, r in skipped) or "no ckpt-XXXXXXXX directories"
            raise CheckpointNotFoundError(f"no valid checkpoint in {path} ({why})")
    if model is not None:
        check_architecture(model, ckpt.tensors[weights], str(ckpt.path))
        model.load_state_dict(ckpt.tensors[weights])
    return ckpt


# -- optimiser state -----------------------------------------------------------------------

def optimizer_to_flat(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors keyed ``"<param name>/<slot>"`` and JSON metadata (hyper-parameters, non-tensor slots).
    ``names`` are the parameter names in the order the optimiser holds them."""
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if n_params != len(names):
        raise ValueError(f"the optimiser holds {n_params} parameters but {len(names)} names were given")
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for slot, v in slots.items():
            key = f"{names[idx]}/{slot}"
            if isinstance(v, Tensor):
                tensors[key] = v
            else:
                scalars[key] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"class": type(optimizer).__name__, "param_names": list(names), "param_groups": groups, "scalar_state": scalars}
    return tensors, meta


def optimizer_from_flat(optimizer: torch.optim.Optimizer, names: Sequence[str], tensors: dict[str, Tensor],
                        meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_flat`; the parameter names must match. The optimiser takes
    the tensors over (no copy): pass tensors read from a file, not ones still owned by another
    optimiser (``state_dict()`` returns references)."""
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointMismatchError(f"the checkpoint's optimiser is {meta.get('class')}, "
                                      f"this one {type(optimizer).__name__}")
    saved = list(meta["param_names"])
    if saved != list(names):
        diff = sorted(set(saved) ^ set(names))[:5]
        raise CheckpointMismatchError(f"the checkpoint's optimiser state is for other parameters "
                                      f"(differ: {diff or 'order'})")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalar_state", {}).items()):
        name, _, slot = key.rpartition("/")
        state.setdefault(index[name], {})[slot] = v
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def export_checkpoint(src: str | Path, dst: str | Path, *, files: Sequence[str] = ("model", "ema")) -> Path:
    """Copy a checkpoint without the optimiser/RNG state (e.g. to ship it inside a package),
    verified on read and written atomically to the directory ``dst``."""
    ckpt = load_checkpoint(src, files=files)
    state = {k: v for k, v in ckpt.state.items() if k not in ("files", "format_version", "step", "optimizer")}
    return write_checkpoint_dir(dst, ckpt.step, ckpt.tensors, state)
