# syntax=docker/dockerfile:1
# One image for serving (the default command) and for `train`, `evaluate`, `tune`, `predict`, `synth`, `bench`.
#
#   docker build -t cellseg:latest .                                 PyTorch's CUDA build (GPU hosts; also runs on CPU)
#   docker build --build-arg TORCH_VARIANT=cpu -t cellseg:cpu .      its CPU build, for hosts without a GPU
#
# docs/operations.md ("Docker") has the sizes and build times of both, measured.

# The dependency list alone, read from pyproject.toml: the dependency layer below is rebuilt only when this list
# changes, not when anything else in pyproject.toml, README.md or the code does.
FROM python:3.11-slim-bookworm AS requirements
COPY pyproject.toml /src/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['onnx'], sep='\n')" > /requirements.txt

# The package as a wheel (the code, the page, the sample image), built apart: the image holds no source tree.
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /wheel .

FROM python:3.11-slim-bookworm

# MPLCONFIGDIR: matplotlib's cache (train draws its curves) where any user can write, also one run with --user.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLCONFIGDIR=/tmp/matplotlib \
    CELLSEG_MODEL_STORE=/app/model_store

# A C++ compiler for torch.compile, which builds the network's CPU kernels at start-up (CELLSEG_COMPILE): faster
# in bfloat16 and float32 (docs/performance.md). Without it the service still runs, uncompiled. Debian's current g++.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# TORCH_VARIANT=cuda: PyPI's Linux wheel, which bundles the CUDA runtime libraries (about 5 GB of the image), so no
# CUDA base image is needed: the host needs only the NVIDIA driver and the container toolkit; without a GPU it runs
# on the CPU. TORCH_VARIANT=cpu: PyTorch's CPU-only wheel from TORCH_CPU_INDEX, for hosts without a GPU.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
LABEL cellseg.torch="${TORCH_VERSION} ${TORCH_VARIANT}"
RUN case "$TORCH_VARIANT" in \
        cuda) pip install "torch==${TORCH_VERSION}" ;; \
        cpu) pip install "torch==${TORCH_VERSION}+cpu" --extra-index-url "$TORCH_CPU_INDEX" ;; \
        *) echo "TORCH_VARIANT is cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac

# Every other dependency, from the list alone (above), so editing the code or the docs does not reinstall them. The
# onnx extra lets CELLSEG_BACKEND=auto run the network on ONNX Runtime on CPUs without native bfloat16 when
# CELLSEG_COMPILE=false; otherwise compiled PyTorch is faster there (README, "Performance").
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt && rm /tmp/requirements.txt

# The container's user owns /app and the bundled store, so `train` and `bench` run with their defaults in it, and a
# named volume mounted over /app/model_store starts as a copy that it can write. A host folder mounted there keeps
# its owner: the entrypoint says what to run when `train` cannot write it.
RUN groupadd --gid 10001 cellseg \
    && useradd --uid 10001 --gid 10001 --create-home cellseg \
    && install --directory --owner 10001 --group 10001 /app
WORKDIR /app

# The bundled default model (and the earlier ones); mount a folder over /app/model_store to serve others.
COPY --chown=10001:10001 model_store ./model_store

COPY deploy/entrypoint.sh /usr/local/bin/cellseg-entrypoint
COPY deploy/healthcheck.py /usr/local/bin/cellseg-healthcheck

# The package last: a change to the code or to README.md rebuilds the wheel and this layer only. (chmod here: the
# legacy builder has no COPY --chmod.)
COPY --from=wheel /wheel /tmp/wheel
RUN pip install --no-deps /tmp/wheel/*.whl && rm -rf /tmp/wheel && pip check \
    && chmod 0755 /usr/local/bin/cellseg-entrypoint /usr/local/bin/cellseg-healthcheck

USER 10001

EXPOSE 8000
# Healthy means ready (/ready), not alive: compose opens the proxy onto the service only then. The start period
# covers the warm-up (about a minute on 2 cores, compiling); a check every 10 s reports it within 10 s.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 CMD ["cellseg-healthcheck"]
ENTRYPOINT ["cellseg-entrypoint"]
CMD ["serve"]
