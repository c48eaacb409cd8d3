"""A run that receives SIGTERM, SIGINT or SIGUSR1 saves a checkpoint after the current step and exits
(143, 130, 138) with one line naming it; `--resume` then ends bit-identical to an uninterrupted run.
One writer per run directory: a second writer is refused naming the holder; a dead holder's lock is
taken over."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SELF_BUILDING_TINY, free_port

ACCELERATE_2PROC = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "launch/cpu_2proc.yaml")]
TINY = SELF_BUILDING_TINY + ["train.steps_per_increment=16", "train.log_every=4", "train.num_threads=1"]


def env():
    # torchrun's agent (inside `accelerate launch`) forwards only the signals listed here to its workers; without
    # SIGUSR1 in the list the agent dies of it and the workers run on (docs/clusters.md, launch/slurm_multinode.sbatch)
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")


def command(run: Path, shards: Path, two: bool, *extra):
    args = ["--config", str(ROOT / "configs/debug_cpu.yaml"), "--out", str(run), "--resume", "auto",
            f"data.shards={shards}", *TINY, *extra]
    if two:
        return [*ACCELERATE_2PROC, "--main_process_port", free_port(), "-m", "mclfir_dist.train", *args]
    return [sys.executable, "-m", "mclfir_dist.cli", "train", *args]


def started(run: Path) -> bool:
    """The run wrote its config.yaml: its lock is held and its signal handlers are in place."""
    return (run / "config.yaml").is_file()


def signal_run(cmd, run: Path, signum: int, delay: float = 0.0, at: str | None = None):
    """Start cmd, send `signum` to its whole process group once a line containing `at` is logged (a step the
    run has reached: no race with start-up time on a loaded machine), or `delay` s after the run started."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 300
    if at is None:
        while p.poll() is None and not started(run) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
    else:
        while p.poll() is None and not any(at in l for l in list(lines)) and time.time() < deadline:
            time.sleep(0.01)
    if p.poll() is None:
        os.killpg(p.pid, signum)
    p.wait(timeout=300)
    reader.join(timeout=60)
    return p.returncode, "".join(lines)


