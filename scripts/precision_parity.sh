#!/usr/bin/env bash
# bf16 + channels_last against fp32 on the embedded default (make demo's config), mclfir, paired by seed:
# each seed trains once in fp32 and once in bf16 + channels_last, one after the other (so their speeds meet
# the same machine state), then bench.step --compare-precision times the step four ways on the demo's and on
# the 96 px real-photo study's config. Resumable: a seed
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
# the step four ways on the demo's ResNet-18 at 64 px, and on the real-photo study's EfficientNet-Lite0 at 96 px
# (its shards are built from ../shared/data the first time; skipped where that data is absent)
bench() {   # bench NAME CONFIG STEPS
  if [ ! -f "$RUNS/bench_$1.txt" ]; then
    .venv/bin/python -m mclfir_dist.bench.step --config "$2" --compare-precision --steps "$3" --warmup 3 \
        --out "$RUNS/bench_$1" > "$RUNS/bench_$1.txt.tmp" 2>&1
    mv "$RUNS/bench_$1.txt.tmp" "$RUNS/bench_$1.txt"
  fi
}
bench demo configs/debug_cpu.yaml 30
if [ -f ../shared/data/fashion-product-images/labels.csv ] || [ -d shards/fpi96 ]; then
  bench fpi96 configs/fpi96_cpu.yaml 10
fi
.venv/bin/python scripts/precision_report.py "$RUNS" --out docs/results/precision
