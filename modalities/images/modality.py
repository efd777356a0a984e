"""The registered image modality: config, network, data, Space, decoding, metrics, files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from multidiff.registry import Modality
from multidiff.space import DenseSpace
from multidiff.training.config import EMAConfig, OptimConfig, RunConfig, TrainConfig
from multidiff.training.distributed import unwrap_model

from .data import DigitsDataset, ImageFolderDataset
from .networks import LabelError, build_network

__all__ = ["ImagesModality", "PRETRAINED_DIR"]

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


class ImagesModality(Modality):
    """Images as ``[B, C, H, W]`` tensors in [-1, 1] on a :class:`~multidiff.space.DenseSpace`.

    ``config.data``: ``{"name": "digits", "resize": None}`` (scikit-learn's 8x8 digits) or
    ``{"name": "folder", "root": ..., "size": 32, "channels": 3, "on_error": "raise"}``;
    ``image_shape`` and ``class_names`` are filled in from the data when training starts.
    ``config.model``: a network config (``{"kind": "unet" | "dit", ...}``).
    """

    name = "images"
    description = "images (8x8 digits built in, or any folder of PNG/JPEG files); U-Net or DiT"

    # -- training ------------------------------------------------------------------------
    def default_config(self) -> TrainConfig:
        return TrainConfig(
            model={"kind": "unet", "in_channels": 1, "base_channels": 32, "channel_mult": [1, 2],
                   "num_res_blocks": 2, "num_classes": 10, "label_dropout": 0.1, "dropout": 0.0,
                   "time_scale": 250.0},
            process={"name": "edm", "options": {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.75},
                     "prediction": "edm", "sigma_data": 0.75},
            loss={"weighting": "edm", "time_sampling": "lognormal"},
            data={"name": "digits", "resize": None, "image_shape": [1, 8, 8],
                  "class_names": [str(d) for d in range(10)]},
            optim=OptimConfig(lr=1e-3, warmup_steps=200, schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0),
            ema=EMAConfig(kind="power", sigma_rel=0.05),
            run=RunConfig(out_dir="runs/digits", steps=6000, batch_size=128, ckpt_every=250, log_every=25),
        )

    def build_network(self, config: TrainConfig) -> nn.Module:
        return build_network(dict(config.model))

    def dataset(self, config: TrainConfig, split: str = "train"):
        data = dict(config.data)
        name = data.get("name", "digits")
        if name == "digits":
            ds = DigitsDataset({"train": "train", "holdout": "heldout", "heldout": "heldout", "all": "all"}[split],
                               resize=data.get("resize"))
        elif name == "folder":
            if "root" not in data:
                raise ValueError("config.data for an image folder needs 'root'")
            ds = ImageFolderDataset(data["root"], resize=data.get("size"), channels=data.get("channels", 3),
                                    class_names=data.get("class_names"), on_error=data.get("on_error", "raise"))
        else:
            raise ValueError(f"unknown image data {name!r}; valid: 'digits', 'folder'")
        shape = list(ds.image_shape)
        if list(data.get("image_shape", shape)) != shape:
            raise ValueError(f"the data gives images of shape {shape} but config.data.image_shape is {data['image_shape']}")
        config.data["image_shape"] = shape
        config.data["class_names"] = list(ds.class_names)
        model_classes = int(config.model.get("num_classes", 0))
        if model_classes and model_classes != ds.num_classes:
            raise ValueError(f"config.model.num_classes is {model_classes} but the data has {ds.num_classes} classes")
        return ds

    def training_batch(self, net: nn.Module, batch: Any, generator: torch.Generator, config: TrainConfig):
        images, labels = batch
        inner = unwrap_model(net)
        cond = {}
        if getattr(inner.config, "num_classes", 0):
            cond["labels"] = inner.drop_labels(labels.to(images.device), generator)
        return images, DenseSpace.like(images), cond

    # -- sampling ------------------------------------------------------------------------
    def space(self, config: TrainConfig, n: int, device="cpu", dtype=torch.float32, **request: Any) -> DenseSpace:
        shape = config.data.get("image_shape")
        if not shape:
            raise ValueError("config.data.image_shape is missing: the checkpoint does not say what size to sample")
        return DenseSpace((n, *shape), device=device, dtype=dtype)

    def _labels(self, config: TrainConfig, n: int, labels, device) -> Tensor:
        k = int(config.model.get("num_classes", 0))
        if not k:
            raise LabelError("this model is unconditional: it takes no labels")
        lab = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if lab.numel() == 1:
            lab = lab.expand(n)
        if lab.numel() != n:
            raise LabelError(f"got {lab.numel()} labels for {n} samples")
        bad = ((lab < 0) | (lab >= k)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise LabelError(f"class label {int(lab[i])} of item {i} is out of range: the model has {k} classes (0..{k - 1})")
        return lab

    def condition(self, config: TrainConfig, n: int, device="cpu", labels=None, **request: Any):
        if labels is None:
            return None
        lab = self._labels(config, n, labels, device)
        null = torch.full_like(lab, int(config.model["num_classes"]))
        return {"labels": lab}, {"labels": null}

    def decode(self, x: Tensor, space, config: TrainConfig) -> list[Tensor]:
        return list(x.detach().float().clamp(-1, 1).cpu())

    # -- evaluation and files --------------------------------------------------------------
    def evaluate(self, objects: list, config: TrainConfig, labels=None, reference: str = "holdout", **options: Any) -> dict:
        from .metrics import evaluate_images

        ref, _ = self.dataset(config, reference).tensors()
        images = torch.stack([o for o in objects])
        return evaluate_images(images, ref, labels=labels, **options)

    def save(self, objects: list, out: str | Path, config: TrainConfig, picture: bool = False) -> list[Path]:
        from .io import save_images

        return save_images(objects, out, picture=picture)

    def pretrained(self) -> dict[str, Path]:
        if not PRETRAINED_DIR.is_dir():
            return {}
        return {p.name: p for p in sorted(PRETRAINED_DIR.iterdir()) if (p / "state.json").is_file()}
