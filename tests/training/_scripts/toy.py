"""A tiny denoising problem shared by the training tests and their worker scripts: an MLP
eps-predictor (with dropout, so the global RNG matters) on 2-D ring Gaussian-mixture data
(with a random jitter in ``__getitem__``, so data-loading randomness matters too), and a
plain eps-MSE loss on the cosine VP process written out here."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from multidiff.testing import GaussianMixture
from multidiff.training.config import EMAConfig, OptimConfig, RunConfig, TrainConfig


class RingData(torch.utils.data.Dataset):
    def __init__(self, n: int = 256, seed: int = 0, jitter: float = 0.01):
        g = torch.Generator().manual_seed(seed)
        self.x = GaussianMixture.ring().sample(n, generator=g).to(torch.float32)
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        # augmentation from the global RNG: the trainer seeds it per micro-batch
        return self.x[i] + self.jitter * torch.randn(2)


class MLP(nn.Module):
    def __init__(self, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def build_model(seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kw)


class EpsLoss:
    """eps-MSE on x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps, t ~ U[1e-3, 1]; optional delay per call."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def __call__(self, net, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        t = 1e-3 + (1 - 1e-3) * torch.rand(x0.shape[0], generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        a, s = torch.cos(0.5 * math.pi * t)[:, None], torch.sin(0.5 * math.pi * t)[:, None]
        return ((net(a * x0 + s * eps, t) - eps) ** 2).mean()


def make_config(out_dir, steps: int = 24, ckpt_every: int = 1, batch_size: int = 32, grad_accum: int = 2,
                **run) -> TrainConfig:
    return TrainConfig(
        model={"width": 32}, loss={"kind": "eps-mse"},
        optim=OptimConfig(lr=1e-2, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0,
                          grad_accum=grad_accum, weight_decay=0.01),
        ema=EMAConfig(kind="power", sigma_rel=0.1),
        run=RunConfig(out_dir=str(out_dir), steps=steps, batch_size=batch_size, seed=7, device="cpu",
                      ckpt_every=ckpt_every, **{"keep_last": 2, "log_every": 1, "progress": False, **run}),
    )
