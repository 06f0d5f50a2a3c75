"""Launch a Triton kernel with less host work once the variant it needs has been launched before.

``kernel[grid](*args, **meta)`` runs Triton's ``JITFunction.run`` on every call: it binds the
arguments, specialises each one (type, 16-byte alignment of tensors, integers equal to 1 or
divisible by 16), builds a string key and looks the compiled kernel up: about 20 us a launch on a
2-core CPU before the driver sees it, against about 10 us here (``benchmarks.host``, BENCHMARKS.md).
:func:`launch` keys its own cache on what that specialisation is a function of: every tensor's
dtype and address modulo 16, every other argument's type and value, the keywords (constexprs and
launch options, by value and type) and Triton's debug and instrumentation switches. That key is
finer than Triton's, so a hit always finds the kernel Triton would have chosen. (Keys compare values
with ``==``: a float constexpr of 0.0 and one of -0.0 would share a variant. The kernels here have
no float constexpr that could be either.) A miss goes through ``kernel[grid]`` (compiling if needed) and
keeps the compiled kernel it returns; a hit calls that kernel's launcher directly, with the
arguments ``JITFunction.run`` passes it (every parameter in order, then the launch hooks).

A :class:`Launcher` goes further for the launchers that keep a description per input signature
(:mod:`.memo`): it holds the kernel with its grid, its non-tensor arguments and its constexprs, fixed
when the description is built, and each call passes only the tensors. Its key is the launcher itself
(by identity), the device, the tensors' dtypes and addresses modulo 16, and the two switches: what the
rest of :func:`launch`'s key holds is the same at every call of one launcher, so it is left out.

Triton's path is taken unchanged when the kernel is not a ``JITFunction`` (the interpreter), when
its ``run`` is replaced on the instance (a stub or an instrumenting wrapper), when it has
pre-run hooks, when a stage-inspection hook is set, when a global the kernel read at compile
time has changed (Triton then raises its own error), and while :data:`CACHED` is False (its initial
value is False when the environment sets ``TEMPME_FAST_CACHED_LAUNCH=0``).
"""
import os
from typing import Dict, Optional, Sequence

import torch

__all__ = ["CACHED", "MAX_ENTRIES", "Launcher", "clear_cache", "launch"]

# Off: every launch goes through kernel[grid](...), as without this module.
CACHED = os.environ.get("TEMPME_FAST_CACHED_LAUNCH", "1") != "0"
# Distinct (kernel, shapes, alignments, ...) variants kept; the cache is cleared when full.
MAX_ENTRIES = 4096

_MISSING = object()
_CACHE: Dict[tuple, tuple] = {}
_LEADING_TENSORS: Dict[object, int] = {}
_triton = None  # (JITFunction, driver config, knobs), imported on first use


def clear_cache() -> None:
    """Forget every compiled kernel kept here (Triton's own cache is untouched)."""
    _CACHE.clear()
    _LEADING_TENSORS.clear()


def _modules():
    global _triton
    if _triton is None:
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        _triton = (JITFunction, driver, knobs)
    return _triton


def _leading_tensors(args: Sequence[object]) -> int:
    n = 0
    for a in args:
        if not isinstance(a, torch.Tensor):
            break
        n += 1
    return n


def _rebound(bound: tuple) -> bool:
    return any(namespace.get(name, _MISSING) is not value for namespace, name, value in bound)


def _through_triton(kernel, jit_function, knobs) -> bool:
    """Whether a launch of ``kernel`` must take Triton's own path (see the module's docstring)."""
    return (not CACHED or not isinstance(kernel, jit_function) or "run" in kernel.__dict__ or kernel.pre_run_hooks
            or getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None)


# What NumPy 2.4 and later say when Triton's interpreter before 3.7 turns a one-element block into a Python int
# (a loop bound computed in the kernel: most kernels here have one). The launch then fails with what to change.
_NUMPY_REFUSED = "only 0-dimensional arrays can be converted to Python scalars"


