"""Running on several processes: ``torchrun`` set-up, and generation sharded across ranks.

**Training.** Launch any training script with ``torchrun`` (``python -m torch.distributed.run``)::

    torchrun --nproc_per_node 8 train.py ...                      # one machine, 8 GPUs (NCCL)
    python -m torch.distributed.run --nproc_per_node 2 \\
        --master_addr 127.0.0.1 --master_port 29517 train.py ...  # 2 CPU processes (gloo)

:func:`init_distributed` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` from the environment and joins the process group with NCCL when CUDA is
available and gloo otherwise; without those variables it does nothing (one process). The
:class:`~multidiff.training.trainer.Trainer` calls it, wraps the network in
``DistributedDataParallel`` and gives every rank its shard of each global batch
(:mod:`multidiff.training.data`).

**Generation** (:func:`generate_sharded`). ``total`` samples are cut into fixed chunks of
``chunk_size``; chunk ``c`` is drawn with its own generator seeded by
``derive_seed(seed, "generate", c)`` and rank ``r`` of ``W`` draws chunks ``r, r + W, r + 2W, ...``
into its own shard file. After a barrier rank 0 merges the shards in chunk order into one file.
Because each chunk's random stream depends only on ``(seed, c)`` — not on which rank draws it or
how many ranks there are — the merged result for a given ``(seed, chunk_size)`` is the same on 1
or 8 processes (on one device type), while 8 processes draw 8 chunks at a time. Keep
``chunk_size`` fixed to reproduce a result: it defines the streams.
"""
from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from .checkpoint import atomic_write_bytes
from .data import derive_seed

__all__ = [
    "DistInfo",
    "barrier",
    "destroy_distributed",
    "dist_info",
    "free_port",
    "generate_sharded",
    "init_distributed",
    "merge_shards",
    "resolve_device",
    "unwrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    """This process's rank, world size and local rank (from the process group, else the environment)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if _initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local)


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the ``torchrun`` process group if the environment describes one (``WORLD_SIZE > 1``).

    ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"`` otherwise. Safe to
    call more than once; a no-op for a single process.
    """
    info = dist_info()
    if _initialized() or info.world_size <= 1:
        return info
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={info.world_size} but {', '.join(missing)} not set: launch with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    torch.distributed.init_process_group(backend, init_method="env://", rank=info.rank,
                                         world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    return dist_info()


def destroy_distributed() -> None:
    if _initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def resolve_device(spec: str = "auto", info: DistInfo | None = None) -> torch.device:
    """``"auto"``: ``cuda:<local rank>`` if CUDA is available, else CPU; ``"cuda"``: ``cuda:<local rank>``."""
    info = info or dist_info()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return torch.device("cuda", info.local_rank)
    try:
        return torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"run.device: cannot use {spec!r} ({e}); use auto, cpu, cuda, cuda:N or mps") from None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- sharded generation --------------------------------------------------------------------

def _shard_path(out_dir: Path, name: str, rank: int, world_size: int) -> Path:
    return out_dir / f"{name}.shard-{rank:05d}-of-{world_size:05d}.safetensors"


def generate_sharded(fn: Callable[[int, torch.Generator], Tensor | dict[str, Tensor]], total: int, seed: int,
                     out_dir: str | Path, *, chunk_size: int = 64, name: str = "samples", device="cpu",
                     info: DistInfo | None = None, merge: bool = True,
                     with_offset: bool = False) -> dict[str, Tensor] | None:
    """Draw ``total`` samples across all ranks; returns the merged tensors on rank 0 (else ``None``).

    ``fn(n, generator)`` draws ``n`` samples using only ``generator`` for randomness and returns a
    tensor or a dict of tensors with leading dimension ``n``. Each rank writes
    ``<name>.shard-RRRRR-of-WWWWW.safetensors``; rank 0 merges them into ``<name>.safetensors``
    (see the module docstring for why the result does not depend on the number of ranks).
    ``info`` overrides the rank and world size (to run the ranks one after another, e.g. in tests).
    With ``with_offset``, ``fn`` is called as ``fn(n, generator, offset)`` where ``offset`` is the
    index of the chunk's first sample in the whole job (for per-item requests such as labels).
    """
    if total < 1 or chunk_size < 1:
        raise ValueError(f"total and chunk_size must be >= 1, got {total}, {chunk_size}")
    info = info or dist_info()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_chunks = math.ceil(total / chunk_size)
    mine: dict[str, Tensor] = {}
    for c in range(info.rank, num_chunks, info.world_size):
        n = min(chunk_size, total - c * chunk_size)
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "generate", c))
        out = fn(n, gen, c * chunk_size) if with_offset else fn(n, gen)
        out = {"x": out} if isinstance(out, Tensor) else dict(out)
        for key, t in out.items():
            if "/" in key:
                raise ValueError(f"output names may not contain '/': {key!r}")
            if t.shape[0] != n:
                raise ValueError(f"fn returned {key!r} with leading size {t.shape[0]} for a chunk of {n}")
            mine[f"{c:08d}/{key}"] = t.detach().to("cpu").contiguous()
    atomic_write_bytes(_shard_path(out_dir, name, info.rank, info.world_size), safetensors.torch.save(mine))
    if not merge:
        return None
    barrier()
    result = merge_shards(out_dir, name, total, chunk_size, info.world_size) if info.is_main else None
    barrier()
    return result


def merge_shards(out_dir: str | Path, name: str, total: int, chunk_size: int, world_size: int) -> dict[str, Tensor]:
    """Concatenate the chunks of all ``world_size`` shard files in chunk order, write
    ``<name>.safetensors`` atomically, delete the shards, and return the tensors."""
    out_dir = Path(out_dir)
    num_chunks = math.ceil(total / chunk_size)
    chunks: dict[int, dict[str, Tensor]] = {}
    for r in range(world_size):
        path = _shard_path(out_dir, name, r, world_size)
        if not path.is_file():
            raise FileNotFoundError(f"shard of rank {r} missing: {path}")
        for key, t in safetensors.torch.load(path.read_bytes()).items():
            c, _, field = key.partition("/")
            chunks.setdefault(int(c), {})[field] = t
    missing = [c for c in range(num_chunks) if c not in chunks]
    if missing:
        raise RuntimeError(f"chunks {missing[:5]} missing from the shards of {name!r} in {out_dir}")
    keys = sorted(chunks[0])
    merged = {k: torch.cat([chunks[c][k] for c in range(num_chunks)])[:total] for k in keys}
    atomic_write_bytes(out_dir / f"{name}.safetensors", safetensors.torch.save(merged))
    for r in range(world_size):
        _shard_path(out_dir, name, r, world_size).unlink(missing_ok=True)
    return merged
