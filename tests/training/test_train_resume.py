"""Kill and resume: a run SIGKILLed at random steps and resumed ends bitwise equal (CPU) to an
uninterrupted run — parameters, EMA, optimiser state and data position."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from multidiff.training.checkpoint import list_checkpoints, read_checkpoint

SCRIPTS = Path(__file__).parent / "_scripts"
STEPS = 24


def _launch(out_dir: Path, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCRIPTS)}
    log = open(out_dir.parent / f"{out_dir.name}.log", "ab")
    return subprocess.Popen([sys.executable, str(SCRIPTS / "train_worker.py"), str(out_dir), "--steps", str(STEPS),
                             "--delay", str(delay)], stdout=log, stderr=subprocess.STDOUT, env=env)


def _logged_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass  # a line being written
    return max(steps)


def _run_to_end(out_dir: Path, delay: float = 0.0) -> None:
    proc = _launch(out_dir, delay)
    assert proc.wait(timeout=120) == 0, (out_dir.parent / f"{out_dir.name}.log").read_text()


def _kill_at(out_dir: Path, step: int) -> int:
    """Run with a per-step delay and SIGKILL it once it has logged ``step``; returns the step seen."""
    proc = _launch(out_dir, delay=0.05)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        seen = _logged_step(out_dir)
        if seen >= step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
        time.sleep(0.005)
    raise AssertionError(f"the worker ended (rc={proc.poll()}) before step {step}: "
                         + (out_dir.parent / f"{out_dir.name}.log").read_text())


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run_to_end(ref)
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    first = rng.randrange(3, STEPS // 2)
    second = rng.randrange(first + 2, STEPS - 2)
    seen1 = _kill_at(run, first)
    seen2 = _kill_at(run, second)
    info = f"(kill seed {seed}: killed after steps {seen1} and {seen2})"
    assert seen2 < STEPS and all(s < STEPS for s, _ in list_checkpoints(run)), f"the run was not interrupted {info}"
    _run_to_end(run)
    a = read_checkpoint(ref / f"ckpt-{STEPS:08d}")
    b = read_checkpoint(run / f"ckpt-{STEPS:08d}")
    for stem in ("model", "ema", "optimizer", "rng"):
        assert a.tensors[stem].keys() == b.tensors[stem].keys()
        for k in a.tensors[stem]:
            assert torch.equal(a.tensors[stem][k], b.tensors[stem][k]), f"{stem}/{k} differs {info}"
    for key in ("data", "ema", "optimizer", "loss"):
        assert a.state[key] == b.state[key], f"state.json {key} differs {info}"
    # the log holds each step once, as one history
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), info
    ref_losses = [json.loads(line)["loss"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    run_losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert ref_losses == run_losses, info
    # and the trained model moved: the comparison is not between two untouched initialisations
    first_ckpt = read_checkpoint(ref / f"ckpt-{STEPS - 1:08d}")
    assert not torch.equal(first_ckpt.tensors["model"]["net.0.weight"], a.tensors["model"]["net.0.weight"])
