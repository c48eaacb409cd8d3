"""The 96 px real-photo study: does MCL-FIR pay where the encoder must adapt? Resumable phases:

    python scripts/fpi96_study.py --phase gate [--seeds 0 1 2] [--runs runs/fpi96] [--out docs/results/fpi96]

    python scripts/fpi96_study.py --phase gate --probe static_train_lr0.0005 static_frozen_lr0.001 --set ...
    python scripts/fpi96_study.py --phase tune [--trials 8]

gate  Before any study, on the validation split, paired over seeds (train.seed = eval.query_draw = seed):
      static_joint retrained once on all six attributes (static_final_only: 6 x 100 steps, one attribute per
      batch, so 100 updates per head) with a trainable encoder (the paper's static) against the same
      retraining with a frozen encoder (optim.first_encoder_lr_scale=0), each at two lrs on the first seed
      and at its better one on the other seeds; and finetune's average forgetting over the six increments. It passes when the trainable
      encoder is ahead by at least GATE_POINTS on average and finetune forgets at least FORGET_POINTS.
      Writes OUT/GATE.md and a copy of every run's results.json, whether it passes or not.

tune  Every method (METHODS) gets its own `mclfir tune` study with the same sampler, seed and trial count
      (--trials; mclfir_dist/study/tuning.py: trial 0 the config's point, then TPE, median pruning) over its own
      knobs (KNOBS: the lr, the first-increment and the later encoder lr scale for all that train the encoder;
      the KD weight for mclfir and lwf; the teacher decay for mclfir), seed 0, on the first TUNE_INCREMENTS
      increments (every method alike). Trials go round the methods, so a stop leaves equal counts. The
      record: OUT/tuning.json, OUT/TUNING.md and OUT/tune/METHOD/REPORT.md with Optuna's plots.

pruning  Every trial the tune phase pruned, run again to its end as a plain run with the same settings: the
      seconds pruning saved and whether a pruned trial would have beaten the chosen one (OUT/PRUNING.md).

seeds, budget, orders, noise, sensitivity  The test-split runs (docs/evaluation.md, "The 96 px study");
      sensitivity: static retrained at the config's own values, not the search's.

cost  MCL-FIR's and static's seconds per step measured side by side (mclfir_dist/bench/cost.py), for the cost
      claim's steps x seconds-per-step measure (OUT/cost_side_by_side.json). Run it with nothing else running.

`--phase all` runs gate, tune, pruning, seeds, budget, orders, noise, sensitivity, cost and report in order, one command
for the whole study. Each test-split run's results are copied to OUT/runs/PHASE/NAME.json as it ends; a run whose
results (run folder or copy) are complete with the same settings is kept, so the script can be stopped (Ctrl-C)
and started again, in a fresh checkout too. Misuse (a wrong config key, a missing CSV) is one line and exit 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mclfir_dist.evaluation.stats import holm, p_text, paired, tost_paired
from mclfir_dist.study import runner, tuning
from mclfir_dist.utils.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
PROG = "fpi96_study"
GATE_POINTS = 1.5     # trainable over frozen static, equal updates per head (validation mAP points)
FORGET_POINTS = 2.0   # finetune's average forgetting
GATE_LRS = (5e-4, 1e-3)   # each static variant's lr: both on the first seed, the better one on the others
STATIC = ["train.method=static_joint", "train.static_final_only=true"]
GATE_RUNS = {   # name -> overrides (the seed's are added per run)
    **{f"static_train_lr{lr:g}": [*STATIC, f"optim.lr={lr}"] for lr in GATE_LRS},
    **{f"static_frozen_lr{lr:g}": [*STATIC, "optim.first_encoder_lr_scale=0", f"optim.lr={lr}"] for lr in GATE_LRS},
    "finetune": ["train.method=finetune"],
}
VARIANTS = ("static_train", "static_frozen")


# the study's rows: name -> the settings that define it (static: one retraining on every attribute seen)
METHODS = {
    "mclfir": ["train.method=mclfir"],
    "lwf": ["train.method=lwf"],
    "finetune": ["train.method=finetune"],
    "static_train": ["train.method=static_joint"],                                      # the paper's static
    "static_frozen": ["train.method=static_joint", "optim.first_encoder_lr_scale=0"],  # the cheapest strong one
}
# each method's search space (mclfir tune's YAML form): the old ladders' ranges, the decay a ladder of choices
LR = ("optim.lr", {"log": [1.25e-4, 8e-3]})
FIRST = ("optim.first_encoder_lr_scale", {"log": [0.05, 1.0]})
LATER = ("optim.encoder_lr_scale", {"log": [0.025, 0.8]})
KD = ("loss.kd_weight", {"log": [0.3, 100.0]})
DECAY = ("teacher.decay", {"choices": [0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999]})
KNOBS = {"mclfir": [LR, FIRST, LATER, KD, DECAY], "lwf": [LR, FIRST, LATER, KD], "finetune": [LR, FIRST, LATER],
         "static_train": [LR, FIRST], "static_frozen": [LR]}
TUNE_INCREMENTS = 3   # the cost ratio needs 6 increments, tuning does not (the issue: the first 3, for all alike)


def seed_overrides(seed: int, split: str = "val") -> list:
    return [f"train.seed={seed}", f"eval.query_draw={seed}", f"eval.split={split}", "eval.grid_queries=0"]


def gate_runs(args) -> dict:
    """{(name, seed): results} of every gate run, running what is missing (seed by seed, so a stop keeps
    whole seeds). Each static variant's lr is chosen on the first seed (both GATE_LRS run there); the
    other seeds run the chosen one only."""
    out = {}
    (args.runs / "gate").mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        if args.probe:   # a quick look at a regime: these runs on the first seed, no verdict
            chosen = set(args.probe) if seed == args.seeds[0] else set()
        elif seed == args.seeds[0]:
            chosen = set(GATE_RUNS)
        else:
            chosen = {chosen_name(out, v, args.seeds[0]) for v in VARIANTS} | {"finetune"}
        for name, overrides in GATE_RUNS.items():
            if name not in chosen:
                continue
            run = args.runs / "gate" / f"{name}_s{seed}"
            out[name, seed] = runner.run_train(args.config, run, [*overrides, *seed_overrides(seed), *args.set],
                                               args.runs / "gate" / f"{name}_s{seed}.log", prog=PROG)
    return out


def chosen_name(runs: dict, variant: str, first_seed: int) -> str:
    """The run name of `variant` ("static_train" or "static_frozen") whose lr scored best on the first seed."""
    return max((f"{variant}_lr{lr:g}" for lr in GATE_LRS), key=lambda n: final_map(runs[n, first_seed]))


def final_map(res: dict) -> float:
    return 100 * res["final"]["average_map"]


def forgetting(res: dict) -> float:
    return 100 * res["metrics"][-1]["average_forgetting"]


def train_seconds(res: dict) -> float:
    return sum(c["train_seconds"] for c in res["cost"] if not c.get("estimated"))


def gate_verdict(runs: dict, seeds) -> dict:
    """The gate's numbers: each variant's lr (best on the first seed), the paired difference, finetune's
    forgetting, pass or not."""
    kept = {v: chosen_name(runs, v, seeds[0]) for v in VARIANTS}
    by_run = {name: [final_map(runs[name, s]) if (name, s) in runs else None for s in seeds]
              for name in GATE_RUNS if name.startswith(VARIANTS)}
    trained, frozen = by_run[kept["static_train"]], by_run[kept["static_frozen"]]
    diff = paired(trained, frozen)
    forget = [forgetting(runs["finetune", s]) for s in seeds]
    mean_forget = sum(forget) / len(forget)
    return {"kept": kept, "by_run": by_run, "trained": trained, "difference": diff,
            "forgetting": forget, "mean_forgetting": mean_forget,
            "encoder_matters": diff.mean >= GATE_POINTS, "finetune_forgets": mean_forget >= FORGET_POINTS,
            "passes": diff.mean >= GATE_POINTS and mean_forget >= FORGET_POINTS}


def regime(res: dict) -> str:
    """The run's regime in words, from its own config."""
    c = res["config"]
    incs, steps = len(c["train"]["increments"]), c["train"]["steps_per_increment"]
    return (f"{c['model']['trunk']} ({'pretrained' if c['model']['pretrained'] else 'random init'}), "
            f"{c['data']['image_size']} px, {incs} increments x {steps} steps of {c['data']['batch_doublets']} "
            f"doublets, drop_connect {c['model']['drop_connect']}")


