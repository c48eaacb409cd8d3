"""Run results: the results.json record (every field written through `RunRecord`), readable tables,
retrieval grids."""
from __future__ import annotations

import dataclasses
import math
import os
import platform
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

from ..utils.cpu import bf16_units, cpu_name
from ..utils.io import atomic_write_json
from .metrics import LEAKAGE_K

RESULTS_NAME = "results.json"


def fmt(x: Optional[float], pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.2f}"


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
    atomic_write_json(Path(run_dir) / RESULTS_NAME, results)


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


def accuracy_table(results: dict) -> str:
    attrs = [a for inc in results["increments"] for a in inc["attributes"]]
    head = ["after increment"] + attrs + ["avg mAP"]
    rows = [head]
    for t, row in enumerate(results["accuracy_matrix"]):
        name = results["increments"][t]["name"]
        avg = results["metrics"][t]["average_map"] if t < len(results["metrics"]) else None
        rows.append([f"{t}: {name}"] + [fmt(row.get(a)) for a in attrs] + [fmt(avg)])
    if results.get("random_map"):
        rows.append(["random embeddings"] + [fmt(results["random_map"].get(a)) for a in attrs] + [""])
    if results.get("frozen_trunk_map"):
        rows.append(["frozen trunk (pooled)"] + [fmt(results["frozen_trunk_map"].get(a)) for a in attrs] + [""])
    return markdown_table(rows)


def cost_table(results: dict) -> str:
    rows = [["increment", "steps", "images", "train s", "images/s", "eval s", "world", "device-s"]]
    for c in results["cost"]:
        name = f"{c['increment']}: {c['name']}" + (" (estimated, not run)" if c.get("estimated") else "")
        rows.append([name, str(c["steps"]), str(c["images_seen"]), f"{c['train_seconds']:.1f}",
                     f"{c['images_per_second']:.1f}", f"{c['eval_seconds']:.1f}", str(c["world_size"]),
                     f"{c['device_seconds']:.1f}"])
    if results["cost"]:
        tot = lambda k: sum(c[k] for c in results["cost"])
        rows.append(["total", str(tot("steps")), str(tot("images_seen")), f"{tot('train_seconds'):.1f}", "",
                     f"{tot('eval_seconds'):.1f}", "", f"{tot('device_seconds'):.1f}"])
    return markdown_table(rows)


def verdict(rows: Dict[str, dict]) -> str:
    """Whether the deployed index can stay after an increment, from its compatibility rows."""
    if not rows:
        return "-"
    if all(r["unchanged"] for r in rows.values()):
        return "keep: old embeddings unchanged"
    gain = max(r["reembedded"] - r["deployed_index"] for r in rows.values())   # what re-embedding buys
    return f"re-embed: +{100 * gain:.2f} points" if gain > 0.005 else \
        "keep: re-embedding gains < 0.5 points"


def compatibility_table(results: dict) -> str:
    """Per increment and old attribute: (a) re-embedded, (b) deployed index, (c) previous model, a-c, b-c."""
    rows = [["after increment", "attribute", "(a) re-embedded", "(b) deployed index", "(c) previous",
             "a-c forgetting", "b-c stale index", "drift", "deployed index"]]
    for entry in results.get("compatibility", []):
        for a, r in entry["attributes"].items():
            rows.append([str(entry["increment"]), a, fmt(r["reembedded"]), fmt(r["deployed_index"]),
                         fmt(r["previous"]), fmt(r["forgetting"]), fmt(r["stale_index_cost"]),
                         f"{r['embedding_drift']:.4f}", verdict({a: r})])
    return markdown_table(rows) if len(rows) > 1 else ""


