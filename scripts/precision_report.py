"""bf16 + channels_last against fp32 on the embedded default, paired by seed: final average mAP, forgetting and
training speed per seed, the paired difference with its 95% interval, TOST against +-1 point, and the
bench.step tables. Reads RUNS/{fp32,bf16}_s<seed>/results.json and RUNS/bench_<name>.txt
(scripts/precision_parity.sh)."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from mclfir_dist.evaluation.stats import p_text, paired, tost_paired
from mclfir_dist.utils.io import atomic_write_text

MARGIN = 0.01   # one mAP point: the "no worse than seed noise" bar a precision change must meet
BENCHES = {"demo": ("the demo (ResNet-18, 64 px, mclfir)", 30),
           "fpi96": ("the real-photo study (EfficientNet-Lite0, 96 px, mclfir)", 10)}
CONFIGS = {"demo": "configs/debug_cpu.yaml", "fpi96": "configs/fpi96_cpu.yaml"}


def load(runs: Path) -> dict:
    """{setting: {seed: results}} of the complete runs."""
    found: dict = {"fp32": {}, "bf16": {}}
    for path in sorted(runs.glob("*_s*/results.json")):
        m = re.fullmatch(r"(fp32|bf16)_s(\d+)", path.parent.name)
        data = json.loads(path.read_text())
        if m and data.get("complete"):
            found[m.group(1)][int(m.group(2))] = data
    return found


def speed(r: dict) -> tuple:
    """(training seconds, images/s over the run)."""
    seconds = sum(c["train_seconds"] for c in r["cost"])
    return seconds, sum(c["images_seen"] for c in r["cost"]) / seconds


def report(found: dict, bench: dict) -> str:
    seeds = sorted(set(found["fp32"]) & set(found["bf16"]))
    if len(seeds) < 2:
        raise SystemExit(f"error: {len(seeds)} seed(s) with both settings; the paired test needs 2 or more")
    fp, bf = ([found[s][seed] for seed in seeds] for s in ("fp32", "bf16"))
    fmap = lambda r: r["metrics"][-1]["average_map"]
    forget = lambda r: r["metrics"][-1]["average_forgetting"]
    machine = fp[0]["machine"]
    lines = ["# bf16 + channels_last against fp32 on CPU (the embedded default)", "",
             f"Machine: {machine.get('cpu_model', machine['cpu'])}, {machine['cpu_count']} cores, bf16 units "
             f"{', '.join(machine.get('cpu_bf16_units', [])) or 'none'}, torch {machine['torch']}. Config "
             "`configs/debug_cpu.yaml` (mclfir, 4 increments x 120 steps, 64 px), test split. Each seed ran "
             "in fp32 (`train.mixed_precision=no model.channels_last=false`) and then in bf16 "
             "(`train.mixed_precision=bf16 model.channels_last=true`, what `auto` picks on this CPU), "
             "one run at a time. Reproduce: `bash scripts/precision_parity.sh`.", "",
             "| seed | fp32 final avg mAP | bf16 final avg mAP | bf16 - fp32 | fp32 forgetting | bf16 forgetting "
             "| fp32 train s (img/s) | bf16 train s (img/s) | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for seed, a, b in zip(seeds, fp, bf):
        (sa, ra), (sb, rb) = speed(a), speed(b)
        lines.append(f"| {seed} | {100 * fmap(a):.2f} | {100 * fmap(b):.2f} | {100 * (fmap(b) - fmap(a)):+.2f} | "
                     f"{100 * forget(a):.2f} | {100 * forget(b):.2f} | {sa:.0f} ({ra:.0f}) | {sb:.0f} ({rb:.0f}) "
                     f"| {sa / sb:.2f}x |")
    d = paired([fmap(r) for r in bf], [fmap(r) for r in fp])
    eq = tost_paired([fmap(r) for r in bf], [fmap(r) for r in fp], MARGIN)
    ratios = [speed(a)[0] / speed(b)[0] for a, b in zip(fp, bf)]
    lines += ["", f"**Final average mAP, bf16 - fp32, paired over {d.n} seeds:** {d.interval_text()} points "
              f"(mean [95% interval]; paired t {p_text(d.p)}: {d.verdict()}). "
              f"Equivalence within +-{100 * MARGIN:.0f} point (TOST, 90% interval "
              f"[{100 * eq.low:+.2f}, {100 * eq.high:+.2f}]): **{eq.verdict()}** ({p_text(eq.p)}).", "",
              f"**Training speed:** bf16 + channels_last trained {min(ratios):.2f}-{max(ratios):.2f}x faster than "
              f"fp32 (training seconds per run; mean {sum(ratios) / len(ratios):.2f}x).", "",
              "Reading: on this small, noisy task (the sleeve_length head moves by up to 12 points between seeds) "
              "three pairs cannot show equivalence within a point; the interval says only that bf16 is not "
              "measurably worse. Both settings are deterministic run to run on this machine (fp32 and bf16 "
              "reruns of a seed gave the same mAP to the last digit; one bf16 run of seed 1 made while the code was "
              "being edited, before these, gave 76.41 and is not explained). Where bit-exact comparisons across "
              "machines matter, set `train.mixed_precision` explicitly: auto differs between CPUs with and without "
              "bf16 units.", ""]
    for name, (what, steps) in BENCHES.items():
        if name in bench:
            lines += [f"## bench.step: {what}", "", f"`python -m mclfir_dist.bench.step --config {CONFIGS[name]} "
                      f"--compare-precision --steps {steps} --warmup 3` (each setting in its own process; images/s "
                      "and the ratio against fp32 without channels_last; the `step` column is the engine's whole "
                      "training step):", "", "```", bench[name], "```", "", fastest(bench[name]), ""]
    return "\n".join(lines)


def fastest(table: str) -> str:
    """The setting with the fastest engine step in a --compare-precision table, in words."""
    rows = {}
    for line in table.splitlines()[1:]:
        name, numbers = line[:24].strip(), line[24:].split()
        if len(numbers) >= 3:
            rows[name] = float(numbers[1])
    best = max(rows, key=rows.get)
    return (f"Fastest training step here: **{best}**, {rows[best] / rows['fp32']:.2f}x fp32's; "
            + ", ".join(f"{k} {v / rows['fp32']:.2f}x" for k, v in rows.items() if k not in ("fp32", best)) + ".")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    found = load(runs)
    bench = {}
    for name in BENCHES:
        path = runs / f"bench_{name}.txt"
        text = path.read_text() if path.is_file() else ""
        if "\nsetting" in text:
            bench[name] = text[text.index("\nsetting"):].strip()
    text = report(found, bench)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for setting, by_seed in found.items():
        for seed in by_seed:
            shutil.copyfile(runs / f"{setting}_s{seed}" / "results.json", out / "runs" / f"{setting}_s{seed}.json")
    atomic_write_text(out / "README.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