def gate_report(runs: dict, seeds, config: Path) -> str:
    v = gate_verdict(runs, seeds)
    d, first = v["difference"], runs[v["kept"]["static_train"], seeds[0]]
    c = first["config"]
    steps, incs = c["train"]["steps_per_increment"], len(c["train"]["increments"])
    word = lambda ok: "**holds**" if ok else "**fails**"
    lr_of = lambda name: name.rsplit("_lr", 1)[1]
    lines = ["# GATE: can the encoder's adaptation show in this regime?", "",
             f"**The gate {'passes' if v['passes'] else 'fails'}.** `{config}`: {regime(first)}; validation split, "
             f"seeds {', '.join(map(str, seeds))} (each seed also draws the queries), paired by seed.", "",
             f"1. Static retraining with a trainable encoder beats it with a frozen encoder by at least "
             f"{GATE_POINTS} points at equal updates per head (both: one retraining on all {incs} attributes, "
             f"{steps * incs} steps, one attribute per batch, {steps} updates per head): "
             f"{word(v['encoder_matters'])}. Trainable - frozen = {d.interval_text(1.0)} points (mean [95% "
             f"interval], paired t {p_text(d.p)}, d_z {d.d_z:.2f}). Each at its better lr of "
             f"{', '.join(f'{lr:g}' for lr in GATE_LRS)} on seed {seeds[0]} (the other seeds ran that lr only): "
             f"trainable {lr_of(v['kept']['static_train'])}, frozen {lr_of(v['kept']['static_frozen'])}.",
             f"   Margin: the mean is {d.mean - GATE_POINTS:+.2f} points from the bar and the interval's lower end "
             f"{d.low:+.2f}, so the stricter reading (the whole 95% interval above {GATE_POINTS}) "
             f"{'holds' if d.low >= GATE_POINTS else 'does not hold'}.",
             f"2. Finetune forgets at least {FORGET_POINTS} points (average forgetting after {incs} increments): "
             f"{word(v['finetune_forgets'])}: {v['mean_forgetting']:.2f} points on average "
             f"({', '.join(f'{f:.2f}' for f in v['forgetting'])}).", "",
             "| seed | " + " | ".join(n.replace("_lr", ", lr ") for n in v["by_run"])
             + " | trainable - frozen (kept lrs) | finetune final | finetune forgetting |",
             "|---|" + "---|" * (len(v["by_run"]) + 3)]
    cell = lambda x: "-" if x is None else f"{x:.2f}"
    for i, s in enumerate(seeds):
        lines.append(f"| {s} | " + " | ".join(cell(values[i]) for values in v["by_run"].values())
                     + f" | {d.differences[i]:+.2f} | {final_map(runs['finetune', s]):.2f} | {v['forgetting'][i]:.2f} |")
    lines += ["", "Training seconds per run (seed order): " + "; ".join(
        f"{name} " + " / ".join(f"{train_seconds(runs[name, s]):.0f}" for s in seeds if (name, s) in runs)
        for name in GATE_RUNS if any((name, s) in runs for s in seeds)) + ".",
        "", f"Machine: {first['machine'].get('cpu_model', first['machine']['cpu'])}, {first['machine']['cpu_count']} "
        f"cores, torch {first['machine']['torch']}, precision {first.get('mixed_precision')} "
        f"({first.get('precision_reason', '')}), channels_last {first.get('channels_last')}. Every number comes "
        "from a results.json in `gate_runs/`. Reproduce: `python scripts/fpi96_study.py --phase gate`.", ""]
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


def tune_methods(args) -> list:
    """Each method's tuning task: its own settings on the first TUNE_INCREMENTS increments, validation, seed 0
    (static: its one retraining, validated every 100 steps so the pruner has a curve)."""
    base = tune_overrides(args.config, args.set)
    static = ["train.static_final_only=true", "eval.every_steps=100"]
    return [tuning.MethodTune(m, dict(KNOBS[m]), [*METHODS[m], *base, *(static if m.startswith("static") else []),
                                                  *args.set]) for m in args.methods]


def tune(args) -> dict:
    """Every method's own `mclfir tune` study (study/tuning.py: the config's point first, TPE, median pruning),
    round the methods until each has args.trials finished."""
    tdir = args.runs / "tune_optuna"
    task = (f"the first {TUNE_INCREMENTS} increments (static: one retraining over them, validated every 100 steps "
            "for the pruner)")
    return tuning.run(args.config, tune_methods(args), args.trials, tdir, PROG, "fpi96",
                      lambda rec: tuning.write(args.out, rec, tdir, "fpi96", task))


