"""Recovery: damaged or stale checkpoint files, run directories that already hold a run."""
import logging
from argparse import Namespace

import pytest
import torch

from conftest import checkpoint_state
from mclfir_dist.training.checkpoint import Checkpointer
from mclfir_dist.cli import replace_run, resolve_run_dir
from mclfir_dist.config import ConfigError


def _state(index):
    return checkpoint_state(index)


def test_damaged_partial_falls_back_to_the_last_increment_and_stale_temporaries_go(tmp_path, caplog):
    ck = Checkpointer(tmp_path)
    ck.save_increment(0, _state(0))
    ck.partial_path.write_bytes(b"PK\x03\x04 truncated zip")
    stale = ck.dir / ".increment_01.pt.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    with caplog.at_level(logging.INFO, logger="mclfir"):
        point = ck.resume_point()
    assert point is not None and not point.partial and point.path.name == "increment_00.pt"
    assert "partial.pt" in caplog.text and "damaged" in caplog.text
    assert not stale.exists()


def test_damaged_newest_increment_falls_back_to_the_one_before(tmp_path, caplog):
    ck = Checkpointer(tmp_path)
    ck.save_increment(0, _state(0))
    ck.save_increment(1, _state(1))
    data = ck.increment_path(1).read_bytes()
    ck.increment_path(1).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.ERROR, logger="mclfir"):
        point = ck.resume_point()
    assert point.state["increment"] == 0 and point.next_increment == 1
    assert "increment_01.pt" in caplog.text


def test_a_partial_of_the_next_increment_wins_over_the_increment_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path)
    ck.save_increment(0, _state(0))
    ck.save_partial({**_state(1), "step": 5})
    point = ck.resume_point()
    assert point.partial and point.next_increment == 1 and point.state["step"] == 5


def _args(**kw):
    return Namespace(**{"out": None, "resume": None, "overwrite": False, **kw})


def test_a_run_directory_is_never_shared_by_two_runs(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "increment_01.pt").write_bytes(b"old run")
    (run / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a run"):
        resolve_run_dir(_args(out=str(run)))
    assert (run / "checkpoints" / "increment_01.pt").exists()
    assert resolve_run_dir(_args(out=str(run), overwrite=True)) == (run, False, True)
    assert (run / "checkpoints" / "increment_01.pt").exists()   # nothing deleted before the config is checked
    replace_run(run)
    assert not (run / "checkpoints").exists() and not (run / "results.json").exists()


def test_resume_auto_resumes_only_when_there_is_something_to_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_run_dir(_args(out=str(run), resume="auto")) == (run, False, False)
    Checkpointer(run).save_increment(0, _state(0))
    assert resolve_run_dir(_args(out=str(run), resume="auto")) == (run, True, False)
    assert resolve_run_dir(_args(resume=str(run))) == (run, True, False)
    with pytest.raises(ConfigError, match="contradict"):
        resolve_run_dir(_args(resume=str(run), overwrite=True))
    with pytest.raises(ConfigError, match="contradict"):
        resolve_run_dir(_args(out=str(run), resume="auto", overwrite=True))
