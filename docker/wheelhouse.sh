#!/bin/sh
# Fills a wheelhouse for an image build that reaches no package index: the wheels of
# docker/requirements.lock (hash-checked) and torch (docker/torch.txt), as pip on this host finds them.
#   sh docker/wheelhouse.sh docker/wheelhouse && docker build -t fisherguard .
set -eu
out=${1:-docker/wheelhouse}
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes -r docker/requirements.lock -d "$out"
python3 -m pip download --quiet --no-deps --only-binary=:all: -r docker/torch.txt -d "$out"
