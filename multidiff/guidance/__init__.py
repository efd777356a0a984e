"""Guidance: steering a sampler toward a condition without retraining.

Every guide here is either a *model wrapper* that follows the sampler protocol
(``.process`` and ``__call__(x, t[B], space, **cond) -> x0_hat``) or a *state hook* for the
samplers' ``constrain=`` argument, so each works with every sampler family and on any Space:

* :class:`ClassifierFreeGuidance`: ``x0 = x0_c + w (x0_c - x0_u)`` from one batched call
  (Ho & Salimans 2021), optionally only inside a noise-level interval (Kynkaenniemi et al. 2024).
* :class:`ClassifierGuidance`: ``score + scale * grad log p(y | x_t)`` (Dhariwal & Nichol 2021).
* :class:`ReconstructionGuidance`: diffusion posterior sampling for ``y = A(x0) + noise``
  (Chung et al. 2023), gradient through the model's ``x0_hat``.
* :class:`Inpaint` (replacement, Song et al. 2021b, hook) with :class:`InpaintDenoiser`
  (known entries of ``x0_hat`` replaced), and :func:`sample_repaint`, RePaint's resampling
  sampler (Lugmayr et al. 2022).

A score correction ``score' = score + g`` is the data-prediction correction
``x0' = x0 + (sigma^2 / alpha) g`` (Tweedie: ``x0_hat = (x + sigma^2 score) / alpha``); that is
how the gradient guides reach every sampler. Where ``alpha = 0`` exactly (the linear
interpolant at ``t = 1``) the factor is infinite while ``g`` vanishes; their finite limit is not
available from a black-box gradient, so the correction is dropped at that one point.

NFE: a wrapper is called once per sampler evaluation, however many inner passes it makes
(CFG's batched call of twice the batch, a backward pass for the gradient guides); the NFE a
sampler reports counts those calls.

GraphSpace: CFG duplicates the batch with ``space.repeat(2)`` (nodes of copy 0, then copy 1);
gradient corrections are projected onto the zero-centre-of-mass subspace. Inpainting graph
positions with zero centre of mass: ``known`` must be given in the centred frame of the
*whole* item (the values the final centred sample must hold); the centre-of-mass constraint is
then met by shifting only the free (unknown) entries of each centred channel.
"""
from .cfg import ClassifierFreeGuidance
from .gradient import ClassifierGuidance, ReconstructionGuidance
from .inpaint import Inpaint, InpaintDenoiser, repaint_schedule, sample_repaint

__all__ = [
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "ReconstructionGuidance",
    "Inpaint",
    "InpaintDenoiser",
    "sample_repaint",
    "repaint_schedule",
]
