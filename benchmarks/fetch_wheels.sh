#!/usr/bin/env bash
# Download the wheels gpu_suite.sh needs on a GPU machine that has torch and triton but no package index:
# open_clip_torch and its small pure-Python dependencies, for the given Python version (default 3.12).
#
#   bash benchmarks/fetch_wheels.sh [DIR] [PYTHON_VERSION]      # DIR defaults to .whl
set -euo pipefail
dir=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dir"
for pkg in open_clip_torch ftfy wcwidth; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation py \
        --platform any -d "$dir" "$pkg" \
    || python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" -d "$dir" "$pkg"
done
ls -1 "$dir"
