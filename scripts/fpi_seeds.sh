#!/usr/bin/env bash
# The several-seed real-photo comparison (equal validation tuning, 5 seeds, report); its budget is 150 minutes
# on 2 CPU cores. Report: docs/results/fpi_seeds/. Any CSV with the same columns:
#   bash scripts/fpi_seeds.sh --csv other/labels.csv --image-root other/ --shards shards/other
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/fpi_seeds.py "$@"