def same_end(run: Path, reference: Path) -> bool:
    a, b = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    if not a["complete"] or a["accuracy_matrix"] != b["accuracy_matrix"]:
        return False
    sa, sb = (torch.load(r / "checkpoints" / "increment_01.pt", weights_only=True) for r in (run, reference))
    return all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("signals")
    p = subprocess.run(command(work / "reference", work / "shards", False), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return work


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_then_exits_and_resume_is_exact(reference, tmp_path, signum, code):
    run = tmp_path / "run"
    # at a logged step, not after a delay: a fast CPU finished all 32 steps within 2 s and the signal came too late
    rc, out = signal_run(command(run, reference / "shards", False), run, signum, at="inc 0 step 4/")
    assert rc == code, out[-3000:]
    line = [l for l in out.splitlines() if "stopped by" in l]
    assert len(line) == 1 and signal.Signals(signum).name in line[0] and ".pt" in line[0], out[-3000:]
    assert "Traceback" not in out
    assert not list((run / "checkpoints").glob(".*.tmp")) and not list(run.glob(".*.tmp"))
    p = subprocess.run(command(run, reference / "shards", False), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert same_end(run, reference / "reference")


@pytest.mark.cluster   # the second step of `make test` (about 3 minutes)
def test_two_processes_signalled_at_random_steps_resume_exactly(tmp_path):
    """Both ranks agree on the step (a collective flag), so the partial is consistent; each rank's own
    method state (the EMA teacher's BatchNorm statistics differ by rank) is saved beside it. Five trials,
    each signalled once a random step (of 2 x 16) has been logged."""
    shards = tmp_path / "shards"
    reference = tmp_path / "reference"
    every_step = ["train.log_every=1"]
    p = subprocess.run(command(reference, shards, True, *every_step), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rng = random.Random(0)
    for trial, signum in enumerate([signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM]):
        run = tmp_path / f"trial_{trial}"
        increment, step = rng.randrange(2), rng.randrange(1, 15)
        rc, out = signal_run(command(run, shards, True, *every_step), run, signum, at=f"inc {increment} step {step}/")
        assert rc != 0, out[-3000:]
        # one line, from rank 0 (the launcher itself, signalled too, exits non-zero with its own report)
        assert out.count("mclfir train: stopped by") == 1 and "partial.pt at increment" in out, out[-3000:]
        assert len(list((run / "checkpoints").glob("partial_rank_*.pt"))) == 2   # each rank's own state
        p = subprocess.run(command(run, shards, True, *every_step), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert same_end(run, reference), f"trial {trial} ({signal.Signals(signum).name}, inc {increment} " \
                                         f"step {step}) did not end exactly"


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(reference, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(command(run, reference / "shards", False), cwd=ROOT, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not started(run) and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)   # holds its lock, and cannot finish before the second starts
        second = subprocess.run(command(run, reference / "shards", False), cwd=ROOT, env=env(), capture_output=True,
                                text=True, timeout=300)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"pid {first.pid}" in err[0] and "host" in err[0], second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    p = subprocess.run(command(run, reference / "shards", False), cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]   # the dead run's lock is taken over
    assert same_end(run, reference / "reference")


def test_a_signal_landing_during_the_collective_is_not_lost(monkeypatch):
    """The Python handler runs when the all-reduce returns; the result (the other rank saw nothing yet) must
    not overwrite it: the signal counts at the next check, on every rank at once."""
    from mclfir_dist.training import signals

    stop = signals.SignalStop()
    stop._group = object()   # as if two ranks

    def all_reduce(flag, op=None, group=None):
        if not stop.received:
            stop._handle(signal.SIGUSR1, None)   # arrives inside the collective; the other rank reported 0

    monkeypatch.setattr(signals.dist, "all_reduce", all_reduce)
    assert stop.agreed() == 0          # this step: no rank had it when the flags were exchanged
    assert stop.agreed() == signal.SIGUSR1   # next step: it is exchanged, not lost


@pytest.mark.parametrize("answer", ["accepted", "refused"])
def test_requeue_reports_scontrols_answer_though_slurm_signals_it(tmp_path, monkeypatch, answer):
    """A requeue makes SLURM send SIGTERM to every process of the step, the scontrol that asked included (the
    race a CI run hit). A stand-in scontrol signals itself the same way before it answers."""
    from mclfir_dist.training import signals

    fake = tmp_path / "scontrol"
    tail = 'exit 0' if answer == "accepted" else 'echo "Requested operation not supported on this job" >&2; exit 1'
    fake.write_text(f'#!/bin/sh\nkill -TERM $$\nsleep 0.2\necho "$@" > "{tmp_path}/args"\n{tail}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    stop = signals.SignalStop()
    stop.signum = signal.SIGTERM
    assert stop.requeue(True) is None          # only SIGUSR1 (the warning before a time limit) asks for a requeue
    stop.signum = signal.SIGUSR1
    expected = ("scontrol requeue 41: done" if answer == "accepted" else
                "scontrol requeue 41: failed: Requested operation not supported on this job")
    assert stop.requeue(True) == expected
    assert (tmp_path / "args").read_text().split() == ["requeue", "41"]
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN   # ignored in scontrol only, not here


REQUEUE_RANK = """
import os, signal, sys, time
import torch.distributed as dist
from mclfir_dist.training import signals
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
stop = signals.SignalStop()
stop.install(2)
stop.signum = signal.SIGUSR1
said = stop.requeue(rank == 0)
print(said, time.time())
"""


def test_no_rank_leaves_before_rank_0_has_asked_for_the_requeue(tmp_path):
    """A rank that left first ended the step (srun --kill-on-bad-exit) and killed rank 0 before it asked: the
    job failed instead of coming back (a CI run hit it). Rank 1 must return only after rank 0's scontrol."""
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\nsleep 2\ndate +%s.%N > "{tmp_path}/asked"\n')
    fake.chmod(0o755)
    run_env = dict(env(), PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="41")
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", REQUEUE_RANK, str(r), port], cwd=ROOT, env=run_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outs
    said, left = zip(*(o.strip().splitlines()[-1].rsplit(" ", 1) for o in outs))
    assert said == ("scontrol requeue 41: done", "None"), outs
    assert float(left[1]) >= float((tmp_path / "asked").read_text()), outs


def test_a_run_killed_with_kill_9_resumes_at_once_though_its_loader_worker_lives_on(reference, tmp_path):
    """The loader worker (a forked child) used to inherit the lock's descriptor and kept the run locked while it
    outlived its killed parent: the resume right after `kill -9` was refused."""
    run = tmp_path / "run"
    first = subprocess.Popen(command(run, reference / "shards", False, "data.num_workers=1"), cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in first.stdout:   # a step logged: the loader's worker is up
            if " step " in line:
                break
        workers = subprocess.run(["pgrep", "-P", str(first.pid)], capture_output=True, text=True).stdout.split()
        assert workers, "no loader worker"
        for pid in workers:
            os.kill(int(pid), signal.SIGSTOP)   # it cannot notice its parent's death and exit
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        p = subprocess.run(command(run, reference / "shards", False, "data.num_workers=1"), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]   # not "being written by ... pid <the dead one>"
        assert json.loads((run / "results.json").read_text())["complete"]
    finally:
        os.killpg(first.pid, signal.SIGKILL)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_a_signal_to_every_process_of_the_run_leaves_stopping_to_the_main_one(reference, tmp_path, signum, code):
    """SLURM signals every process of a step (its time limit, --signal=USR1@N), loader workers included. torch's
    worker dies of SIGTERM, and the main process then failed with a traceback and no checkpoint (exit 1)."""
    run = tmp_path / "run"
    cmd = command(run, reference / "shards", False, "data.num_workers=1")
    rc, out = signal_run(cmd, run, signum, at="inc 0 step 4/")
    assert rc == code, out[-3000:]
    assert "Traceback" not in out and "DataLoader worker" not in out, out[-3000:]
    assert [l for l in out.splitlines() if "stopped by" in l and ".pt" in l], out[-3000:]
    assert (run / "checkpoints" / "partial.pt").is_file()
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["complete"]


def test_a_trainer_installs_its_signal_handlers_only_while_it_runs(tiny_shards, tmp_path):
    """The constructor used to install them and only run() removed them: bench.step, which drives the steps
    itself, left SIGTERM/SIGINT saving a checkpoint nobody would write."""
    from mclfir_dist.configure import load_config
    from mclfir_dist.training.engine import Trainer
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", [*TINY, f"data.shards={tiny_shards}"])
    trainer = Trainer.create(cfg, tmp_path / "run")
    assert {s: signal.getsignal(s) for s in before} == before   # built, not running: the process's own
    seen = {}
    original = trainer._run
    trainer._run = lambda: (seen.update({s: signal.getsignal(s) for s in before}), original())[1]
    trainer.run()
    assert all(h not in (before[s],) for s, h in seen.items())   # while it runs: ours
    assert {s: signal.getsignal(s) for s in before} == before      # after: the process's own again


def test_a_loader_worker_killed_alone_ends_the_run_in_one_line_and_resume_ends_exactly(reference, tmp_path):
    """The out-of-memory killer may SIGKILL a loader worker alone: the run used to end with torch's traceback.
    Now one line names the worker, its signal and the checkpoint kept, and `--resume` ends as if uninterrupted."""
    run = tmp_path / "run"
    cmd = command(run, reference / "shards", False, "data.num_workers=1", "train.checkpoint_every=4")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines = []
    try:
        for line in p.stdout:   # increment 1 has saved a partial checkpoint at step 4 and logged step 8
            lines.append(line)
            if "inc 1 step 8/" in line:
                break
        workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 1, (workers, "".join(lines)[-3000:])
        os.kill(int(workers[0]), signal.SIGKILL)
        lines += p.stdout.readlines()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = "".join(lines)
    assert p.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("mclfir train: error: a data loader worker died in increment 1 "
                           f"(pid {workers[0]} killed by SIGKILL;"), last
    assert "partial.pt, is kept: continue with --resume" in last, last
    resumed = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert same_end(run, reference / "reference")
