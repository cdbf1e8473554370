# syntax=docker/dockerfile:1.7
# lipsync-compositing (CPU only); also runs `lipsync-models` (the compose `models` service and the
# Kubernetes models Job). Build from the repository root:
#   docker build -f deploy/docker/compositing.Dockerfile -t lipsync-compositing .
# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed anywhere.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade pip
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
 && python -c "import cv2, av, onnxruntime, compositing_service.server, demo_models.cli"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 lipsync \
 && useradd --system --uid 10001 --gid lipsync --home-dir /home/lipsync --create-home --shell /usr/sbin/nologin lipsync \
 && mkdir -p /models /etc/lipsync /tmp/lipsync-frames \
 && chown lipsync:lipsync /models /tmp/lipsync-frames
COPY --from=builder /opt/venv /opt/venv
COPY deploy/configs/compositing.yaml /etc/lipsync/compositing.yaml
COPY deploy/configs/inference.yaml /etc/lipsync/inference.yaml
COPY --chmod=0755 deploy/docker/grpc_health_check.py /usr/local/bin/grpc-health-check
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/lipsync \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/lipsync
EXPOSE 50052
# NOT_SERVING (unhealthy) while the inference service is unreachable.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["grpc-health-check", "127.0.0.1:50052", "compositing.CompositingService"]
# SIGTERM: NOT_SERVING, calls in flight finish within server.grace_seconds, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lipsync-compositing"]
CMD ["--config", "/etc/lipsync/compositing.yaml"]
