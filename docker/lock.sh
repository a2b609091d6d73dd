#!/bin/sh
# Refreshes docker/requirements.lock: the service's runtime dependencies (pyproject.toml) pinned with
# hashes, torch apart (the Dockerfile installs the build its target needs: CPU or CUDA, docker/torch.txt's
# version). Needs uv (pip install uv) and the CPU torch wheel: the PyTorch CPU index when online, or
# a folder holding it, e.g.  sh docker/lock.sh --find-links /opt/wheels
set -eu
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
  --constraint docker/torch.txt --no-emit-package torch --no-header --quiet "$@" -o docker/requirements.lock
