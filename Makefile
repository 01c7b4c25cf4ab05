# `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tpp-installed
# SpikingJelly 0.0.0.0.14 (the paper-era line) lives in a side folder; the SpikingJelly tests run
# a second time with it first on PYTHONPATH.
SJ_LEGACY := $(VENV)/sj-0.0.0.0.14
SJ_TESTS  := $(addprefix tests/test_,$(addsuffix .py,spikingjelly conversion registry readme \
             runner reproduce count_domain bench cupy hardening properties))

.PHONY: demo test test-all lint clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install spikingjelly==2.0.0 snntorch==1.0.0 scikit-learn matplotlib tqdm pytest ruff hypothesis
	# CuPy for torch's CUDA 13: CI compiles the CUDA kernels with NVRTC (no GPU needed)
	$(PY) -m pip install cupy-cuda13x
	$(PY) -m pip install --no-deps -e .
	touch $@

$(SJ_LEGACY)/spikingjelly/__init__.py: | $(STAMP)
	$(PY) -m pip install --no-deps --target $(SJ_LEGACY) spikingjelly==0.0.0.0.14

demo: $(STAMP)
	$(PY) -m tpp_plugin demo

test: $(STAMP) $(SJ_LEGACY)/spikingjelly/__init__.py
	$(PY) -m pytest -m "not slow"
	PYTHONPATH=$(SJ_LEGACY) $(PY) -m pytest -m "not slow" -p no:cacheprovider $(SJ_TESTS)
	# every docstring example, on both SpikingJelly lines
	$(PY) -m pytest -p no:cacheprovider --doctest-modules tpp_plugin
	PYTHONPATH=$(SJ_LEGACY) $(PY) -m pytest -p no:cacheprovider --doctest-modules tpp_plugin

test-all: test
	$(PY) -m pytest -m slow

# The paper's experiment on Fashion-MNIST (Debian package dataset-fashion-mnist, installed here
# when running as root). Override BENCH_ARGS for a quicker run, e.g. BENCH_ARGS='--subset 6000'.
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
BENCH_ARGS  ?= --model mlp8 cnn5 vgg --ann relu qcfs --L 4 --seeds 3 --T 1 2 4 8 16 32 64
bench: $(STAMP)
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && apt-get install -y dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: sudo apt-get install -y dataset-fashion-mnist"; exit 1; \
	  fi; \
	fi
	$(PY) -m tpp_plugin reproduce --dataset fashion-mnist --data-dir $(FASHION_DIR) \
	  --out results/fashion-mnist --checkpoint results/checkpoints $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
