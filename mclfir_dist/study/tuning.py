"""A study's tuning phase on `mclfir tune`: every method its own Optuna study (one SQLite file), the same sampler,
seed and trial count for all, one trial at a time round the methods so that a stop leaves equal counts. Trial 0
of each is the config's own point (after the method's settings); then random trials, then TPE; the median
pruner stops a trial whose validation curve falls below the earlier trials'. The record: tuning.json (each
method's trials and its best complete one, `chosen`), TUNING.md and each study's REPORT.md with its plots."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from ..utils.io import atomic_write_json, atomic_write_text
from . import runner

SAMPLER = ["--sampler", "tpe", "--seed", "0", "--startup-trials", "3", "--start-at-config", "--pruner", "median"]


@dataclass
class MethodTune:
    name: str
    space: Dict[str, dict]   # mclfir tune's YAML form: {key: {log: [lo, hi]} | {choices: [...]}}
    overrides: List[str]     # the method's own settings and the tuning task's (split, seed, increments)


def storage_of(tdir: Path) -> str:
    return f"sqlite:///{tdir / 'study.db'}"


def _shown(path: Path) -> Path:
    """A path as a reader of the committed report can use it: relative to the repository when inside it."""
    return path.relative_to(runner.ROOT) if path.is_relative_to(runner.ROOT) else path


def run(config: Path, methods: List[MethodTune], trials: int, tdir: Path, prog: str, prefix: str, write) -> dict:
    """Round robin until every method has `trials` finished (study PREFIX_METHOD); `write(record)` after every
    round."""
    import yaml
    tdir.mkdir(parents=True, exist_ok=True)
    for k in range(1, trials + 1):
        for m in methods:
            space = tdir / f"{m.name}.space.yaml"
            atomic_write_text(space, yaml.safe_dump(m.space, sort_keys=False))
            cmd = [str(Path(sys.executable).parent / "mclfir"), "tune", "--config", str(config), "--space",
                   str(space), "--trials", str(k), "--study", f"{prefix}_{m.name}", "--storage",
                   storage_of(tdir), "--out", str(tdir / m.name), *SAMPLER, *m.overrides]
            _run_tune(cmd, tdir / f"{m.name}.tune.log", prog, f"{m.name} (to {k} trials)")
            print(f"  {m.name}: {k} trials", flush=True)
        write(record(prefix, [m.name for m in methods], tdir, trials))
    return record(prefix, [m.name for m in methods], tdir, trials)


def _run_tune(cmd: list, log: Path, prog: str, what: str) -> None:
    with open(log, "a") as f:
        p = subprocess.run(cmd, cwd=runner.ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode in (130, 143):   # Ctrl-C or SIGTERM: the trial saved and stopped; the next start goes on
        raise KeyboardInterrupt
    if p.returncode != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        runner.usage_error(prog, f"tune {what}: {lines[-1] if lines else p.returncode} (log: {log})")


def record(prefix: str, methods: List[str], tdir: Path, trials: int) -> dict:
    """Every method's finished trials and its best complete one (`chosen`), read from the studies."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {"tuner": "mclfir tune", "trials_per_method": trials, "sampler": SAMPLER, "methods": {}}
    for method in methods:
        try:
            study = optuna.load_study(study_name=f"{prefix}_{method}", storage=storage_of(tdir))
        except KeyError:
            continue
        done = [{"number": t.number, "params": t.params, "state": t.state.name, "value": t.value,
                 "seconds": t.user_attrs.get("seconds"), "run": t.user_attrs.get("run"),
                 "last_step": max(t.intermediate_values, default=None)}
                for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        complete = [t for t in done if t["state"] == "COMPLETE"]
        if complete:
            best = max(complete, key=lambda t: t["value"])
            out["methods"][method] = {"trials": done, "chosen": best["params"], "chosen_val_map": best["value"],
                                      "chosen_trial": best["number"]}
    return out


def write(out: Path, rec: dict, tdir: Path, prefix: str, task: str) -> None:
    """tuning.json, TUNING.md (one row per method) and each study's REPORT.md and plots under OUT/tune/METHOD."""
    import optuna
    from ..tune import report
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tuning.json", json.dumps(rec, indent=1))
    lines = ["# Validation search: `mclfir tune`, the same for every method", "",
             f"{rec['trials_per_method']} finished trials per method (complete or pruned), validation split, seed 0, "
             f"{task}. `mclfir tune {' '.join(rec['sampler'])}`: trial 0 is the config's own values, then 2 random "
             "trials, then TPE; the median pruner compares each validation with the earlier trials' at the same "
             "step. Each method's REPORT.md (tune/METHOD/) lists every trial, whether each knob's best value is "
             "interior, and Optuna's plots.", "",
             "| method | trials | pruned | chosen (best complete trial) | val avg mAP | trial seconds (sum) |",
             "|---|---|---|---|---|---|"]
    for method, r in rec["methods"].items():
        chosen = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["chosen"].items())
        lines.append(f"| {method} | {len(r['trials'])} | {sum(t['state'] == 'PRUNED' for t in r['trials'])} | "
                     f"{chosen} | {100 * r['chosen_val_map']:.2f} | "
                     f"{sum(t['seconds'] or 0 for t in r['trials']):.0f} |")
        study = optuna.load_study(study_name=f"{prefix}_{method}", storage=storage_of(tdir))
        report.write_report(study, study.user_attrs["settings"], out / "tune" / method,
                            f"{storage_of(_shown(tdir))} (study {prefix}_{method})")
    atomic_write_text(out / "TUNING.md", "\n".join(lines) + "\n")


