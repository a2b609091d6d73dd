# syntax=docker/dockerfile:1
# FisherGuard service image: CPU by default.  CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fisherguard:cuda .
# (the CUDA wheels carry the CUDA runtime; the host needs the NVIDIA driver and container toolkit).
# BASE may name another Debian-based image that has Python 3.11 at /usr/local/bin/python3.11.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
RUN pip install . && fisherguard --help > /dev/null

FROM ${BASE} AS runtime
RUN useradd --system --uid 10001 --create-home fisherguard
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FISHERGUARD_HOST=0.0.0.0 \
    FISHERGUARD_PORT=8000 \
    FISHERGUARD_DEVICE=auto
USER 10001
WORKDIR /home/fisherguard
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# one process, one uvicorn worker: metrics are per process
ENTRYPOINT ["fisherguard", "serve"]
