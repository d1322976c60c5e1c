# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned to what the local package cache serves; any torch>=2.4 works.
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[test,onnx]"
	touch $(STAMP)

# One pytest worker per core (pytest-xdist): most tests run one thread, so two workers keep both cores busy.
test: install
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist worksteal --durations=15

demo: install
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
