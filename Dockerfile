# syntax=docker/dockerfile:1
# FisherGuard service image. CPU by default; for CUDA:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t fisherguard:cuda .
ARG BASE=python:3.11-slim-bookworm
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

FROM python:3.11-slim-bookworm AS build
ARG TORCH_INDEX
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
RUN pip install .

FROM ${BASE} AS runtime
RUN (command -v python3.11 >/dev/null || (apt-get update && apt-get install -y --no-install-recommends python3.11 && rm -rf /var/lib/apt/lists/*)) \
 && useradd --system --uid 10001 --create-home fisherguard
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FISHERGUARD_HOST=0.0.0.0 \
    FISHERGUARD_PORT=8000 \
    FISHERGUARD_DEVICE=auto
USER fisherguard
WORKDIR /home/fisherguard
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["fisherguard", "serve"]
