"""What a resume may change. A run continues only under the config it was trained with, except for keys
that change how it runs, not what it computes (workers, logging, compile, checkpoint cadence, ...), and
except that `train.increments` may grow: the saved increments must come first, unchanged, and the new
ones extend the run (a new attribute arrives). Anything else is refused in one line that lists the keys."""
from __future__ import annotations

import hashlib
import json
from typing import Dict, List, Optional

from ..config import RunConfig, flat_keys, to_dict
from ..errors import ConfigError

# may differ on resume: how the run executes, never its maths
OPERATIONAL = ("name", "plugins", "data.build.", "data.loader", "data.num_workers", "data.eval_batch_size",
               "data.dali_threads", "data.skip_bad_shards", "data.cache_", "data.remote_retries", "model.channels_last", "optim.implementation",
               "train.checkpoint_every", "train.resume_other_world", "train.trackers", "train.log_every", "train.compile", "train.deterministic",
               "train.num_threads", "train.dist_", "eval.query_chunk", "eval.grid_", "eval.frozen_baseline",
               "tune.")
# derived from the global batch by train.reference_batch_doublets: they follow a change of world size
BATCH_SCALED = ("train.steps_per_increment", "optim.step_size", "optim.warmup_steps", "teacher.warmup_steps",
                "optim.lr", "teacher.decay", "train.reference_batch_doublets")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _increment(inc: dict) -> dict:
    return {"name": inc.get("name"), "attributes": list(inc.get("attributes") or []), "shards": inc.get("shards") or ""}


def check_increments(saved: List[dict], new: List[dict], where: str) -> Optional[int]:
    """None if the increments are the run's; else the index of the first added one."""
    for i, (s, n) in enumerate(zip(saved, new)):
        if _increment(s) != _increment(n):
            raise ConfigError(f"{where}: train.increments[{i}] differs from the run's: the config has "
                              f"{_increment(n)}, the run trained {_increment(s)}; an extension keeps the run's "
                              f"increments first and unchanged, then adds new ones")
    if len(new) < len(saved):
        raise ConfigError(f"{where}: the config has {len(new)} increments, the run has {len(saved)} "
                          f"({', '.join(s['name'] for s in saved)}); a resume may add increments, never drop them")
    return len(saved) if len(new) > len(saved) else None


def check_resume(saved: dict, cfg: RunConfig, where: str, scaled: bool = True) -> Optional[int]:
    """Refuse a config that changes the run's results; return the first new increment of an extension.
    scaled=False: both are what the user asked for, before batch scaling, so every key is compared (the
    batch-scaled keys too: a new train.reference_batch_doublets cannot carry a new lr past the check)."""
    new = to_dict(cfg)
    first_new = check_increments(saved["train"]["increments"], new["train"]["increments"], where)
    old_flat, new_flat = flat_keys(saved), flat_keys(new)
    rescaled = scaled and cfg.train.reference_batch_doublets > 0 and \
        old_flat.get("train.reference_batch_doublets") != new_flat.get("train.reference_batch_doublets")
    differ = []
    for key, value in new_flat.items():
        if key == "train.increments" or key not in old_flat or key.startswith(OPERATIONAL):
            continue
        if rescaled and key in BATCH_SCALED:
            continue
        if old_flat[key] != value:
            differ.append(f"{key} (run: {old_flat[key]!r}, config: {value!r})")
    if differ:
        raise ConfigError(f"{where}: the config changes what the run computes: {'; '.join(differ)}. Resume with "
                          f"the run's own config (omit --config) or start a new run with --out")
    return first_new
