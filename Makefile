# ray-ssl: `make run` and `make test` create .venv when missing, install, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= local

.PHONY: run test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the package metadata changes; `pip install -e` keeps sources live.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python jobs/franca_g.py --preset $(PRESET)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

# The benchmarks' own extra (lightly, for quality.py's reference); *_reference.py and *_report.py
# are helpers of another benchmark, not benchmarks.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	for b in $(filter-out %_reference.py %_report.py,$(wildcard benchmarks/*.py)); do \
		echo "== $$b"; $(BIN)/python $$b --quick || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data ray_results .pytest_cache
