#!/usr/bin/env bash
# Every method on the same real-photo config, then the comparison report into docs/results/.
#   bash scripts/fpi_benchmark.sh            (about an hour on 2 CPU cores)
# static_joint runs every joint retraining (static-cumulative measured end to end);
# STATIC_FINAL_ONLY=1 runs only the last one and estimates the others from its seconds per step.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fpi_bench}
REPORT=${REPORT:-docs/results/fpi_benchmark}
CONFIG=configs/fpi_methods_cpu.yaml
for method in mclfir finetune lwf frozen static_joint; do
  extra=()
  [ "$method" = static_joint ] && [ "${STATIC_FINAL_ONLY:-0}" = 1 ] && extra=(train.static_final_only=true)
  /usr/bin/time -f "$method wall %e s" .venv/bin/mclfir train --config $CONFIG --out "$OUT/$method" --overwrite \
      train.method=$method "${extra[@]}" 2>&1 | tee "$OUT.$method.log" | grep -E "increment [0-9]+:|wall"
done
.venv/bin/mclfir report "$OUT"/mclfir "$OUT"/finetune "$OUT"/lwf "$OUT"/frozen "$OUT"/static_joint --out "$REPORT"
