"""Image metrics: Fréchet distance, improved precision/recall, the shipped digits classifier and
the script that trains it.

Measured with the shipped classifier (torch 2.13 CPU): held-out accuracy 296/300 = 98.67 %;
fd_digits train split vs held-out 0.59, held-out vs Gaussian-noise images 47.4, held-out vs
pixel-shuffled held-out digits 33.5.
"""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from multidiff.modalities.images.classifier import (
    PRETRAINED_DIR,
    DigitsClassifier,
    ImageShapeError,
    ImageValueError,
    load_classifier,
    load_digits_classifier,
    prepare_images,
    save_classifier,
)
from multidiff.modalities.images.data import DigitsDataset
from multidiff.modalities.images.metrics import (
    class_accuracy,
    evaluate_images,
    features,
    frechet_distance,
    frechet_distance_from_stats,
    precision_recall,
    predict,
)
from multidiff.modalities.images.train_classifier import main as train_main
from multidiff.modalities.images.train_classifier import train_digits_classifier

FEATURE_DIM = 64


# -- Fréchet distance --------------------------------------------------------------------------

def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # diagonal covariances: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    exact = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(exact, rel=1e-12)
    # the same in a rotated basis: the distance is invariant under a common orthogonal change of basis
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    got = frechet_distance_from_stats(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(exact, rel=1e-10)


def _samples_with_exact_moments(rng, n, mean, cov):
    """n points whose empirical mean and unbiased covariance are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # empirical cov = I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_of_feature_sets_uses_their_mean_and_covariance():
    rng = np.random.default_rng(1)
    d = 4
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 1.0
    s1, s2 = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    a = _samples_with_exact_moments(rng, 50, mu1, np.diag(s1))
    b = _samples_with_exact_moments(rng, 80, mu2, np.diag(s2))
    exact = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance(a, b) == pytest.approx(exact, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("n, d", [(200, 20), (10, 30), (50, 64)])  # the last two: singular covariances
def test_frechet_distance_matches_scipy_sqrtm(n, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.3
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2)
    reference = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(root).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(100, 16)) * rng.uniform(0.01, 10, 16)
    b = rng.normal(size=(70, 16)) + 0.5
    scale = float(np.trace(np.cov(a, rowvar=False)))
    assert 0.0 <= frechet_distance(a, a) < 1e-9 * scale
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.1


def test_frechet_distance_rejects_bad_features():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(a, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a, np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"2-d array"):
        frechet_distance(np.zeros(10), a)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((10, 3), np.nan), a)


# -- improved precision and recall -------------------------------------------------------------

def _brute_force_precision_recall(real, fake, k):
    def radius(points, i):
        others = sorted(float(np.linalg.norm(points[i] - points[j])) for j in range(len(points)) if j != i)
        return others[k - 1]

    def covered(query, centres):
        radii = [radius(centres, j) for j in range(len(centres))]
        return np.mean([any(np.linalg.norm(q - c) <= r for c, r in zip(centres, radii)) for q in query])

    return covered(fake, real), covered(real, fake)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(30, 5)) * 0.7 + 0.8
    p_ref, r_ref = _brute_force_precision_recall(real, fake, k)
    assert 0.0 < p_ref < 1.0 and 0.0 < r_ref < 1.0  # the case is not trivial
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, batch_size=7)
    assert got.precision == pytest.approx(p_ref, abs=1e-12) and got.recall == pytest.approx(r_ref, abs=1e-12)


def test_precision_recall_counts_points_on_the_ball_boundary():
    # integer lattice points: duplicates and exact distance ties with the radii (a point at
    # exactly the k-NN radius is inside, Kynkäänniemi et al. eq. 1 uses <=)
    rng = np.random.default_rng(7)
    real = rng.integers(0, 6, size=(40, 2)).astype(np.float64)
    fake = rng.integers(2, 9, size=(30, 2)).astype(np.float64)
    p_ref, r_ref = _brute_force_precision_recall(real, fake, 3)
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch_size=16)
    assert got.precision == pytest.approx(p_ref, abs=1e-12) and got.recall == pytest.approx(r_ref, abs=1e-12)
    assert 0.0 < p_ref < 1.0 and 0.0 < r_ref < 1.0


def test_precision_recall_extremes_and_errors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 8, generator=g)
    assert tuple(precision_recall(a, a.clone(), k=3)) == (1.0, 1.0)
    far = torch.randn(60, 8, generator=g) + 100.0
    assert tuple(precision_recall(a, far, k=3)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(a, a[:3], k=3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        precision_recall(a, a, k=0)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(a, a[:, :4])


# -- the shipped classifier --------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    train_x, train_y = DigitsDataset("train").tensors()
    held_x, held_y = DigitsDataset("heldout").tensors()
    return train_x, train_y, held_x, held_y


def _shuffled_pixels(images, generator):
    flat = images.flatten(1)
    return torch.stack([row[torch.randperm(row.numel(), generator=generator)] for row in flat]).view_as(images)


def test_shipped_classifier_files_and_held_out_accuracy(digits):
    _, _, held_x, held_y = digits
    weights = PRETRAINED_DIR / "digits_classifier.safetensors"
    meta = json.loads((PRETRAINED_DIR / "digits_classifier.json").read_text())
    assert weights.stat().st_size < 300_000
    net = load_digits_classifier()
    assert isinstance(net, DigitsClassifier) and not net.training
    assert load_digits_classifier() is net  # cached
    assert net.feature_dim == FEATURE_DIM == meta["feature_dim"]
    accuracy = float((predict(held_x) == held_y).float().mean())
    assert accuracy >= 0.95, accuracy  # measured 0.9867
    assert accuracy == pytest.approx(meta["heldout_accuracy"], abs=1e-6)
    assert class_accuracy(held_x, held_y) == pytest.approx(accuracy, abs=1e-7)
    assert features(held_x).shape == (300, FEATURE_DIM)


def test_fd_digits_separates_digits_from_noise_and_shuffled_pixels(digits):
    train_x, _, held_x, _ = digits
    g = torch.Generator().manual_seed(0)
    noise = (0.5 * torch.randn(300, 1, 8, 8, generator=g)).clamp(-1, 1)
    shuffled = _shuffled_pixels(held_x, g)
    f_held = features(held_x)
    fd_train = frechet_distance(features(train_x), f_held)
    fd_noise = frechet_distance(f_held, features(noise))
    fd_shuffled = frechet_distance(f_held, features(shuffled))
    # measured: 0.59, 47.4, 33.5
    assert fd_train < 2.0, fd_train
    assert fd_noise > 20.0 and fd_noise > 20 * fd_train, (fd_train, fd_noise)
    assert fd_shuffled > 15.0 and fd_shuffled > 20 * fd_train, (fd_train, fd_shuffled)


def test_inputs_are_validated_and_larger_images_reduced_by_area(digits):
    _, _, held_x, held_y = digits
    x = held_x[:20]
    # 16x16 by pixel repetition: the area reduction gives the 8x8 digits back exactly
    big = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(prepare_images(big), x)
    assert torch.allclose(features(big), features(x), atol=1e-6)
    assert torch.equal(prepare_images(x[:, 0]), x)  # [B, H, W] is taken as one channel
    assert torch.equal(prepare_images(x * 1.2), (x * 1.2).clamp(-1, 1))  # small overshoot is clamped
    assert class_accuracy(DigitsDataset("heldout", resize=16).tensors()[0], held_y) >= 0.95  # bilinear 16x16
    with pytest.raises(ImageValueError, match="NaN"):
        features(torch.where(x == x.max(), torch.nan, x))
    with pytest.raises(ImageValueError, match="far outside"):
        features(x * 127.5 + 127.5)  # 8-bit pixel values
    with pytest.raises(ImageShapeError, match="grey"):
        features(x.repeat(1, 3, 1, 1))
    with pytest.raises(ImageShapeError, match="at least 8x8"):
        features(F.avg_pool2d(x, 2))
    with pytest.raises(ImageShapeError, match="empty"):
        features(x[:0])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        class_accuracy(x, torch.full((20,), 10))
    with pytest.raises(ValueError, match="20 images"):
        class_accuracy(x, held_y[:5])


def test_evaluate_images_reports_all_metrics(digits):
    train_x, _, held_x, held_y = digits
    out = evaluate_images(held_x, train_x, labels=held_y)
    f_held, f_train = features(held_x), features(train_x)
    assert out["fd_digits"] == pytest.approx(frechet_distance(f_train, f_held), rel=1e-12)
    pr = precision_recall(f_train, f_held, k=3)
    assert (out["precision"], out["recall"]) == (pr.precision, pr.recall)
    assert out["precision"] > 0.8 and out["recall"] > 0.8  # measured 0.90, 0.90
    assert out["class_accuracy"] == pytest.approx(class_accuracy(held_x, held_y), abs=1e-12)
    assert out["sample_mean"] == pytest.approx(float(held_x.double().mean()), abs=1e-12)
    assert out["sample_std"] == pytest.approx(float(held_x.double().std()), abs=1e-12)
    assert out["fraction_outside"] == 0.0 and (out["n_samples"], out["n_reference"]) == (300, 1497)
    assert "class_accuracy" not in evaluate_images(held_x, train_x)
    over = held_x * 1.1
    assert evaluate_images(over, train_x)["fraction_outside"] == pytest.approx(float((over.abs() > 1).double().mean()))
    with pytest.raises(ImageShapeError, match="same size"):
        evaluate_images(DigitsDataset("heldout", resize=16).tensors()[0], train_x)
    with pytest.raises(ImageValueError, match="samples"):
        evaluate_images(torch.full_like(held_x, torch.nan), train_x)
    with pytest.raises(ImageValueError, match="reference_images"):
        evaluate_images(held_x, train_x * 10)


# -- saving, loading and training --------------------------------------------------------------

def test_load_classifier_rejects_missing_foreign_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits_classifier"):
        load_classifier(tmp_path)
    weights, config = save_classifier(DigitsClassifier(), tmp_path, {"note": "untrained"})
    assert load_classifier(tmp_path).state_dict().keys() == DigitsClassifier().state_dict().keys()
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load_classifier(tmp_path)
    config.write_text(json.dumps({**meta, "kind": "unet"}))
    with pytest.raises(ValueError, match="'unet'"):
        load_classifier(tmp_path)
    config.write_text(json.dumps(meta))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read classifier weights"):
        load_classifier(tmp_path)


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = train_digits_classifier(epochs=1, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = train_digits_classifier(epochs=1, seed=5)
    c, _ = train_digits_classifier(epochs=1, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_train_classifier_command_reproduces_the_shipped_classifier(tmp_path, digits):
    """The full recipe (about 10 s on one core). On the machine that made the shipped file the
    weights come out bitwise equal; other CPUs may use other floating-point kernels, so the test
    asserts the accuracy band and agreement with the shipped classifier's predictions."""
    _, _, held_x, held_y = digits
    assert train_main(["--out", str(tmp_path), "--quiet"]) == 0
    net = load_classifier(tmp_path)
    shipped = json.loads((PRETRAINED_DIR / "digits_classifier.json").read_text())
    meta = json.loads((tmp_path / "digits_classifier.json").read_text())
    assert meta["training"] == {**shipped["training"], "torch": meta["training"]["torch"]}
    accuracy = class_accuracy(held_x, held_y, classifier=net)
    assert accuracy == pytest.approx(meta["heldout_accuracy"], abs=1e-6)
    assert accuracy >= 0.95 and abs(accuracy - shipped["heldout_accuracy"]) <= 0.02, accuracy
    agreement = float((predict(held_x, net) == predict(held_x)).float().mean())
    assert agreement >= 0.95, agreement
