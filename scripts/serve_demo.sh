#!/usr/bin/env bash
# `make serve`: the search page on the demo run. Trains the demo (configs/debug_cpu.yaml, ~8 min on 2 cores)
# if runs/debug has no results yet, embeds and indexes its synthetic test split when the run is newer than
# the index, then serves on http://127.0.0.1:${PORT:-8000}/ until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
M=.venv/bin/mclfir
RUN=${RUN:-runs/debug}
if [ ! -f "$RUN/results.json" ]; then
  "$M" train --config configs/debug_cpu.yaml --out "$RUN" --resume auto
fi
if [ ! -f "${RUN}_index/index.json" ] || [ -n "$(find "$RUN" -name '*.pt' -newer "${RUN}_index/index.json" -print -quit)" ]; then
  "$M" embed --run "$RUN" --shards shards/synthetic --splits test --out "${RUN}_embed" --workers 1
  "$M" index --embeddings "${RUN}_embed" --out "${RUN}_index"
fi
exec "$M" serve --run "$RUN" --index "${RUN}_index" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