def summary_text(results: dict) -> str:
    parts = [f"## mAP (%) on the {results['eval_split']} split, accuracy matrix", accuracy_table(results)]
    if results["metrics"]:
        m = results["metrics"][-1]
        forg = ", ".join(f"{a} {fmt(v)}" for a, v in m["forgetting"].items()) or "-"
        parts.append(f"average mAP {fmt(m['average_map'])} | average forgetting {fmt(m['average_forgetting'])} "
                     f"({forg}) | BWT {fmt(m['bwt'])}")
        if m.get("dataset_map"):
            parts.append("dataset mAP (query-weighted over its attributes): "
                         + ", ".join(f"{name} {fmt(v)}" for name, v in m["dataset_map"].items()))
    compat = compatibility_table(results)
    if compat:
        parts += ["## the deployed index after each increment (mAP %; drift = 1 - mean cosine, old vs new "
                  "gallery embedding)", compat]
    leakage = leakage_table(results)
    if leakage:
        parts += [f"## attribute leakage after the last increment: % of each head's top-{LEAKAGE_K} that share the "
                  "query's value of each attribute (chance in brackets; the head's own attribute is its "
                  f"precision@{LEAKAGE_K})", leakage]
    parts += ["## cost per increment", cost_table(results)]
    return "\n\n".join(parts)


def last_leakage(results: dict) -> Dict[str, dict]:
    """{head: {attribute: {share, chance}}} of the last evaluated increment ({} for runs from before it)."""
    for details in reversed(results.get("map_details") or []):
        found = {a: d["leakage"] for a, d in details.items() if isinstance(d, dict) and d.get("leakage")}
        if found:
            return found
    return {}


def mean_excess_leakage(results: dict) -> Optional[float]:
    """Mean over heads and the other attributes of share - chance: 0 = attribute-specific, > 0 = the heads
    also retrieve by other attributes."""
    gaps = [v["share"] - v["chance"] for head, row in last_leakage(results).items() for b, v in row.items()
            if b != head]
    return float(np.mean(gaps)) if gaps else None


def leakage_table(results: dict) -> str:
    leak = last_leakage(results)
    if not leak:
        return ""
    columns = sorted({b for row in leak.values() for b in row}, key=lambda b: (b not in leak, b))
    rows = [["head"] + columns]
    for head, row in leak.items():
        rows.append([head] + [f"{'**' if b == head else ''}{100 * row[b]['share']:.1f}{'**' if b == head else ''} "
                              f"({100 * row[b]['chance']:.1f})" if b in row else "-" for b in columns])
    return markdown_table(rows)


def markdown_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def retrieval_grid(query_imgs: torch.Tensor, cand_imgs: torch.Tensor, matches: torch.Tensor, pad: int = 3,
                   query_values: Optional[Sequence[str]] = None, cand_values: Optional[Sequence[Sequence[str]]] = None
                   ) -> torch.Tensor:
    """Rows: query (blue frame) then its top-k (green = same value, red = miss), each captioned with its
    value when values are given. uint8 tensors in, 3xHxW out."""
    colours = {"q": (40, 90, 230), True: (30, 180, 60), False: (220, 40, 40)}
    caption = 12 if query_values is not None else 0

    def framed(img: torch.Tensor, colour, text: str = "") -> torch.Tensor:
        out = torch.full((3, img.shape[1] + 2 * pad + caption, img.shape[2] + 2 * pad), 255, dtype=torch.uint8)
        out[:, :img.shape[1] + 2 * pad] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
        out[:, pad:pad + img.shape[1], pad:-pad] = img
        if caption:
            out[:, -caption:] = _text_strip(text, out.shape[2], caption)
        return out

    cells = []
    for qi in range(query_imgs.shape[0]):
        cells.append(framed(query_imgs[qi], colours["q"], query_values[qi] if query_values else ""))
        cells += [framed(cand_imgs[qi, k], colours[bool(matches[qi, k])], cand_values[qi][k] if cand_values else "")
                  for k in range(cand_imgs.shape[1])]
    return make_grid(torch.stack(cells), nrow=1 + cand_imgs.shape[1], padding=2, pad_value=255)


def _text_strip(text: str, width: int, height: int) -> torch.Tensor:
    """`text` in black on white, width x height, as a 3 x height x width uint8 tensor (PIL's default font)."""
    from PIL import Image, ImageDraw
    strip = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(strip).text((1, 0), text[: max(1, width // 6)], fill="black")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)
