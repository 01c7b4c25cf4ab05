# `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tpp-installed
# SpikingJelly 0.0.0.0.14 (the paper-era line) lives in a side folder; the SpikingJelly tests run
# a second time with it first on PYTHONPATH.
SJ_LEGACY := $(VENV)/sj-0.0.0.0.14
SJ_TESTS  := $(addprefix tests/test_,$(addsuffix .py,spikingjelly conversion window_sync registry readme \
             runner users_scripts reproduce count_domain bench cupy hardening hardening2 \
             properties calibration calibration_stream finetune finetune_loader stats evaluate \
             run_calibrate sj_tools engine))
# Fashion-MNIST: the Debian package dataset-fashion-mnist, installed here when running as root
# (the test of SpikingJelly's own cnn_mnist.py example uses a subset; `make bench` all of it)
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
FASHION     := $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz

.PHONY: demo test test-all lint clean bench bench-calib bench-calib-time bench-scale fashion-data gpu-deps gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install spikingjelly==2.0.0 snntorch==1.0.0 scikit-learn matplotlib tqdm pytest ruff hypothesis
	# NIR export (snnTorch): the plugin refuses TPP modules there with a clear error, tested
	$(PY) -m pip install "nir>=1.0.6" "nirtorch>=2.0.5"
	# CuPy for torch's CUDA 13: CI compiles the CUDA kernels with NVRTC (no GPU needed)
	$(PY) -m pip install cupy-cuda13x
	$(PY) -m pip install --no-deps -e .
	touch $@

$(SJ_LEGACY)/spikingjelly/__init__.py: | $(STAMP)
	$(PY) -m pip install --no-deps --target $(SJ_LEGACY) spikingjelly==0.0.0.0.14

demo: $(STAMP)
	$(PY) -m tpp_plugin demo

fashion-data:
	@if [ ! -f $(FASHION) ] && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || true; \
	fi
	@[ -f $(FASHION) ] || echo "note: Fashion-MNIST is missing (sudo apt-get install -y dataset-fashion-mnist)"

test: $(STAMP) $(SJ_LEGACY)/spikingjelly/__init__.py fashion-data
	$(PY) -m pytest -m "not slow"
	PYTHONPATH=$(abspath $(SJ_LEGACY)) $(PY) -m pytest -m "not slow" -p no:cacheprovider $(SJ_TESTS)
	# every docstring example, on both SpikingJelly lines
	$(PY) -m pytest -p no:cacheprovider --doctest-modules tpp_plugin
	PYTHONPATH=$(abspath $(SJ_LEGACY)) $(PY) -m pytest -p no:cacheprovider --doctest-modules tpp_plugin

test-all: test
	$(PY) -m pytest -m slow

# The paper's experiment on Fashion-MNIST. Override BENCH_ARGS for a quicker run, e.g.
# BENCH_ARGS='--subset 6000'.
BENCH_ARGS  ?= --model mlp8 cnn5 vgg --ann relu qcfs --L 4 --seeds 3 --T 1 2 4 8 16 32 64
bench: $(STAMP) fashion-data
	@[ -f $(FASHION) ] || exit 1
	$(PY) -m tpp_plugin reproduce --dataset fashion-mnist --data-dir $(FASHION_DIR) \
	  --out results/fashion-mnist --checkpoint results/checkpoints $(BENCH_ARGS)

# Threshold calibrations side by side (RateCoding 99.9%, SpikingJelly's LTB, the T-aware tpp
# calibration) on the same ANNs and calibration images; see docs/results.md.
BENCH_CALIB_ARGS ?= --model cnn5 vgg cnn5_maxpool resnet --calibration 99.9% ltb tpp --seeds 3 \
                    --T 1 2 4 8
bench-calib: $(STAMP) fashion-data
	@[ -f $(FASHION) ] || exit 1
	$(PY) -m tpp_plugin reproduce --dataset fashion-mnist --data-dir $(FASHION_DIR) \
	  --out results/fashion-mnist-calibration --checkpoint results/checkpoints $(BENCH_CALIB_ARGS)

# Calibration time: TPPCalibrationRecipe (its defaults, and every image) against SpikingJelly's
# LTB on the same loader, interleaved, medians and ratios (docs/results.md).
BENCH_CALIB_TIME_ARGS ?= --models mlp8 cnn5 vgg resnet --T 1 2 4 8 --repeats 3
bench-calib-time: $(STAMP) fashion-data
	@[ -f $(FASHION) ] || exit 1
	OMP_NUM_THREADS=1 $(PY) -m tpp_plugin.experiments.calibration_timing \
	  --data-dir $(FASHION_DIR) --json results/calibration-timing.json $(BENCH_CALIB_TIME_ARGS)

# Cost as the work grows (docs/performance.md): torchvision ResNets at 224 px on synthetic
# inputs, LTB / RateCoding / the T-aware calibration for 128-1024 images, the SNN's passes and
# a fine-tuning epoch, each case in a fresh process (its own peak memory). Tens of minutes.
BENCH_SCALE_ARGS ?= --models resnet18 --images 128 512 1024
bench-scale: $(STAMP)
	$(PY) -m tpp_plugin bench --scale --write-docs docs/performance.md $(BENCH_SCALE_ARGS)

# The GPU check (docs/performance.md, "How to run the GPU checks"): every GPU-gated test and the
# CuPy benchmarks in one run of at most ~8 minutes, results in $$OUT or results/gpu-check/.
# `make gpu-deps` (on a machine with the venv) copies the pure-Python packages that a bare GPU
# machine lacks (SpikingJelly both lines, snnTorch, ...) into .gpu-deps/, which travels with the
# tree; `make gpu-check` (on the GPU machine) needs nothing from make: it runs the script with
# .venv/bin/python if that works there, else python3.
gpu-deps: $(STAMP) $(SJ_LEGACY)/spikingjelly/__init__.py
	PY=$(PY) SJ_LEGACY=$(SJ_LEGACY) bash tools/gpu_deps.sh

gpu-check:
	bash tools/gpu_check.sh

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
