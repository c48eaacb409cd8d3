#!/usr/bin/env bash
# bf16 + channels_last against fp32 on the embedded default (make demo's config), mclfir, paired by seed:
# each seed trains once in fp32 and once in bf16 + channels_last, one after the other (so their speeds meet
# the same machine state), then bench.step --compare-precision times the step four ways. Resumable: a seed
# whose results.json is complete is kept. Report: docs/results/precision/README.md.
#   bash scripts/precision_parity.sh [SEEDS]          (default "0 1 2"; ~5 min a seed on a 2-core AMX CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
RUNS=${RUNS:-runs/precision}
mkdir -p "$RUNS"
for seed in $SEEDS; do
  for setting in fp32 bf16; do
    out="$RUNS/${setting}_s$seed"
    if [ -f "$out/results.json" ] && grep -q '"complete": true' "$out/results.json"; then
      echo "$setting seed $seed: done before, kept"; continue
    fi
    if [ "$setting" = fp32 ]; then flags=(train.mixed_precision=no model.channels_last=false)
    else flags=(train.mixed_precision=bf16 model.channels_last=true); fi
    .venv/bin/mclfir train --config configs/debug_cpu.yaml --out "$out" --overwrite train.seed=$seed \
        "${flags[@]}" > "$out.log" 2>&1
    grep "average mAP" "$out.log" | tail -1 | sed "s/^/$setting seed $seed: /"
  done
done
if [ ! -f "$RUNS/bench.txt" ]; then
  .venv/bin/python -m mclfir_dist.bench.step --config configs/debug_cpu.yaml --compare-precision \
      --steps 30 --warmup 5 --out "$RUNS/bench" > "$RUNS/bench.txt.tmp" 2>&1
  mv "$RUNS/bench.txt.tmp" "$RUNS/bench.txt"
fi
.venv/bin/python scripts/precision_report.py "$RUNS" --out docs/results/precision
