"""Compile ahead, on every core, the Triton kernels that a patched model will launch.

With an empty Triton cache, the first ``encode_video`` on a GPU compiles each kernel variant it
launches (one per set of dtypes, alignments and tiles: a few dozen per batch size, dtype and
forward or training step), one after another, about a second of one CPU core each. Triton keeps
them on disk, so that cost comes back on every fresh machine or container.

:func:`compile_kernels` runs the model once on meta tensors (a copy whose weights take no memory;
nothing is computed and no device is touched) with every Triton launch recorded instead of run
(:class:`~tempme_fast.ops.recording.Recorder`), then compiles each distinct variant in a pool of
processes into Triton's on-disk cache, where the real launches find them. (Variants are looked up
here while the cache has them; worker processes start from the first one it lacks, so a second call
starts none.) With ``arch`` it compiles for a GPU that is not here, e.g. while building a container
image on a machine without one (Triton's cache folder, ``TRITON_CACHE_DIR``, then goes into the image).

    model = open_clip.create_model("ViT-B-16", pretrained="openai").cuda().half()
    tempme_fast.apply_tempme(model, TempMeConfig.for_model(model, frames=12))
    tempme_fast.compile_kernels(model, batch_sizes=(1, 16))       # then model.encode_video(...) compiles nothing

Variants follow the model's dtype (or ``dtype``), each batch size, and with ``training=True`` the
forward and backward of a training step in that dtype. A launch that was not compiled ahead (a
batch size not given, autocast) compiles at its first call as it would have anyway.
"""
from __future__ import annotations

import copy
import functools
import importlib
import itertools
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .ops import recording
from .ops.recording import Launch

__all__ = ["check_compile_target", "compile_kernels", "compile_launches", "distinct_launches", "record_launches"]


def _meta_copy(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (same shapes, strides and
    ``requires_grad``; ``dtype`` for the floating ones where given). The weights are never copied."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        meta = torch.empty_strided(t.shape, t.stride(), dtype=target, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _check_model(model: nn.Module) -> None:
    settings = getattr(model, "tempme", None)
    if settings is None or not hasattr(model, "encode_video"):
        raise ValueError("model is not patched by apply_tempme; call tempme_fast.apply_tempme(model, ...) first")
    if settings.backend == "torch":
        raise ValueError("model runs the torch backend (apply_tempme(..., backend='torch')), which launches no "
                         "Triton kernel; patch it with backend='auto' or 'triton' to compile its kernels")


def record_launches(model: nn.Module, batch_sizes: Sequence[int] = (1,), dtype: Optional[torch.dtype] = None,
                    training: bool = False) -> List[Launch]:
    """Every Triton launch of ``model.encode_video`` (and with ``training`` of its backward) at each
    batch size, recorded on a meta copy of the model, in launch order (repeats included)."""
    _check_model(model)
    if isinstance(batch_sizes, int) or not batch_sizes or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={batch_sizes!r} must be a non-empty sequence of ints >= 1")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype={dtype} must be None (the model's), torch.float16, torch.bfloat16 or torch.float32")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels are the interpreter's, whose launch descriptions differ "
                           "from a GPU's; record in a process without it (unset before triton is imported)")
    meta = _meta_copy(model, dtype)
    frames = model.tempme.config.frames
    height, width = tuple(model.visual.image_size)  # (open_clip keeps it as a pair)
    video_dtype = dtype or next(model.visual.parameters()).dtype
    previous = recording.META_AS_GPU
    recording.META_AS_GPU = True
    try:
        with recording.recording_all() as launches:
            for batch in batch_sizes:
                video = torch.empty(batch, frames, 3, height, width, dtype=video_dtype, device="meta")
                with torch.no_grad():
                    meta.encode_video(video)
                if training:
                    with torch.enable_grad():
                        out = meta.encode_video(video)
                        if out.requires_grad:
                            torch.autograd.backward(out, torch.empty_like(out))
    finally:
        recording.META_AS_GPU = previous
    return launches


