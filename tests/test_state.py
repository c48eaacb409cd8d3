"""The run state's saving rules (training/state.py), without a run: when a partial checkpoint is due."""
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
