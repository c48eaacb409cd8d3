"""The several-seed real-photo comparison, end to end: equal validation tuning, seeds, report.

    python scripts/fpi_seeds.py [--csv labels.csv --image-root DIR] [--shards DIR] [--runs DIR] [--out DIR]
    (bash scripts/fpi_seeds.sh: the defaults, about 100 minutes on 2 CPU cores)

1. tune   every method (mclfir, finetune, lwf, frozen, static_joint) gets the same search on the
          validation split: optim.lr over --lrs, seed 0, the first --tune-increments increments
          (static_joint: its final retraining over them). The best validation average mAP wins; every
          trial and the choice go to tuning.json / TUNING.md. The test split is never looked at here.
2. seeds  every method with its chosen lr for --seeds on the test split. static_joint retrains at every
          increment for the first seed (static-cumulative measured end to end) and only at the last for
          the others (their earlier retrainings' cost is estimated, and marked so).
3. report mean +- std over seeds, error-bar plots, and one sentence per target of the paper's claim.

Runs whose results.json is complete are not run again, so the script can be stopped and restarted.
Any CSV with the same columns works: --csv/--image-root rebuild the shards from it (into --shards).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["mclfir", "finetune", "lwf", "frozen", "static_joint"]


def run_train(config: Path, out: Path, overrides, log: Path) -> dict:
    """One `mclfir train`, skipped when its results.json is already complete."""
    results = out / "results.json"
    if results.is_file() and json.loads(results.read_text()).get("complete"):
        print(f"  {out.name}: done before, kept", flush=True)
        return json.loads(results.read_text())
    cmd = [str(Path(sys.executable).parent / "mclfir"), "train", "--config", str(config), "--out", str(out),
           "--overwrite", *overrides]
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"{out.name} failed (exit {p.returncode}); its log: {log}")
    res = json.loads(results.read_text())
    print(f"  {out.name}: final avg mAP {100 * res['final']['average_map']:.2f} in {time.time() - t0:.0f}s",
          flush=True)
    return res


def increments_override(config: Path, n: int) -> str:
    sys.path.insert(0, str(ROOT))
    from mclfir_dist.configure import load_config
    incs = load_config(config).train.increments[:n]
    return "train.increments=[" + ", ".join(
        f"{{name: {i.name}, attributes: [{', '.join(i.attributes)}]}}" for i in incs) + "]"


def tune(args, data) -> dict:
    print(f"== tune: optim.lr in {args.lrs}, validation split, seed 0, first {args.tune_increments} increments",
          flush=True)
    tdir = args.runs / "tune"
    tdir.mkdir(parents=True, exist_ok=True)
    trials = {}
    for method in args.methods:
        for lr in args.lrs:
            extra = ["train.static_final_only=true"] if method == "static_joint" else []
            res = run_train(args.config, tdir / f"{method}_lr{lr}",
                            data + [f"train.method={method}", f"optim.lr={lr}", "eval.split=val", "train.seed=0",
                                    increments_override(args.config, args.tune_increments),
                                    "eval.frozen_baseline=false", "eval.grid_queries=0", *extra],
                            tdir / f"{method}_lr{lr}.log")
            trials.setdefault(method, {})[lr] = res["final"]["average_map"]
    chosen = {m: max(t, key=t.get) for m, t in trials.items()}
    record = {"grid": {"optim.lr": args.lrs}, "split": "val", "seed": 0, "increments": args.tune_increments,
              "trials": trials, "chosen": chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tuning.json").write_text(json.dumps(record, indent=1))
    lines = ["# Validation search (the same for every method)", "",
             f"optim.lr in {args.lrs}; validation split; seed 0; the first {args.tune_increments} increments "
             "(static_joint: its final retraining over them). Validation average mAP:", "",
             "| method | " + " | ".join(f"lr {lr}" for lr in args.lrs) + " | chosen |",
             "|---|" + "---|" * (len(args.lrs) + 1)]
    for m, t in trials.items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * t[lr]:.2f}" for lr in args.lrs) + f" | {chosen[m]} |")
    (args.out / "TUNING.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return chosen


def seeds(args, data, chosen: dict) -> None:
    print(f"== seeds {args.seeds}, test split", flush=True)
    sdir = args.runs / "seeds"
    sdir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            extra = []
            if method == "static_joint" and seed != args.seeds[0]:
                extra = ["train.static_final_only=true"]
            run_train(args.config, sdir / f"{method}_s{seed}",
                      data + [f"train.method={method}", f"optim.lr={chosen[method]}", f"train.seed={seed}",
                              "eval.split=test", "eval.grid_queries=0", *extra],
                      sdir / f"{method}_s{seed}.log")


# ---------------------------------------------------------------- report

def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def fmt(ms, scale=100.0):
    m, s, n = ms
    return "-" if n == 0 else f"{scale * m:.2f} ± {scale * s:.2f}"


def compare(runs, a: str, b: str):
    """Welch's t-test of two methods' final avg mAP over their seeds."""
    from mclfir_dist.evaluation.stats import welch
    values = lambda m: [r["final"]["average_map"] for r in runs[m].values()]
    return welch(values(a), values(b))


def claim(runs, final, other: str) -> str:
    w = compare(runs, "mclfir", other)
    words = {"above": f"above {other}", "below": f"below {other}", "not distinguishable": f"not distinguishable from {other}"}
    return (f"- **MCL-FIR is {words[w.verdict()]}** (Welch's t-test over seeds, two-sided p = {w.p:.3f}, "
            f"df = {w.df:.1f}): {fmt(final['mclfir'])} vs {fmt(final[other])}, {100 * w.difference:+.2f} points.")


def leakage_lines(runs) -> list:
    """Per method and head: the top-10 share of the head's own attribute and the mean excess over chance of
    the other attributes (mean over seeds); runs from before leakage was recorded give no table."""
    from mclfir_dist.evaluation.record import last_leakage
    rows = {}
    for method, by_seed in runs.items():
        per_head = {}
        for r in by_seed.values():
            for head, row in last_leakage(r).items():
                others = [v["share"] - v["chance"] for b, v in row.items() if b != head]
                per_head.setdefault(head, []).append((row[head]["share"], float(np.mean(others)) if others else 0.0))
        if per_head:
            rows[method] = per_head
    if not rows:
        return []
    heads = sorted({h for per_head in rows.values() for h in per_head})
    lines = ["Attribute leakage (test split, top-10, mean over seeds): each head's precision@10 on its own "
             "attribute / the mean excess over chance of the share of neighbours with the query's value of "
             "each other attribute (0 = attribute-specific).", "",
             "| method | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for method, per_head in rows.items():
        cells = []
        for h in heads:
            v = per_head.get(h)
            cells.append("-" if not v else f"{100 * np.mean([a for a, _ in v]):.1f} / {100 * np.mean([b for _, b in v]):+.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(args) -> str:
    sdir = args.runs / "seeds"
    runs = {}
    for method in args.methods:
        for seed in args.seeds:
            p = sdir / f"{method}_s{seed}" / "results.json"
            if p.is_file():
                r = json.loads(p.read_text())
                if r.get("complete"):
                    runs.setdefault(method, {})[seed] = r
    if not runs:
        raise SystemExit(f"no complete runs under {sdir}")
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    for method, by_seed in runs.items():
        for seed, r in by_seed.items():
            (args.out / "runs" / f"{method}_s{seed}.json").write_text(json.dumps(r))
    train_s = {m: [sum(c["train_seconds"] for c in r["cost"] if not c.get("estimated")) for r in rs.values()]
               for m, rs in runs.items()}
    static = runs.get("static_joint", {})
    cumulative = [sum(c["train_seconds"] for c in r["cost"]) for r in static.values()
                  if not any(c.get("estimated") for c in r["cost"])]
    static_cum = float(np.mean(cumulative)) if cumulative else float("nan")
    static_final = float(np.mean([r["cost"][-1]["train_seconds"] for r in static.values()])) if static else math.nan
    attrs = [a for inc in next(iter(next(iter(runs.values())).values()))["increments"] for a in inc["attributes"]]
    final = {m: mean_std([r["final"]["average_map"] for r in rs.values()]) for m, rs in runs.items()}
    forget = {m: mean_std([r["final"]["average_forgetting"] for r in rs.values()]) for m, rs in runs.items()}
    lines = ["| method | seeds | final avg mAP (test) | avg forgetting | train s | / static-final | "
             "/ static-cumulative | " + " | ".join(attrs) + " |", "|---|---|---|---|---|---|---|" + "---|" * len(attrs)]
    for m, rs in runs.items():
        # static_joint: the final retraining (static-final); its cumulative cost is the reference itself
        t = static_final if m == "static_joint" else float(np.mean(train_s[m]))
        name = "static_joint (static-final)" if m == "static_joint" else m
        forgetting = f"{fmt(forget[m])} (n={forget[m][2]})" if forget[m][2] != len(rs) else fmt(forget[m])
        lines.append(f"| {name} | {len(rs)} | {fmt(final[m])} | {forgetting} | {t:.0f} | {t / static_final:.2f} | "
                     f"{t / static_cum:.2f} | "
                     + " | ".join(fmt(mean_std([r["accuracy_matrix"][-1].get(a) for r in rs.values()]))
                                  for a in attrs) + " |")
    if cumulative:
        lines.append(f"| static-cumulative (seed {args.seeds[0]}, every retraining run) | 1 | "
                     f"{fmt(mean_std([r['final']['average_map'] for r in static.values()][:1]))} | - | "
                     f"{static_cum:.0f} | {static_cum / static_final:.2f} | 1.00 |" + " |" * len(attrs))
    table = "\n".join(lines)

    sentences = []
    if "mclfir" in runs and "static_joint" in runs:
        w = compare(runs, "mclfir", "static_joint")
        sentences.append(
            f"- **Within 1 point of tuned static_joint: {'holds' if w.difference >= -0.01 else 'does not hold'}.** "
            f"MCL-FIR {fmt(final['mclfir'])} vs static_joint {fmt(final['static_joint'])}: {100 * w.difference:+.2f} "
            f"points (Welch p = {w.p:.3f}).")
        frac = float(np.mean(train_s["mclfir"])) / static_cum
        sentences.append(
            f"- **At most 35% of static-cumulative training cost: {'holds' if frac <= 0.35 else 'does not hold'}.** "
            f"{frac:.0%} (MCL-FIR {np.mean(train_s['mclfir']):.0f} s of training against static-cumulative "
            f"{static_cum:.0f} s measured end to end for seed {args.seeds[0]}; static-final "
            f"{static_final:.0f} s).")
    if "mclfir" in runs:
        f_m, f_s, _ = forget["mclfir"]
        sentences.append(f"- **Average forgetting at most 2 points: {'holds' if f_m <= 0.02 else 'does not hold'}.** "
                         f"MCL-FIR {fmt(forget['mclfir'])} points.")
        sentences += [claim(runs, final, other) for other in ("static_joint", "lwf", "finetune", "frozen")
                      if other in runs and len(runs[other]) > 1 and len(runs["mclfir"]) > 1]
    _plots(args.out, runs, final, forget, train_s, static_cum)
    leakage = leakage_lines(runs)
    text = "\n".join([
        "# Real-photo comparison over several seeds (2-core CPU)", "",
        f"Config `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`; "
        f"seeds {args.seeds}; each method with the lr its validation search chose (TUNING.md). Test split. "
        "mean ± sample std over seeds, in mAP points. Training seconds are measured on this machine, one run "
        "at a time; static-cumulative is the first seed's static_joint run, which retrained at every increment.",
        "", table, "", *leakage,
        "Targets (the paper's claim), then each comparison by Welch's t-test over the seeds at the 5% level: "
        "\"above\" or \"below\" only where the test says so, otherwise \"not distinguishable\". The spread covers "
        "the training seed only (one split, one query draw):", "", *sentences, "",
        "![final mAP and forgetting](final_map.png)", "", "![mAP vs cost](map_vs_cost.png)", ""])
    (args.out / "README.md").write_text(text)
    print(text, flush=True)
    return text


def _plots(out: Path, runs, final, forget, train_s, static_cum) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, what, title in ((axes[0], final, "final average mAP (test)"), (axes[1], forget, "average forgetting")):
        ax.bar(methods, [100 * what[m][0] for m in methods], yerr=[100 * what[m][1] for m in methods], capsize=4,
               color=["tab:red" if m == "mclfir" else "tab:gray" for m in methods])
        ax.set_title(title + " (points, ± std over seeds)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "final_map.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in methods:
        x = [t / static_cum for t in train_s[m]] if m != "static_joint" else \
            [r["cost"][-1]["train_seconds"] / static_cum for r in runs[m].values()]
        ax.errorbar(np.mean(x), 100 * final[m][0], xerr=np.std(x, ddof=1) if len(x) > 1 else 0,
                    yerr=100 * final[m][1], fmt="o", capsize=4, label="static-final" if m == "static_joint" else m)
    if "static_joint" in runs:
        ax.errorbar(1.0, 100 * final["static_joint"][0], yerr=100 * final["static_joint"][1], fmt="s", capsize=4,
                    label="static-cumulative")
    ax.axvline(0.35, ls=":", c="k", lw=0.8)
    ax.set_xlabel("training cost / static-cumulative")
    ax.set_ylabel("final average mAP (test)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "map_vs_cost.png", dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/fpi_seeds_cpu.yaml")
    ap.add_argument("--csv", help="CSV of photos with the config's columns (default: the config's)")
    ap.add_argument("--image-root", help="folder the CSV's file names are relative to")
    ap.add_argument("--shards", type=Path, help="shard folder (built from --csv when given, or when missing)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/fpi_seeds", help="where the runs go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/fpi_seeds", help="where the report goes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3])
    ap.add_argument("--tune-increments", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--phase", choices=["all", "tune", "seeds", "report"], default="all")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = ap.parse_args()
    data = list(args.overrides)
    if args.csv:
        if not args.shards:
            ap.error("--csv needs --shards (a new folder for the shards built from it)")
        data += [f"data.build.csv.csv={Path(args.csv).resolve()}",
                 f"data.build.csv.image_root={Path(args.image_root or Path(args.csv).parent).resolve()}"]
    if args.shards:
        data.append(f"data.shards={args.shards.resolve()}")
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    t0 = time.time()
    chosen_path = args.out / "tuning.json"
    if args.phase in ("all", "tune"):
        chosen = tune(args, data)
    elif chosen_path.is_file():
        chosen = json.loads(chosen_path.read_text())["chosen"]
        chosen = {m: float(v) for m, v in chosen.items()}
    else:
        chosen = {}
    if args.phase in ("all", "seeds"):
        missing = [m for m in args.methods if m not in chosen]
        if missing:
            raise SystemExit(f"no tuned lr for {missing}: run --phase tune first ({chosen_path})")
        seeds(args, data, chosen)
    if args.phase in ("all", "report"):
        report(args)
    print(f"== done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
