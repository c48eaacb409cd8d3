"""The real-photo comparison, end to end: equal validation tuning, seeds, report.

    python scripts/fpi_seeds.py [--csv labels.csv --image-root DIR] [--shards DIR] [--runs DIR] [--out DIR]
    (bash scripts/fpi_seeds.sh: the defaults; its budget is 150 minutes on 2 CPU cores)

1. tune   every method gets its own `mclfir tune` study with the same sampler, seed and trial count
          (--trials; mclfir_dist/study/tuning.py: trial 0 at an earlier search's choices, START, or with
          --start config the config's values; then TPE; median pruning) over its own knobs (KNOBS, the old
          ladders as choices: lr and encoder lr scale for all; KD weight for mclfir and lwf; the teacher decay
          for mclfir), on the validation split of the full task (every increment; static_joint: its final
          retraining), seed 0. The record: tuning.json, TUNING.md, tune/METHOD/REPORT.md. The test split is
          never looked at here. (The committed 48 px TUNING.md came from the compass search this replaced.)
2. seeds  every method with its chosen values for --seeds on the test split; seed N also redraws which
          images are queries (eval.query_draw=N), so the spread covers the query draw too. static_joint runs
          every retraining for the first seed (static-cumulative measured end to end) and only the last for
          the others (their earlier retrainings' cost is estimated, and marked so).
3. report mean +- std over seeds, Welch's t-test per claim, attribute leakage, plots.

Runs whose results.json is complete are not run again, so the script can be stopped and restarted.
Any CSV with the same columns works: --csv/--image-root rebuild the shards from it (into --shards).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from mclfir_dist.evaluation.stats import p_text
from mclfir_dist.study import runner, tuning

ROOT = Path(__file__).resolve().parents[1]
# name in the report -> (train.method, settings that define it)
VARIANTS = {
    "mclfir": ("mclfir", []),
    # the official code's distillation: MSE of pooled trunk features, the released weight, an augmented teacher view
    "mclfir_released": ("mclfir", ["loss.kd_type=feature", "loss.kd_weight=0.0001", "data.teacher_view=perspective"]),
    "lwf": ("lwf", []),
    "finetune": ("finetune", []),
    "frozen": ("frozen", []),
    # a retraining is long: validation every 30 steps, stopped after 3 evaluations without a better one
    # (its search starts at the middle of the encoder scales the audit asked for, {0, 0.05, 0.1, 0.2})
    "static_joint": ("static_joint", ["eval.every_steps=30", "train.patience=3", "optim.first_encoder_lr_scale=0.1"]),
}
METHODS = list(VARIANTS)
DEFAULT_METHODS = [m for m in METHODS if m != "finetune"]   # finetune (the lower bound) would not fit the budget
LABELS = {"mclfir_released": "mclfir (released loss)"}
# knob -> its ladder of values, searched as choices by `mclfir tune` (the config's value, or START's, first)
LR = ("optim.lr", [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
ENCODER = ("optim.encoder_lr_scale", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
FIRST_ENCODER = ("optim.first_encoder_lr_scale", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
KD = ("loss.kd_weight", [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
DECAY = ("teacher.decay", [0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999])
KNOBS = {"mclfir": [LR, ENCODER, KD, DECAY], "mclfir_released": [LR, ENCODER, DECAY], "lwf": [LR, ENCODER, KD],
         "finetune": [LR, ENCODER], "frozen": [LR], "static_joint": [LR, FIRST_ENCODER]}
# Where each method's search starts: the values an earlier validation search (4 trials per method, same task,
# same split, seed 0) chose; a knob not named starts at the config's value. --start config ignores these.
START = {"mclfir": {"optim.lr": 1e-3, "optim.encoder_lr_scale": 0.2, "loss.kd_weight": 10.0, "teacher.decay": 0.98},
         "mclfir_released": {"optim.lr": 1e-3, "optim.encoder_lr_scale": 0.1, "teacher.decay": 0.99},
         "lwf": {"optim.lr": 1e-3, "optim.encoder_lr_scale": 0.1, "loss.kd_weight": 3.0},
         "frozen": {"optim.lr": 2e-3},
         "static_joint": {"optim.lr": 5e-4, "optim.first_encoder_lr_scale": 0.1}}


def usage_error(message: str):
    """A wrong order of phases or an empty folder: one line, exit 2 (a failed run exits 1)."""
    runner.usage_error("fpi_seeds", message)


def label(method: str) -> str:
    return LABELS.get(method, method)


def run_train(config: Path, out: Path, overrides, log: Path) -> dict:
    return runner.run_train(config, out, overrides, log, prog="fpi_seeds")


# ---------------------------------------------------------------- tuning

def tune_methods(args, data) -> list:
    """Each method's `mclfir tune` study: its ladders as choices, trial 0 at START's values (--start earlier) or
    the config's, every increment of the task on validation, seed 0 (static_joint: its final retraining)."""
    out = []
    for method in args.methods:
        train_method, settings = VARIANTS[method]
        start = [f"{k}={v}" for k, v in START.get(method, {}).items()] if args.start == "earlier" else []
        extra = ["train.static_final_only=true"] if method == "static_joint" else []
        out.append(tuning.MethodTune(method, {k: {"choices": ladder} for k, ladder in KNOBS[method]},
                                     [*data, f"train.method={train_method}", *settings, *start, "eval.split=val",
                                      "train.seed=0", "eval.frozen_baseline=false", "eval.grid_queries=0", *extra]))
    return out


