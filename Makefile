# Two entry points for a fresh machine with Python 3.11 (see README.md):
#   make run    set up .venv and run the main job on the embedded synthetic default (no download)
#   make test   set up .venv, lint (ruff + pyink) and run the test suite and the docstring examples of mtlmatch/ on
#               8 fake CPU devices (without the tests marked slow)
#   make test-fast  the fast tier (maths and unit tests, under 3 minutes here) for a developer's iterations
#   make test-all   the same with the slow tests (the 20-kill fault test, ...)
#   make lint   the linter and the formatter check alone; make format rewrites the code in the house style
#   make docs   install the docs extra into .venv, build the site into docs/_build/html with warnings as errors and
#               every cross-reference checked (nitpicky), then check every internal link and anchor of the HTML
#   make schema rewrites mtlmatch/config_schema.json (the defaults a config reads) from the code
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/affect_dm

.PHONY: setup run test test-fast test-all lint format docs schema clean

$(VENV)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,experiments,lint]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m mtlmatch.main --config=configs/affect.py:dm --workdir=$(WORKDIR)

# Two pytest workers (pytest-xdist), whole files per worker (module fixtures are built once), one per core.
PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -n 2 --dist loadfile --doctest-modules

test: setup lint
	$(PYTEST) -m "not slow" tests mtlmatch

# The fast tier for a developer's iterations (maths and unit tests against their references, the layout rules, the
# config files without JAX, the docstring examples); make test runs everything CI runs.
FAST_TESTS := tests/test_losses.py tests/test_matching.py tests/test_relatedness.py tests/test_metrics.py \
	tests/test_weighting.py tests/test_weighting_gradient_methods.py tests/test_weighting_zoo.py tests/test_dgr.py \
	tests/test_layout.py tests/test_config_light.py tests/test_monitor.py tests/test_data_pipeline.py

test-fast: setup
	$(PYTEST) -m "not slow" $(FAST_TESTS) mtlmatch

test-all: setup
	$(PYTEST) tests mtlmatch

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyink --check .

format: setup
	$(VENV)/bin/pyink .
	$(VENV)/bin/ruff check --fix .

# The docs extra on top of the test environment, with its own stamp (make setup does not install it).
$(VENV)/.docs-installed: $(VENV)/.installed setup.cfg constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	rm -rf docs/_build docs/_generated
	$(PY) -m sphinx -W --keep-going -n -q -b html docs docs/_build/html
	$(PY) docs/check_links.py docs/_build/html
schema: setup
	$(PY) -m mtlmatch.config_schema --write

clean:
	rm -rf $(VENV) workdirs docs/_build docs/_generated
