# One image for both entry points: `colo-operator` (the chart's Deployment)
# and `colo-agent` (the pods the operator creates; it names the command
# explicitly, so the image sets no ENTRYPOINT that could get in the way).
#
#   docker build -t colo-operator:0.1.0 .
#   kind load docker-image colo-operator:0.1.0
#
# The build stage compiles the guest firmware; the runtime stage has no
# compiler and loads that prebuilt image ($COLO_AGENT_FIRMWARE), which the
# agent refuses if it was built from other sources than the ones installed.
# `bash .ci/docker` builds this file on a machine that cannot pull, from a
# base image it makes from Debian packages under the FROM name below.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev binutils \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/colo/venv PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv "$VIRTUAL_ENV"
WORKDIR /src
# Dependencies first, in their own layer: a source or README edit reuses it
# (pyproject.toml names the README, so an empty one stands in here).
COPY pyproject.toml ./
RUN mkdir -p agent/colo_agent operator/colo_operator \
    && touch README.md agent/colo_agent/__init__.py operator/colo_operator/__init__.py \
    && "$VIRTUAL_ENV/bin/pip" install . \
    && "$VIRTUAL_ENV/bin/pip" uninstall -y colo-operator \
    && rm -rf agent operator build README.md
COPY README.md ./
COPY agent ./agent
COPY operator ./operator
RUN "$VIRTUAL_ENV/bin/pip" install --no-deps . \
    && XDG_CACHE_HOME=/tmp/fw "$VIRTUAL_ENV/bin/python" -m colo_agent.microvm.firmware_build \
       --install /opt/colo/firmware \
    && "$VIRTUAL_ENV/bin/python" -m compileall -q "$VIRTUAL_ENV/lib"

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 65532 colo \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin colo
COPY --from=build /opt/colo/venv /opt/colo/venv
COPY --from=build /opt/colo/firmware /opt/colo/firmware
COPY crds /opt/colo/crds
ENV PATH=/opt/colo/venv/bin:$PATH \
    COLO_AGENT_FIRMWARE=/opt/colo/firmware/firmware.bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# Operator liveness (kopf), agent client / control / replication ports.
EXPOSE 8080 6379 7700
CMD ["colo-operator"]
