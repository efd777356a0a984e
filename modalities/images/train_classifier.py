"""Train the digits classifier behind the image metrics and write it as safetensors + JSON.

    python -m multidiff.modalities.images.train_classifier --out modalities/images/pretrained

reproduces the shipped ``pretrained/digits_classifier.{safetensors,json}`` (same seed, one CPU
thread: bitwise the same weights on the same torch build; about 15 s on one core). Training uses
only the digits train split (1,497 images; the 300 held-out images of
:func:`multidiff.modalities.images.data.digits_split` with its default seed are kept for the
reported accuracy).

Recipe: AdamW (lr 3e-3, weight decay 1e-4), batch 64, cosine decay to zero, cross-entropy with
label smoothing 0.05; augmentation by random translations of up to one pixel (the border filled
with the background value -1) so the features do not hinge on exact pixel positions, and, for a
quarter of the images, the slight blur of a 2x bilinear upsample / area downsample round trip (how
digits trained at 16x16 reach the classifier). Every random draw (initialisation, dropout, batches,
shifts, blur) comes from ``seed``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .classifier import DigitsClassifier, DigitsClassifierConfig, save_classifier
from .data import DigitsDataset

__all__ = ["evaluate_accuracy", "main", "random_roundtrip_blur", "random_shift", "train_digits_classifier"]


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by an integer offset in ``[-max_shift, max_shift]^2`` (independent per
    image), filling the uncovered border with -1 (the digits' background)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def random_roundtrip_blur(x: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """With probability ``prob`` per image, replace it by its 2x bilinear-upsample / area-downsample
    round trip: what a model trained on ``DigitsDataset(resize=16)`` looks like to the classifier
    after :func:`.classifier.prepare_images` (a slight blur)."""
    if prob == 0.0:
        return x
    pick = torch.rand(x.shape[0], generator=generator) < prob
    if not bool(pick.any()):
        return x
    h, w = x.shape[-2:]
    up = F.interpolate(x[pick], size=(2 * h, 2 * w), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    out = x.clone()
    out[pick] = F.interpolate(up, size=(h, w), mode="area")
    return out


@torch.no_grad()
def evaluate_accuracy(net: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``net`` (put in eval mode) on ``[N, 1, 8, 8]`` images."""
    net.eval()
    return float((net(images).argmax(1) == labels).float().mean())


def train_digits_classifier(
    epochs: int = 60,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.05,
    max_shift: int = 1,
    blur_prob: float = 0.25,
    seed: int = 0,
    config: DigitsClassifierConfig | None = None,
    log=None,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train a :class:`DigitsClassifier` on the digits train split; return it (eval mode) and a
    JSON-ready ``info`` dict (recipe, train and held-out accuracy)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    config = config or DigitsClassifierConfig()
    train_x, train_y = DigitsDataset("train").tensors()
    held_x, held_y = DigitsDataset("heldout").tensors()
    start = time.perf_counter()
    # fork_rng: parameter init and dropout draw from the global generator; keep the caller's intact
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier(config)
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        n = train_x.shape[0]
        steps_per_epoch = math.ceil(n / batch_size)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(n, generator=gen)
            running = 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = random_roundtrip_blur(random_shift(train_x[idx], max_shift, gen), blur_prob, gen)
                loss = F.cross_entropy(net(x), train_y[idx], label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach()) * len(idx)
            if log is not None:
                log(f"epoch {epoch + 1}/{epochs}  loss {running / n:.4f}  held-out acc "
                    f"{evaluate_accuracy(net, held_x, held_y):.4f}")
    net.eval().requires_grad_(False)
    info = {
        "training": {
            "data": "scikit-learn digits, train split of digits_split(holdout=300, seed=0): 1,497 images",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
            "label_smoothing": label_smoothing, "max_shift": max_shift, "blur_prob": blur_prob, "seed": seed,
            "torch": torch.__version__,
            "command": f"python -m multidiff.modalities.images.train_classifier --out DIR --epochs {epochs} --seed {seed}",
        },
        "train_accuracy": round(evaluate_accuracy(net, train_x, train_y), 6),
        "heldout_accuracy": round(evaluate_accuracy(net, held_x, held_y), 6),
        "heldout_size": int(held_y.shape[0]),
        "feature_dim": config.feature_dim,
        "input": "[B, 1, 8, 8] in [-1, 1]; larger images are reduced to 8x8 by area interpolation",
    }
    if log is not None:
        log(f"trained in {time.perf_counter() - start:.1f} s")
    return net, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multidiff.modalities.images.train_classifier",
                                description="Train the digits classifier used by the image metrics "
                                            "(Fréchet distance in its feature space, class accuracy, precision/recall).")
    p.add_argument("--out", required=True, help="folder for digits_classifier.safetensors and .json")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 reproduces the shipped weights bitwise)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    log = None if args.quiet else (lambda s: print(s, flush=True))
    net, info = train_digits_classifier(epochs=args.epochs, seed=args.seed, log=log)
    weights, config = save_classifier(net, args.out, info)
    print(f"held-out accuracy {info['heldout_accuracy']:.4f} ({info['heldout_size']} images); "
          f"wrote {weights} ({weights.stat().st_size} bytes) and {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
