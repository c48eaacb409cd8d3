# `make demo` and `make test` work on a fresh machine: both set up .venv first.
.PHONY: setup demo test bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/mclfir train --config configs/debug_cpu.yaml --out runs/debug --overwrite

test: setup
	.venv/bin/python -m pytest -q tests

clean:
	rm -rf runs shards/synthetic .pytest_cache
