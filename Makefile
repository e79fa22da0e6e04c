# The two commands of the README: `make demo` and `make test`. Both work on a fresh machine with
# nothing but Python: they create .venv/, install torch (CPU wheel, pinned) FIRST, then the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup sample demo test bench evaluate clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

sample: setup
	$(BIN)/unetsegment fetch-sample

demo: sample
	$(BIN)/unetsegment demo --output-dir demo-output

test: sample
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/inference_vs_monai.py

evaluate: sample
	$(BIN)/python -m UNetSegmentLib.training.cases --config Resources/Training/ct-hemorrhage.yaml --split val --output-dir .cache/eval-ct-hemorrhage
	$(BIN)/unetsegment evaluate --model ct-hemorrhage --cases .cache/eval-ct-hemorrhage --output .cache/eval-ct-hemorrhage.json

clean:
	rm -rf demo-output .pytest_cache
