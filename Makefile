# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first so that no other package can pull a CUDA build onto a CPU machine.
# On a GPU machine, set TORCH_SPEC to the build that matches its CUDA (e.g. TORCH_SPEC="torch==2.11.0").
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo --out demo_output

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