def run_out_pruned(config: Path, methods: List[MethodTune], rec: dict, rdir: Path, prog: str) -> dict:
    """Every pruned trial run to its end as a plain run with the same settings (under RDIR, kept when done):
    per method, the seconds the study took with pruning, what it would have taken without, and whether a
    pruned trial would have beaten the chosen one."""
    out = {}
    rdir.mkdir(parents=True, exist_ok=True)
    for m in methods:
        r = rec["methods"].get(m.name)
        if r is None:
            continue
        ran_out = []
        for t in (t for t in r["trials"] if t["state"] == "PRUNED"):
            name = f"{m.name}_t{t['number']:02d}"
            values = [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()]
            res = runner.run_train(config, rdir / name, [*m.overrides, *values], rdir / f"{name}.log", prog=prog)
            ran_out.append({"number": t["number"], "pruned_seconds": t["seconds"], "full_seconds": res["wall_seconds"],
                            "value": res["final"]["average_map"], "pruned_at_step": t["last_step"]})
        complete = sum(t["seconds"] or 0 for t in r["trials"] if t["state"] == "COMPLETE")
        best = max([r["chosen_val_map"], *(x["value"] for x in ran_out)])
        out[m.name] = {"trials": len(r["trials"]), "pruned": ran_out, "chosen_val_map": r["chosen_val_map"],
                       "with_pruning_s": complete + sum(x["pruned_seconds"] or 0 for x in ran_out),
                       "without_pruning_s": complete + sum(x["full_seconds"] or 0 for x in ran_out),
                       "choice_changes": best > r["chosen_val_map"]}
    return out


def best_finished(rec: dict, ran_out: dict) -> dict:
    """Each method's values to carry on with: the best complete trial, or a pruned trial whose run to its end
    (RAN_OUT, run_out_pruned's summary; {} when none) scored higher. Every method's pruned trials are run out
    alike, so this keeps equal footing; it only undoes what a wrong prune cost."""
    chosen = {}
    for method, r in rec["methods"].items():
        params = {t["number"]: t["params"] for t in r["trials"]}
        value, best = r["chosen_val_map"], r["chosen"]
        for x in (ran_out.get(method) or {}).get("pruned", []):
            if x["value"] > value:
                value, best = x["value"], params[x["number"]]
        chosen[method] = best
    return chosen


def write_pruning(out: Path, summary: dict, note: str) -> str:
    """PRUNING.md: the measured saving per method and in all, and whether pruning changed a choice."""
    lines = ["# What pruning saved", "", note, "",
             "| method | trials | pruned | seconds with pruning | seconds if run to the end | saved | a pruned trial "
             "beats the chosen one |", "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        saved = 1 - s["with_pruning_s"] / s["without_pruning_s"] if s["without_pruning_s"] else 0.0
        beaten = [f"trial {x['number']} {100 * x['value']:.2f}" for x in s["pruned"]
                  if x["value"] > s["chosen_val_map"]]
        lines.append(f"| {method} | {s['trials']} | {len(s['pruned'])} | {s['with_pruning_s']:.0f} | "
                     f"{s['without_pruning_s']:.0f} | {100 * saved:.0f}% | "
                     f"{'yes: ' + ', '.join(beaten) if beaten else 'no'} (chosen {100 * s['chosen_val_map']:.2f}) |")
    w, wo = (sum(s[k] for s in summary.values()) for k in ("with_pruning_s", "without_pruning_s"))
    lines += ["", f"In all: {w:.0f} s with pruning against {wo:.0f} s with every trial run to its end "
                  f"({100 * (1 - w / wo) if wo else 0:.0f}% saved); a choice changes for "
                  f"{sum(s['choice_changes'] for s in summary.values())} of {len(summary)} methods.", ""]
    for method, s in summary.items():
        for x in s["pruned"]:
            lines.append(f"- {method} trial {x['number']}: pruned at step {x['pruned_at_step']} after "
                         f"{x['pruned_seconds']:.0f} s; run to the end: {100 * x['value']:.2f} in "
                         f"{x['full_seconds']:.0f} s")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "PRUNING.md", text)
    atomic_write_json(out / "pruning.json", summary)
    return text
