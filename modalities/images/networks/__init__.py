"""Image denoising networks: a U-Net and a small DiT behind one interface.

``net(x [B, C, H, W], t [B], labels=None) -> [B, C, H, W]``; see :mod:`.base` for the contract
(labels, null class, label dropout) and :func:`build_network` to rebuild one from a checkpoint's
config dict.
"""
from __future__ import annotations

from typing import Any

from multidiff.networks import build_from_config

from .base import ConfigError, ImageNetwork, config_from_dict
from .dit import DiT, DiTConfig, sincos_2d
from .embeddings import TIME_EMBEDDINGS, LabelError, TimeFeatures, drop_labels
from .unet import UNet, UNetConfig

__all__ = [
    "NETWORKS",
    "TIME_EMBEDDINGS",
    "ConfigError",
    "DiT",
    "DiTConfig",
    "ImageNetwork",
    "LabelError",
    "TimeFeatures",
    "UNet",
    "UNetConfig",
    "build_network",
    "config_from_dict",
    "drop_labels",
    "sincos_2d",
]

NETWORKS: dict[str, type[ImageNetwork]] = {"unet": UNet, "dit": DiT}


def build_network(config: dict[str, Any]) -> ImageNetwork:
    """Rebuild a network from ``net.config_dict()`` (``{"kind": "unet" | "dit", ...}``)."""
    return build_from_config(NETWORKS, config, "image network")
