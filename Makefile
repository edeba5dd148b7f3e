# The one place the torch version is pinned. On these machines pip finds a CPU wheel of it on disk.
TORCH_VERSION := 2.13.0
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# two stamps: the demo installs only what it runs (data + cli extras); the tests and lint add
# the dev extras (pytest, hypothesis, ruff, ray) on top
DEMO_STAMP := $(VENV)/.demo-$(TORCH_VERSION)
TEST_STAMP := $(VENV)/.test-$(TORCH_VERSION)

.PHONY: demo test lint bench mutants clean

$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[data,cli]'
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(TEST_STAMP)

# every registered method on MNIST-1D at W4A4/W3A3/W2A2, 2 seeds; prints the table and the
# path of report.html (runs/demo; rerunning reuses the finished cells)
demo: $(DEMO_STAMP)
	$(BIN)/qatlab demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

lint: $(TEST_STAMP)
	$(BIN)/ruff check qatlab tests benchmarks tools

bench: $(DEMO_STAMP)
	$(BIN)/python benchmarks/step_overhead.py

# mutation testing of the formula modules ([tool.mutmut] in pyproject.toml) against their fast
# tests; not part of `make test`. tools/mutants.py is mutmut with decorated functions mutated
# too (@torch.no_grad(), @contextmanager, @property, the registries). mutmut works in ./mutants/
# and reuses its results there (rm -rf mutants for a fresh run); `$(BIN)/python tools/mutants.py
# show <name>` prints a mutant's diff. docs/results/mutation.md
mutants: $(TEST_STAMP)
	OMP_NUM_THREADS=1 nice -n 5 $(BIN)/python tools/mutants.py run --max-children 2
	$(BIN)/python tools/mutants.py results

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
