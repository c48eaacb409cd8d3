"""Atomic writes: all or nothing, no temp files left behind, ordinary permissions."""
import os
import stat

import pytest

from mclfir_dist.utils.io import atomic_write, atomic_write_json


def test_atomic_write_replaces_whole_file_with_umask_permissions(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":2}'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="cannot write .*ckpt.pt: the disk is full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_full_disk_during_a_checkpoint_is_one_named_error(tmp_path, monkeypatch):
    import errno

    import torch

    from mclfir_dist.training.checkpoint import Checkpointer
    from mclfir_dist.utils import io as io_module
    ck = Checkpointer(tmp_path)
    from conftest import checkpoint_state
    ck.save_increment(0, checkpoint_state(0))
    before = ck.increment_path(0).read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io_module.os, "fsync", no_space)
    with pytest.raises(io_module.OutputError, match="increment_00.pt: the disk is full"):
        ck.save_increment(0, checkpoint_state(1))
    assert ck.increment_path(0).read_bytes() == before
    assert [p.name for p in ck.dir.iterdir()] == ["increment_00.pt"]


def test_train_into_a_read_only_place_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    p = subprocess.run([sys.executable, "-m", "mclfir_dist.train", "--config", str(ROOT / "configs/debug_cpu.yaml"),
                        "--out", "/sys/mclfir_run"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "cannot write /sys/mclfir_run" in p.stderr and "Traceback" not in p.stderr
