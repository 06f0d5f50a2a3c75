#!/usr/bin/env bash
# One run on a CUDA machine within one time budget: the headline figures first, then the merge sweeps, the
# profile, the CUDA tests and the other sweeps (benchmarks/suite.py lists the stages). Every result is appended to OUTDIR as it is made;
# with --archive, PATH is kept a current .tar.gz of OUTDIR during the run and at its end.
#
#   bash benchmarks/gpu_suite.sh [--budget SECONDS] [--archive PATH] [--wheels DIR] [suite options] OUTDIR
#
#   --budget SECONDS  the whole run, setup included (default 420, as benchmarks/suite.py); each stage gets what remains
#   --archive PATH    .tar.gz of OUTDIR, outside it (the one file to carry back)
#   --wheels DIR      open_clip's wheels for a machine without a package index (default .whl; make them
#                     with benchmarks/fetch_wheels.sh): installed into a private folder with pip, or by
#                     unzipping them where pip is unusable; nothing else on the machine changes
#   other options (--device cpu, --only STAGE..., --skip STAGE..., --every SECONDS, --list) go to
#                     benchmarks/suite.py, which prints its plan (expected seconds per stage) against the budget;
#                     --only and --skip take the lower-case words after them (stage names), so OUTDIR and the
#                     wheels folder may come before or after them when they are paths (/tmp/out, .whl)
#
# A measurement split into two calls of about 7 minutes each: the first call as it is, the second with
# --skip naming the stages the first one finished (its stages.jsonl says which), less preflight and warm:
# a fresh machine has an empty Triton cache, and on the same machine warm only finds what is cached.
#
# The exit status is non-zero if any stage failed, ran out of time or was skipped.
set -uo pipefail
start=$(date +%s)
budget=420 archive="" wheels=.whl out="" extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
        --archive) archive=${2:?--archive needs a path}; shift 2 ;;
        --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
        # Stage names are lower-case words: a path (OUTDIR, the wheels) after them is not taken for one.
        --only|--skip) extra+=("$1"); shift; while [ $# -gt 0 ] && [[ $1 =~ ^[a-z_]+$ ]]; do extra+=("$1"); shift; done ;;
        --list) extra+=("$1"); shift ;;
        --*) extra+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        *) if [ -z "$out" ]; then out=$1; else wheels=$1; fi; shift ;;
    esac
done
[ -n "$out" ] || { echo "usage: benchmarks/gpu_suite.sh [--budget SECONDS] [--archive PATH] [--wheels DIR] OUTDIR" >&2; exit 2; }
[[ $budget =~ ^[0-9]+$ ]] && [ "$budget" -gt 0 ] || { echo "--budget $budget: give a whole number of seconds > 0" >&2; exit 2; }
[ -z "$archive" ] || archive=$(cd "$(dirname "$archive")" 2>/dev/null && pwd)/$(basename "$archive") \
    || { echo "--archive $archive: its folder does not exist" >&2; exit 2; }
case $wheels in /*) ;; *) wheels=$PWD/$wheels ;; esac
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Kernels compile for the GPU: the interpreter setting of a CPU test machine must not leak in.
unset TRITON_INTERPRET

# The package runs from the source tree: the kernels folder is imported as tempme_kernels.
site=$(mktemp -d)
ln -s "$PWD/kernels" "$site/tempme_kernels"
export PYTHONPATH="$PWD:$site:${PYTHONPATH:-}"
log() { echo "[setup] $*" | tee -a "$out/suite.log"; }
have_open_clip() {  # prints where open_clip comes from; fails when it does not import
    "$py" -c "import open_clip; print('[setup] open_clip', open_clip.__version__, 'from', open_clip.__file__)" \
        2>>"$out/suite.log" | tee -a "$out/suite.log"
    return "${PIPESTATUS[0]}"
}
if ! have_open_clip; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        if "$py" -m pip --version >/dev/null 2>&1 && "$py" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --target "$site" "$wheels"/*.whl >>"$out/suite.log" 2>&1; then
            log "installed with pip into $site: $(cd "$wheels" && echo *.whl)"
        else
            # A wheel is a zip of the files to put on the path: pure-Python ones need nothing more.
            "$py" - "$site" "$wheels"/*.whl <<'PY' && log "pip unusable: unzipped into $site: $(cd "$wheels" && echo *.whl)"
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
        fi
        have_open_clip || log "open_clip still does not import: the whole-model stages will fail"
    else
        log "open_clip is missing and $wheels holds no wheels: the whole-model stages will fail"
    fi
fi

args=("$out" --deadline $((start + budget)) --budget "$budget")
[ -z "$archive" ] || args+=(--archive "$archive")
"$py" -m benchmarks.suite "${args[@]}" "${extra[@]}"
rc=$?
rm -rf "$site"
exit $rc
