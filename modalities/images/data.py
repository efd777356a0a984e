"""Image data: the built-in 8x8 digits and any folder of PNG/JPEG files, as tensors in [-1, 1].

Both datasets are map-style: ``len(ds)`` and ``ds[i] -> (image [C, H, W] float32 in [-1, 1],
label int)`` with ``label = -1`` for unlabelled (flat-folder) data, plus ``num_classes``,
``image_shape``, ``class_names`` and :meth:`ImageDataset.tensors` for whole-set training
without a ``DataLoader``.

* :class:`DigitsDataset`: scikit-learn's copy of the UCI optical digits (1,797 grey 8x8
  images, 10 classes, integer values 0..16; shipped inside scikit-learn, no download), scaled
  by ``x / 8 - 1``. A fixed-seed split stratified by class keeps ``holdout`` images (default
  300, i.e. 1,497 train / 300 held out) for evaluation; ``resize`` upsamples (e.g. to 16x16).
* :class:`ImageFolderDataset`: class labels from sub-folder names (sorted, so the mapping is
  stable; pass ``class_names`` to reuse a saved mapping), a flat folder is unconditional.
  Every file is decoded once at construction, so a bad file is found before training starts,
  never mid-epoch. ``on_error="raise"`` stops at the first unreadable or wrongly sized file
  with its path in the message; ``on_error="skip"`` leaves it out, records it with the reason in
  :attr:`ImageFolderDataset.skipped` and warns (never a silent drop).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESAMPLE",
    "DigitsDataset",
    "EmptyImageFolderError",
    "ImageDataError",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageFolderLayoutError",
    "ImageSizeError",
    "SkippedFile",
    "UnreadableImageError",
    "digits_split",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
RESAMPLE = ("nearest", "bilinear", "bicubic", "area")
DIGITS_SIZE = 1797


class ImageDataError(ValueError):
    """Image data that cannot be used; ``path`` names the file or folder at fault."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class UnreadableImageError(ImageDataError):
    """A file that Pillow cannot decode (corrupt, truncated, not an image)."""


class ImageSizeError(ImageDataError):
    """An image whose size differs from the others while ``resize=None``."""


class EmptyImageFolderError(ImageDataError):
    """A folder without any usable image."""


class ImageFolderLayoutError(ImageDataError):
    """A folder whose layout does not say what the labels are."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


def _check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")


def _size_hw(resize: int | Sequence[int] | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    hw = (resize, resize) if isinstance(resize, int) else tuple(resize)
    if len(hw) != 2 or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in hw):
        raise ValueError(f"resize must be a positive int, a (height, width) pair or None, got {resize!r}")
    return hw


class ImageDataset(torch.utils.data.Dataset):
    """In-memory (or lazily decoded) images with integer labels; see the module docstring."""

    def __init__(self, labels: Tensor, class_names: Sequence[str], image_shape: tuple[int, int, int]):
        self.labels = labels.to(torch.long)
        self.class_names = tuple(class_names)
        self.image_shape = tuple(int(s) for s in image_shape)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for unlabelled data)."""
        return len(self.class_names)

    @property
    def class_to_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return self.image(index), int(self.labels[index])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images ``[N, C, H, W]`` float32 in [-1, 1] and labels ``[N]`` (long, -1 = none)."""
        if len(self) == 0:
            return torch.empty(0, *self.image_shape), self.labels.clone()
        return torch.stack([self.image(i) for i in range(len(self))]), self.labels.clone()

    def class_counts(self) -> list[int]:
        """Images per class, in class-index order."""
        return torch.bincount(self.labels[self.labels >= 0], minlength=self.num_classes).tolist()


# -- the 8x8 digits ----------------------------------------------------------------------------


def digits_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, heldout)`` of a class-stratified split with exactly ``holdout`` held out.

    Each class gives ``holdout * n_c / N`` images, rounded by largest remainder so the total is
    exact; which images is a fixed-seed permutation within the class (``numpy.random.default_rng``).
    """
    n = len(labels)
    if not 0 <= holdout < n:
        raise ValueError(f"holdout must be in 0..{n - 1}, got {holdout}")
    classes, counts = np.unique(labels, return_counts=True)
    quota = holdout * counts / n
    take = np.floor(quota).astype(int)
    # largest remainder, ties broken by class order, so the total is exactly `holdout`
    for j in np.argsort(-(quota - take), kind="stable")[: holdout - int(take.sum())]:
        take[j] += 1
    rng = np.random.default_rng(seed)
    held = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        held.append(idx[rng.permutation(len(idx))[:k]])
    held_idx = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=int)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


