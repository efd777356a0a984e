"""Image metrics in the feature space of the shipped digits classifier.

**fd_digits is not FID.** FID (Heusel et al. 2017) is the Fréchet distance between Gaussians
fitted to Inception-v3 pool features. Inception weights cannot be downloaded here and would see
little in 8x8 grey digits, so the same distance is computed in the 64-d penultimate layer of a
small CNN trained on the digits train split (:mod:`.classifier`). Its numbers are on their own
scale: compare them only with other ``fd_digits`` values computed with the same classifier and the
same sample sizes (the estimate is biased upwards for small samples, as FID is).

* :func:`frechet_distance` -- squared Fréchet (2-Wasserstein) distance between the Gaussians
  ``N(mu_a, S_a)`` and ``N(mu_b, S_b)`` fitted to two feature sets (Dowson & Landau 1982)::

      d^2 = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})

  (``tr((S_a S_b)^{1/2})`` of the FID papers equals the last trace, since ``S_a S_b`` is similar to
  the symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}``). Both square roots come from symmetric
  eigen-decompositions in float64 with round-off negatives clipped to zero, so there is no
  complex ``sqrtm`` output to discard and singular covariances (fewer samples than features,
  dead units) are handled.
* :func:`precision_recall` -- improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-2):
  the real manifold is the union of balls around each real feature with radius its distance to
  the k-th nearest other real feature; precision is the fraction of generated features inside it,
  recall the fraction of real features inside the generated manifold built the same way.
* :func:`class_accuracy` -- the classifier's top-1 agreement with the requested classes of
  class-conditional samples.
* :func:`evaluate_images` -- all of the above plus sanity statistics, as one dict.

Images are ``[N, 1, H, W]`` in [-1, 1] with ``H, W >= 8`` (reduced to 8x8 by area interpolation;
see :func:`.classifier.prepare_images` for the validation rules). Computation runs on the
caller's device (``device=None``: the images' device).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .classifier import DigitsClassifier, ImageShapeError, load_digits_classifier, prepare_images

__all__ = [
    "PrecisionRecall",
    "class_accuracy",
    "evaluate_images",
    "features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "precision_recall",
    "predict",
]


def _resolve(images: Tensor, classifier: DigitsClassifier | None, device) -> tuple[DigitsClassifier, torch.device]:
    """The device to compute on (``device``, else the images') and the classifier there: the
    shipped one, or the caller's moved to that device and put in eval mode."""
    dev = torch.device(device) if device is not None else (images.device if isinstance(images, Tensor) else torch.device("cpu"))
    if classifier is None:
        classifier = load_digits_classifier(dev)
    else:
        classifier = classifier.to(dev).eval()
    return classifier, dev


@torch.no_grad()
def _run(images: Tensor, classifier, device, batch_size: int, name: str, head: bool) -> Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net, dev = _resolve(images, classifier, device)
    x = prepare_images(images, name=name)
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(dev)
        out.append(net(xb) if head else net.features(xb))
    return torch.cat(out)


def features(images: Tensor, classifier: DigitsClassifier | None = None, device=None, batch_size: int = 512) -> Tensor:
    """Penultimate-layer features ``[N, feature_dim]`` (float32, on ``device``) of the digits
    classifier (the shipped one unless ``classifier`` is given)."""
    return _run(images, classifier, device, batch_size, "images", head=False)


def predict(images: Tensor, classifier: DigitsClassifier | None = None, device=None, batch_size: int = 512) -> Tensor:
    """Predicted classes ``[N]`` (long, on ``device``): argmax of the classifier's logits."""
    return _run(images, classifier, device, batch_size, "images", head=True).argmax(1)


def class_accuracy(images: Tensor, labels: Tensor, classifier: DigitsClassifier | None = None, device=None,
                   batch_size: int = 512) -> float:
    """Fraction of ``images`` that the classifier assigns to ``labels`` (the classes the samples
    were conditioned on; 0..num_classes-1)."""
    net, dev = _resolve(images, classifier, device)
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-d integer tensor, got shape {list(labels.shape)} dtype {labels.dtype}")
    n = images.shape[0] if isinstance(images, Tensor) else len(images)
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} images")
    num_classes = net.config.num_classes
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class indices in 0..{num_classes - 1}, got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    pred = predict(images, net, dev, batch_size)
    return float((pred == labels.to(pred.device)).float().mean())


# -- Fréchet distance --------------------------------------------------------------------------


