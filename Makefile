# Two entry points: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# pip on this machine prints one harmless warning per missing local index folder
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }

.PHONY: demo test install clean model-repository

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 $(QUIET)
	$(PY) -m pip install -q -e '.[test]' $(QUIET)
	$(PY) -c "import torch, timm, onnxruntime, tritonclient.grpc, kfp, minio" 
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/captioner demo --workdir demo_out

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

# model_repository/: the seed-vit768 repository as `captioner export` writes it, without the
# ONNX graphs (tests/export/test_model_repository.py keeps it up to date)
model-repository: $(VENV)/.installed
	$(PY) -m captioner.export.repository model_repository

clean:
	rm -rf demo_out runs .pytest_cache
