"""Mean +- std over seeds of runs named <method>_s<seed> under a folder: final average mAP, average
forgetting, BWT, train seconds; per attribute too. Writes README.md (and a copy of each results.json)."""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np


def stats(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    by_method = defaultdict(list)
    for run in sorted(Path(args.runs).iterdir()):
        m = re.fullmatch(r"(.+)_s(\d+)", run.name)
        if not m or not (run / "results.json").is_file():
            continue
        res = json.loads((run / "results.json").read_text())
        if not res.get("complete"):
            continue
        by_method[m.group(1)].append(res)
        shutil.copyfile(run / "results.json", out / "runs" / f"{run.name}.json")
    attrs = [a for inc in next(iter(by_method.values()))[0]["increments"] for a in inc["attributes"]]
    lines = ["| method | seeds | final avg mAP | avg forgetting | BWT | train s (mean) | "
             + " | ".join(f"{a} (final)" for a in attrs) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(attrs)]
    for method, runs in by_method.items():
        final = [r["final"] for r in runs]
        lines.append(f"| {method} | {len(runs)} | {stats([f['average_map'] for f in final])} | "
                     f"{stats([f['average_forgetting'] for f in final])} | {stats([f['bwt'] for f in final])} | "
                     f"{np.mean([sum(c['train_seconds'] for c in r['cost']) for r in runs]):.0f} | "
                     + " | ".join(stats([r["accuracy_matrix"][-1].get(a) for r in runs]) for a in attrs) + " |")
    text = "\n".join(lines)
    print(text)
    (out / "README.md").write_text("# The embedded default (configs/debug_cpu.yaml) over seeds\n\n"
                                   "Mean ± sample std over seeds, test split, mAP in %. "
                                   "Reproduce: `bash scripts/demo_seeds.sh`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