def pruning_phase(args, chosen: dict) -> None:
    """Every pruned tune trial run to its end (RUNS/pruning): what pruning saved, and whether it changed a
    choice (OUT/PRUNING.md)."""
    import json
    record = json.loads((args.out / "tuning.json").read_text())
    summary = tuning.run_out_pruned(args.config, tune_methods(args), record, args.runs / "pruning", PROG)
    note = ("Each pruned trial of the tune phase run again to its end, with the same settings, as a plain run; "
            "seconds are each run's wall time on this machine (tune trials and these runs may have shared the "
            "cores with other work: compare the totals, not single runs). The choice compares the chosen trial's "
            "validation mAP with each pruned trial's final one; TPE's later picks would have seen those finals "
            "too, which no rerun can replay.")
    print(tuning.write_pruning(args.out, summary, note))


# ---------------------------------------------------------------- seeds, budget, orders, noise (test split)

ORDERS = {   # the config's order is "default"; two more, each attribute in a new position
    "reversed": ["subCategory", "season", "usage", "gender", "baseColour", "articleType"],
    "shuffled": ["gender", "subCategory", "articleType", "season", "baseColour", "usage"],
}
BUDGETS = (0.25, 0.5, 2.0)   # static_train's final retraining at these multiples of its charged steps (1x: seeds)
NOISE = 0.2                  # data.label_noise of the noise phase
CONTINUAL = ("mclfir", "lwf", "finetune")


