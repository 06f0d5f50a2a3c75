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
fp16), per inference forward, per training step (forward and backward, beside open_clip's own model
of the same shape) and per merge step: aten ops dispatched outside the kernels (with the most
frequent ones), custom-op calls, Triton launches, tensor allocations and host microseconds with the
launches stubbed; and per forward and training step the function calls made from Python
(:func:`python_calls`). :func:`forward_counts`, :func:`train_counts` and :func:`step_counts` are what
``tests/test_host.py`` checks against its budgets.

Triton's own launch path (``JITFunction.run``: argument binding, specialisation, cache lookup)
is not in these microseconds. :func:`fake_device` runs it for real on a stand-in sm_90 device up to
the compiled kernel's C launcher: :func:`launch_us` times the recorded launches through it and
through ``tempme_fast.ops.launch``, and ``--launch-check`` (:func:`launch_mismatches`) checks that
the two hand the same compiled kernel the same arguments. See ``BENCHMARKS.md`` ("Host cost of the
eager Triton forward").
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tempme_fast import TempMeConfig, apply_tempme, token_schedule
from tempme_fast.loading import DTYPES

from .bench_model import train_once
from .common import VIT_GEOMETRY

MODELS = ("ViT-B-32", "ViT-B-16")
KERNEL_MODULES = ("best_match", "match", "merge", "norm", "attention", "segment")


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
    # (kernel, grid, args, kwargs, via) of every launch; via: (launcher, tensors) when a Launcher launched it
    calls: List[tuple] = field(default_factory=list)

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
        # An output without alias information in the schema is new memory (not a view, not in place);
        # one with no elements takes none (the caching allocator is not called for zero bytes).
        fresh = [r.alias_info is None for r in func._schema.returns]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for is_fresh, o in zip(fresh, outs):
            self.counts.allocations += sum(1 for t in tree_leaves(o)
                                           if is_fresh and isinstance(t, torch.Tensor) and t.numel() > 0)
        return out


@contextlib.contextmanager
def gpu_like(counts: Optional[Counts] = None, launchers: bool = False) -> Iterator[None]:
    """Run the Triton backend on CPU tensors as it runs on CUDA, with every launch stubbed.

    Inside: ``kernel.run`` of every Triton kernel records the launch (in ``counts.launches``) and
    returns; the launchers choose GPU tiles (not the interpreter's); ``resolve_backend`` takes
    ``"auto"`` to Triton, the attention's ``"auto"`` sees the Triton backend and the patch embedding is a
    matrix product, as for CUDA tensors (so its output, which ``embed_norm`` reads, has CUDA's layout).
    With ``launchers``, each recorded call also names the ``Launcher`` that made it (for a replay
    through it); that look-up walks the calling frames, so the timed runs (:func:`host_us`) leave it out.
    """
    from tempme_fast import encoder, ops
    from tempme_fast.ops import attention_impl, triton_attention, triton_ops

    counts = Counts() if counts is None else counts
    kernels = _kernels()
    saved_runs = [k.__dict__.get("run") for k in kernels]
    saved = [(triton_ops, "_interpreting"), (triton_attention, "_interpreting"), (ops, "resolve_backend"),
             (attention_impl, "attention"), (attention_impl, "self_attention"), (attention_impl, "query_attention"),
             (encoder, "patch_embed")]
    # (self_attention and query_attention: absent from older versions)
    originals = [getattr(m, n, None) for m, n in saved]
    resolve, attend, self_attend, query_attend, embed = originals[2:]

    def stub(kernel):
        name = kernel.fn.__name__

        def run(*args, grid, warmup=False, **kwargs):
            counts.launches[name] += 1
            counts.calls.append((kernel, grid, args, kwargs, _launched_by() if launchers else None))
        return run

    def gpu_resolve(backend, tensor):
        return "triton" if backend in ("auto", "triton") else resolve(backend, tensor)

    def gpu_attention(q, k, v, size, impl, triton_backend):
        return attend(q, k, v, size, impl, True)

    def gpu_self_attention(qkv, heads, size, impl, triton_backend, keys):
        return self_attend(qkv, heads, size, impl, True, keys)

    def gpu_query_attention(q, kv, heads, size, impl, triton_backend):
        return query_attend(q, kv, heads, size, impl, True)

    def gpu_patch_embed(conv, frames, as_matmul=None):
        return embed(conv, frames, True)

    for k in kernels:
        k.run = stub(k)
    for (module, name), value, original in zip(saved, (lambda: False, lambda: False, gpu_resolve, gpu_attention,
                                                       gpu_self_attention, gpu_query_attention, gpu_patch_embed),
                                               originals):
        if original is not None:
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
            if value is not None:
                setattr(module, name, value)


def _launched_by(depth: int = 6) -> Optional[tuple]:
    """``(launcher, tensors)`` of the ``tempme_fast.ops.launch.Launcher`` call that a stubbed launch
    came from, found among the calling frames (None: a plain ``launch`` or ``kernel[grid]`` call)."""
    from tempme_fast.ops.launch import Launcher

    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code is Launcher.__call__.__code__:
            return frame.f_locals["self"], frame.f_locals["tensors"]
        frame = frame.f_back
    return None


class _PythonCalls:
    """Counts the function calls made from Python (``sys.setprofile``: Python functions and the C
    functions Python calls, such as ``Tensor.stride`` or ``torch.empty``) while it is installed. A call
    of ``tempme_fast.ops.launch.launch`` or of a ``Launcher`` counts as one: what happens inside it
    differs between a GPU, the stubs and the interpreter, and :func:`launch_us` times it apart."""

    def __init__(self):
        from tempme_fast.ops import launch

        self.calls = 0
        self._launch_codes = (launch.launch.__code__, launch.Launcher.__call__.__code__)
        self._inside = 0

    def __call__(self, frame, event, arg):
        if event == "call":
            if frame.f_code in self._launch_codes:
                if not self._inside:
                    self.calls += 1
                self._inside += 1
            elif not self._inside:
                self.calls += 1
        elif event == "return":
            if frame.f_code in self._launch_codes:
                self._inside -= 1
        elif event == "c_call" and not self._inside:
            self.calls += 1

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


def python_calls(fn: Callable[[], object]) -> int:
    """Function calls made from Python in one call of ``fn`` (after one warm-up call), with the
    launches stubbed (:class:`_PythonCalls`). On a GPU at small batch each is host time the GPU waits
    for: the eager forward and the training step scale with this count more than with the aten ops."""
    with gpu_like():
        fn()
        with _collector_paused(), _PythonCalls() as counter:
            fn()
    return counter.calls - 1  # the profiler's own __exit__ call


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection inside: a collection would run the callbacks in ``gc.callbacks`` (other
    libraries install them, hypothesis for one) and count their calls as the forward's."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def count(fn: Callable[[], object], counts: Optional[Counts] = None) -> Counts:
    """Ops, custom ops, launches and allocations of one call of ``fn`` (after one warm-up call)."""
    counts = Counts() if counts is None else counts
    with gpu_like(counts, launchers=True):
        fn()  # warm-up: imports, caches, the match scratch buffer
        counts.launches.clear()
        counts.calls.clear()
        with _OpCounter(counts):
            fn()
    return counts


class _Compiled:
    """Stands in for Triton's ``CompiledKernel`` on :func:`fake_device`: its launcher records."""

    def __init__(self, name: str, key: str, log: Optional[list]):
        self.name, self.key, self.log = name, key, log
        self.function = object()  # the loaded kernel's handle
        self.packed_metadata = (name,)
        self.run = self._launch  # what CompiledKernel.run returns: the C launcher

    def _launch(self, *launch):
        if self.log is not None:
            self.log.append((self, launch))

    def launch_metadata(self, grid, stream, *args):
        return None


class _Driver:
    """The part of Triton's active driver that its launch path asks: device, stream, target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0x5EED

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def fake_device(log: Optional[list] = None, arch: int = 90, binds: Optional[Counter] = None) -> Iterator[None]:
    """Triton's launch path as on an sm_``arch`` GPU, on this CPU, up to the compiled kernel's launcher.

    Inside, ``kernel[grid](...)`` runs ``JITFunction.run`` itself (binding, specialisation, cache key,
    lookup); a kernel is "compiled" to a stand-in per Triton cache key, whose launcher appends
    ``(stand-in, launch arguments)`` to ``log`` (when given) and runs nothing. ``binds`` counts the
    calls of each kernel's argument binder (Triton's per-launch work that a cached launch skips).
    Needs real ``JITFunction`` kernels: not under ``TRITON_INTERPRET=1``.
    """
    from triton.runtime.driver import driver

    from tempme_fast.ops import launch

    kernels = _kernels()
    if any(not hasattr(k, "device_caches") for k in kernels):
        raise RuntimeError("fake_device needs compiled Triton kernels: unset TRITON_INTERPRET")
    previous = driver._active
    saved = [(k.device_caches, k.__dict__.get("_do_compile")) for k in kernels]

    def caches(kernel):
        def create():
            cache, key_cache, target, backend, binder = kernel.create_binder()
            if binds is None:
                return cache, key_cache, target, backend, binder

            def counted(*args, **kwargs):
                binds[kernel.fn.__name__] += 1
                return binder(*args, **kwargs)
            return cache, key_cache, target, backend, counted
        return create

    def compiler(kernel):
        def do_compile(key, signature, device, constexprs, options, attrs, warmup):
            kernel.cache_key  # as compiling does: hashes the source and records the globals it reads
            compiled = _Compiled(kernel.fn.__name__, key, log)
            kernel.device_caches[device][0][key] = compiled
            return compiled
        return do_compile

    driver.set_active(_Driver(arch))
    for k in kernels:
        k.device_caches = defaultdict(caches(k))
        k._do_compile = compiler(k)
    launch.clear_cache()
    try:
        yield
    finally:
        launch.clear_cache()
        driver._active = previous
        for k, (device_caches, do_compile) in zip(kernels, saved):
            k.device_caches = device_caches
            if do_compile is None:
                del k._do_compile
            else:
                k._do_compile = do_compile


def _replay(calls: Sequence[tuple], cached: bool) -> None:
    """Launch ``calls`` again: through Triton's path, or (``cached``) as the launchers did, through
    their ``Launcher`` or ``tempme_fast.ops.launch.launch``."""
    from tempme_fast.ops.launch import launch

    for kernel, grid, args, kwargs, via in calls:
        if not cached:
            kernel[grid](*args, **kwargs)
        elif via is not None:
            via[0](*via[1])
        else:
            launch(kernel, grid, *args, **kwargs)


def launch_us(calls: Sequence[tuple], arch: int = 90, repeats: int = 20, rounds: int = 5) -> Dict[str, float]:
    """Host microseconds of launching ``calls`` (``(kernel, grid, args, kwargs)``, as recorded by
    :func:`count`) on :func:`fake_device`, through Triton's ``JITFunction.run`` (``"triton"``) and through
    ``tempme_fast.ops.launch`` once every variant is known (``"cached"``): rounds of ``repeats`` replays,
    the two alternating, the best round of each. Left out of both: the C launcher and the driver's
    launch (they need a GPU)."""
    best = {"triton": float("inf"), "cached": float("inf")}
    with fake_device(arch=arch):
        for path in best:
            _replay(calls, path == "cached")
        for _ in range(rounds):
            for path in best:
                t0 = time.perf_counter()
                for _ in range(repeats):
                    _replay(calls, path == "cached")
                best[path] = min(best[path], (time.perf_counter() - t0) / repeats * 1e6)
    return best


def _same_launch(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y if isinstance(x, torch.Tensor) else type(x) is type(y) and x == y
                                    for x, y in zip(a, b))


def launch_mismatches(calls: Sequence[tuple], arch: int = 90) -> Dict[str, object]:
    """Launch ``calls`` through Triton's path, then twice through ``tempme_fast.ops.launch``, on
    :func:`fake_device`, and compare what reaches the compiled kernels' launchers.

    Returns ``launches`` (per pass), ``variants`` (distinct Triton cache keys), ``mismatches``
    (descriptions of the cached launches whose compiled kernel or arguments differ from Triton's),
    and Triton's binder calls in the first and second pass through ``launch`` (``binds_first``:
    one per variant that ``launch`` tells apart; ``binds_second``: 0 when every launch of a known
    variant skips Triton's path).
    """
    log, binds = [], Counter()
    with fake_device(log, arch, binds):
        _replay(calls, cached=False)
        expected, log[:] = log[:], []
        binds.clear()
        _replay(calls, cached=True)
        first = sum(binds.values())
        _replay(calls, cached=True)
        got = log[:]
    mismatches = []
    for i, ((want_kernel, want), (got_kernel, launch)) in enumerate(zip(expected + expected, got)):
        if got_kernel is not want_kernel or not _same_launch(want, launch):
            mismatches.append(f"launch {i % len(calls)} ({want_kernel.name}): compiled "
                              f"{'same' if got_kernel is want_kernel else 'different'}, arguments "
                              f"{'same' if _same_launch(want, launch) else 'different'}")
    if len(got) != 2 * len(expected):
        mismatches.append(f"{len(got)} launches reached the launchers, expected {2 * len(expected)}")
    return {"launches": len(calls), "variants": len({id(k) for k, _ in expected}), "mismatches": mismatches,
            "binds_first": first, "binds_second": sum(binds.values()) - first}


def launch_check_calls() -> List[tuple]:
    """Launches that a cached launch must tell apart: ViT-B/32 and ViT-B/16 inference forwards (fp16),
    a ViT-B/32 training forward and backward (float32), one merge step whose inputs differ only in
    their address modulo 16 or their dtype (fp16, bf16) from one another (recorded in one pass, so
    that its launches share their ``Launcher``), and a plan and grouping from given scores (the
    plain ``launch``) at two addresses modulo 16."""
    from tempme_fast import encoder
    from tempme_fast.ops import triton_ops

    calls = []
    for name in MODELS:
        calls += count(_encode(name, torch.float16, 1)).calls
    model = narrow_model("ViT-B-32", torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    video = torch.randn(1, model.tempme.config.frames, 3, *model.visual.image_size)
    calls += count(lambda: model.encode_video(video).sum().backward()).calls
    step = next(s for s in merge_steps("ViT-B-32") if s.stage == "intra" and s.layer == 8)
    steps = []
    for dtype, offset in ((torch.float16, 0), (torch.float16, 1), (torch.bfloat16, 0), (torch.float16, 8)):
        shape = (step.clips, step.tokens, 768)
        x = torch.zeros(step.clips * step.tokens * 768 + offset, dtype=dtype)[offset:].view(shape)
        size = torch.ones(step.clips, step.tokens, 1)
        keys = torch.randn(step.clips, step.tokens, 3 * 768, dtype=dtype)[..., 768:1536]
        steps.append((x, size, keys, torch.nn.LayerNorm(768, dtype=dtype)))

    def merge_steps_of_each():
        with torch.inference_mode():
            for x, size, keys, norm in steps:
                encoder._merge_then_norm(x, torch.zeros_like(x), size, None, keys, 12, step.r, step.protected, norm,
                                         "auto")
    calls += count(merge_steps_of_each).calls
    plans = []
    for offset in (0, 1):
        scores = torch.rand(step.clips * 24 + offset)[offset:].view(step.clips, 24)
        dst = torch.randint(0, 24, (step.clips * 24 + offset,))[offset:].view(step.clips, 24)
        plans.append((scores, dst))

    def plans_of_each():
        for scores, dst in plans:
            merged, merged_dst, _ = triton_ops.match_plan_forward(scores, dst, step.r)
            triton_ops.merge_index(merged_dst[:, 1:], merged[:, 1:], 24)
    calls += count(plans_of_each).calls
    return calls


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


def narrow_clip(name: str, dtype: torch.dtype = torch.float16, width: int = 16):
    """``name``'s CLIP with its vision tower (depth, patch and image size) at ``width`` channels in
    one head and a one-layer text tower, unpatched: the op sequence of ``name`` at little arithmetic."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    vision = dict(cfg["vision_cfg"], width=width, head_width=width)
    text = dict(cfg["text_cfg"], width=16, heads=1, layers=1, vocab_size=64)
    return open_clip.model.CLIP(cfg["embed_dim"], vision, text).to(dtype=dtype).eval()


def narrow_model(name: str, dtype: torch.dtype = torch.float16, width: int = 16,
                 config: Optional[TempMeConfig] = None):
    """:func:`narrow_clip` patched with TempMe (backend and attention "auto"): the same token schedule
    and op sequence as ``name``. Narrow, so that the CPU's arithmetic adds little to the host time."""
    return apply_tempme(narrow_clip(name, dtype, width), config or TempMeConfig())


def _encode(name: str, dtype: torch.dtype, videos: int) -> Callable[[], object]:
    model = narrow_model(name, dtype)
    video = torch.randn(videos, model.tempme.config.frames, 3, *model.visual.image_size).to(dtype)

    def forward():
        with torch.inference_mode():
            return model.encode_video(video)
    return forward


def _train_step(name: str, variant: str, dtype: torch.dtype, videos: int) -> Callable[[], object]:
    """One training call of ``variant`` ("tempme" or "open_clip", the latter encoding the frames as
    images) as ``bench_model --modes train`` times it: gradients set afresh, forward, a loss of every
    embedding, backward into every weight."""
    model = (narrow_model if variant == "tempme" else narrow_clip)(name, dtype).train()
    frames = TempMeConfig().frames
    video = torch.randn(videos, frames, 3, *model.visual.image_size).to(dtype)

    def images(v: torch.Tensor) -> torch.Tensor:
        return model.encode_image(v.flatten(0, 1))
    return lambda: train_once(model, video, None if variant == "tempme" else images)


def train_counts(name: str, variant: str = "tempme", videos: int = 1, dtype: torch.dtype = torch.float16,
                 timed: bool = True, repeats: int = 3, rounds: int = 3) -> Counts:
    """:func:`forward_counts` for one training step (:func:`_train_step`), forward and backward: the
    counts in ``dtype``, the host time in float32."""
    counts = count(_train_step(name, variant, dtype, videos))
    if timed:
        counts.host_us = host_us(_train_step(name, variant, torch.float32, videos), repeats, rounds)
    return counts


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
        keys = torch.empty(step.clips, step.tokens, 3 * width, dtype=dtype, device="cpu")[..., width:2 * width]
        residual = torch.empty_like(x)

        def run():
            return encoder._merge_then_norm(x, residual, size, None, keys, heads, step.r, step.protected, norm,
                                            "auto")

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


def _launch_path(calls: Sequence[tuple], per: str) -> str:
    us = launch_us(calls)
    return (f"Triton's JITFunction.run {us['triton']:.0f} us per {per}, tempme_fast.ops.launch {us['cached']:.0f} us "
            f"({us['triton'] / us['cached']:.2f}x)")


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
        print(f"  function calls from Python (a launch as one): {python_calls(_encode(name, dtype, 1))}", file=out)
        if not _interpreter():
            print(f"  launch path up to the C launcher (sm_90): {_launch_path(fwd.calls, 'forward')}", file=out)
        for variant in ("open_clip", "tempme"):
            train = train_counts(name, variant, dtype=dtype)
            print(f"training step, {variant}: aten ops {sum(train.aten.values())}, Triton launches "
                  f"{sum(train.launches.values())}, allocations {train.allocations}, host {train.host_us:.0f} us "
                  f"(launches stubbed)", file=out)
            print(f"  aten: {_top(train.aten)}", file=out)
            calls = python_calls(_train_step(name, variant, dtype, 1))
            print(f"  function calls from Python (a launch as one): {calls}", file=out)
            if variant == "tempme" and not _interpreter():
                print(f"  launch path up to the C launcher (sm_90): {_launch_path(train.calls, 'step')}", file=out)
            results.setdefault(name, {})[f"train_{variant}"] = dict(train.row(), python_calls=calls)
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
        results[name].update(forward=fwd.row(), steps=steps)
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--launch-check", action="store_true",
                        help="compare tempme_fast.ops.launch with Triton's launch path on a stand-in sm_90 "
                             "device (launch_mismatches); exit 1 on any difference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.launch_check:
        result = launch_mismatches(launch_check_calls())
        print(f"launches {result['launches']}, Triton variants {result['variants']}, binder calls through "
              f"launch: first pass {result['binds_first']}, second pass {result['binds_second']}, "
              f"mismatches {len(result['mismatches'])}")
        for line in result["mismatches"][:20]:
            print("  " + line)
        return 1 if result["mismatches"] or result["binds_second"] else 0
    report(args.models, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
