"""Pipelines: a trained network with its process, Space and modality, from config or checkpoint.

The ``process`` section of a :class:`~multidiff.training.config.TrainConfig` says how the network
relates to the noise::

    {"name": "vp-cosine", "options": {...}, "prediction": "eps", "time_input": "t", "sigma_data": 0.5}

and the ``loss`` section holds :class:`~multidiff.training.loss.DenoisingLoss` options
(``weighting``, ``time_sampling``, ...). :func:`train` runs the shared
:class:`~multidiff.training.trainer.Trainer` for any modality; :class:`DiffusionPipeline` loads a
checkpoint (or a shipped one by name) and samples domain objects with any solver and guidance.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .guidance import ClassifierFreeGuidance
from .process import Process, make_process
from .registry import Modality, ModalityError, available_modalities, get_modality
from .sampling import sample
from .training.checkpoint import CheckpointNotFoundError, load_checkpoint
from .training.config import TrainConfig
from .training.loss import DenoisingLoss

__all__ = [
    "DiffusionPipeline",
    "process_from_config",
    "denoiser_from_config",
    "loss_from_config",
    "make_loss_fn",
    "train",
    "find_pretrained",
]

_DIFFUSION_KEYS = ("prediction", "time_input", "sigma_data")


def process_from_config(config: TrainConfig) -> Process:
    """The :class:`~multidiff.process.Process` named by ``config.process``."""
    section = config.process
    return make_process(section.get("name", "vp-cosine"), **section.get("options", {}))


def denoiser_from_config(net: Callable[..., Tensor], config: TrainConfig, process: Process | None = None) -> Denoiser:
    """``net`` bound to the process and prediction kind of ``config.process``."""
    section = config.process
    return Denoiser(
        net,
        process or process_from_config(config),
        prediction=section.get("prediction", "eps"),
        time_input=section.get("time_input", "t"),
        sigma_data=float(section.get("sigma_data", 0.5)),
    )


def loss_from_config(config: TrainConfig, process: Process | None = None) -> DenoisingLoss:
    """The :class:`DenoisingLoss` of ``config.loss`` for the network of ``config.process``."""
    section = config.process
    return DenoisingLoss(
        process or process_from_config(config),
        prediction=section.get("prediction", "eps"),
        time_input=section.get("time_input", "t"),
        sigma_data=float(section.get("sigma_data", 0.5)),
        **config.loss,
    )


def make_loss_fn(modality: Modality, config: TrainConfig) -> Callable:
    """The trainer's ``loss_fn(net, batch, generator)``: the modality turns a batch into
    ``(x0, space, cond)``, the shared denoising loss does the rest. A stateful loss (importance
    sampling) exposes its state for checkpoints."""
    loss = loss_from_config(config)

    def loss_fn(net: nn.Module, batch: Any, generator: torch.Generator):
        x0, space, cond = modality.training_batch(net, batch, generator, config)
        return loss(net, x0, space, generator, **cond)

    if loss.history is not None:
        loss_fn.state_dict = loss.history.state_dict  # type: ignore[attr-defined]
        loss_fn.load_state_dict = loss.history.load_state_dict  # type: ignore[attr-defined]
    loss_fn.loss = loss  # type: ignore[attr-defined]
    return loss_fn


def train(modality: Modality | str, config: TrainConfig | None = None, sample_fn: Callable | None = None):
    """Train ``modality`` as ``config`` says (default: the modality's default config); resumes
    from the newest valid checkpoint in ``config.run.out_dir``. Returns the trainer's result."""
    from .training.trainer import Trainer

    modality = get_modality(modality) if isinstance(modality, str) else modality
    config = config or modality.default_config()
    # the initial weights come from run.seed, not from whatever the global RNG holds
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        net = modality.build_network(config)
    if sample_fn is None and config.run.sample_every > 0:
        sample_fn = _preview_fn(modality, config)
    trainer = Trainer(
        net,
        make_loss_fn(modality, config),
        modality.dataset(config, "train"),
        config,
        kind=modality.name,
        collate=modality.collate,
        sample_fn=sample_fn,
    )
    return trainer.fit()


def _preview_fn(modality: Modality, config: TrainConfig, n: int = 16, nfe: int = 20) -> Callable:
    """A trainer ``sample_fn`` that writes ``n`` samples of the EMA weights and their picture to
    ``samples/step-XXXXXXXX/`` (fixed seed, so pictures are comparable across steps)."""

    def preview(ema_module: nn.Module, step: int, out_dir: Path) -> None:
        device = next(ema_module.parameters()).device
        was_training = ema_module.training
        pipe = DiffusionPipeline(modality, ema_module, config, device)
        objects = pipe.sample(n, nfe=nfe, generator=torch.Generator(device=device).manual_seed(0))
        modality.save(objects, Path(out_dir) / f"step-{step:08d}", config, picture=True)
        ema_module.train(was_training)

    return preview


def find_pretrained(name: str, modality: str | None = None) -> Path:
    """The directory of a shipped checkpoint: ``"digits"``, or ``"images/digits"`` to say which
    modality; an unknown name lists the shipped ones."""
    if "/" in name and modality is None:
        head, tail = name.split("/", 1)
        if head not in available_modalities() or "/" in tail:
            raise CheckpointNotFoundError(f"no checkpoint directory at {name}")
        modality, name = head, tail
    names = [modality] if modality else available_modalities()
    shipped: dict[str, Path] = {}
    for mod in names:
        try:
            for ckpt_name, path in get_modality(mod).pretrained().items():
                shipped[f"{mod}/{ckpt_name}"] = Path(path)
        except ModalityError:
            if modality:
                raise
    hits = [p for key, p in shipped.items() if key.split("/", 1)[1] == name]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CheckpointNotFoundError(f"several modalities ship a checkpoint named {name!r}: say which, e.g. 'images/{name}'")
    listing = ", ".join(sorted(shipped)) or "none"
    raise CheckpointNotFoundError(f"{name!r} is neither a checkpoint directory nor a shipped checkpoint; shipped: {listing}")


def _chunk(value: Any, lo: int, hi: int, n: int) -> Any:
    """Slice a per-item request value (a length-``n`` list or tensor) to items ``lo:hi``."""
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[lo:hi]
    if isinstance(value, (list, tuple)) and len(value) == n:
        return type(value)(value[lo:hi])
    return value


class DiffusionPipeline:
    """A trained network with its modality, process and config; samples domain objects.

    Build one with :meth:`load` (a checkpoint or run directory), :meth:`from_pretrained` (a shipped
    checkpoint by name, from the package: no network access) or directly from a network.
    """

    def __init__(self, modality: Modality, net: nn.Module, config: TrainConfig, device: torch.device | str | None = None,
                 checkpoint: Path | None = None):
        self.modality = modality
        self.config = config
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = net.to(self.device).eval()
        self.process = process_from_config(config)
        self.denoiser = denoiser_from_config(self.net, config, self.process)
        self.checkpoint = checkpoint

    # -- construction --------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None, weights: str = "ema",
             modality: Modality | str | None = None) -> "DiffusionPipeline":
        """Load a checkpoint directory (or the newest valid checkpoint of a run directory)."""
        path = Path(path)
        header = load_checkpoint(path, files=())
        kind = header.kind
        if modality is None:
            modality = get_modality(kind)
        elif isinstance(modality, str):
            modality = get_modality(modality)
        net = modality.build_network(header.config)
        ckpt = load_checkpoint(header.path, net, kind=modality.name, weights=weights, files=(weights,))
        return cls(modality, net, ckpt.config, device or "cpu", checkpoint=ckpt.path)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: torch.device | str | None = None,
                        modality: str | None = None) -> "DiffusionPipeline":
        """A local checkpoint directory, or a checkpoint shipped inside an installed modality."""
        path = Path(name_or_path)
        if not path.exists():
            path = find_pretrained(str(name_or_path), modality)
        return cls.load(path, device=device, modality=modality)

    # -- sampling ------------------------------------------------------------------------
    def model_for(self, n: int, guidance: float = 0.0, guidance_interval: tuple[float, float] | None = None,
                  **request: Any):
        """The sampler-ready model for ``n`` items: the denoiser, conditioned on ``request`` and
        with classifier-free guidance of scale ``guidance`` when the request is conditional."""
        cond = self.modality.condition(self.config, n, self.device, **request)
        if cond is None:
            if guidance:
                raise ValueError("guidance needs a conditional request (e.g. labels=...) on a conditional model")
            return self.denoiser
        c, u = cond
        if guidance:
            return ClassifierFreeGuidance(self.denoiser, c, u, guidance, guidance_interval)
        return self.denoiser.with_condition(**c)

    @torch.no_grad()
    def sample_tensors(self, n: int, solver: str = "dpmpp_2m", nfe: int = 20, grid: str | None = None,
                       guidance: float = 0.0, guidance_interval: tuple[float, float] | None = None,
                       generator: torch.Generator | None = None, batch_size: int | None = None,
                       wrap: Callable | None = None, solver_options: dict | None = None,
                       dtype: torch.dtype = torch.float32, progress: bool = False,
                       **request: Any) -> list[tuple[Tensor, Any, int]]:
        """Sample ``n`` items in chunks of ``batch_size``; returns ``[(x, space, nfe), ...]`` per chunk.

        ``request`` is modality-specific (``labels=``, ``n_atoms=``, ...): per-item lists or tensors
        of length ``n`` are sliced per chunk. ``wrap(model, space)`` may wrap the model in a
        guide (inpainting, reconstruction guidance). ``solver_options`` go to the solver.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        batch_size = batch_size or n
        chunks = []
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="sampling", unit="batch")
        for lo in starts:
            hi = min(n, lo + batch_size)
            req = {k: _chunk(v, lo, hi, n) for k, v in request.items()}
            space = self.modality.space(self.config, hi - lo, self.device, dtype, generator=generator, **req)
            model = self.model_for(hi - lo, guidance, guidance_interval, **req)
            if wrap is not None:
                model = wrap(model, space)
            out = sample(model, space, solver=solver, nfe=nfe, grid=grid, generator=generator, **(solver_options or {}))
            chunks.append((out.x, space, out.nfe))
        return chunks

    def sample(self, n: int, **kwargs: Any) -> list:
        """``n`` domain objects (see :meth:`sample_tensors` for the options)."""
        objects: list = []
        for x, space, _ in self.sample_tensors(n, **kwargs):
            objects.extend(self.modality.decode(x, space, self.config))
        return objects

    def generate(self, n: int, seed: int, out_dir: str | Path, chunk_size: int = 64, **kwargs: Any) -> list | None:
        """Sample ``n`` items in fixed-size chunks, each seeded from ``(seed, chunk index)``, spread
        over the processes of a ``torchrun`` launch (one process without it): every rank draws
        chunks ``rank, rank + W, ...`` into its own shard file under ``out_dir`` and rank 0 merges
        them in chunk order. The result depends on ``seed`` and ``chunk_size`` only, not on the
        number of processes. Returns the domain objects on rank 0, ``None`` on the others.

        ``labels``: one label, one per item, or ``"all"`` (item ``i`` gets class ``i mod K``).
        """
        from .training.distributed import dist_info, generate_sharded

        request = dict(kwargs)
        labels = request.pop("labels", None)
        k = self.modality.num_classes(self.config)
        if isinstance(labels, str) and labels != "all":
            raise ValueError(f"labels must be class indices or 'all', got {labels!r}")
        if labels == "all" and not k:
            raise ValueError("labels='all' needs a class-conditional model")

        def labels_for(offset: int, m: int):
            if labels is None:
                return None
            if labels == "all":  # cycle through the classes by global item index
                return [(offset + i) % k for i in range(m)]
            if isinstance(labels, int) or len(labels) == 1:
                return labels
            if len(labels) != n:
                raise ValueError(f"got {len(labels)} labels for {n} samples")
            return list(labels[offset: offset + m])

        def draw(m: int, generator: torch.Generator, offset: int) -> Tensor:
            lab = labels_for(offset, m)
            extra = {} if lab is None else {"labels": lab}
            chunks = self.sample_tensors(m, generator=generator, **request, **extra)
            return torch.cat([c[0] for c in chunks])

        merged = generate_sharded(draw, n, seed, out_dir, chunk_size=chunk_size, device=self.device, with_offset=True)
        if not dist_info().is_main or merged is None:
            return None
        x = merged["x"].to(self.device)
        space = self.modality.space(self.config, n, self.device, x.dtype)
        return self.modality.decode(x, space, self.config)

    def evaluate(self, objects: list, **options: Any) -> dict:
        return self.modality.evaluate(objects, self.config, **options)

    def save(self, objects: list, out: str | Path, picture: bool = False) -> list[Path]:
        return self.modality.save(objects, out, self.config, picture=picture)

    def info(self) -> dict:
        """A JSON-ready description: modality, process, network size, checkpoint."""
        return {
            "modality": self.modality.name,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "process": self.config.process,
            "model": self.config.model,
            "parameters": sum(p.numel() for p in self.net.parameters()),
        }

    def __repr__(self) -> str:
        return f"DiffusionPipeline({json.dumps(self.info())})"