class DigitsDataset(ImageDataset):
    """scikit-learn's 8x8 digits as ``[1, 8, 8]`` (or ``[1, resize, resize]``) images in [-1, 1].

    Args:
        split: ``"train"`` (1,497 images with the default holdout), ``"heldout"`` (300) or ``"all"`` (1,797).
        resize: ``None`` keeps 8x8; an int or ``(h, w)`` resamples with ``resample``
            (``torch.nn.functional.interpolate``; results are clamped to [-1, 1]).
        holdout: number of held-out images (class-stratified).
        seed: seed of the split.
    """

    SPLITS = ("train", "heldout", "all")

    def __init__(
        self,
        split: str = "train",
        resize: int | Sequence[int] | None = None,
        resample: str = "bilinear",
        holdout: int = 300,
        seed: int = 0,
    ):
        _check_choice("split", split, self.SPLITS)
        _check_choice("resample", resample, RESAMPLE)
        hw = _size_hw(resize)
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # the [images] extra
            raise ImportError("the digits dataset needs scikit-learn: pip install 'multidiff-toolkit[images]'") from e
        digits = load_digits()
        labels = np.asarray(digits.target)
        train, held = digits_split(labels, holdout, seed)
        idx = {"train": train, "heldout": held, "all": np.arange(len(labels))}[split]
        # values are integers 0..16: x / 8 - 1 maps them onto [-1, 1]
        images = torch.from_numpy(digits.images[idx]).float()[:, None] / 8.0 - 1.0
        if hw is not None and hw != tuple(images.shape[-2:]):
            kw = {} if resample in ("nearest", "area") else {"align_corners": False}
            images = F.interpolate(images, size=hw, mode=resample, **kw).clamp_(-1.0, 1.0)
        self.images = images.contiguous()
        self.indices = torch.from_numpy(idx)
        self.split = split
        self.resample, self.holdout, self.seed = resample, holdout, seed
        super().__init__(torch.from_numpy(labels[idx]), [str(d) for d in range(10)], tuple(self.images.shape[1:]))

    def image(self, index: int) -> Tensor:
        return self.images[index]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.images.clone(), self.labels.clone()

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (for a checkpoint): enough to rebuild the same split."""
        return {"kind": "digits", "split": self.split, "image_shape": list(self.image_shape),
                "resample": self.resample, "holdout": self.holdout, "seed": self.seed,
                "class_names": list(self.class_names), "num_images": len(self)}


# -- folders of PNG/JPEG files -----------------------------------------------------------------


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("image folders need Pillow: pip install 'multidiff-toolkit[images]'") from e
    return Image


_PIL_RESAMPLE = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "area": "BOX"}


def _decode(path: Path, channels: int, size_hw: tuple[int, int] | None, resample: str) -> np.ndarray:
    """Decode one file to ``uint8 [C, H, W]``; any failure becomes :class:`UnreadableImageError`."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                # 16/32-bit grey: rescale to 8 bits rather than let convert() clip at 255
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
                img = Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
            img = img.convert("L" if channels == 1 else "RGB")
            if size_hw is not None and img.size != (size_hw[1], size_hw[0]):
                img = img.resize((size_hw[1], size_hw[0]), getattr(Image.Resampling, _PIL_RESAMPLE[resample]))
            arr = np.array(img, dtype=np.uint8)  # a writable copy, detached from Pillow
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}", path) from e
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _header_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the header only; raises :class:`UnreadableImageError`."""
    Image = _pil()
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}", path) from e
    return h, w


def _is_image(p: Path, extensions: Sequence[str]) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions


class ImageFolderDataset(ImageDataset):
    """PNG/JPEG files under ``root`` as ``[channels, H, W]`` images in [-1, 1].

    Layout: ``root/<class name>/**/<image>`` (labels ``0..K-1`` in sorted class-name order) or
    ``root/<image>`` (flat, unlabelled: label -1). Mixing both is an error. Hidden files and
    files with other extensions are ignored and listed in :attr:`ignored`.

    Args:
        root: the folder.
        resize: ``None`` requires every image to have the same size (the most common one;
            a file of another size is an :class:`ImageSizeError` naming it and both sizes);
            an int or ``(h, w)`` resizes every image with ``resample`` (Pillow).
        channels: 1 (greyscale) or 3 (RGB); other modes are converted, alpha is dropped.
        on_error: ``"raise"`` or ``"skip"`` (record in :attr:`skipped`, warn, keep going).
        cache: keep the decoded images in memory (uint8); otherwise decode on every access.
        class_names: a saved class list to reuse (e.g. from a checkpoint); every class folder
            must be in it, and classes without a folder keep their index.
        extensions: file suffixes to read (lower case).
    """

    ON_ERROR = ("raise", "skip")

    def __init__(
        self,
        root: str | os.PathLike,
        resize: int | Sequence[int] | None = None,
        channels: int = 1,
        on_error: str = "raise",
        cache: bool = True,
        resample: str = "bilinear",
        class_names: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ):
        _check_choice("on_error", on_error, self.ON_ERROR)
        _check_choice("resample", resample, RESAMPLE)
        _check_choice("channels", channels, (1, 3))
        self.root = Path(root)
        self.size_hw = _size_hw(resize)
        self.channels, self.on_error, self.resample = channels, on_error, resample
        self.extensions = tuple(e.lower() for e in extensions)
        self.skipped: list[SkippedFile] = []
        self.ignored: list[str] = []
        names, candidates = self._scan(class_names)

        # pass 1: headers (cheap) -> reference size for resize=None
        sized = []
        for path, label in candidates:
            try:
                sized.append((path, label, _header_size(path)))
            except UnreadableImageError as e:
                self._fail(e)
        ref_hw = self.size_hw
        if ref_hw is None and sized:
            counts = Counter(hw for _, _, hw in sized)
            ref_hw = max(counts, key=lambda hw: counts[hw])  # most common; first seen on ties
        # pass 2: decode everything once, so bad files surface now, not mid-training
        paths, labels, arrays = [], [], []
        for path, label, hw in sized:
            try:
                if self.size_hw is None and hw != ref_hw:
                    raise ImageSizeError(
                        f"image {path} is {hw[0]}x{hw[1]} (height x width) but the folder's images are "
                        f"{ref_hw[0]}x{ref_hw[1]} ({counts[ref_hw]} files); pass resize=... to resize them",
                        path,
                    )
                arr = _decode(path, channels, self.size_hw, resample)
            except ImageDataError as e:
                self._fail(e)
                continue
            paths.append(path)
            labels.append(label)
            if cache:
                arrays.append(arr)
        if not paths:
            why = f"; all {len(self.skipped)} candidate files were skipped, first: {self.skipped[0].reason}" if self.skipped else ""
            raise EmptyImageFolderError(f"no usable image in {self.root}{why}", self.root)
        self.files = paths
        self._cache = torch.from_numpy(np.stack(arrays)) if cache else None
        super().__init__(torch.tensor(labels, dtype=torch.long), names, (channels, *ref_hw))
        if self.skipped:
            warnings.warn(f"{self.report()}\n(see ImageFolderDataset.skipped)", stacklevel=2)

    def _scan(self, class_names: Sequence[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
        root = self.root
        if not root.exists():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a folder")
        entries = sorted(root.iterdir())
        top = [p for p in entries if _is_image(p, self.extensions)]
        self.ignored += [str(p) for p in entries if p.is_file() and p not in top]
        class_files: dict[str, list[Path]] = {}
        for d in (p for p in entries if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in d.rglob("*") if f.is_file())
            images = [f for f in files if _is_image(f, self.extensions)]
            self.ignored += [str(f) for f in files if f not in images]
            if images:
                class_files[d.name] = images
        if top and class_files:
            raise ImageFolderLayoutError(
                f"{root} mixes images at the top level (e.g. {top[0].name}) with class sub-folders "
                f"({', '.join(sorted(class_files))}); put every image in a class folder, or use a flat folder",
                root,
            )
        if not top and not class_files:
            raise EmptyImageFolderError(
                f"no image files ({', '.join(self.extensions)}) in {root} or its sub-folders", root
            )
        if not class_files:
            if class_names:
                raise ImageFolderLayoutError(
                    f"class_names were given but {root} is a flat folder without class sub-folders", root
                )
            return [], [(p, -1) for p in top]
        names = sorted(class_files) if class_names is None else list(class_names)
        if len(set(names)) != len(names):
            raise ValueError(f"class_names has duplicates: {names}")
        unknown = sorted(set(class_files) - set(names))
        if unknown:
            raise ImageFolderLayoutError(
                f"class folder(s) {unknown} in {root} are not among the given class_names {names}", root
            )
        index = {n: i for i, n in enumerate(names)}
        return names, [(f, index[n]) for n in sorted(class_files, key=index.get) for f in class_files[n]]

    def _fail(self, error: ImageDataError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped.append(SkippedFile(error.path, str(error)))

    def image(self, index: int) -> Tensor:
        if self._cache is not None:
            arr = self._cache[index]
        else:
            arr = torch.from_numpy(_decode(self.files[index], self.channels, self.image_shape[1:], self.resample))
        return arr.float() / 127.5 - 1.0

    def report(self) -> str:
        """Human-readable account of the scan: images kept, files skipped (with reasons), ignored."""
        lines = [f"{self.root}: {len(self.files)} images kept, {len(self.skipped)} skipped, {len(self.ignored)} ignored (not {'/'.join(self.extensions)})"]
        lines += [f"  skipped {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (for a checkpoint): class mapping, shape and the skip report."""
        return {"kind": "folder", "root": str(self.root), "class_names": list(self.class_names),
                "image_shape": list(self.image_shape), "resample": self.resample, "num_images": len(self),
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped]}
