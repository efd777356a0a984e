"""Image modality: 8x8 digits and image folders as tensors in [-1, 1], a U-Net and a small DiT.

>>> import torch
>>> from multidiff.modalities.images import DigitsDataset, UNet, UNetConfig
>>> data = DigitsDataset("train")                    # 1,497 images [1, 8, 8], 10 classes
>>> net = UNet(UNetConfig(num_classes=data.num_classes))
>>> x, labels = data.tensors()
>>> net(x[:4], torch.rand(4), labels[:4]).shape
torch.Size([4, 1, 8, 8])
"""
from __future__ import annotations

from .data import (
    IMAGE_EXTENSIONS,
    RESAMPLE,
    DigitsDataset,
    EmptyImageFolderError,
    ImageDataError,
    ImageDataset,
    ImageFolderDataset,
    ImageFolderLayoutError,
    ImageSizeError,
    SkippedFile,
    UnreadableImageError,
    digits_split,
)
from .classifier import DigitsClassifier, ImageShapeError, ImageValueError, load_digits_classifier
from .io import image_grid, save_images
from .metrics import class_accuracy, evaluate_images, features, frechet_distance, precision_recall, predict
from .modality import ImagesModality
from .networks import (
    NETWORKS,
    ConfigError,
    DiT,
    DiTConfig,
    ImageNetwork,
    LabelError,
    UNet,
    UNetConfig,
    build_network,
    drop_labels,
)

__all__ = [
    "DigitsClassifier",
    "ImageShapeError",
    "ImageValueError",
    "ImagesModality",
    "class_accuracy",
    "evaluate_images",
    "features",
    "frechet_distance",
    "image_grid",
    "load_digits_classifier",
    "precision_recall",
    "predict",
    "save_images",
    "IMAGE_EXTENSIONS",
    "NETWORKS",
    "RESAMPLE",
    "ConfigError",
    "DiT",
    "DiTConfig",
    "DigitsDataset",
    "EmptyImageFolderError",
    "ImageDataError",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageFolderLayoutError",
    "ImageNetwork",
    "ImageSizeError",
    "LabelError",
    "SkippedFile",
    "UNet",
    "UNetConfig",
    "UnreadableImageError",
    "build_network",
    "digits_split",
    "drop_labels",
]
