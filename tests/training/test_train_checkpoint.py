"""Checkpoints: round trip, atomicity (nothing replaced before the new one is complete), fallback
from a corrupt newest checkpoint, clear errors for another kind/architecture/version, no pickle."""
from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from torch import nn

import multidiff.training.checkpoint as ck
from multidiff.training.checkpoint import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    check_architecture,
    export_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    read_checkpoint,
    write_checkpoint,
)
from multidiff.training.config import TrainConfig


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.ReLU(), nn.Linear(width, 2))


def _files(net: nn.Module, scale: float = 1.0) -> dict:
    sd = {k: v * scale for k, v in net.state_dict().items()}
    return {"model": sd, "ema": {k: v + 1 for k, v in sd.items()}, "rng": {"g": torch.get_rng_state()}}


def _state(kind: str = "toy") -> dict:
    return {"kind": kind, "config": TrainConfig().to_dict()}


def _write_steps(run, steps, net=None, **kw):
    net = net or _net()
    return [write_checkpoint(run, s, _files(net, s), _state(), **kw) for s in steps]


def test_round_trip_and_manifest(tmp_path):
    net = _net()
    path = write_checkpoint(tmp_path, 12, _files(net, 2.0), {**_state(), "data": {"position": 5}})
    assert path.name == "ckpt-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["ema.safetensors", "model.safetensors", "rng.safetensors", "state.json"]
    ck_ = read_checkpoint(path)
    assert ck_.step == 12 and ck_.kind == "toy" and ck_.state["data"] == {"position": 5}
    assert ck_.config == TrainConfig()
    for k, v in net.state_dict().items():
        assert torch.equal(ck_.model_state[k], v * 2.0) and torch.equal(ck_.ema_state[k], v * 2.0 + 1)
    assert ck_.tensors["rng"]["g"].dtype == torch.uint8
    st = json.loads((path / "state.json").read_text())
    assert st["format_version"] == ck.FORMAT_VERSION and set(st["files"]) == {"model.safetensors", "ema.safetensors",
                                                                              "rng.safetensors"}
    assert all(len(e["sha256"]) == 64 for e in st["files"].values()) and "library_version" in st


def test_load_into_model_checks_and_loads(tmp_path):
    src = _net()
    write_checkpoint(tmp_path, 3, _files(src), _state())
    dst = _net()
    with torch.no_grad():
        for p in dst.parameters():
            p.zero_()
    got = load_checkpoint(tmp_path, dst, kind="toy", weights="model", files=("model",))
    assert got.step == 3 and set(got.tensors) == {"model"}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    load_checkpoint(tmp_path, dst, kind="toy")  # default: the EMA weights
    assert torch.equal(dst[0].bias, src[0].bias + 1)


def test_keep_last_prunes_only_after_the_new_one(tmp_path):
    _write_steps(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_write_leaves_everything_intact(tmp_path, monkeypatch):
    """A crash while writing (here: the 2nd tensor file fails) replaces and prunes nothing,
    also when the same step already exists."""
    paths = _write_steps(tmp_path, [1, 2], keep_last=2)
    before = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in paths}
    real, calls = ck._write_durable, []

    def failing(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, data)

    monkeypatch.setattr(ck, "_write_durable", failing)
    for step in (3, 2):  # a new step, and rewriting an existing one
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            write_checkpoint(tmp_path, step, _files(_net(), 9.0), _state(), keep_last=2)
    monkeypatch.setattr(ck, "_write_durable", real)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    after = {p.name: {f.name: f.read_bytes() for f in p.iterdir()} for p in paths}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary directory removed
    # and a complete rewrite of an existing step replaces it
    write_checkpoint(tmp_path, 2, _files(_net(), 9.0), _state(), keep_last=2)
    assert torch.equal(read_checkpoint(tmp_path / "ckpt-00000002").model_state["0.bias"], _net()[0].bias * 9.0)


