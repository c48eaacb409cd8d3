#!/usr/bin/env bash
# A new attribute arrives, on real photos: 5 attributes, then the 6th on its own shards, for mclfir, lwf,
# finetune and frozen; compatibility (re-embedded / deployed index / previous) and the extension's cost
# against retraining all 6. Report: docs/results/extend/. About 25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/extend_study.py "$@"
