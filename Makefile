# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision as a matched pair (see README, "Installing"); pyproject.toml keeps loose ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
NIFTI_EXTRA := nibabel>=5

.PHONY: install test lint demo demo-3d bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]" "$(NIFTI_EXTRA)"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

demo: install
	$(PY) -m ddcnn data fetch fashion-mnist
	$(PY) -m ddcnn run configs/fashion_mnist_2x2.yaml --set budget=demo --out runs/demo --force
	@echo "report: runs/demo/report.md"

demo-3d: install
	$(PY) -m ddcnn run configs/generated_3d.yaml --out runs/demo-3d --force

bench: install
	$(PY) benchmarks/train_step.py --device cpu

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
