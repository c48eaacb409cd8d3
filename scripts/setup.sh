#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies. Re-running reuses the
# environment: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.mclfir-installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing pinned dependencies (torch from local disk; ~2-3 minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.mclfir-installed-*
  touch "$stamp"
else
  echo "[setup] .venv is up to date"
fi
