# FedSeg developer commands. Everything runs in ./.venv, created from requirements.txt on first use.
PY      := .venv/bin/python
export PYTHONPATH := $(CURDIR)/custom
SITES   ?= 4
DATA    ?= data/synth2d
ROUNDS  ?= 8

.PHONY: venv data demo test test-fast bench-quick bench-standard bench poc jobs clean

venv: .venv/.installed
.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	touch $@

data: venv
	$(PY) -m fedseg.data.synthetic --out $(DATA) --sites $(SITES) --dims 2 --seed 0 --size small

# The demo: built-in non-iid dataset, a real FedAvg job in the NVFlare simulator, per-site Dice table.
demo: venv
	$(PY) -m fedseg_tools.demo --data $(DATA) --sites $(SITES) --rounds $(ROUNDS)

test: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q --timeout=1200 -n 3 --dist loadfile tests

# The fast layer: lint and every test that starts no simulator job, POC federation or training subprocess and
# needs no GPU (markers in tests/conftest.py); 75 s on 2 busy cores. `make test` runs everything.
test-fast: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q --timeout=300 -m "not slow and not poc and not gpu" tests

jobs: venv
	$(PY) -m fedseg.jobgen --out jobs

# A local POC federation of hospitals: prepare, start, submit jobs/fedavg, print the table, stop everything.
poc: venv
	$(PY) poc/fedseg_poc.py run

clean:
	rm -rf workspaces results bench_results .pytest_cache

# Benchmark: every method on the same data, seeds and training budget -> $(BENCH_OUT)/BENCHMARKS.md, raw JSON/CSV, plots.
# bench-quick: 2 CPU cores, minutes, too small to conclude; bench-standard: 2 CPU cores, up to ~100 minutes, runs to
# convergence (the committed report); bench: the full preset (a GPU machine). BENCH_ARGS=--publish also updates the
# committed report (BENCHMARKS.md + docs/benchmarks/); see python -m fedseg_tools.bench --help for datasets/seeds/methods.
BENCH_OUT  ?= bench_results
BENCH_ARGS ?=

bench-quick: venv
	$(PY) -m fedseg_tools.bench --preset quick --out $(BENCH_OUT) $(BENCH_ARGS)

bench-standard: venv
	$(PY) -m fedseg_tools.bench --preset standard --out $(BENCH_OUT) $(BENCH_ARGS)

bench: venv
	$(PY) -m fedseg_tools.bench --preset full --out $(BENCH_OUT) $(BENCH_ARGS)
