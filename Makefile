# egress-guard — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# `make run` needs only the runtime requirements; `make test` adds the test tooling and
# keeps the runtime wheels (and the build backend) at hand for the offline install tests
# (e2e/test_package.py).
RUNTIME := $(VENV)/.runtime
DEV     := $(VENV)/.installed
WHEELS  := $(VENV)/wheels
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' proxy/cli.py)
IMAGE   ?= egress-guard:$(VERSION)

.PHONY: run test tools image bench lint clean

$(RUNTIME): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(PY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: -d $(WHEELS) \
	  -r requirements.txt $$(grep '^setuptools==' requirements-dev.txt)
	touch $@

# Run the proxy on the example policy, on 127.0.0.1 (the example's keys are public);
# every setting can be overridden from the environment, e.g.
# `PROXY_PORT=8080 LOG_LEVEL=DEBUG make run`, `PROXY_HOST=0.0.0.0 make run`.
run: $(RUNTIME)
	CONFIGMAP_PATH=$${CONFIGMAP_PATH:-egress-policy.yaml} $(PY) egress_guard.py

# What the tests drive besides Python: curl, strace, systemd-analyze, a container engine.
tools:
	@.ci/ensure-tools

test: $(DEV) tools
	$(PY) -m pytest

# The container image, with docker where a daemon answers, else podman.
image:
	@.ci/ensure-tools image
	.ci/engine build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

bench: $(DEV)
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench/build build dist *.egg-info