def _triton_path(kernel, grid: Sequence[int], args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)``, Triton's own launch path, with the interpreter's known failure named."""
    try:
        kernel[grid](*args, **meta)
    except Exception as e:
        if _NUMPY_REFUSED not in str(e) or os.environ.get("TRITON_INTERPRET") != "1":
            raise
        import numpy
        import triton

        raise RuntimeError(
            f"TRITON_INTERPRET=1: the interpreter of triton {triton.__version__} cannot run these kernels with "
            f"numpy {numpy.__version__} (it converts one-element blocks to Python ints, which numpy 2.4 refuses: "
            f"{e}). Install numpy<2.4, or triton>=3.7, whose interpreter handles it.") from e


def launch(kernel, grid: Sequence[int], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, with Triton's per-call binding skipped for a variant seen before.

    ``args`` are the kernel's runtime parameters in order (tensors first); ``meta`` its constexprs and
    launch options (``num_warps``, ...) by name. ``grid`` is a tuple of one to three program counts.
    """
    jit_function, driver, knobs = _triton or _modules()
    if _through_triton(kernel, jit_function, knobs):
        _triton_path(kernel, grid, args, meta)
        return
    active = driver.active
    device = active.get_current_device()
    kernel_id = id(kernel)  # (a JITFunction hashes its source's cache key: slow)
    n = _LEADING_TENSORS.get(kernel_id)
    if n is None:
        n = _LEADING_TENSORS[kernel_id] = _leading_tensors(args)
    tensors, scalars = args[:n], args[n:]
    try:
        key = (kernel_id, device, *[t.data_ptr() & 15 for t in tensors], *[t.dtype for t in tensors], *scalars,
               *map(type, scalars), *meta.items(), *map(type, meta.values()), knobs.runtime.debug,
               knobs.compilation.instrumentation_mode)
        entry = _CACHE.get(key)
    except (AttributeError, TypeError):  # a non-tensor where a tensor was, or an unhashable argument
        kernel[grid](*args, **meta)
        return
    if entry is None or entry[0] is not kernel or entry[6] and _rebound(entry[6]):
        _remember(key, kernel, grid, args, meta)
        return
    _run(entry, grid, args, active, device, knobs)


class Launcher:
    """``kernel[grid](*tensors, *scalars, **meta)`` for any ``tensors``: a kernel whose grid, non-tensor
    arguments and constexprs (launch options included) are fixed, as a launcher's description fixes
    them for one input signature. A call passes the tensors (every argument before ``scalars``) and
    launches, through Triton the first time for a variant and directly after that (see the module's
    docstring). ``scalars`` and ``meta`` must not change after construction.
    """

    __slots__ = ("kernel", "grid", "scalars", "meta")

    def __init__(self, kernel, grid: Sequence[int], scalars: Sequence[object] = (), meta: Optional[dict] = None):
        self.kernel, self.grid, self.scalars, self.meta = kernel, tuple(grid), tuple(scalars), dict(meta or {})

    def __repr__(self) -> str:
        name = getattr(getattr(self.kernel, "fn", self.kernel), "__name__", self.kernel)
        return f"Launcher({name}, grid={self.grid}, scalars={self.scalars}, meta={self.meta})"

    def __call__(self, *tensors) -> None:
        kernel = self.kernel
        jit_function, driver, knobs = _triton or _modules()
        if _through_triton(kernel, jit_function, knobs):
            _triton_path(kernel, self.grid, (*tensors, *self.scalars), self.meta)
            return
        active = driver.active
        device = active.get_current_device()
        try:  # self: by identity (it holds the kernel, grid, scalars and constexprs)
            key = (self, device, *[t.data_ptr() & 15 for t in tensors], *[t.dtype for t in tensors],
                   knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        except AttributeError:  # a non-tensor where a tensor was
            kernel[self.grid](*tensors, *self.scalars, **self.meta)
            return
        entry = _CACHE.get(key)
        args = (*tensors, *self.scalars)
        if entry is None or entry[6] and _rebound(entry[6]):
            _remember(key, kernel, self.grid, args, self.meta)
            return
        _run(entry, self.grid, args, active, device, knobs)


def _run(entry: tuple, grid: Sequence[int], args: tuple, active, device, knobs) -> None:
    """Launch a kept compiled kernel with ``args`` (every runtime parameter) and its constexprs."""
    _, run, function, packed, compiled, tail, _ = entry
    stream = active.get_current_stream(device)
    size = len(grid)
    enter = knobs.runtime.launch_enter_hook
    metadata = None if enter is None else compiled.launch_metadata(grid, stream, *args, *tail)
    run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, function, packed, metadata,
        enter, knobs.runtime.launch_exit_hook, *args, *tail)


def _remember(key: tuple, kernel, grid: Sequence[int], args: tuple, meta: dict) -> None:
    """Launch through Triton and keep the compiled kernel it used, if it is one this module can call.

    Also kept: the objects bound to the globals the kernel read when compiled. A later launch whose
    globals are no longer those objects goes through Triton, which checks their values.
    """
    compiled = kernel[grid](*args, **meta)
    if hasattr(compiled, "result"):  # a compilation future (asynchronous compile)
        compiled = compiled.result()
    params = list(kernel.signature.parameters.values())
    if compiled is None or getattr(compiled, "function", None) is None or len(args) > len(params):
        return
    tail = tuple(meta.get(p.name, p.default) for p in params[len(args):])  # constexprs, in order
    if any(v is p.empty for v, p in zip(tail, params[len(args):])):
        return
    bound = tuple((ns, name, ns.get(name, _MISSING)) for (name, _), (_, ns) in kernel.used_global_vals.items())
    if len(_CACHE) >= MAX_ENTRIES:
        _CACHE.clear()
    _CACHE[key] = (kernel, compiled.run, compiled.function, compiled.packed_metadata, compiled, tail, bound)
