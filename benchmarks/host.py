"""Host cost of the Triton-backed forward, measured without a GPU.

On a fast GPU the eager TempMe forward at small batch waits on the host: every aten op, custom-op
dispatch, autograd node and Triton launch costs Python and dispatcher time before the GPU sees any
work. This module measures that cost here, on CPU tensors, with every Triton launch replaced by a
stub at ``kernel.run`` (what ``kernel[grid](...)`` calls), so neither the interpreter nor a device
adds time. The launchers, tile tables and attention choices run as on CUDA (GPU tiles,
``attention="auto"`` taking the Triton kernel where the model passes sizes). A whole forward runs
on a narrow twin of the model (same depth, patches and token schedule, 16 channels; timed in
float32) so that the CPU's arithmetic stays small; a merge step runs at the real width (it does no
arithmetic on the host).

``python -m benchmarks.host`` prints, for ViT-B/32 and ViT-B/16 at one video (default config,
fp16, inference mode), per forward and per merge step: aten ops dispatched outside the kernels
(with the most frequent ones), custom-op calls, Triton launches, tensor allocations and host
microseconds with the launches stubbed. :func:`forward_counts` and :func:`step_counts` are what
``tests/test_host.py`` checks against its budgets.

Triton's own launch path (``JITFunction.run``: argument binding, specialisation, cache lookup)
is not in these microseconds (it needs a GPU driver); :func:`triton_run_us` replays its Python
part for the recorded launches instead. See ``BENCHMARKS.md`` ("Host cost of the eager Triton
forward").
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tempme_fast import TempMeConfig, apply_tempme, token_schedule
from tempme_fast.loading import DTYPES

from .common import VIT_GEOMETRY

MODELS = ("ViT-B-32", "ViT-B-16")
KERNEL_MODULES = ("best_match", "match", "merge", "attention")


def _kernels() -> List[object]:
    """Every Triton kernel object of ``tempme_kernels`` (the same objects the launchers call)."""
    import importlib

    found = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"tempme_kernels.{name}")
        found += [obj for key, obj in vars(module).items()
                  if key.startswith("_") and key.endswith("_kernel") and hasattr(obj, "run")]
    return found


@dataclass
class Counts:
    """What one call dispatched: aten ops by name, custom ops by name, launches by kernel, allocations."""

    aten: Counter = field(default_factory=Counter)
    custom: Counter = field(default_factory=Counter)
    launches: Counter = field(default_factory=Counter)
    allocations: int = 0
    host_us: float = 0.0
    calls: List[tuple] = field(default_factory=list)  # (kernel, grid, args, kwargs) of every launch

    def row(self) -> Dict[str, object]:
        return {"aten_ops": sum(self.aten.values()), "custom_ops": sum(self.custom.values()),
                "launches": sum(self.launches.values()), "allocations": self.allocations,
                "host_us": round(self.host_us, 1)}


class _OpCounter(TorchDispatchMode):
    """Counts every op that reaches the dispatcher's Python key, and the fresh tensors they return.

    A ``tempme::`` custom op is counted as one custom-op call, and its Python implementation is then
    run under this mode, so the aten ops and allocations of its launcher are counted too (as they
    are when the launcher is called directly).
    """

    sees_eager_path = True  # the Triton ops run as without a mode (tempme_fast.ops.eager)

    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tempme":
            from torch._library.custom_ops import OPDEFS

            self.counts.custom[func.name()] += 1
            opdef = OPDEFS.get(func.name().split(".")[0])
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self.counts.aten[func.overloadpacket.__name__] += 1
        # An output without alias information in the schema is new memory (not a view, not in place).
        fresh = [r.alias_info is None for r in func._schema.returns]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for is_fresh, o in zip(fresh, outs):
            self.counts.allocations += sum(1 for t in tree_leaves(o) if is_fresh and isinstance(t, torch.Tensor))
        return out


@contextlib.contextmanager
def gpu_like(counts: Optional[Counts] = None) -> Iterator[None]:
    """Run the Triton backend on CPU tensors as it runs on CUDA, with every launch stubbed.

    Inside: ``kernel.run`` of every Triton kernel records the launch (in ``counts.launches``) and
    returns; the launchers choose GPU tiles (not the interpreter's); ``resolve_backend`` takes
    ``"auto"`` to Triton and the attention's ``"auto"`` sees the Triton backend, as for CUDA tensors.
    """
    from tempme_fast import ops
    from tempme_fast.ops import attention_impl, triton_attention, triton_ops

    counts = Counts() if counts is None else counts
    kernels = _kernels()
    saved_runs = [k.__dict__.get("run") for k in kernels]
    saved = [(triton_ops, "_interpreting"), (triton_attention, "_interpreting"), (ops, "resolve_backend"),
             (attention_impl, "attention"), (attention_impl, "self_attention")]
    originals = [getattr(m, n, None) for m, n in saved]  # (self_attention: absent from older versions)
    resolve, attend, self_attend = originals[2:]

    def stub(kernel):
        name = kernel.fn.__name__

        def run(*args, grid, warmup=False, **kwargs):
            counts.launches[name] += 1
            counts.calls.append((kernel, grid, args, kwargs))
        return run

    def gpu_resolve(backend, tensor):
        return "triton" if backend in ("auto", "triton") else resolve(backend, tensor)

    def gpu_attention(q, k, v, size, impl, triton_backend):
        return attend(q, k, v, size, impl, True)

    def gpu_self_attention(qkv, heads, size, impl, triton_backend, keys):
        return self_attend(qkv, heads, size, impl, True, keys)

    for k in kernels:
        k.run = stub(k)
    for (module, name), value in zip(saved, (lambda: False, lambda: False, gpu_resolve, gpu_attention,
                                                 gpu_self_attention)):
        setattr(module, name, value)
    try:
        yield
    finally:
        for k, run in zip(kernels, saved_runs):
            if run is None:
                del k.run
            else:
                k.run = run
        for (module, name), value in zip(saved, originals):
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)


def count(fn: Callable[[], object], counts: Optional[Counts] = None) -> Counts:
    """Ops, custom ops, launches and allocations of one call of ``fn`` (after one warm-up call)."""
    counts = Counts() if counts is None else counts
    with gpu_like(counts):
        fn()  # warm-up: imports, caches, the match scratch buffer
        counts.launches.clear()
        counts.calls.clear()
        with _OpCounter(counts):
            fn()
    return counts


def triton_run_us(calls: Sequence[tuple], arch: int = 90, repeats: int = 20) -> float:
    """Microseconds of Triton's own launch path (``JITFunction.run``) for ``calls``, on this CPU.

    Replays what ``run`` does in Python before its final C launcher call, for an sm_``arch``
    target: the per-launch options, the argument binder (specialisation of every argument), the
    cache key, the kernel-cache lookup, the global-value check and the grid. Left out: the driver's
    current device and stream (two cheap C calls) and the launch itself (the C launcher, which needs
    a GPU). Not available in the interpreter, whose kernels have no binder.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders, key_caches, prepared = {}, {}, []
    for kernel, grid, args, kwargs in calls:
        if id(kernel) not in binders:
            binders[id(kernel)] = create_function_from_signature(kernel.signature, kernel.params, backend)
            key_caches[id(kernel)] = {}
        prepared.append((kernel, binders[id(kernel)], key_caches[id(kernel)], grid, args, kwargs))
    kernel_cache: Dict[object, object] = {}

    def replay():
        for kernel, binder, key_cache, grid, args, kwargs in prepared:
            kwargs = dict(kwargs)
            kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            for hook in kernel.pre_run_hooks:
                hook(*args, **kwargs)
            bound, specialization, options = binder(*args, **kwargs)
            key = compute_cache_key(key_cache, specialization, options)
            kernel_cache.get(key)
            for (name, _), (val, globals_dict) in kernel.used_global_vals.items():
                globals_dict.get(name)
            grid = grid(bound) if callable(grid) else grid
            _ = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, *bound.values())

    replay()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            replay()
        best = min(best, (time.perf_counter() - t0) / repeats * 1e6)
    return best


