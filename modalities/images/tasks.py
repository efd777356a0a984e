"""Image tasks built on the core's guidance, with no extra network.

* :func:`inpaint`: fill the masked-out pixels of images (replacement at every step, or
  RePaint's resampling), on any image model.
* :func:`super_resolve`: ``factor``-times super-resolution of low-resolution images with the
  unconditional model and reconstruction guidance (DPS, Chung et al. 2023) on the measurement
  ``y = avg_pool(x0, factor)``; the known low-resolution image is matched by the samples' block
  averages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from multidiff.guidance import Inpaint, ReconstructionGuidance, sample_repaint
from multidiff.sampling import sample
from multidiff.schedules import make_grid

__all__ = ["inpaint", "super_resolve", "downsample"]


def downsample(images: Tensor, factor: int = 2) -> Tensor:
    """Block averages of ``factor x factor`` pixels (the super-resolution measurement)."""
    return F.avg_pool2d(images, factor)


def _check_images(pipe, images: Tensor, what: str) -> Tensor:
    shape = list(pipe.config.data["image_shape"])
    if images.ndim != 4 or list(images.shape[1:]) != shape:
        raise ValueError(f"{what} must be [N, {', '.join(map(str, shape))}] for this model, got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} hold NaN or infinite values")
    return images.to(pipe.device, torch.float32)


def inpaint(pipe, images: Tensor, mask: Tensor, *, method: str = "repaint", solver: str = "ddim", nfe: int = 50,
            jump_length: int = 10, resamplings: int = 5, generator: torch.Generator | None = None,
            **request) -> Tensor:
    """Images whose ``mask`` pixels (``True`` = known) equal ``images`` and the rest is generated.

    ``method="replace"`` runs ``solver`` with the known pixels replaced by their noised values
    after every step (``nfe`` evaluations); ``"repaint"`` runs RePaint's resampling schedule on
    ``nfe`` ancestral steps (``jump_length``, ``resamplings``; more evaluations, better
    agreement between the known and the generated parts). ``request`` (e.g. ``labels=``) goes
    to the model as for sampling."""
    images = _check_images(pipe, images, "images")
    mask = torch.as_tensor(mask, device=images.device).bool().expand_as(images)
    n = images.shape[0]
    space = pipe.modality.space(pipe.config, n, pipe.device)
    model = pipe.model_for(n, **request)
    x_T = pipe.process.prior_sample(space, generator)
    with torch.no_grad():
        if method == "replace":
            hook = Inpaint(mask, images, pipe.process, generator=generator)
            return sample(model, space, solver=solver, nfe=nfe, generator=generator, x_T=x_T,
                          constrain=hook.constrain).x.clamp(-1, 1)
        if method == "repaint":
            ts = make_grid("uniform", pipe.process, nfe)
            return sample_repaint(model, x_T, ts, space, generator, mask=mask, known=images,
                                  jump_length=jump_length, resamplings=resamplings).x.clamp(-1, 1)
    raise ValueError(f"unknown inpainting method {method!r}; valid: 'replace', 'repaint'")


def super_resolve(pipe, low_res: Tensor, factor: int = 2, *, scale: float = 1.0, solver: str = "ddim",
                  nfe: int = 50, generator: torch.Generator | None = None, **request) -> Tensor:
    """High-resolution images whose ``factor x factor`` block averages match ``low_res``.

    DPS on the model's own resolution: ``low_res`` is ``[N, C, H/factor, W/factor]``; ``scale`` is
    the reconstruction-guidance step (see :class:`~multidiff.guidance.ReconstructionGuidance`).
    Works with every solver; each evaluation costs a forward and a backward pass."""
    shape = list(pipe.config.data["image_shape"])
    want = [shape[0], shape[1] // factor, shape[2] // factor]
    if low_res.ndim != 4 or list(low_res.shape[1:]) != want:
        raise ValueError(f"low_res must be [N, {', '.join(map(str, want))}] for a {factor}x model of size {shape}, "
                         f"got {tuple(low_res.shape)}")
    if not bool(torch.isfinite(low_res).all()):
        raise ValueError("low_res holds NaN or infinite values")
    low_res = low_res.to(pipe.device, torch.float32)
    n = low_res.shape[0]
    space = pipe.modality.space(pipe.config, n, pipe.device)
    guided = ReconstructionGuidance(pipe.model_for(n, **request), lambda x0: downsample(x0, factor), low_res, scale)
    with torch.no_grad():
        return sample(guided, space, solver=solver, nfe=nfe, generator=generator).x.clamp(-1, 1)
