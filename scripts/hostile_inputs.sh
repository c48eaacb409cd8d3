#!/usr/bin/env bash
# Every hostile or careless input case (crafted names, damaged shards/checkpoints, full disk, bad configs,
# misuse of embed/index/search) against a tiny run; prints a table; exit 1 if any case fails.
#   bash scripts/hostile_inputs.sh [--only ID,ID] [--keep] [--work DIR]      (about 2-3 minutes on 2 cores)
# The full-disk cases mount a tmpfs and need root (CI runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" scripts/hostile_inputs.py "$@"