def test_state_json_is_written_last(tmp_path, monkeypatch):
    order = []
    real = ck._write_durable
    monkeypatch.setattr(ck, "_write_durable", lambda p, d: (order.append(p.name), real(p, d))[1])
    write_checkpoint(tmp_path, 1, _files(_net()), _state())
    assert order[-1] == "state.json" and len(order) == 4


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "bytes, the manifest says"),
    ("flip", "SHA-256 does not match"),
    ("delete", "missing"),
    ("json", "not valid JSON"),
    ("no_state", "state.json: missing"),
])
def test_corrupt_newest_falls_back_with_a_warning(tmp_path, damage, reason):
    _write_steps(tmp_path, [1, 2, 3])
    newest = tmp_path / "ckpt-00000003"
    model = newest / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[-3] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "delete":
        model.unlink()
    elif damage == "json":
        (newest / "state.json").write_text('{"step": 3, "files": ')
    else:
        (newest / "state.json").unlink()
    with pytest.warns(CheckpointFallbackWarning, match=f"ckpt-00000003.*{reason}") as rec:
        got = load_checkpoint(tmp_path)
    assert got.step == 2 and len(rec) == 1
    expected_file = "state.json" if damage in ("json", "no_state") else "model.safetensors"
    assert expected_file in str(rec[0].message)
    with pytest.raises(CheckpointCorruptError, match=reason):  # asked for by name: no fallback
        load_checkpoint(newest)


def test_all_corrupt_is_not_found(tmp_path):
    _write_steps(tmp_path, [1])
    (tmp_path / "ckpt-00000001" / "ema.safetensors").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointNotFoundError, match="no valid checkpoint.*ema.safetensors"):
            load_checkpoint(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint or run directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_newer_version_and_other_kind_are_errors_not_fallbacks(tmp_path):
    _write_steps(tmp_path, [1, 2])
    sj = tmp_path / "ckpt-00000002" / "state.json"
    st = json.loads(sj.read_text())
    sj.write_text(json.dumps({**st, "format_version": ck.FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointVersionError, match=f"format version {ck.FORMAT_VERSION + 1}.*upgrade"):
        load_checkpoint(tmp_path)
    sj.write_text(json.dumps(st))
    with pytest.raises(CheckpointMismatchError, match="holds a 'toy' model, but a 'molecules' model was expected"):
        load_checkpoint(tmp_path, kind="molecules")


def test_architecture_mismatch_names_the_difference(tmp_path):
    write_checkpoint(tmp_path, 1, _files(_net(8)), _state())
    with pytest.raises(CheckpointMismatchError, match=r"0\.weight: checkpoint \(8, 2\) vs model \(16, 2\)"):
        load_checkpoint(tmp_path, _net(16))
    other = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: 3\.weight; 3\.bias"):
        check_architecture(other, read_checkpoint(tmp_path / "ckpt-00000001").model_state)


def test_optimizer_state_round_trip_continues_identically():
    def run(opt, net, steps, start=0):
        for s in range(start, start + steps):
            opt.zero_grad()
            net(torch.full((4, 2), float(s))).pow(2).sum().backward()
            opt.step()

    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    run(opt, net, 3)
    names = [n for n, _ in net.named_parameters()]
    tensors, meta = optimizer_to_flat(opt, names)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from a file (state_dict aliases)
    assert set(tensors) == {f"{n}/{slot}" for n in names for slot in ("step", "exp_avg", "exp_avg_sq")}
    json.dumps(meta)  # JSON-ready
    net2 = _net()
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(net2.parameters(), lr=5.0)
    optimizer_from_flat(opt2, names, tensors, meta)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and opt2.param_groups[0]["lr"] == 1e-2
    run(opt, net, 2, 3)
    run(opt2, net2, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    with pytest.raises(CheckpointMismatchError, match="other parameters"):
        optimizer_from_flat(opt2, ["a"] + names[1:], tensors, meta)


def test_no_pickle_on_load(tmp_path, monkeypatch):
    _write_steps(tmp_path, [1])

    def forbidden(*a, **k):
        raise AssertionError("unpickling during checkpoint loading")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert load_checkpoint(tmp_path, _net()).step == 1


def test_tied_weights_and_export(tmp_path):
    net = _net()
    tied = {"a": net[0].weight, "b": net[0].weight}  # shared storage
    run = tmp_path / "run"
    write_checkpoint(run, 5, {"model": net.state_dict(), "ema": net.state_dict(), "optimizer": tied}, _state())
    out = export_checkpoint(run, tmp_path / "shipped")
    assert sorted(p.name for p in out.iterdir()) == ["ema.safetensors", "model.safetensors", "state.json"]
    got = load_checkpoint(out, _net(), kind="toy")
    assert got.step == 5 and "optimizer" not in got.state
