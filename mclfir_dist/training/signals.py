"""Stopping on a signal without losing work. SIGTERM (what SLURM and Kubernetes send before a kill), SIGUSR1
(SLURM's `--signal=USR1@N`) and SIGINT (Ctrl-C) ask the run to write a checkpoint after the current step and
exit: 143 after SIGTERM, 130 after SIGINT, 138 after SIGUSR1 (which also asks SLURM to requeue the job when
it runs under SLURM). Every rank agrees on the step through a collective on host memory (no device sync),
so the partial checkpoint, ZeRO partitions included, is consistent."""
from __future__ import annotations

import logging
import os
import shutil
import contextlib
import signal
import subprocess
import threading
from typing import Dict, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("mclfir")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunStopped(Exception):
    """The run saved its state and stopped on a signal; `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, where: str):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: {where}; continue with --resume")


class SignalStop:
    def __init__(self):
        self.signum = 0     # what the ranks agreed on
        self.received = 0   # what this rank's handler saw; never overwritten by a collective
        self._previous: Dict[int, object] = {}
        self._group = None

    def install(self, world: int) -> None:
        """On every rank, before the first step (the collective group is made here, by all ranks at once)."""
        if world > 1 and dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        if threading.current_thread() is not threading.main_thread():
            return   # Python delivers signals to the main thread only; a run started elsewhere keeps the defaults
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    @contextlib.contextmanager
    def installed(self, world: int):
        """The handlers for the span of a run (Trainer.run): a Trainer used step by step (bench.step) leaves the
        process's own handlers alone."""
        self.install(world)
        try:
            yield self
        finally:
            self.uninstall()

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if not self.received:
            self.received = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none); every rank gets the same answer at the same step. A signal
        that lands while the collective runs (its handler runs as it returns) counts at the next check: it
        must not be lost by overwriting, nor acted on by one rank alone."""
        if self._group is None:
            self.signum = self.received
            return self.signum
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        self.signum = int(flag)
        return self.signum

    def requeue(self, is_main: bool) -> Optional[str]:
        """After SIGUSR1 under SLURM: rank 0 asks for the job to be requeued (the script allows it with --requeue),
        and every rank waits for the answer. A rank that left first would end the step (srun --kill-on-bad-exit)
        and could kill rank 0 before it asked: the job would fail instead of coming back."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.signum != signal.SIGUSR1 or not job:
            return None
        said = _ask_requeue(job) if is_main else None
        if self._group is not None:
            dist.barrier(group=self._group)
        return said


def _ask_requeue(job: str) -> Optional[str]:
    if shutil.which("scontrol") is None:
        return None
    log.info("scontrol requeue %s: asking", job)
    # The requeue makes SLURM send SIGTERM to every process of the step, scontrol included: ignoring it
    # (inherited through exec) lets scontrol report its answer instead of dying before it.
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                          preexec_fn=_ignore_sigterm)
    if done.returncode == 0:
        return f"scontrol requeue {job}: done"
    why = done.stderr.strip() or f"exit {done.returncode}"
    return f"scontrol requeue {job}: failed: {why}"


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
