# egress-guard container image.
#
#   make image                      (docker where a daemon answers, else podman)
#   docker run --rm --read-only -p 4750:4750 -p 9090:9090 \
#     -v "$PWD/config:/etc/config:ro" egress-guard:0.1.0
#
# (config/ holds egress-policy.yaml: mount the directory, so edits reload.)
#
# Two stages: the builder installs the pinned wheels into a virtualenv and byte-compiles
# everything; the runtime stage copies only that virtualenv and the application. Every
# dependency ships a manylinux wheel, so no compiler is installed in either stage
# (--only-binary makes pip fail rather than fall back to building from source).
#
# The base is pinned to a patch release and Debian suite. To pin the digest as well, run
# `docker buildx imagetools inspect python:3.11.14-slim-bookworm` and append
# `@sha256:<index digest>` to both FROM lines (see deploy/README.md, "Image").

FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app

# The dependencies' own test suites (gevent, greenlet, zope.interface: ~6 MB) never run here.
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && find /opt/venv/lib -depth -type d \( -name tests -o -path '*/gevent/testing' \) -exec rm -rf {} +

COPY egress_guard.py egress-policy.yaml ./
COPY policy/ policy/
COPY wire/ wire/
COPY proxy/ proxy/

# The runtime root filesystem is read-only and PYTHONDONTWRITEBYTECODE is set there, so
# bytecode must exist before the image ships. checked-hash .pyc files stay valid whatever
# timestamps the COPY below gives the sources.
RUN python -m compileall -q -f -j 0 --invalidation-mode checked-hash /app /opt/venv/lib


FROM python:3.11.14-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="egress-guard" \
      org.opencontainers.image.description="HTTP CONNECT egress proxy for Kubernetes pods: per-identity destination allow-lists with TLS SNI checks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# The base ships an installer (pip, setuptools, ensurepip's wheels); nothing is installed
# at run time, so the runtime stage carries none. (This only deletes files.)
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && bundled="$(python -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))')/_bundled" \
 && rm -rf /usr/local/bin/pip /usr/local/bin/pip3* "$site"/pip "$site"/pip-* "$site"/setuptools \
      "$site"/setuptools-* "$site"/_distutils_hack "$site"/distutils-precedence.pth "$site"/wheel \
      "$site"/wheel-* "$bundled" /usr/share/python-wheels

# CONFIGMAP_PATH points at the Kubernetes mount. The example policy is kept at
# /app/egress-policy.yaml but deliberately not used by default: an image started without
# its policy mount must fail fast, not run with example keys. A container listens on every
# interface (the proxy's own default is 127.0.0.1).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROXY_HOST=0.0.0.0 \
    PROXY_PORT=4750 \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9090 \
    CONFIGMAP_PATH=/etc/config/egress-policy.yaml

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
WORKDIR /app

# Numeric, so Kubernetes can verify runAsNonRoot without /etc/passwd. Files stay owned
# by root: the process can read its code but not change it.
USER 10001:10001

EXPOSE 4750 4751 9090

# Docker and Podman only; Kubernetes ignores HEALTHCHECK and uses the probes in
# deploy/base/deployment.yaml. slim has no curl, so python's urllib does the request; a
# non-2xx answer or a refused connection raises and exits non-zero.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('METRICS_PORT', '9090'), timeout=3)"]

# Exec form: python is PID 1 and receives SIGTERM itself (readiness off, listener
# closed, tunnels drained for SHUTDOWN_TIMEOUT, exit 0). A shell wrapper would swallow it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "egress_guard.py"]
