"""Images out: tensors in [-1, 1] to PNG files and picture grids (Pillow)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["to_uint8", "to_pil", "image_grid", "save_images"]


def to_uint8(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` (or ``[C, H, W]``) in [-1, 1] -> uint8 ``[B, H, W, C]`` in 0..255 (clamped)."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with 1 or 3 channels, got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def to_pil(image: Tensor, scale: int = 1):
    """One ``[C, H, W]`` image in [-1, 1] as a PIL image, enlarged ``scale`` times (nearest)."""
    from PIL import Image

    arr = to_uint8(image)[0].numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode="L" if arr.shape[-1] == 1 else "RGB")
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def image_grid(images: Sequence[Tensor] | Tensor, nrow: int | None = None, scale: int = 4, pad: int = 1):
    """A PIL picture of the images in a grid (``nrow`` per row, default about square), each
    enlarged ``scale`` times, separated by ``pad`` pixels of mid grey."""
    from PIL import Image

    batch = torch.stack(list(images)) if not isinstance(images, Tensor) else images
    u8 = to_uint8(batch)
    n, h, w, c = u8.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    hh, ww = h * scale, w * scale
    canvas = Image.new("L" if c == 1 else "RGB", (nrow * (ww + pad) + pad, rows * (hh + pad) + pad), color=128)
    for i in range(n):
        tile = to_pil(batch[i], scale)
        canvas.paste(tile, (pad + (i % nrow) * (ww + pad), pad + (i // nrow) * (hh + pad)))
    return canvas


def save_images(images: Sequence[Tensor] | Tensor, out: str | Path, prefix: str = "sample", picture: bool = False,
                nrow: int | None = None) -> list[Path]:
    """Write each image as ``out/{prefix}_{i:05d}.png`` and, with ``picture``, ``out/grid.png``.
    Returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = out / f"{prefix}_{i:05d}.png"
        to_pil(img).save(p)
        paths.append(p)
    if picture and len(paths):
        p = out / "grid.png"
        image_grid(images, nrow=nrow, scale=max(1, 64 // int(images[0].shape[-1]))).save(p)
        paths.append(p)
    return paths
