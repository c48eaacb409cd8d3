"""results.json: `RunRecord` is the one writer of a run's results (every field written through it), in memory
during training and saved atomically after every increment; `CostRecord` is one increment's cost row."""
from __future__ import annotations

import dataclasses
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..utils.cpu import bf16_units, cpu_name
from ..utils.io import atomic_write_json
from .layout import RunFolder


def machine_info() -> dict:
    """Where a run's costs were measured: they are only comparable on the same machine."""
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_name(),
            "cpu_bf16_units": list(bf16_units()),
            "cpu_count": os.cpu_count(), "torch": str(torch.__version__), "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return info


def new_results(config: dict, shards: str) -> dict:
    return {
        "format": "mclfir-results/1",
        "complete": False,
        "config": config,
        "shards": shards,
        "eval_split": config["eval"]["split"],
        "increments": [{"index": i, "name": inc["name"], "attributes": list(inc["attributes"])}
                       for i, inc in enumerate(config["train"]["increments"])],
        "learned_at": {},
        "accuracy_matrix": [],       # R[t] = {attribute: mAP after increment t}
        "map_details": [],           # per increment: {attribute: {map, queries, queries_without_relevant, leakage}}
        "random_map": {},
        "frozen_trunk_map": {},
        "cost": [],                  # per increment (see engine)
        "metrics": [],               # continual metrics after each increment
        "final": {},
        "machine": machine_info(),
        "wall_seconds": 0.0,         # run(): baselines, training, evaluation and checkpoints
        "skipped_samples": {},       # {"train/increment_00" | "<split>/<shards>": {count, keys}}
    }


def write_results(run_dir: str | Path, results: dict) -> None:
    atomic_write_json(RunFolder(run_dir).results, results)


