"""Keep an increment's sample budget when the global batch changes (`train.reference_batch_doublets`).

A config's step counts and learning rate are written for one global batch, e.g. the paper's 16
doublets per step x 12,500 steps per task. Run it at G doublets per step (a larger per-GPU batch, more
GPUs) with `train.reference_batch_doublets: R` and, with k = G / R:

  train.steps_per_increment   ceil(steps / k)      the same doublets per increment, so costs compare
  optim.step_size, optim.warmup_steps, teacher.warmup_steps
                              round(steps / k)     the schedule keeps its shape in samples
  optim.lr                    x sqrt(k) (sqrt, the default: the rule for Adam, Malladi et al. 2022),
                              x k (linear) or unchanged (none): `optim.lr_scaling`
  teacher.decay               d ** k               the EMA keeps its horizon in samples (Busbridge et al. 2023)

`train.checkpoint_every` and `train.log_every` stay in steps (they are about time, not samples).
The effective config is what the run uses and saves, with `reference_batch_doublets` set to G, so a
resume at the same world size scales nothing twice; results.json keeps what was scaled from what.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

from ..config import RunConfig

LR_RULES = {"sqrt": math.sqrt, "linear": lambda k: k, "none": lambda k: 1.0}


def _steps(value: int, k: float, round_up: bool = False) -> int:
    if value <= 0:
        return value
    return max(1, math.ceil(value / k) if round_up else round(value / k))


def scale_to_global_batch(cfg: RunConfig, world: int) -> Tuple[RunConfig, Optional[dict]]:
    """(effective config, what was scaled or None). `cfg` itself is not changed."""
    reference = cfg.train.reference_batch_doublets
    global_doublets = cfg.data.batch_doublets * world
    if reference <= 0 or global_doublets == reference:
        return cfg, None
    k = global_doublets / reference
    out = copy.deepcopy(cfg)
    changes: List[Tuple[str, object, object]] = []

    def set_(dotted: str, value) -> None:
        section, key = dotted.split(".")
        old = getattr(getattr(out, section), key)
        if old != value:
            setattr(getattr(out, section), key, value)
            changes.append((dotted, old, value))

    set_("train.steps_per_increment", _steps(cfg.train.steps_per_increment, k, round_up=True))
    set_("optim.step_size", _steps(cfg.optim.step_size, k))
    set_("optim.warmup_steps", _steps(cfg.optim.warmup_steps, k))
    set_("teacher.warmup_steps", _steps(cfg.teacher.warmup_steps, k))
    set_("optim.lr", cfg.optim.lr * LR_RULES[cfg.optim.lr_scaling](k))
    set_("teacher.decay", cfg.teacher.decay ** k)
    out.train.reference_batch_doublets = global_doublets
    return out, {"reference_doublets": reference, "global_doublets": global_doublets, "factor": k,
                 "lr_scaling": cfg.optim.lr_scaling,
                 "changes": {key: {"from": old, "to": new} for key, old, new in changes}}


def describe(scaling: dict) -> str:
    """One log line: what the batch scaling changed."""
    parts = [f"{key} {c['from']:.6g} -> {c['to']:.6g}" for key, c in scaling["changes"].items()]
    return (f"global batch {scaling['global_doublets']} doublets vs the config's reference "
            f"{scaling['reference_doublets']} (x{scaling['factor']:.4g}, lr rule {scaling['lr_scaling']}): "
            + ", ".join(parts))
