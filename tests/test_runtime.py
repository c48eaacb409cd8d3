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
from mclfir_dist.training.runtime import build_trackers, resolve_precision


@pytest.mark.parametrize("configured,launcher,expected", [
    ("auto", None, "no"),
    ("auto", "bf16", "bf16"),          # `accelerate launch --mixed_precision bf16` is no longer ignored
    ("no", "bf16", "no"),              # an explicit config value wins, and says so
    ("bf16", None, "bf16"),
])
def test_precision_precedence(configured, launcher, expected):
    precision, why = resolve_precision(configured, launcher)
    assert precision == expected
    if configured not in ("auto", launcher) and launcher:
        assert "overrides the launcher" in why


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
