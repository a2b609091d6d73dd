# FisherGuard service image, CPU by default (docs/deployment.md#containers).
#   docker build -t fisherguard .
#   CUDA:    docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fisherguard:cuda .
#   offline: sh docker/wheelhouse.sh && docker build -t fisherguard .   (no package index reached inside the build)
# BASE may name another Debian-based image with Python 3.11 (python3.11 and its venv module on the PATH).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
LABEL org.fisherguard.stage=build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The pinned runtime set (docker/requirements.lock, with hashes; torch apart: its build depends on the
# target). A wheelhouse in docker/wheelhouse/ replaces every index.
COPY docker/requirements.lock docker/wheelhouse/ /deps/
RUN if ls /deps/*.whl > /dev/null 2>&1; then \
      pip install --no-index --find-links /deps "torch==${TORCH_VERSION}" \
      && pip install --no-index --find-links /deps --no-deps --require-hashes -r /deps/requirements.lock; \
    else \
      pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
      && pip install --no-deps --require-hashes -r /deps/requirements.lock; \
    fi
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
RUN pip install --no-deps --no-build-isolation --no-index . \
    && fisherguard --help > /dev/null \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf $site/torch/include $site/torch/share $site/torch/lib/*.a $site/torch/_inductor/codegen/*.h \
              $site/torch/utils/benchmark $site/torch/testing/_internal/generated $site/caffe2 \
    && find /opt/venv -depth \( -name __pycache__ -o -name tests -path "*/numpy/*" \) -exec rm -rf {} + \
    && python -m compileall -q -j 0 $site/service $site/models

FROM ${BASE} AS runtime
# jemalloc: `serve` re-executes under it (docs/deployment.md#memory); a base that has it needs no index.
RUN useradd --system --uid 10001 --create-home fisherguard \
    && if ! ls /usr/lib/*/libjemalloc.so.2 > /dev/null 2>&1; then \
      (apt-get update && apt-get install -y --no-install-recommends libjemalloc2 && rm -rf /var/lib/apt/lists/*) \
      || echo "no libjemalloc2: serve runs on the C library's malloc"; \
    fi
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FISHERGUARD_HOST=0.0.0.0 \
    FISHERGUARD_PORT=8000 \
    FISHERGUARD_DEVICE=auto
USER 10001
WORKDIR /home/fisherguard
EXPOSE 8000
# The probe reads the address the server bound (its address file), so it follows --port and FISHERGUARD_PORT.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 CMD ["python", "-m", "service.serve.health"]
# one process, one uvicorn worker: metrics are per process
ENTRYPOINT ["fisherguard", "serve"]
