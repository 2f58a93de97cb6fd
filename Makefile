# egress-guard — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test tools bench lint clean

# The environment: a venv with the pinned requirements (re-made when they change).
$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

# Run the proxy on the example policy; every setting can be overridden from the
# environment, e.g. `PROXY_PORT=8080 LOG_LEVEL=DEBUG make run`.
run: $(STAMP)
	CONFIGMAP_PATH=$${CONFIGMAP_PATH:-egress-policy.yaml} $(PY) egress_guard.py

# Command-line tools the end-to-end tests drive (curl; strace for the per-tunnel budget).
tools:
	@.ci/ensure-tools

test: $(STAMP) tools
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench/build
