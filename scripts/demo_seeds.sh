#!/usr/bin/env bash
# The embedded default under mclfir and finetune, several seeds; prints each run's final average mAP and
# forgetting, then a mean +- std table (docs/results/demo_seeds/). Each run is `make demo` with a seed.
#   bash scripts/demo_seeds.sh [SEEDS] [METHODS]       (default: "0 1 2" "mclfir finetune"; ~7 min a run on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
METHODS=${2:-"mclfir finetune"}
OUT=${OUT:-runs/demo_seeds}
for method in $METHODS; do
  for seed in $SEEDS; do
    .venv/bin/mclfir train --config configs/debug_cpu.yaml --out "$OUT/${method}_s$seed" --overwrite \
        train.method=$method train.seed=$seed > "$OUT.${method}_s$seed.log" 2>&1
    grep "average mAP" "$OUT.${method}_s$seed.log" | sed "s/^/$method seed $seed: /"
  done
done
.venv/bin/python scripts/seed_table.py "$OUT" --out docs/results/demo_seeds
