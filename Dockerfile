# CPU image: ctscan with serving and export extras. Build: docker build -t ctscan .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.39.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU wheels of torch keep the image small.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.14.1" "torchvision==0.29.1"

COPY pyproject.toml README.md ./
COPY src ./src
COPY settings ./settings
# The project itself (its dependency ranges live in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install ".[serve,export]" \
    && useradd --create-home --uid 10001 ctscan \
    && mkdir -p /app/outputs && chown ctscan /app/outputs

USER 10001
ENTRYPOINT ["ctscan"]
CMD ["--help"]
