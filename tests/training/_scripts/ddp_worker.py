"""Launched by torchrun with 2 CPU processes (gloo): train the toy model with DDP into OUT_DIR,
then draw a sharded generation job into OUT_DIR/gen. The test compares both with one process."""
from __future__ import annotations

import argparse

import torch
import toy

from multidiff.training.distributed import (
    destroy_distributed,
    dist_info,
    generate_sharded,
)
from multidiff.training.trainer import Trainer

STEPS, BATCH = 8, 16


def generation_fn(n: int, generator: torch.Generator) -> dict:
    net = toy.build_model(5, dropout=0.0).eval()
    x = torch.randn(n, 2, generator=generator)
    t = torch.rand(n, generator=generator)
    with torch.no_grad():
        return {"x": net(x, t), "t": t}


def config(out_dir, world_size: int):
    # the same global batch; 2 ranks x 1 micro-batch <-> 1 process x 2 micro-batches
    return toy.make_config(out_dir, steps=STEPS, ckpt_every=STEPS, batch_size=BATCH, grad_accum=2 // world_size)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = dist_info().world_size
    trainer = Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(64), config(args.out_dir, world), kind="toy")
    assert trainer.dist.world_size == 2 and trainer.ddp is not None, "not running under torchrun with 2 processes"
    trainer.fit()
    generate_sharded(generation_fn, total=37, seed=3, out_dir=f"{args.out_dir}/gen", chunk_size=5)
    destroy_distributed()
    print(f"rank {trainer.dist.rank} done", flush=True)
