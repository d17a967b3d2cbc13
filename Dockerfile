# syntax=docker/dockerfile:1
# ctscan on CPU: train, evaluate, predict, export and serve (docs/delivery.md has every command).
#   docker build -t ctscan:cpu .
#   docker run --rm -v "$PWD/data:/app/data:ro" -v "$PWD/outputs:/app/outputs" ctscan:cpu train --device cpu
#   docker run --rm -p 8000:8000 -v "$PWD/outputs:/app/outputs" ctscan:cpu serve outputs/runs/RUN/best.pt
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: every wheel is built and installed into /opt/venv here (compilers live only in this stage)
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# PyTorch's CPU-only wheels: no CUDA libraries (about 1.5 GB smaller than PyPI's default Linux build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C toolchain for any dependency that has no wheel for this platform (none on x86_64 today).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# The project (not editable) with what train, evaluate, predict (DICOM too), export and serve use,
# OpenVINO too (--backend openvino: bf16 on AMX CPUs); its dependency ranges live in
# pyproject.toml, torch above already satisfies them.
# hadolint ignore=DL3013
RUN pip install ".[serve,export,dicom,sweep,openvino]" \
    && pip check

# ---- final: the slim base, the installed environment, no compilers
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ctscan" \
      org.opencontainers.image.description="Chest-CT slice classifiers: train, evaluate, predict, export, serve (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    GIT_PYTHON_REFRESH=quiet \
    CTSCAN_SERVE__HOST=0.0.0.0 \
    CTSCAN_SERVE__PORT=8000

RUN useradd --create-home --uid 10001 --user-group ctscan
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Recipes for --settings NAME; data/ and outputs/ are volumes (the paths in the default settings).
COPY settings ./settings
RUN mkdir -p /app/data /app/outputs && chown ctscan:ctscan /app/outputs

USER 10001:10001
EXPOSE 8000
# Healthy = /health answers, when the container serves; any other command (train, ...) counts as healthy.
# Python's urllib: the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u;a=open('/proc/1/cmdline','rb').read().decode().split('\\0');p=a[a.index('--port')+1] if '--port' in a else os.environ.get('CTSCAN_SERVE__PORT','8000');'serve' in a and u.urlopen('http://127.0.0.1:%s/health'%p,timeout=4)"]
ENTRYPOINT ["ctscan"]
CMD ["--help"]
