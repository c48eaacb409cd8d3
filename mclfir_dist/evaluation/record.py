"""Readable tables of a run's results (runfolder/record.py holds results.json itself) and retrieval grids."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

from .metrics import LEAKAGE_K


def fmt(x: Optional[float], pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.2f}"


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