def host_us(fn: Callable[[], object], repeats: int = 20, rounds: int = 5) -> float:
    """Microseconds of one call of ``fn`` with the launches stubbed: the fastest of ``rounds`` means
    over ``repeats`` calls (other processes on the host only add time)."""
    with gpu_like():
        fn()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            best = min(best, (time.perf_counter() - t0) / repeats * 1e6)
    return best


def narrow_model(name: str, dtype: torch.dtype = torch.float16, width: int = 16,
                 config: Optional[TempMeConfig] = None):
    """``name``'s vision tower (depth, patch and image size: the same token schedule and the same
    op sequence) at ``width`` channels in one head, with a one-layer text tower, patched with TempMe
    (backend and attention "auto"). Narrow, so that the CPU's arithmetic adds little to the host time."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    vision = dict(cfg["vision_cfg"], width=width, head_width=width)
    text = dict(cfg["text_cfg"], width=16, heads=1, layers=1, vocab_size=64)
    model = open_clip.model.CLIP(cfg["embed_dim"], vision, text).to(dtype=dtype).eval()
    return apply_tempme(model, config or TempMeConfig())


def _encode(name: str, dtype: torch.dtype, videos: int) -> Callable[[], object]:
    model = narrow_model(name, dtype)
    video = torch.randn(videos, model.tempme.config.frames, 3, *model.visual.image_size).to(dtype)

    def forward():
        with torch.inference_mode():
            return model.encode_video(video)
    return forward


def forward_counts(name: str, videos: int = 1, dtype: torch.dtype = torch.float16, timed: bool = True,
                   repeats: int = 5, rounds: int = 3) -> Counts:
    """One ``encode_video`` forward of :func:`narrow_model` under ``torch.inference_mode()`` on CPU
    tensors: the counts in ``dtype``; the host time (``timed``) in float32, because the CPU's
    16-bit matrix products are slow enough to hide the host cost (the op sequence is the same but
    for the dtype casts that float32 does not need)."""
    counts = count(_encode(name, dtype, videos))
    if timed:
        counts.host_us = host_us(_encode(name, torch.float32, videos), repeats, rounds)
    return counts


@dataclass(frozen=True)
class MergeStep:
    """One merge of the schedule as the encoder runs it (``encoder._merge_then_norm`` or
    ``encoder._join_then_norm``): ``clips`` input clips of ``tokens`` tokens."""

    model: str
    layer: int
    stage: str  # "intra" (after attention) or "cross" (a join's merge)
    clips: int
    tokens: int
    protected: int
    group: int
    r: int
    clips_per_video: int


def merge_steps(name: str, videos: int = 1, config: TempMeConfig = TempMeConfig()) -> List[MergeStep]:
    """Every merge of ``name``'s schedule at ``videos`` videos, in order."""
    depth, tokens, _, _ = VIT_GEOMETRY[name]
    steps = []
    for p in token_schedule(config, depth, tokens).layers:
        if p.group > 1 and p.r_cross:
            steps.append(MergeStep(name, p.layer, "cross", videos * p.clips_in, p.tokens_in, p.protected_in,
                                   p.group, p.r_cross, p.clips_in))
        if p.r:
            steps.append(MergeStep(name, p.layer, "intra", videos * p.clips_out, p.tokens_attn, p.protected_out,
                                   1, p.r, p.clips_out))
    return steps


