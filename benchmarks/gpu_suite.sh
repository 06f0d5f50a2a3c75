#!/usr/bin/env bash
# One run on a CUDA machine (at most about 9.5 minutes, each stage capped; about 6 expected on an H100): the CUDA correctness tests, then the merge-op
# and whole-model benchmarks, then the plots. Every result lands in OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR [WHEELS_DIR]
#
# Where open_clip is not installed and pip cannot reach an index, put its wheels (open_clip_torch, ftfy,
# wcwidth; timm/huggingface_hub if missing) in WHEELS_DIR (default .whl): they are installed into a
# private folder, nothing else on the machine changes. Each stage has its own time limit and a failing
# stage does not stop the next; the exit status is non-zero if any stage failed.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [WHEELS_DIR]}
wheels=${2:-.whl}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# The package runs from the source tree: the kernels folder is imported as tempme_kernels.
site=$(mktemp -d)
ln -s "$PWD/kernels" "$site/tempme_kernels"
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}"
if ! "$py" -c "import open_clip" 2>/dev/null; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
    fi
    "$py" -c "import open_clip" || { echo "open_clip is missing and no wheels were found in $wheels"; exit 1; }
fi
"$py" - <<'PY' | tee "$out/environment.txt"
import torch, triton, open_clip
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| open_clip", open_clip.__version__)
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv >> "$out/environment.txt" 2>/dev/null

failed=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$out/stages.txt"
    [ "$rc" -eq 0 ] || failed=1
}

# 1. Correctness on the GPU: the CUDA module at real sizes, then the kernel and model tests compiled for
#    the GPU (the same tests run in the interpreter on CPU-only machines).
stage cuda_tests 100 "$py" -m pytest -q -p no:cacheprovider tests/test_triton_cuda.py tests/test_cuda_determinism.py \
    --junitxml "$out/cuda_tests.xml"
stage kernel_tests 100 "$py" -m pytest -q -p no:cacheprovider tests/test_triton_ops.py tests/test_model_triton.py \
    --junitxml "$out/kernel_tests.xml"
# 2. Merge ops: fp16 over every batch and both models; bf16 and fp32 at the headline shape.
stage bench_ops 90 "$py" -m benchmarks.bench_ops --out "$out" --rep-ms 40
stage bench_ops_dtypes 40 "$py" -m benchmarks.bench_ops --out "$out/dtypes" --models ViT-B-16 --batches 32 \
    --dtypes bf16 fp32 --impls torch triton --rep-ms 40
# 3. Whole encoders: latency at 1 video, throughput at 16; inference and a training step.
stage bench_model 110 "$py" -m benchmarks.bench_model --out "$out" --batches 1 16 --rep-ms 100
stage bench_compile 90 "$py" -m benchmarks.bench_model --out "$out/compile" --models ViT-B-16 --batches 1 16 \
    --modes infer --variants open_clip tempme-triton tempme-triton+compile --compile --rep-ms 100
# 4. Plots.
stage plots 30 "$py" -m benchmarks.plots "$out"
cat "$out/stages.txt"
exit $failed
