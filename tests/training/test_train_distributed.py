"""Process-group helpers in a single process: no-op set-up, clear errors, unwrapping, devices."""
from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from multidiff.training.distributed import DistInfo, dist_info, free_port, init_distributed, resolve_device, unwrap_model


def test_single_process_is_a_no_op(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert init_distributed() == DistInfo(0, 1, 0) == dist_info()
    assert not torch.distributed.is_initialized()


def test_world_size_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*launch with torchrun"):
        init_distributed()


def test_resolve_device_and_unwrap():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", DistInfo(1, 2, 1)).type == expected
    with pytest.raises(ValueError, match="run.device.*'tpu9'"):
        resolve_device("tpu9")
    net = nn.Linear(2, 2)
    assert unwrap_model(torch.compile(net, backend="eager")) is net and unwrap_model(net) is net


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
