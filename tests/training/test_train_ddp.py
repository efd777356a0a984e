"""DistributedDataParallel under torchrun (2 CPU processes, gloo) against one process with the
same global batch, and generation sharded over ranks against one process.

Tolerance: the two runs see the same items, noise and dropout masks (every draw is seeded by
(seed, step, shard)), so they can differ only in how the gradient is summed: DDP divides each
rank's micro-batch gradient by the world size and all-reduces (sums) them, one process
back-propagates loss/2 per micro-batch and accumulates g0/2 + g1/2. In general that is float32
rounding of a sum in another order (~1e-7 relative per step, carried by AdamW's normalised
updates to ~1e-6 relative in the parameters after a few steps), so we assert a max relative
error (per tensor, against its max magnitude) below 1e-5. With exactly two ranks the halving is
exact and a two-term sum is commutative, so the measured difference is in fact 0 (bitwise) on
CPU; the test prints it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ddp_worker
import safetensors.torch
import torch
import toy

from multidiff.training.checkpoint import read_checkpoint
from multidiff.training.distributed import (
    DistInfo,
    free_port,
    generate_sharded,
    merge_shards,
)
from multidiff.training.trainer import Trainer

SCRIPTS = Path(__file__).parent / "_scripts"
TOL = 1e-5


def _rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def test_ddp_two_processes_match_one_process(tmp_path, capsys):
    port = free_port("127.0.0.1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(SCRIPTS / "ddp_worker.py"), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout

    single = Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(64), ddp_worker.config(tmp_path / "one", 1), kind="toy")
    single.fit()
    ddp = read_checkpoint(tmp_path / "ddp" / f"ckpt-{ddp_worker.STEPS:08d}")
    assert ddp.state["world_size"] == 2 and ddp.state["data"] == single.sampler.state_dict()
    params, ema = _rel(ddp.model_state, single.model.state_dict()), _rel(ddp.ema_state, single.ema.state_dict())
    init = _rel(toy.build_model().state_dict(), single.model.state_dict())
    with capsys.disabled():
        print(f"\nDDP (2 x gloo) vs 1 process after {ddp_worker.STEPS} steps: max relative difference "
              f"params {params:.2e}, EMA {ema:.2e} (training moved them by {init:.2e})")
    assert params < TOL and ema < TOL
    assert init > 1e-2  # the parameters did move: the comparison is not between initialisations

    # the sharded generation: 2 ranks gave exactly what 1 process gives
    one = generate_sharded(ddp_worker.generation_fn, total=37, seed=3, out_dir=tmp_path / "gen1", chunk_size=5)
    two = safetensors.torch.load_file(str(tmp_path / "ddp" / "gen" / "samples.safetensors"))
    assert two.keys() == one.keys() and two["x"].shape == (37, 2)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not list((tmp_path / "ddp" / "gen").glob("*.shard-*"))  # shards merged and removed


def test_sharded_generation_is_independent_of_world_size(tmp_path):
    results = []
    for world in (1, 3, 4):
        out = tmp_path / f"w{world}"
        for rank in range(world):
            generate_sharded(ddp_worker.generation_fn, 23, 11, out, chunk_size=4, info=DistInfo(rank, world), merge=False)
        results.append(merge_shards(out, "samples", 23, 4, world))
    assert results[0]["x"].shape == (23, 2)
    for r in results[1:]:
        assert all(torch.equal(results[0][k], r[k]) for k in r)
    other_seed = generate_sharded(ddp_worker.generation_fn, 23, 12, tmp_path / "s", chunk_size=4)
    assert not torch.equal(other_seed["x"], results[0]["x"])
