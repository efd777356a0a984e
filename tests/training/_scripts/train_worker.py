"""Train the toy model into OUT_DIR (resuming if checkpoints are there); used by the kill-and-resume test."""
from __future__ import annotations

import argparse

import torch
import toy

from multidiff.training.trainer import Trainer

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--ckpt-every", type=int, default=1)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per micro-batch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = toy.make_config(args.out_dir, steps=args.steps, ckpt_every=args.ckpt_every)
    trainer = Trainer(toy.build_model(), toy.EpsLoss(args.delay), toy.RingData(), cfg, kind="toy")
    result = trainer.fit()
    print(f"done step={result.step} loss={result.loss:.6f}", flush=True)