def load_chosen(out: Path, methods) -> dict:
    import json
    path, ran_out = out / "tuning.json", out / "pruning.json"   # pruning.json: PRUNING.md's runs to the end
    try:
        record = json.loads(path.read_text()) if path.is_file() else {"methods": {}}
        missing = [m for m in methods if m not in record["methods"]]
        if missing:
            runner.usage_error(PROG, f"no tuned values for {', '.join(missing)} in {path}: run --phase tune first")
        # a pruned trial that ends above the kept one is taken, for every method alike
        chosen = tuning.best_finished(record, json.loads(ran_out.read_text()) if ran_out.is_file() else {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:   # a file cut short or edited by hand
        runner.usage_error(PROG, f"{path} or {ran_out} is not the tune and pruning phases' record "
                                 f"({type(e).__name__}: {e}): run those phases again")
    return {m: chosen[m] for m in methods}


def read_record(path: Path) -> dict:
    """A results.json or its committed copy; one cut short or edited by hand is one line and exit 2."""
    import json
    try:
        res = json.loads(path.read_text())
        if not isinstance(res, dict):
            raise ValueError("not a JSON object")
        return res
    except ValueError as e:
        runner.usage_error(PROG, f"{path}: not a run's results ({e}): delete it to run that run again")


def copy_path(args, phase: str, name: str) -> Path:
    """Where a run's results are committed: run folders stay on the machine that ran them."""
    return args.out / "runs" / phase / f"{name}.json"


def save_copy(args, phase: str, name: str, res: dict) -> None:
    """Commit-ready copy of a run's results (atomic: a copy is whole or absent)."""
    import json
    copy = copy_path(args, phase, name)
    copy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(copy, json.dumps(res, indent=1))


def study_run(args, phase: str, name: str, method: str, chosen: dict, extra) -> dict:
    """One test-split run of `method` with its chosen values, under RUNS/phase/name. Its results (with the
    run's own wall clock) are copied to OUT/runs/phase/name.json as it ends; a complete copy made with the same
    settings counts as done, so a phase resumes in a fresh checkout too."""
    d, copy = args.runs / phase, copy_path(args, phase, name)
    overrides = [*METHODS[method], *(f"{k}={v}" for k, v in chosen[method].items()), *extra, *args.set]
    if copy.is_file() and not (d / name / "results.json").is_file():
        res = read_record(copy)
        if res.get("complete") and runner.same_settings(args.config, overrides, res):
            print(f"  {name}: done before, kept ({copy})", flush=True)
            return res
    d.mkdir(parents=True, exist_ok=True)
    res = runner.run_train(args.config, d / name, overrides, d / f"{name}.log", prog=PROG)
    save_copy(args, phase, name, res)
    return res


def seeds_phase(args, chosen: dict) -> None:
    """Every method, every seed, all six increments. static_train retrains at every increment for the first
    seed (static-cumulative measured end to end) and only at the last for the others (the earlier
    retrainings' cost estimated from its seconds per step, marked so); static_frozen only at the last."""
    for seed in args.seeds:
        for method in args.methods:
            extra = seed_overrides(seed, "test")
            if method == "static_frozen" or (method == "static_train" and seed != args.seeds[0]):
                extra.append("train.static_final_only=true")
            study_run(args, "seeds", f"{method}_s{seed}", method, chosen, extra)


def budget_phase(args, chosen: dict) -> None:
    """static_train's final retraining at BUDGETS x its charged steps: the accuracy-cost curve."""
    for seed in args.seeds:
        for factor in BUDGETS:
            study_run(args, "budget", f"static_train_x{factor:g}_s{seed}", "static_train", chosen,
                      [*seed_overrides(seed, "test"), "train.static_final_only=true",
                       f"train.static_steps_factor={factor}"])


def order_overrides(order) -> str:
    return "train.increments=[" + ", ".join(f"{{name: {a}, attributes: [{a}]}}" for a in order) + "]"


def orders_phase(args, chosen: dict) -> None:
    """The continual methods in two more attribute orders (first seed), and static_train's cumulative cost
    in each (steps x its measured seconds per step: static_final_only)."""
    seed = args.seeds[0]
    for order_name, order in ORDERS.items():
        for method in [m for m in args.methods if m in (*CONTINUAL, "static_train")]:
            extra = [*seed_overrides(seed, "test"), order_overrides(order)]
            if method == "static_train":
                extra.append("train.static_final_only=true")
            study_run(args, "orders", f"{method}_{order_name}_s{seed}", method, chosen, extra)


def noise_phase(args, chosen: dict) -> None:
    """NOISE of every increment's training labels replaced (seeded per seed; evaluation labels clean)."""
    for seed in args.seeds:
        for method in [m for m in args.methods if m in (*CONTINUAL, "static_train")]:
            extra = [*seed_overrides(seed, "test"), f"data.label_noise={NOISE}", f"data.label_noise_seed={seed}"]
            if method == "static_train":
                extra.append("train.static_final_only=true")
            study_run(args, "noise", f"{method}_noisy_s{seed}", method, chosen, extra)


def config_point(out: Path) -> dict:
    """static_train's trial 0 in the tune record: the config's own values (the gate's lr for a trainable
    encoder), which the search ranked below the values the study goes on with."""
    import json
    try:
        return json.loads((out / "tuning.json").read_text())["methods"]["static_train"]["trials"][0]["params"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        runner.usage_error(PROG, f"{out / 'tuning.json'} has no static_train trial 0 ({type(e).__name__}: {e}): "
                                 "run --phase tune first")


def sensitivity_phase(args, chosen: dict) -> None:
    """Does the result rest on static's tuning? static_train's final retraining at the config's own values
    (tuned on 3 increments, the search chose others; the gate ran these on all 6), every seed, test split."""
    values = {"static_train": config_point(args.out)}
    for seed in args.seeds:
        study_run(args, "sensitivity", f"static_train_config_s{seed}", "static_train", values,
                  [*seed_overrides(seed, "test"), "train.static_final_only=true"])


COST_ROUNDS, COST_STEPS = 5, 10   # bench.cost: turns per arm, timed steps per turn


def side_by_side_path(args) -> Path:
    return args.out / "cost_side_by_side.json"


def cost_phase(args, chosen: dict) -> None:
    """MCL-FIR's and static_train's seconds per step measured side by side (bench.cost: each in its own process,
    taking turns), so the cost claim's steps x seconds-per-step measure is not decided by the hour each run ran
    in. MCL-FIR at its first increment (no teacher), its second and its last; static at its first and last."""
    import subprocess
    from mclfir_dist.configure import load_config
    path = side_by_side_path(args)
    if path.is_file():
        print(f"  side by side: done before, kept ({path}); delete it to measure again", flush=True)
        return
    last = len(load_config(args.config, list(args.set)).train.increments) - 1
    path.parent.mkdir(parents=True, exist_ok=True)
    arms = [("mclfir", 0), ("mclfir", 1), ("mclfir", last), ("static_train", 0), ("static_train", last)]
    cmd = [sys.executable, "-m", "mclfir_dist.bench.cost", "--config", str(args.config), "--rounds",
           str(COST_ROUNDS), "--steps", str(COST_STEPS), "--json", str(path), "--out", str(args.runs / "cost"),
           *seed_overrides(args.seeds[0], "test"), *args.set]
    for method, index in arms:
        cmd += ["--arm", method, str(index), *METHODS[method], *(f"{k}={v}" for k, v in chosen[method].items())]
    print(f"  side by side: {', '.join(f'{m}@{i}' for m, i in arms)}, {COST_ROUNDS} rounds of {COST_STEPS} steps",
          flush=True)
    rc = subprocess.run(cmd).returncode
    if rc:   # bench.cost said why; its arms' logs stay
        print(f"{PROG}: bench.cost failed (exit {rc}; logs: {args.runs / 'cost'}); nothing written", file=sys.stderr)
        raise SystemExit(2 if rc == 2 else 1)


# ---------------------------------------------------------------- report

EQUIVALENCE = 1.0   # "comparable": the paired difference's 90% interval inside +-1 point (TOST at 5%)
COST_CLAIM = 0.35   # "about 30%": at most 35% of static-cumulative's training seconds


def collect(args) -> dict:
    """{phase: {run name: results}} of every complete run of the study: the committed copies
    (OUT/runs/phase/name.json), and the run folders under RUNS, which win (with the study's clock)."""
    import json
    found = {}
    for path in sorted((args.out / "runs").glob("*/*.json")):
        res = read_record(path)
        if res.get("complete"):
            found.setdefault(path.parent.name, {})[path.stem] = res
    for path in sorted(args.runs.glob("*/*/results.json")):
        res, wall = read_record(path), path.parent / "wall_seconds.json"
        if res.get("complete") and path.parent.parent.name in PHASES:
            res["wall_seconds"] = json.loads(wall.read_text()) if wall.is_file() else res.get("wall_seconds")
            found.setdefault(path.parent.parent.name, {})[path.parent.name] = res
    return found


def study_cost(args, runs: dict) -> list:
    """What the study cost on this machine: wall minutes per phase (each run's own clock; gate: its committed
    runs; tune: its trials' seconds; pruning: its runs to the end) and the CPU that ran it."""
    import json
    minutes = {"gate": sum(read_record(p).get("wall_seconds") or 0 for p in (args.out / "gate_runs").glob("*.json"))}
    for name, key in (("tuning.json", "tune"), ("pruning.json", "pruning")):
        if (args.out / name).is_file():
            record = json.loads((args.out / name).read_text())
            minutes[key] = (sum(t["seconds"] or 0 for r in record["methods"].values() for t in r["trials"])
                            if key == "tune" else sum(x["full_seconds"] or 0 for r in record.values()
                                                      for x in r["pruned"]))
    for phase, found in runs.items():
        minutes[phase] = sum(r.get("wall_seconds") or 0 for r in found.values())
    minutes = {k: v / 60 for k, v in minutes.items()}
    machines = {cpu_of(r): r["machine"] for found in runs.values() for r in found.values() if r.get("machine")}
    where = "; ".join(f"{m.get('cpu_count', '?')} cores of {cpu} (torch {m.get('torch', '?')})"
                      for cpu, m in sorted(machines.items())) or "?"
    rows = [f"| {phase} | {m:.0f} |" for phase, m in minutes.items()]
    return ["## What the study cost", "", f"Wall minutes of its runs, one at a time, on {where}: each phase's CPU is "
            "in the progress table. Sessions land on different CPUs, whose speeds differ (compare seconds only within "
            "one machine); phases that shared the cores with other work ran slower than alone.", "", "| phase | minutes |",
            "|---|---|", *rows, f"| total | {sum(minutes.values()):.0f} |", ""]


def total_cost(res: dict) -> float:
    """Training seconds of every increment, estimated ones included (static_final_only)."""
    return sum(c["train_seconds"] for c in res["cost"])


def row(claim: str, test: str, effect: str, p=None, kind: str = "difference", sign: float = 0.0,
        verdict: str = "", interval=(0.0, 0.0)) -> dict:
    """One claim's line: kind 'equivalence' (TOST p; its 90% interval, to say on which side it falls out),
    'difference' (paired t p, sign of the effect), or a threshold with its verdict given (no p)."""
    return {"claim": claim, "test": test, "effect": effect, "p": p, "kind": kind, "sign": sign, "verdict": verdict,
            "interval": interval}


def equivalence_row(claim: str, a, b) -> dict:
    """TOST of a - b (paired, points) inside +-EQUIVALENCE."""
    eq = tost_paired(a, b, EQUIVALENCE)
    return row(claim, f"TOST, paired over {len(a)} seeds, margin +-{EQUIVALENCE:g} point",
               f"{eq.mean:+.2f} points, 90% interval [{eq.low:+.2f}, {eq.high:+.2f}]", eq.p, "equivalence",
               interval=(eq.low, eq.high))


def equivalence_word(r: dict, p_holm: float) -> str:
    low, high = r["interval"]
    if p_holm < 0.05:
        return "equivalent"
    if low > EQUIVALENCE or high < -EQUIVALENCE:   # the whole interval past the margin: not comparable, and which way
        return f"not equivalent: {'above' if low > 0 else 'below'}"
    return "not shown equivalent"


def per_step_at(side: dict, method: str, index: int, turn=None) -> float:
    """A method's side-by-side seconds per step at increment `index`: linear between its measured increments,
    held flat past them; `turn`: that round's figure (default: the median over rounds)."""
    pts = sorted((a["increment"], a["per_step"][turn] if turn is not None else a["median"])
                 for a in side.values() if a["name"] == method)
    for (i0, y0), (i1, y1) in zip(pts, pts[1:]):
        if i0 <= index <= i1:
            return y0 + (y1 - y0) * (index - i0) / (i1 - i0)
    return pts[0][1] if index < pts[0][0] else pts[-1][1]


def side_by_side_row(runs: dict, seeds, side: dict) -> list:
    """The cost claim's second measure: each increment's steps (the seeds phase, first seed) x the seconds per
    step measured side by side; a ratio per round (its arms ran minutes apart), the claim holds if every one does."""
    got, seed = runs.get("seeds", {}), seeds[0]
    if not side or f"mclfir_s{seed}" not in got or f"static_train_s{seed}" not in got:
        return []
    n = min(len(a["per_step"]) for a in side.values())

    def seconds(method, turn):
        cost = got[f"{method}_s{seed}"]["cost"]
        return sum(c["steps"] * per_step_at(side, method, i, turn) for i, c in enumerate(cost))
    ratios = [seconds("mclfir", r) / seconds("static_train", r) for r in range(n)]
    med = seconds("mclfir", None) / seconds("static_train", None)
    return [row(f"At most {100 * COST_CLAIM:.0f}% of static-cumulative's training cost (steps x seconds per step)",
                f"each increment's steps x seconds per step measured side by side (bench.cost, {n} rounds)",
                f"{100 * med:.1f}% at the median seconds per step ({100 * min(ratios):.1f}-{100 * max(ratios):.1f}% "
                "over rounds)", kind="threshold", verdict="holds" if max(ratios) <= COST_CLAIM else "does not hold")]


def claim_rows(runs: dict, seeds, side: dict | None = None) -> list:
    """A row for each of the paper's claims the runs can test, and MCL-FIR against each baseline."""
    got = runs.get("seeds", {})
    have = [s for s in seeds if f"mclfir_s{s}" in got and f"static_train_s{s}" in got]
    if len(have) < 2:
        return []
    rows = [equivalence_row("Comparable to static retraining (trainable encoder)",
                            [final_map(got[f"mclfir_s{s}"]) for s in have],
                            [final_map(got[f"static_train_s{s}"]) for s in have])]
    ratios = [total_cost(got[f"mclfir_s{s}"]) / total_cost(got[f"static_train_s{s}"]) for s in have]
    rows.append(row(f"At most {100 * COST_CLAIM:.0f}% of static-cumulative's training cost",
                    f"training seconds per seed (seed {have[0]}: every retraining run; the others' earlier "
                    "retrainings from seconds per step)",
                    f"{100 * min(ratios):.1f}-{100 * max(ratios):.1f}% (mean {100 * sum(ratios) / len(ratios):.1f}%)",
                    kind="threshold", verdict="holds" if max(ratios) <= COST_CLAIM else "does not hold"))
    rows += side_by_side_row(runs, seeds, side or {})
    for other in ("lwf", "finetune", "static_frozen"):
        pairs = [s for s in have if f"{other}_s{s}" in got]
        if len(pairs) >= 2:
            d = paired([final_map(got[f"mclfir_s{s}"]) for s in pairs],
                       [final_map(got[f"{other}_s{s}"]) for s in pairs])
            rows.append(row(f"MCL-FIR against {other}", f"paired t over {d.n} seeds",
                            f"{d.interval_text(1.0)} points (d_z {d.d_z:.2f})", d.p, sign=d.mean))
    return rows + budget_rows(runs, seeds) + noise_rows(runs, seeds) + order_rows(runs, seeds) + \
        sensitivity_rows(runs, seeds)


def sensitivity_rows(runs: dict, seeds) -> list:
    """MCL-FIR against static retrained at the config's own values: does the comparison rest on static's
    tuning? An equivalence test, as the first claim."""
    got, other = runs.get("seeds", {}), runs.get("sensitivity", {})
    ss = [s for s in seeds if f"mclfir_s{s}" in got and f"static_train_config_s{s}" in other]
    if len(ss) < 2:
        return []
    return [equivalence_row("Sensitivity: comparable to static retrained at the config's own values (not the "
                            "search's)", [final_map(got[f"mclfir_s{s}"]) for s in ss],
                            [final_map(other[f"static_train_config_s{s}"]) for s in ss])]


def noise_rows(runs: dict, seeds) -> list:
    """Messy data: each method's drop (clean - noisy, paired by seed); MCL-FIR's drop against static's."""
    clean, noisy = runs.get("seeds", {}), runs.get("noise", {})
    drops = {}
    for m in (*CONTINUAL, "static_train"):
        ss = [s for s in seeds if f"{m}_s{s}" in clean and f"{m}_noisy_s{s}" in noisy]
        drops[m] = {s: final_map(clean[f"{m}_s{s}"]) - final_map(noisy[f"{m}_noisy_s{s}"]) for s in ss}
    both = [s for s in drops["mclfir"] if s in drops["static_train"]]
    if len(both) < 2:
        return []
    d = paired([drops["mclfir"][s] for s in both], [drops["static_train"][s] for s in both])
    text = "; ".join(f"{m} {sum(v.values()) / len(v):.2f}" for m, v in drops.items() if v)
    return [row(f"Messy data ({int(100 * NOISE)}% of training labels wrong): MCL-FIR's drop against static's",
                f"paired t over {d.n} seeds of the drops (clean - noisy)",
                f"{d.interval_text(1.0)} points (mean drops: {text})", d.p, sign=d.mean)]


def order_rows(runs: dict, seeds) -> list:
    """Order: MCL-FIR against finetune over the three orders (first seed), and each method's range."""
    seed, orders = seeds[0], runs.get("orders", {})

    def per_order(m):
        found = [runs.get("seeds", {}).get(f"{m}_s{seed}")] + [orders.get(f"{m}_{o}_s{seed}") for o in ORDERS]
        return [final_map(r) for r in found] if all(found) else None
    mc, ft = per_order("mclfir"), per_order("finetune")
    if not mc or not ft:
        return []
    d = paired(mc, ft)
    spread = "; ".join(f"{m} {min(v):.2f}-{max(v):.2f}" for m in CONTINUAL if (v := per_order(m)))
    return [row("Order: MCL-FIR against finetune when the attribute order changes",
                f"paired t over {len(mc)} orders (seed {seed})",
                f"{d.interval_text(1.0)} points (range over orders: {spread})", d.p, sign=d.mean)]


def interpolate(points, x: float) -> float:
    """y at x on a curve of (x, y) points, linear in log x, held flat past its ends."""
    import math
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return pts[-1][1]


def budget_curve(runs: dict, seed: int, per_step: float | None = None) -> list:
    """static_train's (cost of its final retraining, mAP) at each budget, for one seed. The cost is the run's
    steps x the seconds per step of the seeds phase's retraining (or `per_step`), so the budget runs may run in
    another session (or share the cores) without moving the curve against MCL-FIR's seconds, measured beside
    that run."""
    base = runs.get("seeds", {}).get(f"static_train_s{seed}")
    if base is None:
        return []
    per_step = per_step or base["cost"][-1]["train_seconds"] / base["cost"][-1]["steps"]
    found = [base] + [runs.get("budget", {}).get(f"static_train_x{f:g}_s{seed}") for f in BUDGETS]
    return [(r["cost"][-1]["steps"] * per_step, final_map(r)) for r in found if r is not None]


def budget_rows(runs: dict, seeds) -> list:
    """MCL-FIR against static's accuracy-cost curve at MCL-FIR's own cost, paired by seed."""
    got = runs.get("seeds", {})
    ss = [s for s in seeds if f"mclfir_s{s}" in got and len(budget_curve(runs, s)) == len(BUDGETS) + 1]
    if len(ss) < 2:
        return []
    mc = [final_map(got[f"mclfir_s{s}"]) for s in ss]
    at_cost = [interpolate(budget_curve(runs, s), total_cost(got[f"mclfir_s{s}"])) for s in ss]
    d = paired(mc, at_cost)
    return [row("Accuracy against cost: MCL-FIR against static retraining given MCL-FIR's training seconds",
                f"paired t over {d.n} seeds; static's mAP interpolated (log cost) on its "
                f"{', '.join(f'{f:g}x' for f in sorted((*BUDGETS, 1.0)))} curve", f"{d.interval_text(1.0)} points",
                d.p, sign=d.mean)]


def curve_table(runs: dict, seeds) -> list:
    """Where each method sits against static's accuracy-cost curve: its mAP against the curve's at its own
    training seconds, per seed then averaged (descriptive; MCL-FIR's is tested among the claims)."""
    got = runs.get("seeds", {})
    curves = {s: c for s in seeds if len(c := budget_curve(runs, s)) == len(BUDGETS) + 1}
    lines = ["| method | training s | final mAP | static's curve at that cost | difference |", "|---|---|---|---|---|"]
    for m in [m for m in METHODS if m != "static_train"]:   # static_train is the curve
        rs = {s: got[f"{m}_s{s}"] for s in curves if f"{m}_s{s}" in got}
        if not rs:
            continue
        cost = [total_cost(r) for r in rs.values()]
        at = [interpolate(curves[s], total_cost(r)) for s, r in rs.items()]
        own = [final_map(r) for r in rs.values()]
        lines.append(f"| {m} | {mean_std(cost)} | {mean_std(own)} | {mean_std(at)} | "
                     f"{mean_std([a - b for a, b in zip(own, at)])} |")
    return lines if len(lines) > 2 else []


def side_curve_table(runs: dict, seeds, side: dict) -> list:
    """MCL-FIR against static's curve with both priced at the side-by-side seconds per step: the same cost on
    every seed, so the host's drift between the seeds phase's runs (its step table) drops out."""
    got = runs.get("seeds", {})
    if not side or not {a["name"] for a in side.values()} >= {"mclfir", "static_train"}:
        return []
    lines = ["| seed | mclfir's seconds | static 1x's seconds | mclfir mAP | static's curve at that cost | difference |",
             "|---|---|---|---|---|---|"]
    diffs = []
    for s in [s for s in seeds if f"mclfir_s{s}" in got and f"static_train_s{s}" in got]:
        last = len(got[f"static_train_s{s}"]["cost"]) - 1   # the final retraining: every head
        if len(curve := budget_curve(runs, s, per_step_at(side, "static_train", last))) != len(BUDGETS) + 1:
            continue
        r = got[f"mclfir_s{s}"]
        cost = sum(c["steps"] * per_step_at(side, "mclfir", i) for i, c in enumerate(r["cost"]))
        at = interpolate(curve, cost)
        diffs.append(final_map(r) - at)
        lines.append(f"| {s} | {cost:.0f} | {curve[0][0]:.0f} | {final_map(r):.2f} | {at:.2f} | {diffs[-1]:+.2f} |")
    if not diffs:
        return []
    return lines + [f"| mean | | | | | {mean_std(diffs)} |"]


def orders_table(runs: dict, seeds) -> list:
    """Each order's final mAP per method (first seed), MCL-FIR's margins over lwf and finetune (descriptive: the
    tested claim is the one against finetune) and MCL-FIR's cost against static-cumulative's there."""
    seed = seeds[0]
    lines = ["| order | first attribute | " + " | ".join((*CONTINUAL, "static_train")) +
             " | mclfir - lwf | mclfir - finetune | mclfir / static-cumulative |", "|---|" + "---|" * 8]
    for order in ("default", *ORDERS):
        found = {m: (runs.get("seeds", {}).get(f"{m}_s{seed}") if order == "default"
                     else runs.get("orders", {}).get(f"{m}_{order}_s{seed}")) for m in (*CONTINUAL, "static_train")}
        if not any(found.values()):
            continue
        share = (f"{100 * total_cost(found['mclfir']) / total_cost(found['static_train']):.1f}%"
                 if found["mclfir"] and found["static_train"] else "-")
        if share != "-" and cpu_of(found["mclfir"]) != cpu_of(found["static_train"]):   # seconds of two speeds
            share += f" ({cpu_of(found['mclfir'])} / {cpu_of(found['static_train'])}: not comparable)"
        margins = [f"{final_map(found['mclfir']) - final_map(found[m]):+.2f}"
                   if found["mclfir"] and found[m] else "-" for m in ("lwf", "finetune")]
        lines.append(f"| {order} | {first_attribute(order, found)} | "
                     + " | ".join(f"{final_map(r):.2f}" if r else "-" for r in found.values())
                     + f" | {' | '.join(margins)} | {share} |")
    return lines if len(lines) > 3 else []


def first_attribute(order: str, found: dict) -> str:
    """The attribute an order trains first: it alone shapes the encoder in increment 0."""
    if order in ORDERS:
        return ORDERS[order][0]
    increments = next((r.get("increments") for r in found.values() if r and r.get("increments")), None)
    return increments[0]["name"] if increments else "-"


def noise_table(runs: dict, seeds) -> list:
    """Each method's final mAP clean and with noisy training labels, and the drop, over the seeds both have."""
    clean, noisy = runs.get("seeds", {}), runs.get("noise", {})
    lines = ["| method | seeds | clean | noisy labels | drop |", "|---|---|---|---|---|"]
    for m in (*CONTINUAL, "static_train"):
        ss = [s for s in seeds if f"{m}_s{s}" in clean and f"{m}_noisy_s{s}" in noisy]
        if ss:
            c, n = [final_map(clean[f"{m}_s{s}"]) for s in ss], [final_map(noisy[f"{m}_noisy_s{s}"]) for s in ss]
            lines.append(f"| {m} | {len(ss)} | {mean_std(c)} | {mean_std(n)} | {mean_std([a - b for a, b in zip(c, n)])} |")
    return lines if len(lines) > 2 else []


def step_table(runs: dict, seeds) -> list:
    """Seconds per training step of each seeds-phase run (its measured increments): the host's speed drifts
    within a session, and this shows how much of a cost ratio is the method and how much the hour it ran in."""
    got = runs.get("seeds", {})
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in METHODS:
        cells = []
        for s in seeds:
            measured = [c for c in got[f"{m}_s{s}"]["cost"] if not c.get("estimated")] if f"{m}_s{s}" in got else []
            steps = sum(c.get("steps", 0) for c in measured)
            cells.append(f"{sum(c['train_seconds'] for c in measured) / steps:.3f}" if steps else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def side_table(record: dict) -> list:
    if not record:
        return []
    m = record.get("machine") or {}
    return [f"Measured {record.get('measured_at', '?')} on {m.get('cpu_count', '?')} cores of {cpu_of(record)} (torch "
            f"{m.get('torch', '?')}), {record.get('rounds', '?')} rounds of {record.get('steps', '?')} steps per arm.",
            "", "| method | increment | heads trained | s/step (median) | range over rounds |", "|---|---|---|---|---|",
            *(f"| {a['name']} | {a['increment']} | {len(a['train_heads'])} | {a['median']:.3f} | "
              f"{min(a['per_step']):.3f}-{max(a['per_step']):.3f} |" for a in record["arms"].values())]


def section(title: str, lines: list) -> list:
    return [f"## {title}", "", *lines, ""] if lines else []


def verdicts(rows: list) -> list:
    """(row, Holm-adjusted p or None, verdict word) per row: Holm's correction over every tested p
    (equivalence and differences together)."""
    tested = [i for i, r in enumerate(rows) if r["p"] is not None]
    adjusted = dict(zip(tested, holm([rows[i]["p"] for i in tested])))
    out = []
    for i, r in enumerate(rows):
        ph = adjusted.get(i)
        if r["kind"] == "equivalence":
            word = equivalence_word(r, ph)
        elif r["kind"] == "difference":
            word = "not distinguishable" if ph >= 0.05 else ("above" if r["sign"] > 0 else "below")
        else:
            word = r["verdict"]
        out.append((r, ph, word))
    return out


def claims_table(rows: list) -> list:
    lines = ["| claim | test | effect [interval] | p | p (Holm) | verdict |", "|---|---|---|---|---|---|"]
    for r, ph, word in verdicts(rows):
        lines.append(f"| {r['claim']} | {r['test']} | {r['effect']} | {'-' if r['p'] is None else p_text(r['p'])} "
                     f"| {'-' if ph is None else p_text(ph)} | {word} |")
    return lines


README_START, README_END = "<!-- fpi96 results: scripts/fpi96_study.py --phase report writes this -->", \
    "<!-- /fpi96 results -->"


def write_readme_results(readme: Path, rows: list, seeds, left: dict) -> None:
    """The repository README's 96 px bullet, regenerated from the claims (between its two markers); LEFT:
    {phase: runs still to run}, said so that a partial study reads as one."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        runner.usage_error(PROG, f"{readme}: no '{README_START}' ... '{README_END}' markers to write between")
    claims = "; ".join(f"{r['claim']}: **{word}** ({r['effect']})" for r, _, word in verdicts(rows))
    bullet = (f"- **Real photos at 96 px, where the encoder must adapt** (EfficientNet-Lite0, 6 increments, test "
              f"split, {len(seeds)} seeds paired, every method tuned alike on validation, Holm-corrected; "
              f"`docs/results/fpi96/README.md`): {claims}.")
    todo = [f"{phase} ({n} run{'s' * (n > 1)})" for phase, n in left.items() if n]
    if todo:
        bullet += f" **Still to run: {', '.join(todo)}**; the claims that need them have no verdict yet."
    head, rest = text.split(README_START, 1)
    atomic_write_text(readme, head + README_START + "\n" + bullet + "\n" + README_END + rest.split(README_END, 1)[1])


def mean_std(values) -> str:
    import statistics
    return "-" if not values else (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
                                   if len(values) > 1 else f"{values[0]:.2f}")


def main_table(runs: dict, seeds) -> list:
    """Per method over the seeds: final mAP, forgetting, training seconds and the share of static-cumulative."""
    got = runs.get("seeds", {})
    static = {s: total_cost(got[f"static_train_s{s}"]) for s in seeds if f"static_train_s{s}" in got}
    lines = ["| method | seeds | final avg mAP (test) | avg forgetting | training s | / static-cumulative |",
             "|---|---|---|---|---|---|"]
    for m in METHODS:
        rs = {s: got[f"{m}_s{s}"] for s in seeds if f"{m}_s{s}" in got}
        if not rs:
            continue
        cost = [total_cost(r) for r in rs.values()]
        share = [total_cost(r) / static[s] for s, r in rs.items() if s in static]
        forget = [forgetting(r) for r in rs.values() if not m.startswith("static")]
        lines.append(f"| {m} | {len(rs)} | {mean_std([final_map(r) for r in rs.values()])} | {mean_std(forget)} | "
                     f"{mean_std(cost)} | {mean_std(share) if share else '-'} |")
    return lines


def plot_curve(runs: dict, seeds, path: Path) -> None:
    """static's accuracy-cost curve (mean over seeds) and every method at its own cost."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = [budget_curve(runs, s) for s in seeds]
    curves = [c for c in curves if len(c) == len(BUDGETS) + 1]
    if curves:
        xs = [sum(c[i][0] for c in curves) / len(curves) for i in range(len(curves[0]))]
        ys = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(curves[0]))]
        ax.plot(*zip(*sorted(zip(xs, ys))), "o-", color="grey", label="static_train at 0.25-2x steps")
    got = runs.get("seeds", {})
    for m in METHODS:
        rs = [got[f"{m}_s{s}"] for s in seeds if f"{m}_s{s}" in got]
        if rs:
            ax.plot(sum(total_cost(r) for r in rs) / len(rs), sum(final_map(r) for r in rs) / len(rs), "s", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (squares: every increment; curve: static's final retraining only)")
    ax.set_ylabel("final average mAP (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def planned(args) -> dict:
    """{phase: the run names it makes}, for the progress table."""
    names = {"seeds": [f"{m}_s{s}" for s in args.seeds for m in args.methods],
             "budget": [f"static_train_x{f:g}_s{s}" for s in args.seeds for f in BUDGETS],
             "orders": [f"{m}_{o}_s{args.seeds[0]}" for o in ORDERS for m in args.methods
                        if m in (*CONTINUAL, "static_train")],
             "noise": [f"{m}_noisy_s{s}" for s in args.seeds for m in args.methods if m in (*CONTINUAL, "static_train")],
             "sensitivity": [f"static_train_config_s{s}" for s in args.seeds]}
    return names


def runs_left(args, runs: dict) -> dict:
    """{phase: the planned runs it has not done}."""
    return {phase: [n for n in names if n not in runs.get(phase, {})] for phase, names in planned(args).items()}


def cpu_of(record: dict) -> str:
    m = record.get("machine") or {}
    return m.get("cpu_model") or m.get("cpu") or "-"


def progress(args, runs: dict, side: dict) -> list:
    """Which phases are done (a claim whose runs are missing has no row yet), and on which CPUs they ran: the
    study spans sessions, and sessions land on different machines."""
    lines = ["| phase | runs done | runs left | ran on |", "|---|---|---|---|"]
    for phase, left in runs_left(args, runs).items():
        done = len(planned(args)[phase]) - len(left)
        cpus = ", ".join(sorted({cpu_of(r) for r in runs.get(phase, {}).values()} - {"-"})) or "-"
        lines.append(f"| {phase} | {done} of {len(planned(args)[phase])} | {', '.join(left) or '-'} | {cpus} |")
    return lines + [f"| cost (side by side) | {int(bool(side))} of 1 | {'-' if side else 'the measurement'} | "
                    f"{cpu_of(side) if side else '-'} |"]


def report_phase(args) -> str:
    runs = collect(args)
    if not runs.get("seeds"):
        runner.usage_error(PROG, f"no complete runs under {args.runs / 'seeds'}: run --phase seeds first")
    args.out.mkdir(parents=True, exist_ok=True)
    for phase, found in runs.items():   # every run's results committed beside the report
        for name, res in found.items():
            save_copy(args, phase, name, res)
    plot_curve(runs, args.seeds, args.out / "accuracy_cost.png")
    side_record = read_record(side_by_side_path(args)) if side_by_side_path(args).is_file() else {}
    side = side_record.get("arms", {})
    lines = ["# MCL-FIR where the encoder must adapt: the paper's claims, tested", "",
             f"`{args.config.name}`, test split, seeds {', '.join(map(str, args.seeds))} (each seed also draws the "
             "queries), paired by seed. The regime, its measured cost per run and the budget: REGIME.md; the gate: "
             "GATE.md; the search: TUNING.md and PRUNING.md. Each claim's verdict follows its test; p values are "
             "corrected with Holm's method over every claim tested so far. Every number comes from a results.json "
             "in `runs/PHASE/`. Written by `python scripts/fpi96_study.py --phase report`.", "",
             "## Progress", "", *progress(args, runs, side_record), "", "## The methods (test split)", "",
             *main_table(runs, args.seeds), "", "## The claims", "",
             *claims_table(rows := claim_rows(runs, args.seeds, side)),
             "", "![accuracy against cost](accuracy_cost.png)", "",
             *section("Against static's accuracy-cost curve (training seconds; static: its final retraining at "
                      "0.25x-2x its steps)", curve_table(runs, args.seeds)),
             *section("Against static's curve, both priced at the side-by-side seconds per step (descriptive)",
                      side_curve_table(runs, args.seeds, side)),
             *section("Seconds per training step (the seeds phase, in the order the runs ran: seed by seed)",
                      step_table(runs, args.seeds)),
             *section("Seconds per training step side by side (`--phase cost`: each arm in its own process, the arms "
                      "taking turns; median and range over rounds)", side_table(side_record)),
             *section(f"Attribute orders (seed {args.seeds[0]})", orders_table(runs, args.seeds)),
             *section(f"Noisy labels ({int(100 * NOISE)}% of training labels wrong, evaluation clean)",
                      noise_table(runs, args.seeds)), *study_cost(args, runs)]
    text = "\n".join(lines)
    atomic_write_text(args.out / "README.md", text)
    if rows:
        left = {k: len(v) for k, v in runs_left(args, runs).items()}
        write_readme_results(args.readme, rows, args.seeds, {**left, "cost": int(not side)})
    return text


PHASES = {"pruning": pruning_phase, "seeds": seeds_phase, "budget": budget_phase, "orders": orders_phase,
          "noise": noise_phase, "sensitivity": sensitivity_phase, "cost": cost_phase}


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    ap = runner.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["all", "gate", "tune", *PHASES, "report"], required=True,
                    help="all: every phase in order (each resumes; stops if the gate fails)")
    ap.add_argument("--trials", type=int, default=8, help="tune: validation trials per method")
    ap.add_argument("--probe", nargs="+", choices=list(GATE_RUNS), metavar="RUN",
                    help="gate: only these runs, on the first seed (a regime's first look; no GATE.md)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--config", type=Path, default=ROOT / "configs/fpi96_cpu.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/fpi96")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/fpi96")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md",
                    help="report: the README whose 96 px results bullet is regenerated (between its markers)")
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


def run_all(args) -> int:
    """Every phase in order, each resuming what it finished before; stops after the gate when it fails (a
    regime that cannot show the claim is never studied)."""
    runs = gate_runs(args)
    print(write_gate(args, runs))
    if not gate_verdict(runs, args.seeds)["passes"]:
        print(f"{PROG}: the gate does not pass (GATE.md): no study in this regime", file=sys.stderr)
        return 1
    tune(args)
    for phase in PHASES.values():
        phase(args, load_chosen(args.out, args.methods))
    print(report_phase(args))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.phase == "all":
            return run_all(args)
        if args.phase == "gate" and args.probe:
            runs = gate_runs(args)
            print("\n".join(f"{name} seed {seed}: val {final_map(r):.2f}" for (name, seed), r in runs.items()))
        elif args.phase == "gate":
            print(write_gate(args, gate_runs(args)))
        elif args.phase == "report":
            print(report_phase(args))
        elif args.phase in PHASES:
            PHASES[args.phase](args, load_chosen(args.out, args.methods))
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
