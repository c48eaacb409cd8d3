"""The run state's saving rules (training/state.py), without a run: when a partial checkpoint is due."""
import os
from types import SimpleNamespace

from mclfir_dist.training.state import RunState


def state(tmp_path, every):
    runtime = SimpleNamespace(is_main=True, rank=0, world=1, deepspeed=None, barrier=lambda: None)
    return RunState(tmp_path, runtime, every)


def test_partials_are_due_every_n_steps_but_never_at_the_increments_end(tmp_path):
    s = state(tmp_path, 4)
    assert [n for n in range(1, 13) if s.partial_due(n, 12)] == [4, 8]   # 12: the increment checkpoint instead
    assert not any(state(tmp_path, 0).partial_due(n, 12) for n in range(1, 13))


def test_a_requested_save_is_due_at_the_next_step_only(tmp_path):
    s = state(tmp_path, 0)
    s.request_save()
    assert s.partial_due(3, 12)
    assert not s.partial_due(12, 12)    # the last step: the increment checkpoint covers it
    s.save_requested = False            # save_partial clears the request once written
    assert not s.partial_due(4, 12)


def test_a_lock_path_that_cannot_be_a_file_is_one_named_error(tmp_path):
    import pytest

    from mclfir_dist.errors import OutputError
    from mclfir_dist.training.lock import RunLock
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(OutputError, match="lock file .*Is a directory"):
        RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "other") as lock:   # and a normal one records its holder
        assert "pid" in lock.path.read_text()


def test_a_link_planted_at_the_lock_is_refused_and_its_target_untouched(tmp_path):
    import pytest

    from mclfir_dist.errors import OutputError
    from mclfir_dist.training.lock import RunLock
    victim = tmp_path / "notes.txt"
    victim.write_text("the user's own file\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        RunLock(tmp_path / "run").acquire()
    assert victim.read_text() == "the user's own file\n"


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """A loader worker outliving a `kill -9`ed run held its lock for seconds and refused the resume."""
    import signal
    import subprocess
    import sys

    from mclfir_dist.training.lock import RunLock
    script = f"""
import multiprocessing as mp, os, signal, sys, time
from mclfir_dist.training.lock import RunLock
RunLock({str(tmp_path / 'run')!r}).acquire()
child = mp.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()
open({str(tmp_path / 'child')!r}, "w").write(str(child.pid))
os.kill(os.getpid(), signal.SIGKILL)
"""
    # no pipes: the child would hold them open and the wait would last its 60 s
    p = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL
    child = int((tmp_path / "child").read_text())
    try:
        os.kill(child, 0)                     # the child lives on
        with RunLock(tmp_path / "run") as lock:   # and the lock is free at once
            assert f"pid {os.getpid()}" in lock.path.read_text()
    finally:
        os.kill(child, signal.SIGKILL)
