# The two commands of the README:
#   make demo   install what is missing, then start the embedded hub with the Image Builder
#   make test   install what is missing, then run every test suite
# Everything lands in .venv/ (Python, configurable-http-proxy) and, as root, Debian packages.

VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
export PATH := $(VENV)/bin:$(PATH)

.PHONY: demo test install install-demo system-deps venv venv-demo proxy js

# the demo installs what the hub needs (dockerspawner for PodmanSpawner, JupyterLab); the tests
# install the rest (pytest, KubeSpawner, kopf...)
demo: install-demo
	$(PY) -m cnbi_hub.demo

# the UI tests drive Debian's Chromium: the test run installs it too
test: SYSTEM_DEPS_ARGS = --browser
test: install js
	$(VENV)/bin/jlpm test
	$(PY) -m pytest $(PYTEST_ARGS)

# The Lab extension's node modules (jest runs from them); the editable install already built it.
js: venv
	$(VENV)/bin/jlpm install --immutable
	cd ui-tests && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(VENV)/bin/jlpm install --immutable

install: system-deps venv proxy

install-demo: system-deps venv-demo proxy

system-deps:
	@if [ "$$(id -u)" -eq 0 ]; then scripts/install-system-deps $(SYSTEM_DEPS_ARGS); \
	else scripts/install-system-deps $(SYSTEM_DEPS_ARGS) || echo "(continuing: tests that need these will say so)"; fi

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

BUILD_TOOLS := hatchling hatch-jupyter-builder editables

venv-demo: $(PY)
	$(PY) -m pip install -q $(BUILD_TOOLS)
	$(PY) -m pip install -q -e ".[docker,lab]"

venv: $(PY)
	$(PY) -m pip install -q $(BUILD_TOOLS)
	$(PY) -m pip install -q -e ".[test,docker,kubernetes,lab]"

# JupyterHub's proxy is a Node program; keep it inside .venv rather than installing globally.
proxy: $(VENV)/bin/configurable-http-proxy

$(VENV)/bin/configurable-http-proxy: | $(PY)
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node configurable-http-proxy@^5
	ln -sf $(VENV)/node/node_modules/.bin/configurable-http-proxy $@
