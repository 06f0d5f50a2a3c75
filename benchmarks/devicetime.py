"""The GPU's own time for a call, apart from the host time spent launching it.

An op timed as called (``common.measure_ms``: CUDA events around each eager call) includes the host's
work: Python, the dispatcher, argument checks, the launch itself. On a machine whose host is slower than
the GPU work, that hides the kernel. Here the calls are captured once in a CUDA graph and the graph is
replayed: the replay launches every kernel from the device, so its time is the kernels' time plus the
small gaps between them.

Inputs that fit in the L2 cache would be read from it on every replay after the first, and the figure
would be a cache figure. The caller therefore gives a factory of input sets, and the graph cycles through
enough sets that together they exceed twice the L2 size (at most ``MAX_SETS``).

Where a call cannot be captured (a host synchronisation inside it), the fallback sums the durations of
the kernels that ``torch.profiler`` sees over one pass through the sets: ``device_basis`` says which.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, List, Sequence

import torch

from .common import failure

MAX_SETS = 64  # input sets cycled through in one graph
MIN_CALLS = 16  # calls per graph, so that one replay's launch cost is spread thin
HOST_BOUND_RATIO = 1.5  # eager time over device time above which a row is called host-bound
DEFAULT_L2_BYTES = 60 << 20


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes (60 MB where torch does not report it)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def input_sets(set_bytes: int, l2: int, max_sets: int = MAX_SETS) -> int:
    """How many input sets of ``set_bytes`` bytes a graph cycles through so that they exceed ``2 * l2``."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes={set_bytes} must be > 0 (the bytes one call's inputs occupy)")
    if l2 < 0 or max_sets < 1:
        raise ValueError(f"l2={l2} must be >= 0 and max_sets={max_sets} >= 1")
    return max(1, min(max_sets, math.ceil(2 * l2 / set_bytes)))


def graph_calls(sets: int, min_calls: int = MIN_CALLS) -> int:
    """Calls captured in one graph: a whole number of passes through the sets, at least ``min_calls``."""
    return sets * max(1, math.ceil(min_calls / sets))


def _quantiles(times: Sequence[float], prefix: str) -> Dict[str, float]:
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return {prefix: statistics.median(times), f"{prefix}_p20": q[0], f"{prefix}_p80": q[-1]}


def _graph_times(fns: List[Callable[[], object]], calls: int, stream, rep_ms: float) -> List[float]:
    """Milliseconds per call of each replay of a graph of ``calls`` calls cycling through ``fns``."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for k in range(calls):
            fns[k % len(fns)]()
    try:
        graph.replay()  # the first replay uploads the graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        graph.replay()
        end.record(stream)
        end.synchronize()
        reps = max(5, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in pairs:
            s.record(stream)
            graph.replay()
            e.record(stream)
        stream.synchronize()
        return [s.elapsed_time(e) / calls for s, e in pairs]
    finally:
        del graph


def kernel_us(events) -> Dict[str, List[float]]:
    """Device-side durations (us) by kernel name, from ``torch.profiler``'s ``events()``."""
    from torch.autograd import DeviceType

    kernels: Dict[str, List[float]] = {}
    for e in events:
        # A user annotation on the device spans kernels already counted: it would count them twice.
        if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False):
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
    return kernels


def _profiled_ms(fns: List[Callable[[], object]], stream) -> float:
    """Kernel milliseconds per call, summed over one profiled pass through ``fns`` (no launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for fn in fns:
            fn()
        stream.synchronize()
    total_us = sum(sum(v) for v in kernel_us(prof.events()).values())
    if total_us <= 0:
        raise RuntimeError("the profiler saw no kernel")
    return total_us / 1e3 / len(fns)


def device_ms(make: Callable[[int], Callable[[], object]], set_bytes: int, device: torch.device,
              rep_ms: float = 100) -> Dict[str, object]:
    """The GPU's time per call of ``make(i)()``, ``i`` cycling over input sets that exceed the L2 cache.

    ``make(i)`` builds the inputs of set ``i`` (never zeros: random data) and returns a zero-argument
    callable; it runs on the capture stream, so a backward whose forward ``make`` ran stays on it.
    ``set_bytes`` is the size of one set's inputs. Returns ``device_ms`` with its 20th/80th percentiles,
    ``device_basis`` (``graph`` or, where capture failed, ``kernels``), ``device_sets`` and
    ``device_calls``; on a CPU device an empty dict (no device time to tell apart from the wall time).
    """
    if device.type != "cuda":
        return {}
    sets = input_sets(set_bytes, l2_bytes(device))
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            fns = [make(i) for i in range(sets)]
            for fn in fns + fns[:1]:  # warm-up: compilation, autotuning, allocator growth stay out
                fn()
            stream.synchronize()
            calls = graph_calls(sets)
            info = {"device_sets": sets, "device_calls": calls, "device_rotated_mb": sets * set_bytes / 2**20}
            try:
                return {**_quantiles(_graph_times(fns, calls, stream, rep_ms), "device_ms"), "device_basis": "graph",
                        **info}
            except RuntimeError as e:  # not capturable: the kernels' own durations instead
                torch.cuda.synchronize(device)
                ms = _profiled_ms(fns, stream)
                return {"device_ms": ms, "device_basis": "kernels", "device_capture_error": str(e)[:300],
                        **info, "device_calls": len(fns)}
    finally:
        torch.cuda.current_stream(device).wait_stream(stream)


def device_columns(make: Callable[[int], Callable[[], object]], set_bytes: int, device: torch.device,
                   rep_ms: float = 100) -> Dict[str, object]:
    """:func:`device_ms`, or ``{"device_error": ...}`` where it raises: a row's eager figure, already
    measured, stands without its device columns."""
    try:
        return device_ms(make, set_bytes, device, rep_ms)
    except Exception as e:  # noqa: BLE001 (recorded in the row)
        return {"device_error": failure(e)["error"]}


def enqueue_ms(fn: Callable[[], object], device: torch.device, calls: int = 7) -> float:
    """Median host milliseconds from the start of ``fn`` until it returns, each call started on an idle GPU
    (synchronised before, not inside): the time the host takes to issue the call's work, apart from the
    GPU's. An eager call is host-bound where this is above its device time, and then its time as called
    is about this. The launch queue never fills in one forward, so the host never waits on the GPU."""
    import time

    times = []
    for _ in range(calls):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def host_columns(eager_ms: float, timing: Dict[str, object]) -> Dict[str, object]:
    """``eager_over_device`` and ``host_bound`` of a row that has a device time; nothing otherwise."""
    dev = timing.get("device_ms")
    if not dev:
        return {}
    ratio = eager_ms / dev
    return {"eager_over_device": ratio, "host_bound": ratio > HOST_BOUND_RATIO}


def basis_ms(row: Dict[str, object], device: torch.device):
    """The time a row's bandwidth and speed-ups are computed from: the device time on a GPU (None where
    it could not be measured), the wall time on a CPU (where the host is the device)."""
    return row.get("device_ms") if device.type == "cuda" else row.get("ms")


def speedups(row: Dict[str, object], base: Dict[str, object], device: torch.device, name: str) -> Dict[str, object]:
    """``name`` (from device time on a GPU, wall time on a CPU) and, on a GPU, ``name_eager`` from the
    eager times: ``base``'s time over ``row``'s; None where either time is missing."""
    def ratio(a, b):
        return a / b if a and b else None

    out = {name: ratio(basis_ms(base, device), basis_ms(row, device))}
    if device.type == "cuda":
        out[f"{name}_eager"] = ratio(base.get("ms"), row.get("ms"))
    return out
