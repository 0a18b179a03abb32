# syntax=docker/dockerfile:1
# One image for every batchbridge role: the Celery worker (the default command), the beat,
# Flower, the metrics server, local-api and the example producer. docker-compose.yml and
# deploy/k8s pick the role with the command. No secret is baked in: every key, password and
# URL comes from the environment at run time.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: build the wheel and install it with its extras into a virtualenv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
WORKDIR /src
# Only what the package build reads (see .dockerignore): tests, bench and deploy stay out.
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
COPY shared ./shared
# A regular (non-editable) install: the final image needs no source tree. pip only warns if
# one of the extras is not defined by this version of pyproject.toml.
RUN /opt/venv/bin/pip install ".[worker,local-api,postgres]"

# ---- final: the slim runtime, non-root ----
FROM ${PYTHON_IMAGE}
# tini is PID 1: it forwards SIGTERM to the command (Celery's warm shutdown) and reaps
# orphans, as `docker run --init` would, also on Kubernetes where there is no such flag.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 batchbridge \
    && useradd --system --uid 10001 --gid batchbridge --home-dir /home/batchbridge \
        --create-home --shell /usr/sbin/nologin batchbridge \
    && install -d -o batchbridge -g batchbridge -m 0750 /var/lib/batchbridge

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The example producer (docker compose --profile example, or `kubectl run` with this image).
COPY deploy/examples ./deploy/examples

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BATCHBRIDGE_DATA_DIR=/var/lib/batchbridge

USER 10001:10001
# A worker's DATA_DIR is scratch (batch files being written, downloads): give each container
# its own volume, never a shared one.
VOLUME ["/var/lib/batchbridge"]

ENTRYPOINT ["tini", "--"]
CMD ["celery", "-A", "worker.app", "worker", "-Q", "batchbridge", "--loglevel=INFO"]