def step_counts(step: MergeStep, width: int = 768, heads: int = 12, dtype: torch.dtype = torch.float16,
                grad: bool = False, repeats: int = 50, rounds: int = 3) -> Counts:
    """Counts and host microseconds of one merge step with its LayerNorm, as the encoder calls it.

    ``grad=True`` gives ``x`` ``requires_grad`` (a training forward); otherwise inference mode.
    """
    from tempme_fast import encoder

    x = torch.empty(step.clips, step.tokens, width, dtype=dtype, device="cpu", requires_grad=grad)
    size = torch.empty(step.clips, step.tokens, 1, dtype=torch.float32, device="cpu")
    norm = torch.nn.LayerNorm(width, device="cpu", dtype=dtype)
    if step.group > 1:
        pos = torch.empty(1, step.clips_per_video, 1, width, dtype=dtype, device="cpu")

        def run():
            return encoder._join_then_norm(x, size, step.group, step.protected, step.r, pos, norm, "auto")
    else:
        keys = torch.empty(step.clips, step.tokens, width // heads, dtype=dtype, device="cpu")
        residual = torch.empty_like(x)

        def run():
            return encoder._merge_then_norm(x, residual, size, None, keys, step.r, step.protected, norm, "auto")

    def call():
        with contextlib.nullcontext() if grad else torch.inference_mode():
            run()
    counts = count(call)
    counts.host_us = host_us(call, repeats, rounds)
    return counts


def _interpreter() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def _top(counter: Counter, n: int = 14) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common(n))


def report(models: Sequence[str] = MODELS, dtype_name: str = "fp16", out=sys.stdout) -> Dict[str, dict]:
    """Print per model the forward's counts and the per-step counts; return them by model."""
    dtype = DTYPES[dtype_name]
    results = {}
    for name in models:
        fwd = forward_counts(name, dtype=dtype)
        print(f"## {name}, 1 video, {dtype_name}, inference mode: encode_video forward", file=out)
        print(f"aten ops {sum(fwd.aten.values())}, custom-op calls {sum(fwd.custom.values())}, "
              f"Triton launches {sum(fwd.launches.values())}, allocations {fwd.allocations}, "
              f"host {fwd.host_us:.0f} us (launches stubbed)", file=out)
        print(f"  aten: {_top(fwd.aten)}", file=out)
        if fwd.custom:
            print(f"  custom ops: {_top(fwd.custom)}", file=out)
        print(f"  launches: {_top(fwd.launches)}", file=out)
        if not _interpreter():
            print(f"  Triton's launch path (JITFunction.run up to its C launcher, sm_90): "
                  f"{triton_run_us(fwd.calls):.0f} us per forward", file=out)
        print("| layer | stage | clips x tokens | r | grad | aten ops | custom ops | launches | allocations "
              "| host us |", file=out)
        print("|---" * 10 + "|", file=out)
        steps = []
        for step in merge_steps(name):
            if step.layer not in (0, 8, 10):  # the first image merge and the joining layers' shapes
                continue
            for grad in (False, True):
                c = step_counts(step, grad=grad)
                steps.append({"step": step, "grad": grad, **c.row()})
                print(f"| {step.layer} | {step.stage} | {step.clips} x {step.tokens} | {step.r} | {grad} "
                      f"| {sum(c.aten.values())} | {sum(c.custom.values())} | {sum(c.launches.values())} "
                      f"| {c.allocations} | {c.host_us:.0f} |", file=out, flush=True)
        print(file=out)
        results[name] = {"forward": fwd.row(), "steps": steps}
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report(args.models, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