def _as_2d_float64(feats, name: str) -> np.ndarray:
    a = feats.detach().to("cpu", torch.float64).numpy() if isinstance(feats, Tensor) else np.asarray(feats, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [N, D] of features, got shape {list(a.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 feature vectors to fit a covariance, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``."""
    a = _as_2d_float64(feats, "feats")
    return a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix, round-off negatives clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """Squared Fréchet distance between ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)`` (float64);
    see the module docstring for the formula."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(f"shape mismatch: means {mu_a.shape}, {mu_b.shape}; covariances {sigma_a.shape}, {sigma_b.shape}")
    root_a = _psd_sqrt(sigma_a)
    inner = root_a @ sigma_b @ root_a
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_cross = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_cross)
    # a true distance is >= 0; identical inputs can land a few ulps below
    return max(value, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Squared Fréchet distance between Gaussians fitted to features ``[N_a, D]`` and ``[N_b, D]``
    (tensors or arrays). With digits-classifier features this is ``fd_digits`` -- not FID."""
    a, b = _as_2d_float64(feats_a, "feats_a"), _as_2d_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


# -- improved precision and recall -------------------------------------------------------------


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _distance_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps distance ties honest; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _knn_radii(feats: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row to its k-th nearest *other* row (the row itself is the 0-th)."""
    out = []
    for i in range(0, feats.shape[0], batch_size):
        d = torch.cdist(feats[i:i + batch_size], feats)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _inside(query: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> Tensor:
    """For each query row: is it within ``radii[j]`` of some ``centres[j]``? (Kynkäänniemi eq. 1)"""
    out = []
    for i in range(0, query.shape[0], batch_size):
        d = torch.cdist(query[i:i + batch_size], centres)
        out.append((d <= radii[None]).any(1))
    return torch.cat(out)


@torch.no_grad()
def precision_recall(real_feats: Tensor, fake_feats: Tensor, k: int = 3, batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii.

    Distances are Euclidean, computed with ``torch.cdist`` in blocks of ``batch_size`` rows (memory
    ``batch_size * N``) on the device of ``real_feats``, in float64 (float32 on MPS). A point lies
    inside a ball when its distance is ``<=`` the radius. Each set needs more than ``k`` rows.
    """
    real, fake = torch.as_tensor(real_feats), torch.as_tensor(fake_feats)
    for name, f in (("real_feats", real), ("fake_feats", fake)):
        if f.dim() != 2:
            raise ValueError(f"{name} must be [N, D], got shape {list(f.shape)}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, "
                         f"got {real.shape[0]} real and {fake.shape[0]} generated")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = real.device
    dtype = _distance_dtype(dev)
    real, fake = real.to(dev, dtype), fake.to(dev, dtype)
    real_radii, fake_radii = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
    precision = _inside(fake, real, real_radii, batch_size).double().mean()
    recall = _inside(real, fake, fake_radii, batch_size).double().mean()
    return PrecisionRecall(float(precision), float(recall))


# -- everything at once ------------------------------------------------------------------------


def evaluate_images(samples: Tensor, reference_images: Tensor, labels: Tensor | None = None, device=None,
                    k: int = 3, batch_size: int = 512, classifier: DigitsClassifier | None = None) -> dict[str, Any]:
    """Metrics of generated ``samples`` against ``reference_images`` (e.g. the 300 held-out digits).

    Returns a dict of floats/ints:

    * ``fd_digits``: squared Fréchet distance in the digits classifier's feature space (not FID);
    * ``precision``, ``recall``: improved precision/recall with ``k`` nearest neighbours;
    * ``class_accuracy`` (only when ``labels``, the classes the samples were conditioned on, are given);
    * sanity statistics of the raw samples: ``sample_mean``, ``sample_std``, ``sample_min``,
      ``sample_max``, ``fraction_outside`` (pixels outside [-1, 1], which are clamped before the
      classifier), and ``reference_mean``, ``reference_std``;
    * ``n_samples``, ``n_reference`` (fd_digits is biased by sample size: compare like with like).

    ``samples`` and ``reference_images`` must have the same ``[C, H, W]``: both are reduced to 8x8
    the same way, so a resize (say, digits upsampled to 16x16 for training) affects both alike.
    Raises :class:`.classifier.ImageShapeError` / :class:`.classifier.ImageValueError` for a wrong
    shape, NaN/inf or values far outside [-1, 1], naming which input is at fault.
    """
    for name, x in (("samples", samples), ("reference_images", reference_images)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if samples.shape[1:] != reference_images.shape[1:]:
        # a resize is not neutral (e.g. bilinear 8->16->8 blurs): both sets must take the same path
        raise ImageShapeError(
            f"samples are {list(samples.shape[1:])} but reference_images are {list(reference_images.shape[1:])}; "
            "compare images of the same size, e.g. DigitsDataset('heldout', resize=16) for 16x16 samples"
        )
    net, dev = _resolve(samples, classifier, device)
    feats_s = _run(samples, net, dev, batch_size, "samples", head=False)
    feats_r = _run(reference_images, net, dev, batch_size, "reference_images", head=False)
    pr = precision_recall(feats_r, feats_s, k=k, batch_size=max(batch_size, 1))
    raw = samples.detach().double()
    ref = reference_images.detach().double()
    result: dict[str, Any] = {
        "fd_digits": frechet_distance(feats_r, feats_s),
        "precision": pr.precision,
        "recall": pr.recall,
        "sample_mean": float(raw.mean()),
        "sample_std": float(raw.std()),
        "sample_min": float(raw.min()),
        "sample_max": float(raw.max()),
        "fraction_outside": float((raw.abs() > 1.0).double().mean()),
        "reference_mean": float(ref.mean()),
        "reference_std": float(ref.std()),
        "n_samples": int(samples.shape[0]),
        "n_reference": int(reference_images.shape[0]),
    }
    if labels is not None:
        result["class_accuracy"] = class_accuracy(samples, labels, net, dev, batch_size)
    return result
