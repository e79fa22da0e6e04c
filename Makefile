# The two commands of the README: `make demo` and `make test`. Both work on a fresh machine with
# nothing but Python: they create .venv/, install torch (CPU wheel, pinned) FIRST, then the package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup gl-libs sample demo test slicer-test bench bench-blast evaluate compare-perfusion clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all,test]"
	touch $(STAMP)

sample: setup
	$(BIN)/unetsegment fetch-sample

demo: sample
	$(BIN)/unetsegment demo --output-dir demo-output

test: sample gl-libs
	$(BIN)/python -m pytest -q

# The Slicer module's self-test on Slicer's own code (slicer-core, trame-slicer) and its real views
# rendered offscreen on the demo case; the PNGs land in Testing/screenshots/ (`make test` runs these too).
slicer-test: sample gl-libs
	$(BIN)/python -m pytest -q -s Testing/test_slicer_views.py \
	  "Testing/test_slicer_module.py::test_module_metadata_and_selftest_pass_on_slicer_code"

# Offscreen VTK loads Mesa's GL libraries at run time: installed from Debian where they are missing (as root).
gl-libs: setup
	@{ ldconfig -p | grep -q 'libGL\.so\.1 ' && ldconfig -p | grep -q 'libEGL\.so\.1 ' && \
	   ldconfig -p | grep -q 'libXt\.so\.6 ' && ldconfig -p | grep -q 'libXrender\.so\.1 '; } || { \
	  apt-get update -qq && apt-get install -y -qq libgl1 libegl1 libgl1-mesa-dri libxrender1 && \
	  { apt-get install -y -qq libxt6t64 || apt-get install -y -qq libxt6; }; }

bench: setup
	$(BIN)/python bench/inference_vs_monai.py
	$(BIN)/python bench/scaling_and_memory.py

# BLAST-CT's DeepMedic (random weights: its package ships none) against ours on the demo CT (#19)
bench-blast: setup sample
	$(BIN)/pip install -q --no-deps blast-ct==2.1.0
	$(BIN)/python bench/blast_ct_speed.py

evaluate: sample
	$(BIN)/python -m UNetSegmentLib.models.training.cases --config Resources/Training/ct-hemorrhage.yaml --split val --output-dir .cache/eval-ct-hemorrhage
	$(BIN)/unetsegment evaluate --model ct-hemorrhage --cases .cache/eval-ct-hemorrhage --output .cache/eval-ct-hemorrhage.json
	$(BIN)/python -m UNetSegmentLib.models.training.cases --config Resources/Training/mr-perfusion-lesion.yaml --split val --output-dir .cache/eval-mr-perfusion
	$(BIN)/unetsegment evaluate --model mr-perfusion-lesion --cases .cache/eval-mr-perfusion --output .cache/eval-mr-perfusion-lesion.json

# early fusion vs one encoder per modality, trained on the same cases (≈ 35 min on 2 cores), then evaluated
compare-perfusion: sample
	$(BIN)/unetsegment train --config Resources/Training/mr-perfusion-lesion.yaml --output-dir .cache/models/mr-perfusion-early
	$(BIN)/unetsegment train --config Resources/Training/mr-perfusion-lesion-multipath.yaml --output-dir .cache/models/mr-perfusion-multipath
	$(BIN)/python -m UNetSegmentLib.models.training.cases --config Resources/Training/mr-perfusion-lesion.yaml --split val --output-dir .cache/eval-mr-perfusion
	$(BIN)/unetsegment evaluate --model .cache/models/mr-perfusion-early --cases .cache/eval-mr-perfusion --output .cache/eval-mr-perfusion-early.json
	$(BIN)/unetsegment evaluate --model .cache/models/mr-perfusion-multipath --cases .cache/eval-mr-perfusion --output .cache/eval-mr-perfusion-multipath.json

clean:
	rm -rf demo-output .pytest_cache
