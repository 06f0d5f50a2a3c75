#!/usr/bin/env bash
# Download the wheels gpu_suite.sh needs on a GPU machine that has torch and triton but no package index:
# open_clip_torch and the dependencies such a machine may lack, for the given Python version (default
# 3.12) on this machine's platform (Linux x86-64 for the GPU machines). ftfy and wcwidth are pure Python;
# regex (open_clip's tokenizer imports it) is compiled, so its wheel is taken for that Python version.
# huggingface_hub and safetensors come with timm, which the GPU machine has.
#
#   bash benchmarks/fetch_wheels.sh [DIR] [PYTHON_VERSION]      # DIR defaults to .whl
set -euo pipefail
dir=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dir"
for pkg in open_clip_torch ftfy wcwidth regex; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation py \
        --platform any -d "$dir" "$pkg" 2>/dev/null \
    || python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" -d "$dir" "$pkg"
done
ls -1 "$dir"
