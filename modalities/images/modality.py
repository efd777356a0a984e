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
    ``config.model``: ``{"kind": "unet" | "dit", "in_channels", "num_classes", "label_dropout",
    "unet": {...}, "dit": {...}}`` — the shared fields at the top, each architecture's own under
    its name, so ``--model.kind dit --model.dit.depth 6`` switches and tunes the backbone. A flat
    dict (one architecture's fields next to ``kind``) is read as well.
    """

    name = "images"
    description = "images (8x8 digits built in, or any folder of PNG/JPEG files); U-Net or DiT"

    # -- training ------------------------------------------------------------------------
    def default_config(self) -> TrainConfig:
        return TrainConfig(
            model={"kind": "unet", "in_channels": 1, "num_classes": 10, "label_dropout": 0.1,
                   "unet": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "dropout": 0.0,
                            "time_scale": 250.0},
                   "dit": {"image_size": 8, "patch_size": 2, "hidden_size": 96, "depth": 4, "num_heads": 4,
                           "time_scale": 250.0}},
            process={"name": "edm", "options": {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.75},
                     "prediction": "edm", "sigma_data": 0.75},
            loss={"weighting": "edm", "time_sampling": "lognormal"},
            data={"name": "digits", "resize": None, "image_shape": [1, 8, 8],
                  "class_names": [str(d) for d in range(10)]},
            optim=OptimConfig(lr=1e-3, warmup_steps=200, schedule="cosine", min_lr_ratio=0.05, grad_clip=1.0),
            ema=EMAConfig(kind="power", sigma_rel=0.05),
            run=RunConfig(out_dir="runs/digits", steps=6000, batch_size=128, ckpt_every=250, log_every=25),
        )

    def network_config(self, config: TrainConfig) -> dict:
        """The flat network config of the selected architecture."""
        model = dict(config.model)
        kind = model.get("kind", "unet")
        if not isinstance(model.get(kind), dict):  # flat layout
            return {k: v for k, v in model.items() if k not in ("unet", "dit")}
        shared = {k: v for k, v in model.items() if not isinstance(v, dict)}
        return {**shared, **model[kind]}

    def num_classes(self, config: TrainConfig) -> int:
        return int(config.model.get("num_classes", 0))

    def build_network(self, config: TrainConfig) -> nn.Module:
        return build_network(self.network_config(config))

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
        model_classes = self.num_classes(config)
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
    def space(self, config: TrainConfig, n: int, device="cpu", dtype=torch.float32, generator=None,
              **request: Any) -> DenseSpace:
        shape = config.data.get("image_shape")
        if not shape:
            raise ValueError("config.data.image_shape is missing: the checkpoint does not say what size to sample")
        return DenseSpace((n, *shape), device=device, dtype=dtype)

    def _labels(self, config: TrainConfig, n: int, labels, device) -> Tensor:
        k = self.num_classes(config)
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
        null = torch.full_like(lab, self.num_classes(config))
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

    # -- command line ----------------------------------------------------------------------
    def add_commands(self, subparsers) -> None:
        for verb, help_text in (("inpaint", "fill the masked part of images (RePaint or replacement)"),
                                ("superres", "2x super-resolution of images by reconstruction guidance (DPS)")):
            p = subparsers.add_parser(verb, help=help_text)
            p.add_argument("checkpoint", help="checkpoint or run directory, or a shipped name (digits)")
            src = p.add_mutually_exclusive_group()
            src.add_argument("--input", help="a folder of images of the model's size (default: held-out digits)")
            src.add_argument("--heldout", type=int, default=16, help="use the first N held-out images (default 16)")
            p.add_argument("--nfe", type=int, default=50, help="steps (default 50)")
            p.add_argument("--solver", default="ddim", help="solver for replacement/DPS (default ddim)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--device", default="cpu")
            p.add_argument("--out", default=f"out/{verb}", help=f"output folder (default out/{verb})")
            p.add_argument("--picture", action="store_true", help="write a picture: inputs, results, originals")
            if verb == "inpaint":
                p.add_argument("--mask", default="right", choices=["left", "right", "top", "bottom", "center"],
                               help="which part to generate (default right)")
                p.add_argument("--method", default="repaint", choices=["repaint", "replace"])
            else:
                p.add_argument("--scale", type=float, default=8.0, help="DPS guidance scale (default 8)")
            p.set_defaults(func=self._run_task, task=verb)

    def _run_task(self, args) -> int:
        from multidiff.pipeline import DiffusionPipeline

        from .io import image_grid, save_images
        from .tasks import downsample, inpaint, super_resolve

        pipe = DiffusionPipeline.from_pretrained(args.checkpoint, device=args.device)
        if args.input:
            data = ImageFolderDataset(args.input, channels=pipe.config.data["image_shape"][0],
                                      resize=tuple(pipe.config.data["image_shape"][1:]))
            images, _ = data.tensors()
        else:
            images, _ = self.dataset(pipe.config, "holdout").tensors()
            images = images[: args.heldout]
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        if args.task == "inpaint":
            mask = _region_mask(images.shape, args.mask)
            result = inpaint(pipe, images, ~mask, method=args.method, solver=args.solver, nfe=args.nfe, generator=g)
            shown = torch.where(mask, torch.zeros_like(images), images)
        else:
            low = downsample(images, 2)
            result = super_resolve(pipe, low, 2, scale=args.scale, solver=args.solver, nfe=args.nfe, generator=g)
            shown = torch.nn.functional.interpolate(low, scale_factor=2, mode="nearest")
        paths = save_images(list(result.cpu()), args.out, prefix=args.task)
        if args.picture:
            grid = image_grid(torch.cat([shown.cpu(), result.cpu(), images.cpu()]), nrow=len(images),
                              scale=max(1, 64 // images.shape[-1]))
            grid.save(Path(args.out) / "picture.png")
            paths.append(Path(args.out) / "picture.png")
        print(f"wrote {len(paths)} files to {args.out}")
        return 0


def _region_mask(shape, region: str) -> Tensor:
    """``True`` on the region to generate."""
    mask = torch.zeros(shape, dtype=torch.bool)
    h, w = shape[-2], shape[-1]
    sl = {"left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, None)),
          "top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, None), slice(None)),
          "center": (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4))}[region]
    mask[..., sl[0], sl[1]] = True
    return mask
