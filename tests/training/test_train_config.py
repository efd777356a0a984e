"""Training configs: files, CLI overrides with clear errors, validation, the learning-rate schedule."""
from __future__ import annotations

import json
import math

import pytest

from multidiff.training.config import (
    ConfigError,
    EMAConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_overrides,
    save_config,
)


def _custom() -> TrainConfig:
    return TrainConfig(model={"channels": 32, "mults": [1, 2]}, process={"name": "vp-cosine"},
                       optim=OptimConfig(lr=3e-4, betas=(0.8, 0.95), grad_clip=None, schedule="cosine", warmup_steps=10),
                       ema=EMAConfig(kind="power", sigma_rel=0.1), run=RunConfig(steps=77, bf16=True, out_dir="x"))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip(tmp_path, suffix):
    pytest.importorskip("yaml") if suffix == ".yaml" else None
    cfg = _custom()
    save_config(cfg, tmp_path / f"c{suffix}")
    back = load_config(tmp_path / f"c{suffix}")
    assert back == cfg
    assert isinstance(back.optim.betas, tuple) and back.optim.grad_clip is None


def test_partial_file_updates_only_its_fields(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lr": 0.01}, "model": {"depth": 3, "unet": {"a": 2}}}))
    cfg = load_config(tmp_path / "c.json")
    assert cfg.optim.lr == 0.01 and cfg.optim.betas == OptimConfig().betas and cfg.model == {"depth": 3, "unet": {"a": 2}}
    assert cfg.run == RunConfig()
    base = TrainConfig(model={"depth": 1, "width": 8, "unet": {"a": 1, "b": 1}}, run=RunConfig(steps=5))
    cfg = load_config(tmp_path / "c.json", base=base)  # over a modality's defaults
    assert cfg.model == {"depth": 3, "width": 8, "unet": {"a": 2, "b": 1}} and cfg.run.steps == 5


def test_bad_files_are_named(tmp_path):
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "c.json").write_text(json.dumps({"optim": {"lrr": 0.01}}))
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c2.json").write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(ConfigError, match="unknown section 'optimizer'.*'optim'"):
        load_config(tmp_path / "c2.json")
    (tmp_path / "c3.json").write_text(json.dumps({"run": {"steps": "many"}}))
    with pytest.raises(ConfigError, match="run.steps expects an integer, got 'many'"):
        load_config(tmp_path / "c3.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match="extension"):
        load_config(tmp_path / "c.toml")


def test_overrides_convert_types():
    cfg = apply_overrides(TrainConfig(), ["--optim.lr", "1e-3", "--run.steps=500", "--run.bf16", "true",
                                          "--optim.grad_clip", "none", "--optim.betas", "0.9,0.99",
                                          "--model.channels", "64", "--model.unet.attn", "[8, 4]", "--data.root", "dir/x"])
    assert cfg.optim.lr == 1e-3 and cfg.run.steps == 500 and cfg.run.bf16 is True and cfg.optim.grad_clip is None
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model == {"channels": 64, "unet": {"attn": [8, 4]}} and cfg.data == {"root": "dir/x"}
    assert TrainConfig().optim.lr == OptimConfig().lr  # the input is not modified


@pytest.mark.parametrize("args, message", [
    (["--optim.lrate", "1"], r"unknown field 'lrate'.*did you mean 'lr'"),
    (["--optimiser.lr", "1"], r"unknown section 'optimiser'.*did you mean 'optim'"),
    (["--run.steps", "ten"], r"--run.steps expects an integer, got 'ten'"),
    (["--run.bf16", "maybe"], r"--run.bf16 expects a boolean"),
    (["--optim.lr", "fast"], r"--optim.lr expects a number"),
    (["--optim.lr"], r"--optim.lr needs a value"),
    (["steps", "3"], r"expected a flag"),
    (["--steps", "3"], r"must name a section and a field"),
    (["--optim.schedule", "linear"], r"optim.schedule must be one of constant, cosine"),
    (["--run.batch_size", "0"], r"run.batch_size must be >= 1"),
    (["--ema.sigma_rel", "0.5"], r"ema.sigma_rel must lie in"),
    (["--optim.betas", "0.9"], r"expects 2 values"),
])
def test_override_errors_name_the_flag(args, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), args)


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == [("a.b", "1"), ("c.d", "x=y")]


def test_learning_rate_schedule():
    warm, total, lr = 10, 110, 1e-3
    const = OptimConfig(lr=lr, warmup_steps=warm)
    assert [const.lr_at(s, total) for s in range(3)] == pytest.approx([lr * 1 / 10, lr * 2 / 10, lr * 3 / 10])
    assert const.lr_at(warm - 1, total) == pytest.approx(lr) and const.lr_at(50, total) == lr
    cos = OptimConfig(lr=lr, warmup_steps=warm, schedule="cosine", min_lr_ratio=0.1)
    assert cos.lr_at(warm, total) == pytest.approx(lr)
    assert cos.lr_at(warm + 50, total) == pytest.approx(0.1 * lr + 0.9 * lr * 0.5)  # half way: the mean
    assert cos.lr_at(total, total) == pytest.approx(0.1 * lr)
    vals = [cos.lr_at(s, total) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert OptimConfig(lr=lr).lr_at(0, 5) == lr  # no warm-up
    assert math.isclose(OptimConfig(lr=lr, schedule="cosine").lr_at(0, 1), lr)


def test_yaml_without_pyyaml_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # import yaml -> ImportError
    (tmp_path / "c.yaml").write_text("optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="needs PyYAML.*JSON works"):
        load_config(tmp_path / "c.yaml")
