# `make demo` and `make test` work on a fresh machine: both set up .venv first.
.PHONY: setup setup-browser setup-postgres setup-nginx setup-cluster demo serve test test-main test-cluster clean

setup:
	bash scripts/setup.sh

setup-browser:
	bash scripts/setup_browser.sh

setup-postgres:
	bash scripts/setup_postgres.sh

setup-nginx:
	bash scripts/setup_nginx.sh

setup-cluster:
	bash scripts/setup_cluster.sh

demo: setup
	.venv/bin/mclfir train --config configs/debug_cpu.yaml --out runs/debug --overwrite

# the search page on the demo run: http://127.0.0.1:8000/ (trains, embeds and indexes it first if needed)
serve: setup
	bash scripts/serve_demo.sh

# two steps: the main suite, then the cluster tests (two localhost nodes, SLURM, elastic restarts; root)
test: test-main test-cluster

# the main suite on 2 xdist workers (one thread each; a file's tests stay on one worker, so its shared runs are
# built once; 3 workers measured slower: 497 s vs 455 s); TEST_WORKERS=0 runs it in one process (664 s)
TEST_WORKERS ?= 2
test-main: setup setup-browser setup-postgres setup-nginx
	.venv/bin/python -m pytest -q -m "not cluster" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

test-cluster: setup setup-cluster
	.venv/bin/python -m pytest -q -m cluster tests

clean:
	rm -rf runs shards/synthetic .pytest_cache
