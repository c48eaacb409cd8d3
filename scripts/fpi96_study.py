"""The 96 px real-photo study: does MCL-FIR pay where the encoder must adapt? Resumable phases:

    python scripts/fpi96_study.py --phase gate [--seeds 0 1 2] [--runs runs/fpi96] [--out docs/results/fpi96]

    python scripts/fpi96_study.py --phase tune [--trials 8]

gate  Before any study, on the validation split, paired over seeds (train.seed = eval.query_draw = seed):
      static_joint retrained once on all six attributes (static_final_only: 6 x 100 steps, one attribute per
      batch, so 100 updates per head) with a trainable encoder (the paper's static) against the same
      retraining with a frozen encoder (optim.first_encoder_lr_scale=0) at two lrs, the better one by its
      mean kept; and finetune's average forgetting over the six increments. It passes when the trainable
      encoder is ahead by at least GATE_POINTS on average and finetune forgets at least FORGET_POINTS.
      Writes OUT/GATE.md and a copy of every run's results.json, whether it passes or not.

tune  Every method (METHODS) gets the same number of validation trials (--trials) of a compass search over its
      own knobs (KNOBS: the lr, the first-increment and the later encoder lr scale for all that train the
      encoder; the KD weight for mclfir and lwf; the teacher decay for mclfir), seed 0, on the first
      TUNE_INCREMENTS increments (every method alike). Trials go round the methods, so a stop leaves equal
      counts. Every trial and whether each chosen value is interior go to OUT/tuning.json and OUT/TUNING.md.

Runs whose results.json is complete with the same settings are kept, so the script can be stopped (Ctrl-C)
and started again. Misuse (a wrong config key, a missing CSV) is one line and exit 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mclfir_dist.evaluation.stats import p_text, paired
from mclfir_dist.study import runner, search
from mclfir_dist.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
PROG = "fpi96_study"
GATE_POINTS = 1.5     # trainable over frozen static, equal updates per head (validation mAP points)
FORGET_POINTS = 2.0   # finetune's average forgetting
FROZEN_LRS = (5e-4, 1e-3)
STATIC = ["train.method=static_joint", "train.static_final_only=true"]
GATE_RUNS = {   # name -> overrides (the seed's are added per run)
    "static_train": STATIC,
    **{f"static_frozen_lr{lr:g}": [*STATIC, "optim.first_encoder_lr_scale=0", f"optim.lr={lr}"] for lr in FROZEN_LRS},
    "finetune": ["train.method=finetune"],
}


# the study's rows: name -> the settings that define it (static: one retraining on every attribute seen)
METHODS = {
    "mclfir": ["train.method=mclfir"],
    "lwf": ["train.method=lwf"],
    "finetune": ["train.method=finetune"],
    "static_train": ["train.method=static_joint"],                                      # the paper's static
    "static_frozen": ["train.method=static_joint", "optim.first_encoder_lr_scale=0"],  # the cheapest strong one
}
LR = ("optim.lr", [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
FIRST = ("optim.first_encoder_lr_scale", [0.05, 0.1, 0.2, 0.4, 0.8, 1.0])
LATER = ("optim.encoder_lr_scale", [0.025, 0.05, 0.1, 0.2, 0.4, 0.8])
KD = ("loss.kd_weight", [0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
DECAY = ("teacher.decay", [0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999])
KNOBS = {"mclfir": [LR, FIRST, LATER, KD, DECAY], "lwf": [LR, FIRST, LATER, KD], "finetune": [LR, FIRST, LATER],
         "static_train": [LR, FIRST], "static_frozen": [LR]}
TUNE_INCREMENTS = 3   # the cost ratio needs 6 increments, tuning does not (the issue: the first 3, for all alike)


def seed_overrides(seed: int) -> list:
    return [f"train.seed={seed}", f"eval.query_draw={seed}", "eval.split=val", "eval.grid_queries=0"]


def gate_runs(args) -> dict:
    """{(name, seed): results} of every gate run, running what is missing (seed by seed, so a stop keeps
    whole seeds)."""
    out = {}
    (args.runs / "gate").mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for name, overrides in GATE_RUNS.items():
            run = args.runs / "gate" / f"{name}_s{seed}"
            out[name, seed] = runner.run_train(args.config, run, [*overrides, *seed_overrides(seed), *args.set],
                                               args.runs / "gate" / f"{name}_s{seed}.log", prog=PROG)
    return out


def final_map(res: dict) -> float:
    return 100 * res["final"]["average_map"]


def forgetting(res: dict) -> float:
    return 100 * res["metrics"][-1]["average_forgetting"]


def train_seconds(res: dict) -> float:
    return sum(c["train_seconds"] for c in res["cost"] if not c.get("estimated"))


def gate_verdict(runs: dict, seeds) -> dict:
    """The gate's numbers: the frozen lr kept, the paired difference, finetune's forgetting, pass or not."""
    frozen_by_lr = {lr: [final_map(runs[f"static_frozen_lr{lr:g}", s]) for s in seeds] for lr in FROZEN_LRS}
    best_lr = max(FROZEN_LRS, key=lambda lr: sum(frozen_by_lr[lr]))
    trained = [final_map(runs["static_train", s]) for s in seeds]
    diff = paired(trained, frozen_by_lr[best_lr])
    forget = [forgetting(runs["finetune", s]) for s in seeds]
    mean_forget = sum(forget) / len(forget)
    return {"best_frozen_lr": best_lr, "frozen_by_lr": frozen_by_lr, "trained": trained, "difference": diff,
            "forgetting": forget, "mean_forgetting": mean_forget,
            "encoder_matters": diff.mean >= GATE_POINTS, "finetune_forgets": mean_forget >= FORGET_POINTS,
            "passes": diff.mean >= GATE_POINTS and mean_forget >= FORGET_POINTS}


def gate_report(runs: dict, seeds, config: Path) -> str:
    v = gate_verdict(runs, seeds)
    d, machine = v["difference"], runs["static_train", seeds[0]]["machine"]
    word = lambda ok: "**holds**" if ok else "**fails**"
    lines = ["# GATE: can the encoder's adaptation show at this size?", "",
             f"**The gate {'passes' if v['passes'] else 'fails'}.** `{config}` (EfficientNet-Lite0, pretrained, "
             "96 px, 6 increments x 100 steps of 32 doublets, stochastic depth off for all), validation split, "
             f"seeds {', '.join(map(str, seeds))} (each seed also draws the queries), paired by seed.", "",
             f"1. Static retraining with a trainable encoder beats it with a frozen encoder by at least "
             f"{GATE_POINTS} points at equal updates per head (both: one retraining on all six attributes, "
             f"600 steps, one attribute per batch, 100 updates per head): {word(v['encoder_matters'])}. "
             f"Trainable - frozen = {d.interval_text(1.0)} points (mean [95% interval], paired t {p_text(d.p)}, "
             f"d_z {d.d_z:.2f}); the frozen encoder at lr {v['best_frozen_lr']:g}, the better of "
             f"{', '.join(f'{lr:g}' for lr in FROZEN_LRS)} by its mean.",
             f"2. Finetune forgets at least {FORGET_POINTS} points (average forgetting after six increments): "
             f"{word(v['finetune_forgets'])}: {v['mean_forgetting']:.2f} points on average "
             f"({', '.join(f'{f:.2f}' for f in v['forgetting'])}).", "",
             "| seed | static, trainable encoder | " + " | ".join(f"static, frozen, lr {lr:g}" for lr in FROZEN_LRS)
             + " | trainable - frozen (kept lr) | finetune final | finetune forgetting |",
             "|---|---|" + "---|" * len(FROZEN_LRS) + "---|---|---|"]
    for i, s in enumerate(seeds):
        lines.append(f"| {s} | {v['trained'][i]:.2f} | " + " | ".join(f"{v['frozen_by_lr'][lr][i]:.2f}"
                     for lr in FROZEN_LRS) + f" | {d.differences[i]:+.2f} | {final_map(runs['finetune', s]):.2f} | "
                     f"{v['forgetting'][i]:.2f} |")
    lines += ["", "Training seconds per run (seed order): " + "; ".join(
        f"{name} " + " / ".join(f"{train_seconds(runs[name, s]):.0f}" for s in seeds) for name in GATE_RUNS) + ".",
        "", f"Machine: {machine.get('cpu_model', machine['cpu'])}, {machine['cpu_count']} cores, torch "
        f"{machine['torch']}, precision {runs['static_train', seeds[0]].get('mixed_precision')} "
        f"({runs['static_train', seeds[0]].get('precision_reason', '')}), channels_last "
        f"{runs['static_train', seeds[0]].get('channels_last')}. Every number comes from a results.json in "
        "`gate_runs/`. Reproduce: `python scripts/fpi96_study.py --phase gate`.", ""]
    return "\n".join(lines)


def write_gate(args, runs: dict) -> str:
    text = gate_report(runs, args.seeds, args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT)
                       else args.config)
    (args.out / "gate_runs").mkdir(parents=True, exist_ok=True)
    for (name, seed) in runs:
        shutil.copyfile(args.runs / "gate" / f"{name}_s{seed}" / "results.json",
                        args.out / "gate_runs" / f"{name}_s{seed}.json")
    atomic_write_text(args.out / "GATE.md", text)
    return text


# ---------------------------------------------------------------- tune

def tune_overrides(config: Path, extra) -> list:
    """The first TUNE_INCREMENTS increments of the config, on validation, seed 0."""
    from mclfir_dist.configure import load_config
    incs = load_config(config, list(extra)).train.increments[:TUNE_INCREMENTS]
    listed = ", ".join(f"{{name: {i.name}, attributes: [{', '.join(i.attributes)}]}}" for i in incs)
    return [f"train.increments=[{listed}]", *seed_overrides(0)]


def start_point(config: Path, method: str, extra) -> dict:
    """The config's value of each of the method's knobs (after its own settings), snapped to the knob's ladder."""
    import math
    from mclfir_dist.configure import load_config
    cfg = load_config(config, [*METHODS[method], *extra])
    point = {}
    for key, ladder in KNOBS[method]:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        point[key] = min(ladder, key=lambda v: abs(math.log(v) - math.log(max(value, 1e-9))))
    return point


