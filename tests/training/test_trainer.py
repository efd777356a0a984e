"""The training loop in one process: NaN stop, fallback on resume, accumulation, workers,
bf16 autocast, torch.compile, sampling callbacks, logs and bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import toy
from torch import nn

from multidiff.training.checkpoint import (
    CheckpointFallbackWarning,
    CheckpointMismatchError,
    list_checkpoints,
)
from multidiff.training.config import RunConfig, TrainConfig
from multidiff.training.trainer import NonFiniteLossError, Trainer


def _params(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train(out_dir, steps=8, loss=None, model=None, data=None, **kw) -> Trainer:
    cfg = toy.make_config(out_dir, steps=steps, **kw)
    tr = Trainer(model or toy.build_model(), loss or toy.EpsLoss(), data or toy.RingData(64), cfg, kind="toy")
    tr.fit()
    return tr


class Crash(RuntimeError):
    pass


class NaNAt:
    """The toy loss, but NaN (or a crash) at the given call."""

    def __init__(self, call: int, exc: type | None = None):
        self.call, self.calls, self.exc, self.inner = call, 0, exc, toy.EpsLoss()

    def __call__(self, net, batch, generator):
        self.calls += 1
        loss = self.inner(net, batch, generator)
        if self.calls == self.call:
            if self.exc is not None:
                raise self.exc("simulated crash")
            return loss * float("nan")
        return loss


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    # grad_accum=2: call 13 is the first micro-batch of step 7; checkpoints every 5 steps
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7.*ckpt-00000005 is kept") as err:
        _train(tmp_path, steps=12, loss=NaNAt(13), ckpt_every=5)
    assert err.value.step == 7 and err.value.checkpoint.name == "ckpt-00000005"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_corrupt_newest_checkpoint_falls_back_and_the_run_still_matches(tmp_path):
    ref = _train(tmp_path / "ref", steps=10)
    with pytest.raises(Crash):
        _train(tmp_path / "run", steps=10, loss=NaNAt(15, Crash))  # dies in step 8, after ckpt-7
    newest = tmp_path / "run" / "ckpt-00000007"
    (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:100])
    with pytest.warns(CheckpointFallbackWarning, match=r"ckpt-00000007.*model.safetensors.*truncated"):
        run = _train(tmp_path / "run", steps=10)
    assert _equal(_params(run.model), _params(ref.model)) and _equal(run.ema.state_dict(), ref.ema.state_dict())
    assert [p.name.split("-")[0] for p in (tmp_path / "run").iterdir() if ".corrupt" in p.name] == ["ckpt"]


def test_fit_twice_resumes_at_the_end(tmp_path):
    tr = _train(tmp_path, steps=3)
    again = Trainer(toy.build_model(1), toy.EpsLoss(), toy.RingData(64), toy.make_config(tmp_path, steps=3), kind="toy")
    res = again.fit()
    assert res.step == 3 and _equal(_params(again.model), _params(tr.model))


def test_resume_refuses_another_kind_or_architecture(tmp_path):
    _train(tmp_path, steps=2)
    cfg = toy.make_config(tmp_path, steps=4)
    with pytest.raises(CheckpointMismatchError, match="holds a 'toy' model, but a 'images' model"):
        Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(64), cfg, kind="images").fit()
    with pytest.raises(CheckpointMismatchError, match=r"net\.0\.weight: checkpoint \(32, 3\) vs model \(16, 3\)"):
        Trainer(toy.build_model(width=16), toy.EpsLoss(), toy.RingData(64), cfg, kind="toy").fit()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Without per-shard randomness (no jitter, no dropout, a loss that draws nothing), 2
    micro-batches of 8 = 1 batch of 16 up to float rounding."""
    def loss(net, x0, generator):
        t = torch.sigmoid(x0[:, 0])  # a per-item function: independent of the split
        return ((net(x0 * 0.5, t) - x0) ** 2).mean()

    kw = {"steps": 6, "loss": loss, "batch_size": 16}
    a = _train(tmp_path / "a", grad_accum=1, model=toy.build_model(dropout=0.0), data=toy.RingData(64, jitter=0), **kw)
    b = _train(tmp_path / "b", grad_accum=2, model=toy.build_model(dropout=0.0), data=toy.RingData(64, jitter=0), **kw)
    pa, pb = _params(a.model), _params(b.model)
    worst = max(float((pa[k] - pb[k]).abs().max() / pa[k].abs().max()) for k in pa)
    assert worst < 1e-5
    assert not _equal(pa, _params(toy.build_model(dropout=0.0)))


def test_dataloader_workers_give_the_same_bits(tmp_path):
    a = _train(tmp_path / "a", steps=5, num_workers=0)
    b = _train(tmp_path / "b", steps=5, num_workers=1)
    assert _equal(_params(a.model), _params(b.model))


