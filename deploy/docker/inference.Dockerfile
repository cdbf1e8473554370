# syntax=docker/dockerfile:1.7
# lipsync-inference on an NVIDIA GPU. Build from the repository root:
#   docker build -f deploy/docker/inference.Dockerfile -t lipsync-inference .
# Run (NVIDIA Container Toolkit on the host): docker run --gpus all -v models:/models:ro -p 50051:50051 lipsync-inference
#
# The CUDA base and the onnxruntime-gpu wheel must agree on the CUDA major version: onnxruntime-gpu
# 1.27 and later on PyPI are built for CUDA 13 + cuDNN 9 (their `cuda` extra names nvidia-*-cu13 /
# ~=13.0 wheels), 1.19-1.26 for CUDA 12 + cuDNN 9. A mismatch does not fail the build: ORT logs that
# it cannot load libonnxruntime_providers_cuda.so and runs on the CPU (docker-compose.yml and the
# Kubernetes manifests therefore set gpus.required=true). CUDA 13 needs an NVIDIA
# driver >= 580 on the host. For an older driver (CUDA 12, >= 525) build with
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 \
#   --build-arg ORT_GPU_SPEC='onnxruntime-gpu>=1.20,<1.27'
# (the models are ONNX IR 9 / opset 17, which every onnxruntime since 1.17 loads).
#
# Python: Ubuntu 22.04's own python3.11 package (universe; the CUDA images are Ubuntu-based and their
# python3 is 3.10). It comes from the base image's trusted archive, so no third-party PPA or key has to
# be fetched; deadsnakes would give a newer 3.11.x patch release at the price of both. The builder and
# the final stage share the same interpreter path, so the venv copied between them works unchanged.
# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed anywhere.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM python AS builder
ARG ORT_GPU_SPEC="onnxruntime-gpu>=1.27"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && pip install --upgrade pip
WORKDIR /src
COPY . .
# The project with its `gpu` extra, then only onnxruntime-gpu providing the `onnxruntime` module:
# both wheels install the same files, so uninstalling the CPU wheel after the GPU one would delete
# files the GPU wheel needs. Remove both and put the GPU wheel (same version, from pip's cache) back.
# The last line fails the build unless the CUDA execution provider is compiled in.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[gpu]" "${ORT_GPU_SPEC}" \
 && ORT_GPU_VERSION="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
 && pip uninstall -y onnxruntime onnxruntime-gpu \
 && pip install --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python -c "import onnxruntime as ort; p = ort.get_available_providers(); assert 'CUDAExecutionProvider' in p, p" \
 && ! pip show onnxruntime >/dev/null 2>&1

FROM python AS runtime
RUN groupadd --system --gid 10001 lipsync \
 && useradd --system --uid 10001 --gid lipsync --home-dir /home/lipsync --create-home --shell /usr/sbin/nologin lipsync \
 && mkdir -p /models /etc/lipsync \
 && chown lipsync:lipsync /models
COPY --from=builder /opt/venv /opt/venv
COPY deploy/configs/inference.yaml /etc/lipsync/inference.yaml
COPY --chmod=0755 deploy/docker/grpc_health_check.py /usr/local/bin/grpc-health-check
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/lipsync \
    CUDA_CACHE_PATH=/tmp/cuda-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/lipsync
EXPOSE 50051
# Model loading (CUDA context, cuDNN, warm-up run) happens before the port answers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["grpc-health-check", "127.0.0.1:50051", "inference.InferenceService"]
# SIGTERM (docker stop, Kubernetes): NOT_SERVING, calls in flight finish within server.grace_seconds, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lipsync-inference"]
CMD ["--config", "/etc/lipsync/inference.yaml"]
