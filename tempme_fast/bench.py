"""``tempme bench``: unmerged open_clip against TempMe on each backend, measured in one run.

The variants take turns, one call each per repetition in alternating order, and the speed-up is
the median of per-repetition ratios with its range: on a shared machine, load that comes and goes
then slows every variant alike instead of whichever was being timed as a block.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .config import TempMeConfig
from .errors import ConfigError
from .flops import model_flops
from .model import apply_tempme, remove_tempme, vit_geometry
from .outputs import plural


@dataclass
class BenchRow:
    """One measured configuration. Times are per batch; memory is above the model's weights.

    ``speedup`` is the median over repetitions of (unmerged time / this variant's time) measured
    back to back in the same repetition; ``speedup_min``/``speedup_max`` bound those ratios and
    ``speedup_q1``/``speedup_q3`` are their quartiles. ``flops_bound`` is unmerged GFLOPs / this
    variant's GFLOPs: the speed-up if time followed FLOPs. ``gflops_per_video`` is TempMe's count
    (every block in full); ``gflops_executed`` what the variant runs (less with the last block trimmed).
    """

    name: str
    backend: str
    tokens_per_video: int
    gflops_per_video: float
    latency_ms: float
    latency_min_ms: float
    latency_max_ms: float
    videos_per_s: float
    peak_mem_mb: float
    speedup: float = 1.0
    speedup_min: float = 1.0
    speedup_max: float = 1.0
    speedup_q1: float = 1.0
    speedup_q3: float = 1.0
    flops_bound: float = 1.0
    gflops_executed: Optional[float] = None


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the mode and alive at once (CPU has no allocator stats).

    A storage counts as freed when the first tensor that produced it dies; views never add bytes.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _release(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._seen:
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._release, key, nbytes)
        return out


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``fn`` above what was allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak / 2**20


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
               tick: Optional[Callable[[], None]] = None) -> List[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
        if tick:
            tick()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if tick:
            tick()
    return times


def default_backends(device: torch.device) -> List[str]:
    """TempMe backends worth timing on ``device``: Triton needs a CUDA GPU to be fast."""
    from .ops import triton_available
    return ["torch", "triton"] if device.type == "cuda" and triton_available() else ["torch"]


def _quartiles(values: Sequence[float]):
    """(min, first quartile, median, third quartile, max); quartiles by linear interpolation."""
    ordered = sorted(values)

    def at(q):
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return ordered[0], at(0.25), at(0.5), at(0.75), ordered[-1]


def bench_model(model: torch.nn.Module, config: TempMeConfig, *, batch: int, device: torch.device,
                dtype: torch.dtype, backends: Sequence[str], repeats: int = 5, warmup: int = 1,
                progress: bool = True, seed: int = 0, cuda_graph: bool = False,
                full_last_block: bool = False) -> List[BenchRow]:
    """Time ``model`` unmerged and with ``config`` on each backend, on the same random videos.

    TempMe runs as ``apply_tempme`` does by default (the last block trimmed to its class tokens);
    ``full_last_block`` adds a row per backend with every token through the last block, as the
    released code runs it.

    With ``cuda_graph`` (CUDA only) every variant, unmerged included, is timed as replays of its
    forward captured in a CUDA graph (:class:`tempme_fast.GraphedVideoEncoder`, captured afresh
    each time the variant is patched in), which takes the host's launch cost out of the latency;
    peak memory is still that of an eager forward.

    The variants are interleaved: every repetition times each variant once, in the opposite order
    to the repetition before (A B, B A, A B, ...), so load that comes and goes on a shared machine
    lands on all of them alike; the speed-up is the median of the per-repetition ratios. The model
    is patched and unpatched for every call (outside the timed region) and left as it came.
    """
    from tqdm.auto import tqdm

    if batch < 1:
        raise ConfigError(f"batch={batch} must be at least 1")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    if cuda_graph and device.type != "cuda":
        raise ConfigError(f"cuda_graph (--cuda-graph) needs a CUDA device; the device is {device}")
    vit_geometry(model.visual)  # refuse a model TempMe cannot patch before reading its image size
    backends = list(dict.fromkeys(backends))  # each named backend once
    model = model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, config.frames, 3, *model.visual.image_size, generator=generator)
    video = video.to(device=device, dtype=dtype)
    variants = [("open_clip (unmerged)", TempMeConfig.unmerged(config.frames), "torch", True)]
    variants += [("TempMe", config, backend, True) for backend in backends]
    if full_last_block and config.merges:
        variants += [("TempMe, full last block", config, backend, False) for backend in backends]

    def run():
        with torch.inference_mode():
            return model.encode_video(video)

    def patched(i):
        return _patched(model, *variants[i][1:])

    def timed(count: int, warm: int, tick=None) -> List[float]:
        """``time_calls`` of the patched-in variant: eager, or replays of a graph captured now."""
        if not cuda_graph:
            return time_calls(run, device, count, warm, tick)
        from .graphs import GraphedVideoEncoder
        encoder = GraphedVideoEncoder(model, batch, dtype=dtype, warmup=1)
        return time_calls(lambda: encoder(video), device, count, warm, tick)

    bar = tqdm(total=len(variants) * (repeats + warmup), desc="bench", unit="run", disable=not progress)
    times: List[List[float]] = [[] for _ in variants]
    for i in range(len(variants)):
        with patched(i):
            timed(0, warmup, tick=bar.update)
    order = list(range(len(variants)))
    for rep in range(repeats):
        for i in (order if rep % 2 == 0 else order[::-1]):
            with patched(i):
                times[i] += timed(1, 0)
            bar.update()
    bar.close()
    rows = []
    for i, (name, cfg, backend, _) in enumerate(variants):
        with patched(i):
            median = statistics.median(times[i])
            rows.append(BenchRow(
                name=name, backend=backend if cfg.merges else "-",
                tokens_per_video=model.tempme.schedule.output_tokens,
                gflops_per_video=model_flops(model).gflops,
                gflops_executed=model_flops(model, executed=True).gflops, latency_ms=median,
                latency_min_ms=min(times[i]), latency_max_ms=max(times[i]),
                videos_per_s=batch / (median / 1e3), peak_mem_mb=peak_memory_mb(run, device)))
    set_speedups(rows, times)
    return rows


def set_speedups(rows: Sequence[BenchRow], times: Sequence[Sequence[float]]) -> None:
    """Fill each row's speed-up statistics and FLOPs bound against ``rows[0]`` (the unmerged model).

    ``times[i][k]`` is variant ``i``'s time in repetition ``k``; the ratios pair the same repetition.
    """
    for row, row_times in zip(rows, times):
        ratios = [base / t for base, t in zip(times[0], row_times)]
        (row.speedup_min, row.speedup_q1, row.speedup, row.speedup_q3, row.speedup_max) = _quartiles(ratios)
        row.flops_bound = rows[0].gflops_per_video / row.gflops_per_video


@contextlib.contextmanager
def _patched(model: torch.nn.Module, config: TempMeConfig, backend: str, trim_last_block: bool = True):
    """The model patched with ``config`` inside the block, unpatched after."""
    apply_tempme(model, config, backend=backend, trim_last_block=trim_last_block)
    try:
        yield model
    finally:
        remove_tempme(model)


# A spread of the per-repetition speed-ups wider than this share of their median earns a warning.
WIDE_SPREAD = 0.10
# Other processes' load (in cores) beyond the cores a run leaves free that still counts as quiet:
# a shell, an editor or a load average still decaying from a run just before.
LOAD_SLACK = 0.5


def load_average() -> Optional[float]:
    """The 1-minute load average, None where the platform has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def noise_warnings(rows: Sequence[BenchRow], threads: int, load_before: Optional[float],
                   load_after: Optional[float], cores: Optional[int]) -> List[str]:
    """Why the speed-ups of ``rows`` may not be what a quiet machine gives, one sentence each.

    Args:
        threads: CPU threads the timed runs used (1 on a GPU: the host thread).
        load_before, load_after: 1-minute load averages (``os.getloadavg()[0]``) before and after
            the runs, None where the platform has none. The run's own threads raise ``load_after``,
            so the other processes' share is estimated as ``max(before, after - threads)``; it warns
            when that exceeds the cores the run leaves free by more than :data:`LOAD_SLACK`.
        cores: CPU cores of the machine.
    """
    out = []
    for row in rows[1:]:
        spread = (row.speedup_max - row.speedup_min) / row.speedup
        if spread > WIDE_SPREAD:
            out.append(f"{row.name} ({row.backend}): the per-repetition speed-ups range over "
                       f"{row.speedup_min:.2f}-{row.speedup_max:.2f}x ({spread:.0%} of the median); the machine "
                       f"was noisy: rerun with more --repeats on a quiet machine")
    if load_before is not None and cores:
        others = max(load_before, (load_after if load_after is not None else load_before) - threads)
        free = cores - threads
        if others > free + LOAD_SLACK:
            out.append(f"load average {others:.1f} from other processes exceeds the {plural(free, 'core')} this run "
                       f"left free ({plural(cores, 'core')}, {plural(threads, 'thread')} used): the timings are "
                       f"contended; the speed-up may not hold on a quiet machine")
    return out


def schedule_name(config: TempMeConfig) -> str:
    """``"released schedule"`` or ``"custom schedule (imgme_r=1, clip_layers=(2, 3))"``: what differs
    from the released one at the same frame count."""
    # The released values are the field defaults (a released config may not exist at these frames).
    fields = TempMeConfig.__dataclass_fields__
    changed = [f"{k}={getattr(config, k)}" for k, f in fields.items()
               if k != "frames" and getattr(config, k) != f.default]
    if not config.merges:
        return "no merging"
    return "released schedule" if not changed else f"custom schedule ({', '.join(changed)})"


def format_table(rows: Sequence[BenchRow]) -> str:
    header = ("variant", "backend", "tokens/video", "GFLOPs/video", "latency ms (min-max)",
              "videos/s", "peak MiB", "speed-up (min-max)", "FLOPs bound")
    lines = [header]
    for r in rows:
        lines.append((r.name, r.backend, str(r.tokens_per_video), f"{r.gflops_per_video:.1f}",
                      f"{r.latency_ms:.1f} ({r.latency_min_ms:.1f}-{r.latency_max_ms:.1f})",
                      f"{r.videos_per_s:.2f}", f"{r.peak_mem_mb:.0f}",
                      f"{r.speedup:.2f}x ({r.speedup_min:.2f}-{r.speedup_max:.2f})", f"{r.flops_bound:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def rows_as_dicts(rows: Sequence[BenchRow]) -> List[dict]:
    return [asdict(r) for r in rows]