def test_bf16_autocast_is_used_when_asked(tmp_path):
    seen = []

    def loss(net, x0, generator):
        t = torch.rand(x0.shape[0], generator=generator)
        out = net(x0, t)
        seen.append(out.dtype)
        return ((out.float() - x0) ** 2).mean()

    _train(tmp_path / "a", steps=2, loss=loss, bf16=True)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    _train(tmp_path / "b", steps=2, loss=loss)
    assert set(seen) == {torch.float32}


def test_compile_flag_runs_the_compiled_network(tmp_path):
    a = _train(tmp_path / "a", steps=3, compile=True, compile_backend="eager")
    assert hasattr(a.net, "_orig_mod")
    b = _train(tmp_path / "b", steps=3)
    pa, pb = _params(a.model), _params(b.model)
    assert all(torch.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6) for k in pa)


def test_metrics_samples_and_loss_object(tmp_path):
    calls = []

    class Out:
        def __init__(self, loss):
            self.loss = loss

    inner = toy.EpsLoss()
    tr = _train(tmp_path, steps=6, loss=lambda n, b, g: Out(inner(n, b, g)), sample_every=3)
    tr2 = Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(64), toy.make_config(tmp_path / "s", steps=6,
                                                                                       sample_every=3), kind="toy",
                  sample_fn=lambda m, step, d: calls.append((m, step, d)))
    tr2.fit()
    assert [c[1] for c in calls] == [3, 6] and all(c[0] is tr2.ema.module for c in calls)
    assert calls[0][2] == tmp_path / "s" / "samples" and calls[0][2].is_dir()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 7))
    cfg = tr.config
    assert [r["lr"] for r in recs] == pytest.approx([cfg.optim.lr_at(s, 6) for s in range(6)])
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["time"] >= 0 for r in recs)


def test_bad_input(tmp_path):
    cfg = toy.make_config(tmp_path, steps=2)
    with pytest.raises(TypeError, match="nn.Module"):
        Trainer(lambda x: x, toy.EpsLoss(), toy.RingData(8), cfg, kind="toy")
    with pytest.raises(TypeError, match="map-style"):
        Trainer(toy.build_model(), toy.EpsLoss(), iter([1, 2]), cfg, kind="toy")
    with pytest.raises(ValueError, match="kind"):
        Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(8), cfg, kind="")
    with pytest.raises(ValueError, match="multiple of world_size \\* grad_accum = 1 \\* 2"):
        Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(8), toy.make_config(tmp_path, batch_size=5), kind="toy")
    with pytest.raises(TypeError, match=r"scalar tensor.*shape \(16, 2\)"):
        _train(tmp_path / "v", steps=1, loss=lambda n, b, g: n(b, torch.zeros(b.shape[0])))
    with pytest.raises(ValueError, match="run.device"):
        Trainer(toy.build_model(), toy.EpsLoss(), toy.RingData(8),
                TrainConfig(run=RunConfig(device="gpu-please", out_dir=str(tmp_path))), kind="toy")


class CountingLoss:
    """A stateful loss (like an importance-sampling history): its state must survive a restart."""

    def __init__(self, crash_at: int = 0):
        self.count, self.crash_at, self.inner = torch.zeros((), dtype=torch.int64), crash_at, toy.EpsLoss()

    def __call__(self, net, batch, generator):
        self.count += 1
        if int(self.count) == self.crash_at:
            raise Crash("simulated crash")
        return self.inner(net, batch, generator)

    def state_dict(self):
        return {"count": self.count.clone(), "label": "calls"}

    def load_state_dict(self, state):
        assert state["label"] == "calls"
        self.count = state["count"].clone()


def test_stateful_loss_is_checkpointed(tmp_path):
    with pytest.raises(Crash):
        _train(tmp_path, steps=10, loss=CountingLoss(crash_at=15))  # in step 8, after ckpt-7 (14 calls)
    assert (tmp_path / "ckpt-00000007" / "loss.safetensors").is_file()
    resumed = CountingLoss()
    _train(tmp_path, steps=10, loss=resumed)
    assert int(resumed.count) == 10 * 2  # 14 restored + 6 new micro-batches


def test_progress_bar_shows_loss_and_rate(tmp_path, capsys):
    _train(tmp_path, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "step/s" in err


def test_tensorboard_gets_the_scalars_when_importable(tmp_path, monkeypatch):
    import sys
    import types

    scalars = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            scalars.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    _train(tmp_path, steps=2)
    assert ("train/loss", 1) in scalars and ("train/grad_norm", 2) in scalars and scalars[-1] == ("closed", None)
