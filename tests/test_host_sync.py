"""No device-to-host read inside a training step, except when logging.

On CUDA a read of a device value (`.item()`, `bool(t)`, a data-dependent shape) makes the host wait for
the device, so a step that does one per step cannot run ahead of the GPU. CI has no GPU, so the reads
are caught where they are dispatched: every `_local_scalar_dense` (what `.item()`, `bool()`, `int()`
and `float()` of a tensor become) and every op whose output shape depends on values. The optimizer's
reads of its step counters are left out: those counters live on the host. On a GPU the test also
counts the synchronisations torch reports (torch.cuda.set_sync_debug_mode).
"""
import itertools
import sys
import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ROOT, tiny_train_overrides

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
              "is_nonzero", "equal"}


class HostReads(TorchDispatchMode):
    """Counts host reads per call site: the innermost frame in mclfir_dist (or the tests)."""

    def __init__(self):
        super().__init__()
        self.sites = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS or (name == "repeat_interleave" and "output_size" not in (kwargs or {})):
            frame, in_optimizer = sys._getframe(1), False
            site = None
            while frame is not None:
                path = frame.f_code.co_filename.replace("\\", "/")
                if "/torch/optim/" in path:
                    in_optimizer = True
                if site is None and "/mclfir_dist/" in path:
                    site = f"{path.rsplit('/mclfir_dist/', 1)[1]}:{frame.f_lineno}"
                frame = frame.f_back
            if not in_optimizer:
                self.sites[site or "elsewhere"] += 1
        return func(*args, **(kwargs or {}))


def _reads_for(trainer, session, batch, steps):
    """Host reads per call site; on CUDA also the synchronisations torch itself reports."""
    cuda = torch.cuda.is_available()
    with HostReads() as reads, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_steps(session.with_steps(steps), itertools.repeat(batch))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    if syncs:
        reads.sites["cuda synchronizations"] += syncs
    return reads.sites


@pytest.mark.parametrize("second", ["[garment_length]", "[garment_length, pattern]"])
def test_a_step_reads_nothing_back_from_the_device_except_when_it_logs(tiny_shards, tmp_path, second):
    """One new head, and two (rows routed to their heads by task)."""
    from mclfir_dist.bench.step import increment_with_distillation
    from mclfir_dist.configure import load_config
    from mclfir_dist.training.engine import Trainer
    # log_every larger than any run below: only the increment's last step logs
    cfg = load_config(ROOT / "configs/debug_cpu.yaml", tiny_train_overrides(tiny_shards) + [
        "train.log_every=1000", "eval.grid_queries=0", "eval.frozen_baseline=false", "data.batch_doublets=8",
        "loss.mask_same_value=true", f"train.increments=[{{name: a, attributes: [colour]}},{{name: b, attributes: {second}}}]"])
    trainer = Trainer.create(cfg, tmp_path / "run")
    index, plan, ctx = increment_with_distillation(trainer)
    assert index == 1 and ctx.old_attributes    # distillation through the old head runs
    session = trainer.open_increment(plan, ctx)
    batch = next(iter(trainer.train_loader(plan)))
    _reads_for(trainer, session, batch, 1)   # first-step set-up aside
    short = _reads_for(trainer, session, batch, 2)
    long = _reads_for(trainer, session, batch, 6)
    # four more steps, not one more read: every read belongs to the logging at the end
    assert long == short, f"reads that grow with the number of steps: {long - short}"
    assert sum(short.values()) > 0, "the final log must read the losses (the detector sees reads)"
    # the reads are the engine's finiteness check and the metrics' loss values, at the logging step
    assert all(site.startswith(("training/engine.py", "training/metrics.py")) or site == "cuda synchronizations"
               for site in short), short
