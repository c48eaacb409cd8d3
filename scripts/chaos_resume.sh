#!/usr/bin/env bash
# kill -9 a tiny run at N random points, resume each, compare with an uninterrupted run.
#   bash scripts/chaos_resume.sh N      (prints "exact: K/N"; exit 1 unless K == N)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" scripts/chaos_resume.py "${1:-5}" "${@:2}"
