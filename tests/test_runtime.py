"""Launch settings: which precision wins, which trackers are used."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_train_overrides
from mclfir_dist.config import ConfigError
from mclfir_dist.configure import load_config
from mclfir_dist.training.runtime import build_trackers, resolve_channels_last, resolve_precision


@pytest.mark.parametrize("configured,launcher,device,units,expected", [
    ("auto", None, "cpu", (), "no"),
    ("auto", None, "cpu", ("amx_bf16",), "bf16"),      # bf16 matrix units: auto picks bf16
    ("auto", None, "cpu", ("avx512_bf16",), "bf16"),
    ("auto", "no", "cpu", ("amx_bf16",), "no"),         # the launcher's word wins over the CPU's flags
    ("auto", None, "cuda", (), "no"),
    ("auto", "bf16", "cpu", (), "bf16"),               # `accelerate launch --mixed_precision bf16` is no longer ignored
    ("no", "bf16", "cpu", (), "no"),                   # an explicit config value wins, and says so
    ("no", None, "cpu", ("amx_bf16",), "no"),
    ("bf16", None, "cpu", (), "bf16"),
])
def test_precision_precedence(configured, launcher, device, units, expected):
    precision, why = resolve_precision(configured, launcher, device, units)
    assert precision == expected
    if configured not in ("auto", launcher) and launcher:
        assert "overrides the launcher" in why
    if configured == "auto" and not launcher and device == "cpu":
        assert ("bf16 matrix units (" + units[0]) in why if units else "no bf16 matrix units" in why


@pytest.mark.parametrize("configured,precision,expected", [
    ("auto", "bf16", True), ("auto", "fp16", True), ("auto", "no", False), (False, "bf16", False), (True, "no", True)])
def test_channels_last_follows_the_precision_unless_set(configured, precision, expected):
    assert resolve_channels_last(configured, precision)[0] is expected


def test_cpu_flags_are_read_from_cpuinfo():
    from mclfir_dist.utils.cpu import cpu_flags
    info = "processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    assert {"amx_bf16", "avx512f"} <= cpu_flags(info) and "avx512_bf16" not in cpu_flags(info)
    assert cpu_flags("no flags here") == frozenset()


def test_auto_precision_follows_this_cpu_and_is_recorded(tiny_shards, tmp_path):
    """No launcher setting: bf16 + channels_last where this CPU has bf16 matrix units, fp32 where not; the
    choice, its reason and the CPU's units are logged and in results.json."""
    from mclfir_dist.utils.cpu import bf16_units
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    overrides = tiny_train_overrides(tiny_shards, steps=2, increments="[{name: a, attributes: [colour]}]")
    p = subprocess.run([sys.executable, "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                        "--out", str(tmp_path / "r"), *overrides, "eval.grid_queries=0", "eval.frozen_baseline=false"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    expected = "bf16" if bf16_units() else "no"
    assert res["mixed_precision"] == expected and res["channels_last"] is (expected == "bf16")
    assert res["machine"]["cpu_bf16_units"] == list(bf16_units())
    assert f"precision: {expected} (train.mixed_precision=auto" in p.stdout + p.stderr
    assert res["precision_reason"].startswith("train.mixed_precision=auto")


def test_the_launcher_precision_reaches_the_run_and_is_recorded(tiny_shards, tmp_path):
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="bf16",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    overrides = tiny_train_overrides(tiny_shards, steps=2, increments="[{name: a, attributes: [colour]}]")
    p = subprocess.run([sys.executable, "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                        "--out", str(tmp_path / "r"), *overrides, "eval.grid_queries=0", "eval.frozen_baseline=false"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "precision: bf16 (the launcher's --mixed_precision bf16" in p.stdout + p.stderr
    assert json.loads((tmp_path / "r" / "results.json").read_text())["mixed_precision"] == "bf16"


def test_trackers_are_checked(tmp_path):
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", ["train.trackers=[tensorboard]"])
    [tracker] = build_trackers(cfg, tmp_path)
    assert tracker.name == "tensorboard"
    with pytest.raises(ConfigError, match="unknown tracker 'nope'"):
        build_trackers(load_config(ROOT / "configs/debug_cpu.yaml", ["train.trackers=[nope]"]), tmp_path)
    from accelerate.utils import is_wandb_available
    if not is_wandb_available():
        with pytest.raises(ConfigError, match="wandb is not installed"):
            build_trackers(load_config(ROOT / "configs/debug_cpu.yaml", ["train.trackers=[wandb]"]), tmp_path)


def test_deterministic_run_trains_on_deterministic_kernels(tiny_shards, tmp_path):
    """train.deterministic: no op of the step, the teacher's distillation or evaluation lacks a deterministic
    kernel on this device (such an op raises: on CPU the CPU kernels are checked, on a GPU the CUDA ones),
    and the run switches torch's process-wide flags (conftest restores them)."""
    from mclfir_dist.training.engine import train
    assert not torch.are_deterministic_algorithms_enabled()
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(tiny_shards, steps=3) + [
        "train.deterministic=true", "eval.grid_queries=0", "eval.frozen_baseline=false"])
    assert train(cfg, tmp_path / "r")["complete"]
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
