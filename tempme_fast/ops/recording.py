"""Triton launches recorded instead of run, and compiled for a GPU that need not be here.

A :class:`Recorder` replaces the ``run`` of every Triton kernel that a launcher module
(``tempme_fast.ops.<module>``) launches: a launch is appended to a list with its grid, arguments
and constexprs, and nothing runs. On meta tensors (no memory, no device) that records, in
microseconds, every kernel variant a forward or backward would launch: :mod:`tempme_fast.precompile`
compiles them ahead of a model's first call, and ``benchmarks.codegen`` reads what the compiler
makes of them.

:func:`compile_launch` compiles a recorded launch for ``sm_<arch>`` through the same binder
(specialisation of each argument: pointer alignment, divisibility by 16, ints equal to 1) and
the same compile call that ``JITFunction.run`` makes, so the result lands in Triton's on-disk
cache under the key a real launch of that variant looks up.

:data:`META_AS_GPU`, set while a model is recorded, makes the ops take meta tensors as CUDA ones
where they choose a path by device (the Triton backend under ``"auto"``, the Triton attention).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from dataclasses import dataclass
from typing import Dict, List, Tuple

__all__ = ["KERNELS", "META_AS_GPU", "Launch", "Recorder", "binder_available", "compile_launch", "recording_all",
           "variant_key"]

# While True, the ops treat meta tensors as CUDA tensors wherever they choose a path by device.
META_AS_GPU = False

# The kernels each launcher module runs; a Recorder stubs one module's at a time.
KERNELS = {"triton_ops": ("_best_match_fwd_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel", "_match_plan_kernel",
                          "_merge_index_kernel"),
           "triton_attention": ("_attention_fwd_kernel", "_attention_bwd_kernel"),
           "triton_norm": ("_add_norm_fwd_kernel", "_embed_norm_fwd_kernel"),
           "triton_linear": ("_linear_act_fwd_kernel",)}


@dataclass
class Launch:
    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict


class Recorder:
    """Replaces each kernel's ``run`` (what ``kernel[grid](...)`` calls) and ``_new_output`` of the
    launchers in ``tempme_fast.ops.<module>``: the launches and allocations of the thread that entered
    :meth:`active` are recorded, and nothing of them runs; its launchers choose the GPU's tiles, whatever
    ``TRITON_INTERPRET`` says. Other threads' launches run as before."""

    def __init__(self, module: str = "triton_ops"):
        self.module = module
        self.launches: List[Launch] = []
        self.allocations = 0

    @contextlib.contextmanager
    def active(self):
        launchers = importlib.import_module(f"tempme_fast.ops.{self.module}")
        names = [name for name in KERNELS[self.module] if hasattr(launchers, name)]
        saved = {name: getattr(launchers, name).__dict__.get("run") for name in names}
        new_output, interpreting = launchers._new_output, launchers._interpreting

        owner = threading.get_ident()

        def recorder(kernel, previous):
            def run(*args, grid, warmup=False, **kwargs):
                if threading.get_ident() != owner:  # another thread's launch runs as it would have
                    return (previous or functools.partial(type(kernel).run, kernel))(*args, grid=grid, warmup=warmup,
                                                                                      **kwargs)
                grid = grid(kwargs) if callable(grid) else grid
                self.launches.append(Launch(kernel, tuple(grid) + (1,) * (3 - len(grid)), args, kwargs))
            return run

        def counted_output(shape, dtype, device):
            self.allocations += threading.get_ident() == owner
            return new_output(shape, dtype, device)

        for name in names:
            kernel = getattr(launchers, name)
            kernel.run = recorder(kernel, saved[name])

        def gpu_tiles():
            return False if threading.get_ident() == owner else interpreting()

        launchers._new_output, launchers._interpreting = counted_output, gpu_tiles
        try:
            yield self
        finally:
            for name, run in saved.items():
                kernel = getattr(launchers, name)
                if run is None:
                    del kernel.run  # back to the class's run
                else:
                    kernel.run = run
            launchers._new_output, launchers._interpreting = new_output, interpreting


@contextlib.contextmanager
def recording_all():
    """Every launcher module's launches (:data:`KERNELS`) recorded as :class:`Recorder` records them, into one
    list in the order of the calls, which this yields."""
    recorders = [Recorder(m) for m in KERNELS]
    for r in recorders[1:]:
        r.launches = recorders[0].launches
    with contextlib.ExitStack() as stack:
        for r in recorders:
            stack.enter_context(r.active())
        yield recorders[0].launches


def binder_available() -> bool:
    """Whether this Triton has the binder API that :func:`compile_launch` compiles through."""
    try:
        from triton.runtime import jit
    except ImportError:
        return False
    return hasattr(jit, "create_function_from_signature") and hasattr(jit.JITFunction, "_pack_args")


_BINDERS: Dict[tuple, tuple] = {}


def _binder(kernel, target):
    """``(backend, binder)`` of a Triton JIT function for ``target``: the same specialisation
    (pointer alignment, divisibility by 16, ints equal to 1) that a launch on that GPU applies."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(kernel), target.arch)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = backend, create_function_from_signature(kernel.signature, kernel.params, backend)
    return _BINDERS[key]


def variant_key(launch: Launch, arch: int):
    """What makes two launches compile to the same binary (as Triton's own cache key)."""
    from triton.backends.compiler import GPUTarget

    backend, binder = _binder(launch.kernel, GPUTarget("cuda", arch, 32))
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    return launch.kernel.fn.__name__, str(specialization), str(options)


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel (PTX, cubin, metadata) of a recorded launch for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend, binder = _binder(launch.kernel, target)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound,
                                                                     specialization, options)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)
