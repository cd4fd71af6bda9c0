PY ?= python
# pytest-xdist workers for `make test` (the Ray tests share one of them: xdist_group)
TEST_WORKERS ?= 2
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## install the package and dev tools (editable)
	$(PY) -m pip install -e ".[dev]"

run:  ## the main job: a short real training run on the embedded digits
	$(PY) -m experiments.run exp=digits_mtl

test: .installed  ## run the test suite (installs first on a fresh clone) on TEST_WORKERS processes; lists its 20 slowest tests
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=20

docs:  ## build the documentation site into site/ (offline; reference pages generated from the code)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve:  ## serve the documentation site at http://127.0.0.1:8000 while editing it
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

lint:  ## ruff check and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench:  ## benchmarks; results go to BENCHMARKS.md by hand, with the command
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/datasets.py
	$(PY) benchmarks/methods.py
	$(PY) benchmarks/forkmerge.py
	$(PY) benchmarks/forkmerge.py --whole
	$(PY) benchmarks/search.py
	$(PY) benchmarks/dense.py
	$(PY) benchmarks/study.py
	$(PY) benchmarks/population.py --steps --grid --pbt
	$(PY) benchmarks/recsys.py
	$(PY) benchmarks/semi_supervised.py
	$(PY) benchmarks/graphs.py
	$(PY) benchmarks/merging.py
	$(PY) benchmarks/adapters.py

gpu-check:  ## every GPU claim in one run, about 8 minutes on one GPU (benchmarks/gpu.py; docs/guide/gpu.md says how)
	$(PY) benchmarks/gpu.py --out gpu-check.md

# A fresh clone has no stamp: install once (pip is quick when the packages are already there).
.installed: pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	@touch .installed

.PHONY: help install run test docs docs-serve lint bench gpu-check
