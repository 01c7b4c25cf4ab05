# `make demo` and `make test` set up .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tpp-installed
# SpikingJelly 0.0.0.0.14 (the paper-era line) lives in a side folder; the SpikingJelly tests run
# a second time with it first on PYTHONPATH.
SJ_LEGACY := $(VENV)/sj-0.0.0.0.14

.PHONY: demo test test-all lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install spikingjelly==2.0.0 snntorch==1.0.0 scikit-learn matplotlib tqdm pytest ruff
	$(PY) -m pip install --no-deps -e .
	touch $@

$(SJ_LEGACY)/spikingjelly/__init__.py: | $(STAMP)
	$(PY) -m pip install --no-deps --target $(SJ_LEGACY) spikingjelly==0.0.0.0.14

demo: $(STAMP)
	$(PY) -m tpp_plugin demo

test: $(STAMP) $(SJ_LEGACY)/spikingjelly/__init__.py
	$(PY) -m pytest -m "not slow"
	PYTHONPATH=$(SJ_LEGACY) $(PY) -m pytest -m "not slow" -p no:cacheprovider tests/test_spikingjelly.py tests/test_conversion.py tests/test_registry.py tests/test_readme.py

test-all: test
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
