# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv when missing and install the project with the torch pin in
# constraints.txt (an unpinned torch would pull a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit docs bench bench-peers clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict statemachine_loop

unit: $(STAMP)
	$(BIN)/python -m pytest

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(VENV)/site

test: lint typecheck unit docs

# Each timing benchmark runs in 8 fresh processes: one process is one draw of the memory
# layout, which moves a ratio by up to ~1 % (docs/benchmarks.md); the two take ~12 minutes.
bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py --processes 8 --json run/overhead.json
	$(BIN)/python benchmarks/observability.py --processes 8 --json run/observability.json
	$(BIN)/python benchmarks/segments.py
	$(BIN)/python benchmarks/resume_cost.py
	if command -v valgrind >/dev/null; then $(BIN)/python benchmarks/instructions.py; fi

# The peers get their own venv so .venv stays lean; -c constraints.txt keeps the CPU
# torch. PyPI's torchvision for this torch is a CUDA build that cannot load against it,
# and Lightning's torchmetrics imports torchvision whenever it is installed, so it is
# removed (fastai's Learner does not need it).
PEERS_VENV := .venv-peers
PEERS_BIN := $(PEERS_VENV)/bin
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp

$(PEERS_STAMP): pyproject.toml constraints.txt
	test -x $(PEERS_BIN)/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[peers]'
	$(PEERS_BIN)/python -m pip uninstall --quiet --yes torchvision
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_BIN)/python benchmarks/peers.py --json run/peers.json

clean:
	rm -rf $(VENV) $(PEERS_VENV) run .pytest_cache .mypy_cache .ruff_cache .hypothesis
