"""A new attribute arrives, on real photos: per method, train 5 attributes of configs/fpi_seeds_cpu.yaml, then
extend the run with the 6th (subCategory) trained on its own shard set (photos of the main set's train split
only, labelled with subCategory alone). Reports, for the 5 old attributes after the extension, (a) re-embedded,
(b) deployed index, (c) previous, and the extension's cost against retraining all 6 (static_joint's final
retraining, run side by side). Writes docs/results/extend/ (README.md, results.json of every run, run.log).

    python scripts/extend_study.py [--out runs/extend_study] [--docs docs/results/extend] [--seed 0]
About 25 minutes on 2 CPU cores; needs ../shared/data/fashion-product-images (or --csv/--image-root).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/fpi_seeds_cpu.yaml"
OLD = ["articleType", "baseColour", "gender", "usage", "season"]
NEW = "subCategory"
# each method's lr as chosen on the validation split by scripts/fpi_seeds.py (read, not copied)
LR = json.loads((ROOT / "docs/results/fpi_seeds/tuning.json").read_text())["chosen"]


def increments(new_shards: str = "") -> str:
    items = [f"{{name: {a}, attributes: [{a}]}}" for a in OLD]
    if new_shards:
        items.append(f"{{name: {NEW}, attributes: [{NEW}], shards: {new_shards}}}")
    return "train.increments=[" + ",".join(items) + "]"


def mclfir(args, log) -> None:
    cmd = [sys.executable, "-m", "mclfir_dist.cli", *map(str, args)]
    print("$ mclfir " + " ".join(map(str, args)), file=log, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): mclfir {' '.join(map(str, args[:4]))} ...; see the log")


def new_attribute_csv(csv_path: Path, manifest: Path, out: Path) -> int:
    """Rows of the main shard set's train split only (no test photo may train), with the new attribute."""
    train_keys = set(json.loads(manifest.read_text())["splits"]["train"]["keys"])
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["id"] in train_keys]
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["filename", "id", NEW])
        w.writeheader()
        for r in rows:
            w.writerow({"filename": r["filename"], "id": r["id"], NEW: r[NEW]})
    return len(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/extend_study")
    p.add_argument("--docs", default="docs/results/extend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default="../shared/data/fashion-product-images/labels.csv")
    p.add_argument("--image-root", default="../shared/data/fashion-product-images")
    p.add_argument("--shards", default="shards/fpi")
    p.add_argument("--methods", default="mclfir,lwf,finetune,frozen")
    args = p.parse_args()
    out, docs = (ROOT / args.out), (ROOT / args.docs)
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    log = open(docs / "run.log", "w")
    common = [f"data.shards={args.shards}", f"data.build.csv.csv={args.csv}",
              f"data.build.csv.image_root={args.image_root}", f"train.seed={args.seed}", "eval.grid_queries=0"]
    started = time.time()
    if not (ROOT / args.shards / "manifest.json").is_file():
        mclfir(["shards", "build", "--source", "csv", "--csv", args.csv, "--image-root", args.image_root,
                "--key-column", "id", "--attributes", ",".join(OLD + [NEW]), "--min-value-count", "10",
                "--samples-per-shard", "1000", "--out", args.shards], log)
    new_shards = out / "new_shards"
    if not (new_shards / "manifest.json").is_file():
        n = new_attribute_csv(ROOT / args.csv, ROOT / args.shards / "manifest.json", out / "new_attribute.csv")
        print(f"new attribute's photos: {n} (the main set's train split)", file=log, flush=True)
        mclfir(["shards", "build", "--source", "csv", "--csv", out / "new_attribute.csv", "--image-root",
                args.image_root, "--key-column", "id", "--attributes", NEW, "--min-value-count", "10",
                "--val-fraction", "0.05", "--test-fraction", "0.05", "--samples-per-shard", "1000",
                "--seed", "1", "--out", new_shards], log)
    rows = {}
    for method in args.methods.split(","):
        run = out / method
        if not (run / "results.json").is_file() or not json.loads((run / "results.json").read_text()).get("extensions"):
            mclfir(["train", "--config", CONFIG, "--out", run, "--overwrite", *common, f"train.method={method}",
                    f"optim.lr={LR[method]}", increments()], log)
            mclfir(["train", "--config", CONFIG, "--resume", run, *common, f"train.method={method}",
                    f"optim.lr={LR[method]}", increments(str(new_shards))], log)
        rows[method] = json.loads((run / "results.json").read_text())
    static = out / "static_joint"
    if not (static / "results.json").is_file():
        mclfir(["train", "--config", CONFIG, "--out", static, "--overwrite", *common, "train.method=static_joint",
                f"optim.lr={LR['static_joint']}", "train.static_final_only=true", _six()], log)
    static_res = json.loads((static / "results.json").read_text())
    for method, res in rows.items():
        (docs / f"{method}_results.json").write_text(json.dumps(res, indent=2))
    (docs / "static_joint_results.json").write_text(json.dumps(static_res, indent=2))
    (docs / "README.md").write_text(report(rows, static_res, args, time.time() - started))
    print((docs / "README.md").read_text())
    return 0


def _six() -> str:
    return "train.increments=[" + ",".join(f"{{name: {a}, attributes: [{a}]}}" for a in OLD + [NEW]) + "]"


def _last_cost(res: dict) -> dict:
    return res["cost"][-1]


def report(rows: dict, static: dict, args, wall: float) -> str:
    pct = lambda v: f"{100 * v:.2f}"
    lines = ["# A new attribute arrives, on real photos (2-core CPU)", "",
             f"`python scripts/extend_study.py` (seed {args.seed}; {wall / 60:.0f} min wall for what had not run "
             "before). Config `configs/fpi_seeds_cpu.yaml` with each method's lr from "
             "`docs/results/fpi_seeds/TUNING.md`; 5 attributes trained first, then the run extended by "
             f"`{NEW}`, trained on its own shard set: the photos of the main set's train split, labelled with "
             f"`{NEW}` only. Test split of the main set. mAP in points.", "",
             "## Can the deployed index stay? Old attributes after the extension", "",
             "(a) queries and gallery re-embedded by the extended model; (b) queries by the extended model against "
             "the gallery the 5-attribute model embedded (the index as deployed); (c) both by the 5-attribute model.",
             "", "| method | attribute | (a) re-embedded | (b) deployed index | (c) previous | a-c forgetting | "
             "b-c stale index | drift |", "|---|---|---|---|---|---|---|---|"]
    summary = ["", "## Per method", "", "| method | mean a-c | mean b-c | mean a-b | verdict | new attribute mAP | "
               "extension train s | / retraining all 6 (static-final) |", "|---|---|---|---|---|---|---|---|"]
    from mclfir_dist.evaluation.record import verdict
    static_final = _last_cost(static)["train_seconds"]
    for method, res in rows.items():
        last = res["compatibility"][-1]
        assert last["increment"] == len(OLD), last["increment"]
        attrs = last["attributes"]
        for a, r in attrs.items():
            lines.append(f"| {method} | {a} | {pct(r['reembedded'])} | {pct(r['deployed_index'])} | "
                         f"{pct(r['previous'])} | {pct(r['forgetting'])} | {pct(r['stale_index_cost'])} | "
                         f"{r['embedding_drift']:.4f} |")
        mean = lambda k: sum(r[k] for r in attrs.values()) / len(attrs)
        gain = sum(r["reembedded"] - r["deployed_index"] for r in attrs.values()) / len(attrs)
        ext = _last_cost(res)["train_seconds"]
        new_map = res["accuracy_matrix"][-1].get(NEW)
        summary.append(f"| {method} | {pct(mean('forgetting'))} | {pct(mean('stale_index_cost'))} | {pct(gain)} | "
                       f"{verdict(attrs)} | {pct(new_map) if new_map is not None else '-'} | {ext:.0f} | "
                       f"{ext / static_final:.2f} |")
    summary += ["", f"Retraining all 6 (static_joint, its final retraining only: {_last_cost(static)['steps']} steps) "
                f"took {static_final:.0f} s of training here and scored {pct(_avg_last(static))} average mAP over "
                "the 6, measured in the same session, one run at a time."]
    return "\n".join(lines + summary) + "\n"


def _avg_last(res: dict) -> float:
    row = list(res["accuracy_matrix"][-1].values())
    return sum(row) / len(row)


if __name__ == "__main__":
    sys.exit(main())
