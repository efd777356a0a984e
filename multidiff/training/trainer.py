"""The training loop: seeded, resumable, bitwise reproducible on CPU, one or many processes.

One optimiser step ``s`` (0-based; logs and checkpoints count completed steps, ``s + 1``):

1. take the next global batch of the index stream and this rank's micro-batches (shards) of it
   (:mod:`multidiff.training.data`);
2. for each micro-batch: seed the global torch RNG with ``derive_seed(seed, "data", s, shard)`` and
   load + collate its items (augmentation is reproducible); seed the trainer's generator with
   ``derive_seed(seed, "loss", s, shard)`` and the global RNG with ``derive_seed(seed, "model",
   s, shard)`` (dropout); call ``loss_fn(net, batch, generator)`` under bf16 autocast if enabled
   and back-propagate ``loss / grad_accum`` (DDP averages over ranks);
3. all-reduce the loss for the log; stop with :class:`NonFiniteLossError` if it (or the gradient
   norm) is not finite — before the optimiser step, so nothing is written;
4. clip the gradient norm, set the learning rate of :meth:`OptimConfig.lr_at`, take an AdamW
   step, update the EMA; log; checkpoint every ``ckpt_every`` steps and at the end.

Every random draw is a pure function of ``(seed, step, shard)``, and model, EMA, optimiser and
data position are checkpointed exactly, so a run killed at any point and resumed gives the same
bits as an uninterrupted one on CPU, and ``W`` processes with ``grad_accum = A`` match one process
with ``grad_accum = W * A`` up to the order of the gradient sums.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import (
    CheckpointMismatchError,
    LoadedCheckpoint,
    atomic_write_bytes,
    check_architecture,
    latest_checkpoint,
    load_latest,
    optimizer_from_flat,
    optimizer_to_flat,
    remove_stale,
    write_checkpoint,
)
from .config import TrainConfig
from .data import ResumableBatchSampler, derive_seed
from .distributed import barrier, init_distributed, resolve_device
from .ema import EMA

__all__ = ["FitResult", "NonFiniteLossError", "Trainer", "load_micro_batch", "move_to"]

# run-section fields that may change between a run and its resumption without a warning
_RESUME_FREE = {"steps", "out_dir", "device", "progress", "tensorboard", "log_every", "ckpt_every", "sample_every",
                "keep_last", "num_workers", "compile", "compile_backend"}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite; training stopped before the step."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class FitResult:
    step: int
    loss: float | None
    checkpoint: Path | None


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors inside dicts, lists, tuples and named tuples (and objects with ``.to``) onto ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        moved = {k: move_to(v, device) for k, v in obj.items()}
        return moved if type(obj) is dict else type(obj)(moved)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    if callable(getattr(obj, "to", None)):
        return obj.to(device)
    return obj


def load_micro_batch(dataset, collate: Callable, indices: list[int], seed: int):
    """Items ``indices`` of ``dataset``, collated, with the global torch RNG seeded by ``seed`` first."""
    torch.manual_seed(seed)
    return collate([dataset[i] for i in indices])


class _ShardTasks(torch.utils.data.Dataset):
    """Micro-batch ``i`` of the rest of the run, computed from scratch (for DataLoader workers)."""

    def __init__(self, dataset, collate, sampler: ResumableBatchSampler, first_step: int, last_step: int, seed: int):
        self.dataset, self.collate, self.sampler, self.seed = dataset, collate, sampler, seed
        self.first_step, self.position0, self.n = first_step, sampler.position, (last_step - first_step) * sampler.accum

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        k, a = divmod(i, self.sampler.accum)
        step = self.first_step + k
        shard, idx = self.sampler.shards_at(self.position0 + k * self.sampler.batch_size)[a]
        return step, shard, load_micro_batch(self.dataset, self.collate, idx, derive_seed(self.seed, "data", step, shard))


def _identity(x):
    return x


class _Progress:
    """tqdm bar, metrics.jsonl and (when importable) TensorBoard, on the main rank only."""

    def __init__(self, out_dir: Path, run, start_step: int, enabled: bool):
        self.enabled, self.run, self.start_step, self.t0 = enabled, run, start_step, time.time()
        self.bar = self.file = self.tb = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=run.steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not run.progress)
        self.file = open(out_dir / "metrics.jsonl", "a")
        if run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: the JSONL log is enough
                self.tb = None

    def log(self, step: int, loss: float, lr: float, grad_norm: float) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", refresh=False)
        if step % self.run.log_every and step != self.run.steps:
            return
        elapsed = time.time() - self.t0
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "time": elapsed, "wall": time.time(),
               "steps_per_s": (step - self.start_step) / elapsed if elapsed > 0 else None}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm"):
                self.tb.add_scalar(f"train/{k}", rec[k], step)

    def close(self) -> None:
        for obj in (self.bar, self.file, self.tb):
            if obj is not None:
                obj.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (a killed run logged steps its last checkpoint does not hold)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the kill
    atomic_write_bytes(path, "".join(k + "\n" for k in keep).encode())


class Trainer:
    """Trains ``model`` with ``loss_fn`` on ``dataset`` as ``config`` says; see the module docstring.

    Args:
        model: the network (an ``nn.Module``); moved to the run's device.
        loss_fn: ``loss_fn(net, batch, generator) -> Tensor`` (a scalar) or an object with ``.loss``.
            ``net`` may be wrapped (DDP, torch.compile): call it, reach attributes through
            :func:`~multidiff.training.distributed.unwrap_model`. All randomness must come from
            ``generator`` (the trainer seeds it per micro-batch). If ``loss_fn`` has
            ``state_dict()``/``load_state_dict()`` (e.g. an importance-sampling history) its
            tensors are checkpointed too.
        dataset: map-style (``__len__``, ``__getitem__``).
        config: a :class:`TrainConfig`.
        kind: the model kind recorded in checkpoints and checked on resume (e.g. ``"images"``).
        collate: list of items -> batch (default ``torch.utils.data.default_collate``).
        sample_fn: ``sample_fn(ema_module, step, samples_dir)``, called every ``run.sample_every``
            steps on the main rank under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, dataset, config: TrainConfig, kind: str,
                 collate: Callable | None = None, sample_fn: Callable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError("dataset must be map-style (define __len__ and __getitem__)")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not (isinstance(kind, str) and kind):
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        self.config, self.kind, self.loss_fn, self.dataset = config, kind, loss_fn, dataset
        self.collate = collate or torch.utils.data.default_collate
        self.sample_fn = sample_fn
        run, opt = config.run, config.optim
        self.dist = init_distributed()
        self.device = resolve_device(run.device, self.dist)
        self.model = model.to(self.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                           weight_decay=opt.weight_decay)
        self.ema = EMA(model, config.ema.kind, config.ema.decay, config.ema.sigma_rel)
        self.sampler = ResumableBatchSampler(len(dataset), run.batch_size, run.seed, shuffle=run.shuffle,
                                             rank=self.dist.rank, world_size=self.dist.world_size, accum=opt.grad_accum)
        self.generator = torch.Generator(device=self.device)
        self.bf16 = self._bf16_enabled()
        net: nn.Module = model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.ddp = net if self.dist.distributed else None
        if run.compile:
            net = torch.compile(net, backend=run.compile_backend)
        self.net = net
        self.step, self.last_loss, self.last_checkpoint = 0, None, None
        self.out_dir = Path(run.out_dir)

    def _bf16_enabled(self) -> bool:
        if not self.config.run.bf16:
            return False
        if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            warnings.warn(f"{self.device} does not support bfloat16: training in float32", RuntimeWarning, stacklevel=3)
            return False
        return True

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (main rank; all ranks wait for it)."""
        path = None
        if self.dist.is_main:
            opt_tensors, opt_meta = optimizer_to_flat(self.optimizer, self.param_names)
            files = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": opt_tensors,
                     "rng": {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()}}
            state: dict[str, Any] = {
                "kind": self.kind, "config": self.config.to_dict(), "data": self.sampler.state_dict(),
                "optimizer": opt_meta, "ema": self.ema.meta(), "world_size": self.dist.world_size,
                "loss": self.last_loss, "generator_device": self.device.type,
                "rng": {"python": _py_rng_to_json(random.getstate()), "numpy": _np_rng_to_json(np.random.get_state())},
            }
            loss_state = self._loss_state()
            if loss_state is not None:
                files["loss"], state["loss_state"] = loss_state
            path = write_checkpoint(self.out_dir, self.step, files, state, keep_last=self.config.run.keep_last)
        barrier()
        self.last_checkpoint = path if path is not None else self.out_dir / f"ckpt-{self.step:08d}"
        return path

    def _loss_state(self):
        sd = getattr(self.loss_fn, "state_dict", None)
        if not callable(sd):
            return None
        state = sd()
        tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        return tensors, {k: v for k, v in state.items() if not isinstance(v, Tensor)}

    def load(self, ckpt: LoadedCheckpoint) -> None:
        """Restore model, EMA, optimiser, data position, RNG and step from a checkpoint."""
        st = ckpt.state
        if st.get("kind") != self.kind:
            raise CheckpointMismatchError(f"{ckpt.path} holds a {st.get('kind')!r} model, but a {self.kind!r} model "
                                          f"was expected")
        check_architecture(self.model, ckpt.tensors["model"], str(ckpt.path))
        self._warn_config_changes(st.get("config", {}), ckpt.path)
        self.model.load_state_dict(ckpt.tensors["model"])
        self.ema.load_state_dict(ckpt.tensors["ema"], st["ema"])
        optimizer_from_flat(self.optimizer, self.param_names, ckpt.tensors["optimizer"], st["optimizer"])
        self.sampler.load_state_dict(st["data"])
        if "loss" in ckpt.tensors or "loss_state" in st:
            if not callable(getattr(self.loss_fn, "load_state_dict", None)):
                raise TypeError(f"{ckpt.path} holds the state of a stateful loss, but this loss_fn has no "
                                f"load_state_dict()")
            self.loss_fn.load_state_dict({**st.get("loss_state", {}), **ckpt.tensors.get("loss", {})})
        # every draw is re-seeded per micro-batch; the states are restored for code outside the loop
        torch.set_rng_state(ckpt.tensors["rng"]["torch_cpu"])
        if st.get("generator_device") == self.device.type:
            self.generator.set_state(ckpt.tensors["rng"]["generator"])
        random.setstate(_py_rng_from_json(st["rng"]["python"]))
        np.random.set_state(_np_rng_from_json(st["rng"]["numpy"]))
        self.step, self.last_loss, self.last_checkpoint = ckpt.step, st.get("loss"), ckpt.path

    def _warn_config_changes(self, saved: dict, path: Path) -> None:
        now, changes = self.config.to_dict(), []
        for section, values in now.items():
            old = saved.get(section, {})
            for key in sorted(set(values) | set(old)):
                if section == "run" and key in _RESUME_FREE:
                    continue
                if values.get(key) != old.get(key):
                    changes.append(f"{section}.{key}: {old.get(key)!r} -> {values.get(key)!r}")
        if changes:
            warnings.warn(f"resuming {path} with a changed config: {'; '.join(changes)}", UserWarning, stacklevel=3)

    def resume(self) -> bool:
        """Load the newest valid checkpoint of ``run.out_dir`` if there is one; corrupt newer ones
        are renamed ``*.corrupt`` (kept for inspection) once every rank has read. True if resumed."""
        ckpt, skipped = load_latest(self.out_dir, map_location="cpu", kind=self.kind)
        if ckpt is not None:
            self.load(ckpt)
        barrier()
        if self.dist.is_main:
            for path, _ in skipped:
                if path.exists():
                    os.rename(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
        return ckpt is not None

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self):
        """``[(shard, batch), ...]`` per step for this rank, from ``self.step`` to the end."""
        run = self.config.run
        if run.num_workers == 0:
            while True:
                yield [(shard, load_micro_batch(self.dataset, self.collate, idx,
                                                derive_seed(run.seed, "data", self.step, shard)))
                       for shard, idx in self.sampler.next_step()]
        tasks = _ShardTasks(self.dataset, self.collate, self.sampler, self.step, run.steps, run.seed)
        loader = torch.utils.data.DataLoader(tasks, batch_size=None, shuffle=False, num_workers=run.num_workers,
                                             collate_fn=_identity)
        it = iter(loader)
        while True:
            out = []
            for _ in range(self.sampler.accum):
                step, shard, batch = next(it)
                if step != self.step:  # cannot happen with an in-order DataLoader; guard the invariant
                    raise RuntimeError(f"a data worker delivered step {step} while training step {self.step}")
                out.append((shard, batch))
            self.sampler.position += self.sampler.batch_size
            yield out

    def _train_step(self, micro_batches) -> tuple[float, float, float]:
        run, opt, s = self.config.run, self.config.optim, self.step
        lr = opt.lr_at(s, run.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for a, (shard, batch) in enumerate(micro_batches):
            batch = move_to(batch, self.device)
            self.generator.manual_seed(derive_seed(run.seed, "loss", s, shard))
            torch.manual_seed(derive_seed(run.seed, "model", s, shard))
            last = a == len(micro_batches) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.loss_fn(self.net, batch, self.generator)
                loss = getattr(out, "loss", out)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(f"loss_fn must return a scalar tensor or an object with .loss, got {type(loss).__name__}"
                                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
                (loss.float().reshape(()) / len(micro_batches)).backward()
            loss_sum += loss.detach().float().reshape(())
        if self.dist.distributed:
            torch.distributed.all_reduce(loss_sum)  # every rank sees a NaN anywhere and stops together
        mean_loss = float(loss_sum) / self.sampler.num_shards
        if not math.isfinite(mean_loss):
            self._stop(f"loss is {mean_loss} at step {s + 1}")
        clip = opt.grad_clip if opt.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(grad_norm):
            self._stop(f"gradient norm is {grad_norm} at step {s + 1} (loss {mean_loss:.6g})")
        self.optimizer.step()
        self.ema.update(self.model)
        return mean_loss, lr, grad_norm

    def _stop(self, what: str) -> None:
        last = self.last_checkpoint or latest_checkpoint(self.out_dir)
        kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"training stopped: {what}; {kept}. Lower optim.lr, check the data, or "
                                 f"enable optim.grad_clip.", self.step + 1, last)

    def fit(self) -> FitResult:
        """Train to ``run.steps``, resuming from ``run.out_dir`` first; returns the final step,
        the last loss and the last checkpoint."""
        run = self.config.run
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale(self.out_dir)
        barrier()
        self.resume()
        if self.step >= run.steps:
            return FitResult(self.step, self.last_loss, self.last_checkpoint)
        progress = _Progress(self.out_dir, run, self.step, self.dist.is_main)
        batches = self._batches()
        try:
            while self.step < run.steps:
                loss, lr, grad_norm = self._train_step(next(batches))
                self.step, self.last_loss = self.step + 1, loss
                progress.log(self.step, loss, lr, grad_norm)
                if self.step % run.ckpt_every == 0 or self.step == run.steps:
                    self.save()
                if self.sample_fn is not None and run.sample_every and self.step % run.sample_every == 0 \
                        and self.dist.is_main:
                    samples = self.out_dir / "samples"
                    samples.mkdir(exist_ok=True)
                    with torch.no_grad():
                        self.sample_fn(self.ema.module, self.step, samples)
        finally:
            batches.close()
            progress.close()
        return FitResult(self.step, self.last_loss, self.last_checkpoint)


def _py_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(obj) -> tuple:
    return (obj[0], tuple(obj[1]), obj[2])


def _np_rng_to_json(state) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _np_rng_from_json(obj) -> tuple:
    return (obj[0], np.asarray(obj[1], dtype=np.uint32), obj[2], obj[3], obj[4])