@dataclass(kw_only=True)
class CostRecord:
    """The cost of one increment, as results.json stores it (one row of `results["cost"]`); built with
    keywords only."""
    increment: int
    name: str
    steps: int
    images_seen: int
    train_seconds: float
    images_per_second: float
    eval_seconds: float
    world_size: int
    device_seconds: float
    backend: str
    global_batch: int
    per_rank_batch: int
    rank_max_diff: float = 0.0      # parameters and buffers of model and teacher across ranks; 0 = identical
    estimated: bool = False         # not run: computed from a measured retraining's seconds per step
    note: str = ""
    val_seconds: float = 0.0        # validation inside the increment (eval.every_steps), not in train_seconds
    selection: dict = dataclasses.field(default_factory=dict)   # eval.every_steps: the val curve and the pick
    data_wait_seconds: float = 0.0  # of train_seconds, the main process blocked on the loader for its next batch
    peak_memory_mb: float = 0.0     # the device's peak allocation (CUDA), or the process's peak RSS (CPU)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class RunRecord:
    """results.json in memory: every result of a run is written through here, and only here."""

    def __init__(self, results: dict):
        self.data = results

    @classmethod
    def new(cls, config: dict, shards: str) -> "RunRecord":
        return cls(new_results(config, shards))

    # -- state (saved in every checkpoint) ----------------------------------------------------
    def state_dict(self) -> dict:
        return self.data

    def load_state_dict(self, data: dict) -> None:
        self.data = data

    # -- what is read back --------------------------------------------------------------------
    @property
    def accuracy_matrix(self) -> List[Dict[str, float]]:
        return self.data["accuracy_matrix"]

    @property
    def learned_at(self) -> Dict[str, int]:
        return self.data["learned_at"]

    @property
    def has_baselines(self) -> bool:
        return bool(self.data["random_map"])

    @property
    def wall_seconds(self) -> float:
        return self.data.get("wall_seconds", 0.0)

    # -- fields -------------------------------------------------------------------------------
    def set_sources(self, attribute_shards: Dict[str, str], skipped_shards: Dict[str, list],
                    batch_scaling: Optional[dict]) -> None:
        """Which shard set each attribute came from, the shards left out, and the batch scaling applied."""
        self.data["attribute_shards"] = dict(attribute_shards)
        self.data["skipped_shards"] = skipped_shards
        self.data["batch_scaling"] = batch_scaling

    def set_remote_shards(self, stats: Dict[str, dict]) -> None:
        """Remote shard sets: each URL's manifest digest (exactly which data the run saw), cache, bytes, retries."""
        if stats:
            self.data["remote_shards"] = stats

    def set_trial(self, study: str, number: int, params: Dict[str, object], pruned: bool = False,
                  pruned_at_step: Optional[int] = None) -> None:
        """A `mclfir tune` trial: its study, number, the values its sampler chose, and whether it was pruned."""
        self.data["tune"] = {"study": study, "trial": number, "params": dict(params), "pruned": pruned,
                             "pruned_at_step": pruned_at_step}

    def set_baselines(self, random_map: Dict[str, float], frozen_trunk_map: Dict[str, float]) -> None:
        self.data["random_map"].update(random_map)
        self.data["frozen_trunk_map"].update(frozen_trunk_map)

    def mark_learned(self, attributes: Sequence[str], index: int) -> None:
        for a in attributes:
            self.data["learned_at"][a] = index

    def set_wall_seconds(self, seconds: float) -> None:
        """run(): baselines, training, evaluation and checkpoints, over every session of the run."""
        self.data["wall_seconds"] = seconds

    def add_increment(self, row: Dict[str, float], details: Dict[str, dict], metrics: dict, cost: CostRecord) -> None:
        self.data["accuracy_matrix"].append(row)
        self.data["map_details"].append(details)
        self.data["metrics"].append(metrics)
        self.data["cost"].append(cost.as_dict())

    def set_launch(self, *, world_size: int, nodes: int, hosts: List[str], backend: str, global_batch: int,
                   loader: str, mixed_precision: str, precision_reason: str = "",
                   channels_last: bool = False) -> None:
        """How the latest increment ran (a resumed run may run on another world size or other nodes)."""
        self.data.update(world_size=world_size, nodes=nodes, hosts=hosts, backend=backend, global_batch=global_batch,
                         loader=loader, mixed_precision=mixed_precision, precision_reason=precision_reason,
                         channels_last=channels_last)

    def skip_increment(self, cost: CostRecord) -> None:
        """An increment that was not run (static_final_only): no mAP, forgetting and BWT unknown."""
        self.data["accuracy_matrix"].append({})
        self.data["map_details"].append({})
        nan = float("nan")
        self.data["metrics"].append({"average_map": nan, "forgetting": {}, "average_forgetting": nan, "bwt": nan})
        self.data["cost"].append(cost.as_dict())

    def fill_estimates(self, measured: CostRecord) -> None:
        """Costs of increments that were not run, from the measured one's seconds per step."""
        per_step = measured.train_seconds / measured.steps
        for c in self.data["cost"]:
            if c.get("estimated"):
                c.update({"train_seconds": per_step * c["steps"],
                          "images_seen": c["steps"] * measured.images_seen // measured.steps,
                          "images_per_second": measured.images_per_second, "eval_seconds": 0.0,
                          "world_size": measured.world_size,
                          "device_seconds": per_step * c["steps"] * measured.world_size,
                          "backend": measured.backend, "global_batch": measured.global_batch,
                          "per_rank_batch": measured.per_rank_batch,
                          "note": "not run: estimated from the final retraining's measured seconds per step"})

    def add_skipped(self, where: str, keys: Sequence[str]) -> None:
        """Samples skipped because their image did not decode, per split (and increment for training)."""
        if not keys:
            return
        entry = self.data.setdefault("skipped_samples", {}).setdefault(where, {"count": 0, "keys": []})
        entry["keys"] = sorted(set(entry["keys"]) | set(keys))   # an eval split is read once per increment
        entry["count"] = len(entry["keys"])

    def extend(self, config: dict, first_new: int, config_hash: str) -> None:
        """The run continues with more increments (a new attribute arrived): when, which, under what config."""
        self.data["config"] = config
        self.data["increments"] = new_results(config, self.data["shards"])["increments"]
        self.data["complete"] = False
        self.data["final"] = {}
        added = [inc["name"] for inc in config["train"]["increments"][first_new:]]
        self.data.setdefault("extensions", []).append({
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "first_new_increment": first_new,
            "increments": added, "config_hash": config_hash})

    def set_compatibility(self, index: int, per_attribute: Dict[str, dict]) -> None:
        """Old attributes after increment `index`: mAP with both sides re-embedded, with the deployed (previous)
        gallery, and with the previous model alone (see evaluation/compatibility.py)."""
        rows = self.data.setdefault("compatibility", [])
        rows[:] = [r for r in rows if r["increment"] != index]
        rows.append({"increment": index, "attributes": per_attribute})

    def finish(self) -> None:
        self.data["final"] = self.data["metrics"][-1]
        self.data["complete"] = True

    def save(self, run_dir: str | Path) -> None:
        write_results(run_dir, self.data)
