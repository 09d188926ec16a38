# syntax=docker/dockerfile:1
# One image for serving (the default command) and for `train`, `evaluate`, `predict`, `bench`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CELLSEG_MODEL_STORE=/app/model_store

# The CUDA build of torch: PyPI's Linux wheel bundles the CUDA runtime libraries, so no CUDA base image is needed;
# the host only needs the NVIDIA driver and the container toolkit. On a host without a GPU it runs on the CPU.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

# A C++ compiler for torch.compile, which builds the network's CPU kernels at start-up (CELLSEG_COMPILE): faster
# in bfloat16 and float32 (docs/performance.md). Without it the service still runs, uncompiled. Debian's current g++.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so editing the code does not reinstall them. The onnx extra lets
# CELLSEG_BACKEND=auto run the network on ONNX Runtime on CPUs without native bfloat16 when CELLSEG_COMPILE=false;
# otherwise compiled PyTorch is faster there (README, "Performance").
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py \
    && pip install "./[onnx]" \
    && pip uninstall --yes cellseg \
    && rm -rf app build

COPY app ./app
RUN pip install --no-deps . && rm -rf build

# The bundled default model; mount a volume over /app/model_store to serve others without rebuilding.
COPY model_store ./model_store

RUN useradd --create-home --uid 10001 cellseg
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["serve"]
