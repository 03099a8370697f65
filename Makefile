# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision as a matched pair (see README, "Set-up"); pyproject.toml keeps loose ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The index torch comes from. Empty: PyPI, whose Linux torch is the CUDA build (several GB of NVIDIA libraries). On a
# machine without a GPU: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu (PyTorch's CPU wheels).
TORCH_INDEX ?=
OPTIONAL_EXTRAS := 'nibabel>=5' 'pydicom>=2.4' 'tensorboard>=2.12' 'onnx>=1.23' 'onnxscript>=0.7' 'onnxruntime>=1.32'

.PHONY: install test test-heavy lint demo demo-3d bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	$(PY) -m pip install --progress-bar on -e ".[dev]" $(OPTIONAL_EXTRAS)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

# The cases left out of `make test` (4 processes, a second torchrun case, killed and resumed runs): minutes on 2 cores.
test-heavy: install
	$(PY) -m pytest -m heavy

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The full protocol on Fashion-MNIST with a budget that fits about 5 minutes on 2 CPU cores (a GPU is far faster):
# 30,000 training images, every CNN stage capped at 3 epochs (the DNN at 10), early stopping after 2 epochs without
# improvement.
DEMO_BUDGET := --set model.width=16 --set data.limit_train=30000 --set 'stages.*.epochs=3' \
	--set 'stages.*.patience=2' --set stages.combine.epochs=10

demo: install
	@$(PY) -m ddcnn data fetch fashion-mnist >/dev/null 2>&1 || \
		{ command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -qq dataset-fashion-mnist; } || true
	$(PY) -m ddcnn data fetch fashion-mnist
	$(PY) -m ddcnn run configs/fashion_mnist_2x2.yaml $(DEMO_BUDGET) --out runs/demo --force

demo-3d: install
	$(PY) -m ddcnn run configs/generated_3d.yaml --out runs/demo-3d --force

# The CPU sizes of every benchmark (tables in docs/performance.md and docs/scaling.md); the GPU measurements are
# one command on a GPU machine: bash benchmarks/gpu_session.sh OUT_DIR [FASHION_MNIST_DIR].
bench: install
	$(PY) benchmarks/train_step.py --sweep cpu --markdown
	$(PY) benchmarks/time_to_accuracy.py --preset cpu --device cpu
	$(PY) benchmarks/local_scaling.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/export_throughput.py --threads 1 --repeats 20

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