# ---------------------------------------------------------------------------------------------
# Compiling recorded launches in worker processes
# ---------------------------------------------------------------------------------------------

def _spec(launch: Launch) -> tuple:
    """What a worker process needs to compile ``launch``: the kernel by module and name, and each
    tensor argument by its dtype and address modulo 16 (all that the specialisation reads of it)."""
    args = tuple(("tensor", str(a.dtype).split(".")[-1], a.data_ptr() % 16) if isinstance(a, torch.Tensor)
                 else ("value", a) for a in launch.args)
    fn = launch.kernel.fn
    return fn.__module__, fn.__name__, launch.grid, args, dict(launch.kwargs)


def _launch(spec: tuple) -> Launch:
    module, name, grid, args, kwargs = spec
    values = []
    for kind, *rest in args:
        if kind == "tensor":
            dtype, offset = getattr(torch, rest[0]), rest[1]
            # A meta tensor's address is its offset in bytes from 0: the same alignment as the original.
            values.append(torch.empty(16, dtype=dtype, device="meta")[offset // dtype.itemsize:])
        else:
            values.append(rest[0])
    return Launch(getattr(importlib.import_module(module), name), grid, tuple(values), kwargs)


def _compile(job: tuple) -> dict:
    """Compile one variant (and its launcher stub when ``stubs``); what happened."""
    spec, arch, stubs = job
    from triton import knobs

    launch = _launch(spec)
    hits = []
    previous = knobs.compilation.listener
    knobs.compilation.listener = lambda **info: hits.append(bool(info.get("cache_hit")))
    t0 = time.perf_counter()
    result = {"kernel": spec[1]}
    try:
        compiled = recording.compile_launch(launch, arch)
        result.update(ok=True, cache_hit=bool(hits) and all(hits))
    except Exception as e:  # noqa: BLE001 (counted; the launch itself will report it)
        compiled = None
        result.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        knobs.compilation.listener = previous
    if compiled is not None and stubs:
        # The kernel is cached whatever happens here: a stub that fails is built again at the launch.
        try:
            from triton.runtime.driver import driver

            driver.active.launcher_cls(compiled.src, compiled.metadata)
        except Exception as e:  # noqa: BLE001
            result["stub_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    result["seconds"] = time.perf_counter() - t0
    return result


RESULT = "tempme-precompile-result "  # the prefix of a worker's result lines (the compiler may print too)


def _worker(path: str, first: int, step: int) -> None:
    """A worker process: compile jobs ``first, first + step, ...`` of the pickled list at ``path``."""
    with open(path, "rb") as f:
        work = pickle.load(f)
    for index in range(first, len(work), step):
        print(RESULT + json.dumps({**_compile(work[index]), "index": index}), flush=True)


def _read_results(path: str) -> List[dict]:
    """The result lines of a worker's output file; a line cut off where the worker was killed is left out (its
    job then counts as lost, with the worker's exit status and error output)."""
    found = []
    with open(path) as f:
        for line in f:
            if line.startswith(RESULT):
                try:
                    found.append(json.loads(line[len(RESULT):]))
                except ValueError:
                    continue
    return found


def _in_processes(work: List[tuple], jobs: int) -> List[dict]:
    """``_compile`` of every job, spread over ``jobs`` new Python processes. Plain subprocesses, not a
    multiprocessing pool: a spawned pool imports the caller's main script again (a script without an
    ``if __name__ == "__main__"`` guard would run twice), and a forked one would share a CUDA context."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "work.pkl")
        with open(path, "wb") as f:
            pickle.dump(work, f)
        # The workers import this package as this process found it.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if isinstance(p, str) and p))
        code = "import sys; from tempme_fast.precompile import _worker; _worker(sys.argv[1], int(sys.argv[2]), " \
               "int(sys.argv[3]))"
        logs = [(os.path.join(folder, f"out{k}"), os.path.join(folder, f"err{k}")) for k in range(jobs)]
        procs = []
        for k, (out, err) in enumerate(logs):  # into files: a full pipe would stall a worker
            with open(out, "w") as stdout, open(err, "w") as stderr:
                procs.append(subprocess.Popen([sys.executable, "-c", code, path, str(k), str(jobs)], env=env,
                                              stdout=stdout, stderr=stderr))
        results: List[Optional[dict]] = [None] * len(work)
        for k, (proc, (out, err)) in enumerate(zip(procs, logs)):
            proc.wait()
            for r in _read_results(out):
                results[r.pop("index")] = r
            lost = [index for index in range(k, len(work), jobs) if results[index] is None]
            if lost:  # the worker died before these jobs
                with open(err) as f:
                    tail = f.read().strip()[-300:]
                for index in lost:
                    results[index] = {"kernel": work[index][0][1], "ok": False, "seconds": 0.0,
                                      "error": f"worker exited with {proc.returncode}: {tail}"}
    return results


def _here() -> Optional[int]:
    """The current CUDA device's compute capability as an int (90 for sm_90), or None."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


def _check_compilable() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 replaces the kernels with the interpreter's, which compile nothing; "
                           "unset it (before triton is imported) to compile")
    if not recording.binder_available():
        raise RuntimeError("this Triton lacks the binder API that compiling ahead goes through "
                           "(triton.runtime.jit.create_function_from_signature); the kernels compile at their "
                           "first launch instead")


@functools.lru_cache(maxsize=None)
def _ptxas_targets(path: str) -> frozenset:
    text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30).stdout
    return frozenset(int(n) for n in re.findall(r"'sm_(\d+)'", text))


def compilable_archs() -> Optional[List[int]]:
    """The compute capabilities (70 and up) that Triton can compile for here: those the ptxas it picks
    for each one can target (read from that ptxas's ``--help``); None when that cannot be read. LLVM
    aborts the whole process, rather than raising, on a target it does not know, so an ``arch`` outside
    this list is refused before any kernel is compiled."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = {arch: get_ptxas(arch).path for arch in (90, 100)}  # Triton picks its ptxas by arch
        candidates = _ptxas_targets(tool[90]) | _ptxas_targets(tool[100])
        found = sorted(a for a in candidates if a >= 70 and a in _ptxas_targets(get_ptxas(a).path))
    except Exception:  # another Triton layout, no ptxas: the compile itself will say what is wrong
        return None
    return found or None


def distinct_launches(launches: Sequence[Launch], arch: int) -> List[Launch]:
    """The first launch of every distinct compiled variant for ``sm_<arch>``, in order."""
    seen, kept = set(), []
    for launch in launches:
        key = recording.variant_key(launch, arch)
        if key not in seen:
            seen.add(key)
            kept.append(launch)
    return kept


def check_compile_target(arch: Optional[int] = None, jobs: Optional[int] = None) -> int:
    """The compute capability to compile for: ``arch``, or the current CUDA device's when None. Raises a
    ValueError for an ``arch`` or ``jobs`` that cannot be used and a RuntimeError where nothing compiles here
    (the interpreter, a Triton without the binder API), before any launch is recorded or model built."""
    if arch is None:
        arch = _here()
        if arch is None:
            raise ValueError("arch: no CUDA device here; give the compute capability to compile for (e.g. 90)")
    if isinstance(arch, bool) or not isinstance(arch, int) or arch < 70:
        raise ValueError(f"arch={arch!r} must be a compute capability of 70 or more as an int (90 for sm_90)")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs={jobs!r} must be an int >= 1")
    _check_compilable()
    known = compilable_archs()
    if known is not None and arch not in known:
        raise ValueError(f"arch={arch}: Triton's ptxas cannot compile for sm_{arch}; valid: "
                         f"{', '.join(map(str, known))}")
    return arch


def compile_launches(launches: Sequence[Launch], arch: Optional[int] = None, jobs: Optional[int] = None,
                     stubs: Optional[bool] = None) -> Dict[str, object]:
    """Compile each distinct variant among ``launches`` into Triton's cache, ``jobs`` processes at a time.

    ``arch``: compute capability as an int (90 for sm_90); default the current CUDA device's.
    ``jobs``: worker processes (default: one per core; 1 compiles in this process).
    ``stubs``: also build the launcher stubs (default: when compiling for the current CUDA device).
    Returns counts (variants, compiled, cache hits, failed with the first errors, per kernel) and seconds.
    """
    arch = check_compile_target(arch, jobs)
    stubs = (arch == _here()) if stubs is None else stubs
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    work = [(_spec(launch), arch, stubs) for launch in distinct_launches(launches, arch)]
    # Here while Triton's cache has them (a second call costs no process starts), the rest in processes.
    results: List[dict] = []
    for job in work:
        results.append(_compile(job))
        if jobs > 1 and not (results[-1]["ok"] and results[-1]["cache_hit"]):
            break
    rest = work[len(results):]
    if len(rest) > 1:
        results += _in_processes(rest, min(jobs, len(rest)))
    elif rest:
        results.append(_compile(rest[0]))
    failed = [r for r in results if not r["ok"]]
    return {"arch": arch, "jobs": jobs, "stubs": stubs, "variants": len(work),
            "cache_hits": sum(r["ok"] and r["cache_hit"] for r in results),
            "compiled": sum(r["ok"] and not r["cache_hit"] for r in results), "failed": len(failed),
            "errors": [f"{r['kernel']}: {r['error']}" for r in failed[:5]],
            "stubs_failed": sum("stub_error" in r for r in results),
            "stub_errors": sorted({r["stub_error"] for r in results if "stub_error" in r})[:3],
            "by_kernel": dict(Counter(r["kernel"] for r in results)),
            "compile_s": round(sum(r["seconds"] for r in results), 2),
            "seconds": round(time.perf_counter() - t0, 2)}


def compile_kernels(model: nn.Module, batch_sizes: Sequence[int] = (1,), dtype: Optional[torch.dtype] = None,
                    training: bool = False, arch: Optional[int] = None, jobs: Optional[int] = None
                    ) -> Dict[str, object]:
    """Compile every Triton kernel variant that ``model.encode_video`` launches at ``batch_sizes``
    (and with ``training`` its backward) into Triton's on-disk cache, on ``jobs`` processes.

    Args:
        model: patched by :func:`~tempme_fast.apply_tempme` with the Triton backend (``"auto"`` or
            ``"triton"``), on any device; it is not run, changed or copied (a meta copy is recorded).
        batch_sizes: the numbers of videos per call to compile for (the tiles depend on them).
        dtype: the dtype the model will run in; default its parameters' dtype.
        training: also the training forward and the backward (gradients of the parameters that
            require one), as a step without autocast runs them.
        arch: compute capability to compile for, as an int (90 for sm_90, 80 for sm_80); default
            the current CUDA device's.
        jobs: worker processes (default: one per core).

    Returns:
        A summary: ``variants`` (distinct), ``compiled``, ``cache_hits`` (already in the cache),
        ``failed`` and ``errors``, ``by_kernel``, ``launches`` recorded, ``seconds``.
    """
    _check_model(model)
    arch = check_compile_target(arch, jobs)  # before the launches are recorded
    t0 = time.perf_counter()
    launches = record_launches(model, batch_sizes, dtype, training)
    recorded = time.perf_counter() - t0
    summary = compile_launches(launches, arch, jobs)
    return {**summary, "launches": len(launches), "record_s": round(recorded, 2),
            "seconds": round(time.perf_counter() - t0, 2)}