def tune(args) -> dict:
    """Round-robin trials until every method has args.trials (or has tried every one-knob move); the record."""
    tdir = args.runs / "tune"
    tdir.mkdir(parents=True, exist_ok=True)
    base = tune_overrides(args.config, args.set)
    record = {"trials_per_method": args.trials, "increments": TUNE_INCREMENTS, "methods": {}}
    trials = {m: [] for m in args.methods}
    starts = {m: start_point(args.config, m, args.set) for m in args.methods}
    for _ in range(args.trials):
        for method in args.methods:
            point = search.next_trial(KNOBS[method], starts[method], trials[method])
            if point is None:
                continue
            name = f"{method}_t{len(trials[method]):02d}"
            overrides = [*METHODS[method], *base, *(f"{k}={v}" for k, v in point.items()), *args.set]
            if method.startswith("static"):
                overrides.append("train.static_final_only=true")
            res = runner.run_train(args.config, tdir / name, overrides, tdir / f"{name}.log", prog=PROG)
            trials[method].append({"run": name, "point": point, "score": res["final"]["average_map"],
                                   "seconds": res["wall_seconds"], "train_seconds": train_seconds(res)})
            record["methods"][method] = tuning_entry(method, starts[method], trials[method])
            write_tuning(args.out, record)
    return record


