# syntax=docker/dockerfile:1
# The one project image: every platform service (`mlops serve ...`), the MLflow server, the KFP components
# (`python -m ...` from /app) and the Ray training job run from it. Built by `make up` (infra/kind/up.sh).

# Pinned by tag; bump deliberately (same minor as the project's `requires-python`).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: a virtualenv with torch (CPU wheel) and the project, no compilers in the final image ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip
# torch first and from the CPU index, pinned like the Makefile does: the project's own requirement
# (torch==2.13.0) is then already met by the CPU build, and pip never resolves a CUDA one.
# Where the CPU index cannot be reached (a mirror with only PyPI), PyPI's wheel, saying so.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --timeout 15 --retries 1 --index-url "${TORCH_INDEX}" "torch==2.13.0" \
    || { echo "warning: ${TORCH_INDEX} not reachable, torch from the default index (a larger image)"; \
         pip install "torch==2.13.0"; }
WORKDIR /src
# Dependencies change less often than code: resolve them from the metadata first (cached layer).
COPY pyproject.toml README.md requirements.lock ./
COPY core ./core
COPY control_plane ./control_plane
COPY mlops ./mlops
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
COPY monitoring ./monitoring
# Every dependency pinned by the same lock that `make setup` and CI use.
RUN pip install -c requirements.lock ".[cluster]" \
    && python -c "import torch, mlflow, kfp, ray, bentoml, psycopg, boto3, kubernetes; assert not torch.cuda.is_available()" \
    && python -c "import aiohttp_cors, opencensus, colorful, smart_open, virtualenv; import ray.dashboard.optional_deps" \
    && py-spy --version

# ---- runtime: slim base, the venv, the project tree at /app, a non-root user ----
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --gid ${UID} mlops \
    && useradd --uid ${UID} --gid ${UID} --home-dir /home/mlops --create-home --shell /usr/sbin/nologin mlops \
    && mkdir -p /data \
    && chown ${UID}:${UID} /data
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The project tree (see .dockerignore), read-only for the app user: `python -m components...` and the
# KFP components import from here, the services from the installed package.
COPY . /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLOPS_HOME=/data \
    MLOPS_TARGET=kind \
    BENTOML_DO_NOT_TRACK=true \
    RAY_USAGE_STATS_ENABLED=0 \
    HOME=/home/mlops
USER 10001:10001
# gateway, slot a, slot b, control plane, controller, drift monitor, MLflow
EXPOSE 8710 8721 8722 8700 8730 8740 5000
ENTRYPOINT ["mlops"]
CMD ["--help"]