def tune(args, data) -> dict:
    """The same `mclfir tune` study for every method (study/tuning.py), round robin to --trials each."""
    print(f"== tune: {args.trials} trials per method (mclfir tune); validation split, seed 0, every increment",
          flush=True)
    tdir = args.runs / "tune_optuna"
    task = "every increment of the task (static_joint: its final retraining over all attributes)"
    record = tuning.run(args.config, tune_methods(args, data), args.trials, tdir, "fpi_seeds", "fpi48",
                        lambda rec: tuning.write(args.out, rec, tdir, "fpi48", task))
    return {m: r["chosen"] for m, r in record["methods"].items()}


def seeds(args, data, chosen: dict) -> None:
    print(f"== seeds {args.seeds}, test split, query draw = seed", flush=True)
    sdir = args.runs / "seeds"
    sdir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            train_method, settings = VARIANTS[method]
            extra = []
            if method == "static_joint" and seed != args.seeds[0]:
                extra = ["train.static_final_only=true"]
            run_train(args.config, sdir / f"{method}_s{seed}",
                      data + [f"train.method={train_method}", *settings, f"train.seed={seed}",
                              f"eval.query_draw={seed}", "eval.split=test", "eval.grid_queries=0", *extra,
                              *(f"{k}={v}" for k, v in chosen[method].items())],
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


def claim(runs, final, a: str, b: str) -> str:
    w = compare(runs, a, b)
    words = {"above": f"above {label(b)}", "below": f"below {label(b)}",
             "not distinguishable": f"not distinguishable from {label(b)}"}
    return (f"- **{label(a)} is {words[w.verdict()]}** (Welch's t-test over seeds, two-sided {p_text(w.p)}, "
            f"df = {w.df:.1f}): {fmt(final[a])} vs {fmt(final[b])}, {100 * w.difference:+.2f} points.")


def static_lines(runs) -> list:
    """How far the static retrainings ran: steps allowed, run and kept, per retraining (mean over seeds)."""
    static = runs.get("static_joint", {})
    rows = {}
    for r in static.values():
        for c in r["cost"]:
            if c.get("estimated") or not c.get("selection"):
                continue
            sel = c["selection"]
            rows.setdefault(c["increment"], []).append(
                (c["steps"], sel.get("kept_step"), sel.get("stopped_early_at"), c["train_seconds"]))
    if not rows:
        return []
    lines = ["Static retrainings (static_joint; each may run twice the steps it is charged and stops at its "
             "validation plateau, train.patience; the kept model is the best on validation):", "",
             "| retraining | runs | steps run (mean) | kept step (mean) | stopped early | train s (mean) |",
             "|---|---|---|---|---|---|"]
    for inc, vals in sorted(rows.items()):
        kept = [v[1] for v in vals if v[1] is not None]
        lines.append(f"| {inc} | {len(vals)} | {np.mean([v[0] for v in vals]):.0f} | "
                     f"{np.mean(kept) if kept else float('nan'):.0f} | {sum(v[2] is not None for v in vals)} of "
                     f"{len(vals)} | {np.mean([v[3] for v in vals]):.0f} |")
    return lines + [""]


def load_tuning(out: Path) -> dict:
    """tuning.json's record ({} when there is none): mclfir tune's, or the compass search's of the committed
    48 px study (its knob verdicts stored with it)."""
    path = out / "tuning.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tuning_lines(out: Path) -> list:
    record = load_tuning(out)
    if not record.get("methods"):
        return []
    counts = sorted({len(r["trials"]) for r in record["methods"].values()})
    where = "tune/METHOD/REPORT.md says whether each value is interior" if record.get("tuner") else \
        "a compass search; per value: interior or not; bracketed or not"
    lines = [f"Chosen on validation (trials per method: {'/'.join(map(str, counts))}; TUNING.md lists every "
             f"trial; {where}):", ""]
    for method, r in record["methods"].items():
        verdict = (lambda k: "") if record.get("tuner") else \
            (lambda k, r=r: f" ({r['interior'][k]}; {r['bracketed'][k]})")
        lines.append(f"- {label(method)}: " + ", ".join(f"{k}={v:g}{verdict(k)}" for k, v in r["chosen"].items())
                     + f"; val {100 * r['chosen_val_map']:.2f}")
    return lines + [""]


def budget_line(args) -> str:
    walls = [json.loads(p.read_text()) for p in args.runs.glob("*/*/wall_seconds.json")]
    if not walls:
        return ""
    tune_s = sum(json.loads(p.read_text()) for p in args.runs.glob("tune/*/wall_seconds.json"))   # compass runs
    return (f"Wall time of every run (one at a time, this machine): {sum(walls) / 60:.0f} min "
            f"(tuning {tune_s / 60:.0f}, seeds {(sum(walls) - tune_s) / 60:.0f}); the budget is 150 min.")


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
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
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
        usage_error(f"no complete runs under {sdir}: run the seeds phase first")
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    written = {f"{method}_s{seed}.json" for method, by_seed in runs.items() for seed in by_seed}
    for old in (args.out / "runs").glob("*_s*.json"):
        if old.name not in written:
            old.unlink()   # from an earlier study: every file here is one row of this report
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
        name = "static_joint (static-final)" if m == "static_joint" else label(m)
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
        difference = final["mclfir"][0] - final["static_joint"][0]
        both = min(len(runs["mclfir"]), len(runs["static_joint"])) > 1
        sentences.append(
            f"- **Within 1 point of tuned static_joint: {'holds' if difference >= -0.01 else 'does not hold'}.** "
            f"MCL-FIR {fmt(final['mclfir'])} vs static_joint {fmt(final['static_joint'])}: {100 * difference:+.2f} "
            f"points" + (f" (Welch {p_text(compare(runs, 'mclfir', 'static_joint').p)})." if both else "."))
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
        sentences += [claim(runs, final, "mclfir", other) for other in METHODS[1:]
                      if other in runs and len(runs[other]) > 1 and len(runs["mclfir"]) > 1]
    if all(len(runs.get(m, {})) > 1 for m in ("static_joint", "frozen")):
        sentences.append(claim(runs, final, "static_joint", "frozen"))
    _plots(args.out, runs, final, forget, train_s, static_cum)
    leakage = leakage_lines(runs)
    text = "\n".join([
        "# Real-photo comparison over several seeds (2-core CPU)", "",
        f"Config `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`; "
        f"seeds {args.seeds}; each method with the values its validation search chose (TUNING.md). Test split; "
        "seed N also redraws which test images are queries. mean ± sample std over seeds, in mAP points. "
        "Training seconds are measured on this machine, one run at a time; static-cumulative is the first "
        "seed's static_joint run, which ran every retraining.",
        "", table, "", *tuning_lines(args.out), *static_lines(runs), *leakage,
        "Targets (the paper's claim), then each comparison by Welch's t-test over the seeds at the 5% level: "
        "\"above\" or \"below\" only where the test says so, otherwise \"not distinguishable\". The spread covers "
        "the training seed and the query draw (one split):", "", *sentences, "", budget_line(args), "",
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
        ax.bar([label(m) for m in methods], [100 * what[m][0] for m in methods], yerr=[100 * what[m][1] for m in methods], capsize=4,
               color=["tab:red" if m.startswith("mclfir") else "tab:gray" for m in methods])
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
                    yerr=100 * final[m][1], fmt="o", capsize=4, label="static-final" if m == "static_joint" else label(m))
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
    ap = runner.Parser(prog="fpi_seeds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/fpi_seeds_cpu.yaml")
    ap.add_argument("--csv", help="CSV of photos with the config's columns (default: the config's)")
    ap.add_argument("--image-root", help="folder the CSV's file names are relative to")
    ap.add_argument("--shards", type=Path, help="shard folder (built from --csv when given, or when missing)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/fpi_seeds", help="where the runs go")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/fpi_seeds", help="where the report goes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--trials", type=int, default=9, help="validation trials per method (mclfir tune; the same "
                                                           "sampler, seed and count for every method)")
    ap.add_argument("--start", choices=["earlier", "config"], default="earlier",
                    help="each study's trial 0: an earlier search's choices (START) or the config's values")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument("--phase", choices=["all", "tune", "seeds", "report"], default="all")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = ap.parse_args()
    # the runs start in the repository root: a relative folder must mean the caller's, not the repository's
    args.runs, args.out, args.config = args.runs.resolve(), args.out.resolve(), args.config.resolve()
    data = list(args.overrides)
    if args.csv:
        if not args.shards:
            ap.error("--csv needs --shards (a new folder for the shards built from it)")
        data += [f"data.build.csv.csv={Path(args.csv).resolve()}",
                 f"data.build.csv.image_root={Path(args.image_root or Path(args.csv).parent).resolve()}"]
    if args.shards:
        data.append(f"data.shards={args.shards.resolve()}")
    for flag, path, exists, noun in (("--csv", args.csv, Path.is_file, "file"),
                                     ("--image-root", args.image_root, Path.is_dir, "folder")):
        if path and not exists(Path(path)):
            usage_error(f"{flag} {path}: no such {noun}")
    if args.trials < 1:
        usage_error(f"--trials must be at least 1, got {args.trials}")
    from mclfir_dist.configure import load_config
    from mclfir_dist.errors import ConfigError
    try:   # a wrong key or value is named here, before any run or folder is made
        load_config(args.config, data)
    except ConfigError as e:
        usage_error(str(e))
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    t0 = time.time()
    chosen_path = args.out / "tuning.json"
    if args.phase in ("all", "tune"):
        chosen = tune(args, data)
    else:
        record = load_tuning(args.out)
        chosen = {m: r["chosen"] for m, r in record.get("methods", {}).items()}
    if args.phase in ("all", "seeds"):
        missing = [m for m in args.methods if m not in chosen]
        if missing:
            usage_error(f"no tuned values for {missing}: run --phase tune first ({chosen_path})")
        seeds(args, data, chosen)
    if args.phase in ("all", "report"):
        report(args)
    print(f"== done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:   # Ctrl-C reaches the run in flight too; runs are resumed by name, whole
        print("fpi_seeds: interrupted; finished runs are kept and the one in flight starts over: run the same "
              "command again to go on",
              file=sys.stderr)
        raise SystemExit(130)