def tuning_entry(method: str, start: dict, trials: list) -> dict:
    best = max(trials, key=lambda t: t["score"])
    knobs = KNOBS[method]
    return {"start": start, "trials": trials, "chosen": best["point"], "chosen_val_map": best["score"],
            "settled": search.settled(knobs, trials), "interior": search.interior(knobs, trials),
            "bracketed": search.bracketed(knobs, trials)}


def write_tuning(out: Path, record: dict) -> None:
    import json
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tuning.json", json.dumps(record, indent=1))
    lines = ["# Validation search (the same number of trials for every method)", "",
             f"Up to {record['trials_per_method']} trials per method, validation split, seed 0, the first "
             f"{record['increments']} increments (static: one retraining over them). A compass search over each "
             "method's own knobs from the config's values (scripts/fpi96_study.py KNOBS); validation average mAP "
             "per trial, the chosen one in bold. A chosen value is interior when both its neighbours on the "
             "knob's ladder were tried with the other knobs at their chosen values.", ""]
    for method, r in record["methods"].items():
        keys = list(r["chosen"])
        lines += [f"## {method}", "", "| trial | " + " | ".join(keys) + " | val avg mAP | train s |",
                  "|---|" + "---|" * (len(keys) + 2)]
        for t in r["trials"]:
            bold = "**" if t["point"] == r["chosen"] else ""
            lines.append(f"| {t['run']} | " + " | ".join(f"{t['point'][k]:g}" for k in keys)
                         + f" | {bold}{100 * t['score']:.2f}{bold} | {t['train_seconds']:.0f} |")
        lines += ["", "Chosen: " + ", ".join(f"{k}={v:g} ({r['interior'][k]})" for k, v in r["chosen"].items()), ""]
    atomic_write_text(out / "TUNING.md", "\n".join(lines))


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    ap = runner.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["gate", "tune"], required=True)
    ap.add_argument("--trials", type=int, default=8, help="tune: validation trials per method")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--config", type=Path, default=ROOT / "configs/fpi96_cpu.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/fpi96")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/fpi96")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    args = ap.parse_args(argv)
    args.runs, args.out, args.config = (Path.cwd() / p if not p.is_absolute() else p
                                        for p in (args.runs, args.out, args.config))
    if args.trials < 1:
        runner.usage_error(PROG, f"--trials must be at least 1, got {args.trials}")
    if len(args.seeds) < 2:
        runner.usage_error(PROG, f"--seeds: the paired test needs at least 2 seeds, got {len(args.seeds)}")
    if not args.config.is_file():
        runner.usage_error(PROG, f"--config {args.config}: no such file")
    from mclfir_dist.config import ConfigError
    from mclfir_dist.configure import load_config
    try:
        load_config(args.config, list(args.set))
    except ConfigError as e:
        runner.usage_error(PROG, str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.phase == "gate":
            print(write_gate(args, gate_runs(args)))
        else:
            record = tune(args)
            print("\n".join(f"{m}: {r['chosen']} val {100 * r['chosen_val_map']:.2f}"
                            for m, r in record["methods"].items()))
    except KeyboardInterrupt:
        print(f"{PROG}: stopped; finished runs are kept under {args.runs}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
