# One image for both entry points: `colo-operator` (the chart's Deployment)
# and `colo-agent` (the pods the operator creates; it names the command
# explicitly, so the image sets no ENTRYPOINT that could get in the way).
#
#   docker build -t ghcr.io/colo-dev/colo-operator:0.1.0 .
#   kind load docker-image ghcr.io/colo-dev/colo-operator:0.1.0
#
# gcc stays in the runtime image: the agent builds the guest firmware from
# the sources it ships with and caches the result keyed by the compiler's
# identity; the build stage below already filled that cache, so a pod
# normally starts without compiling anything.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/colo/venv PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY operator ./operator
RUN "$VIRTUAL_ENV/bin/pip" install . \
    && XDG_CACHE_HOME=/opt/colo/cache "$VIRTUAL_ENV/bin/python" -c \
       "from colo_agent.microvm.firmware_build import build_firmware; print(build_firmware())"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 colo \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin colo
COPY --from=build /opt/colo/venv /opt/colo/venv
# Writable by the agent: a different compiler (or a patched source) rebuilds into it.
COPY --from=build --chown=65532:65532 /opt/colo/cache /opt/colo/cache
COPY crds /opt/colo/crds
ENV PATH=/opt/colo/venv/bin:$PATH \
    XDG_CACHE_HOME=/opt/colo/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# Operator liveness (kopf), agent client / control / replication ports.
EXPOSE 8080 6379 7700
CMD ["colo-operator"]
