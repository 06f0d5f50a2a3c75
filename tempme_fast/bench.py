"""``tempme bench``: unmerged open_clip against TempMe on each backend, measured in one run."""
from __future__ import annotations

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
from .flops import model_flops
from .model import apply_tempme, remove_tempme


@dataclass
class BenchRow:
    """One measured configuration. Times are per batch; memory is above the model's weights."""

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


def bench_model(model: torch.nn.Module, config: TempMeConfig, *, batch: int, device: torch.device,
                dtype: torch.dtype, backends: Sequence[str], repeats: int = 3, warmup: int = 1,
                progress: bool = True, seed: int = 0) -> List[BenchRow]:
    """Time ``model`` unmerged and with ``config`` on each backend, on the same random videos.

    The model is patched and unpatched in turn and left as it came.
    """
    from tqdm.auto import tqdm

    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    model = model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, config.frames, 3, *model.visual.image_size, generator=generator)
    video = video.to(device=device, dtype=dtype)
    variants = [("open_clip (unmerged)", TempMeConfig.unmerged(config.frames), "torch")]
    variants += [("TempMe", config, backend) for backend in backends]
    rows = []
    bar = tqdm(total=len(variants) * (repeats + warmup), desc="bench", unit="run", disable=not progress)
    for name, cfg, backend in variants:
        apply_tempme(model, cfg, backend=backend)
        try:
            def run():
                with torch.inference_mode():
                    return model.encode_video(video)

            times = time_calls(run, device, repeats, warmup, tick=bar.update)
            median = statistics.median(times)
            rows.append(BenchRow(
                name=name, backend=backend if cfg.merges else "-",
                tokens_per_video=model.tempme.schedule.output_tokens,
                gflops_per_video=model_flops(model).gflops,
                latency_ms=median, latency_min_ms=min(times), latency_max_ms=max(times),
                videos_per_s=batch / (median / 1e3), peak_mem_mb=peak_memory_mb(run, device)))
        finally:
            remove_tempme(model)
    bar.close()
    for row in rows:
        row.speedup = row.videos_per_s / rows[0].videos_per_s
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    header = ("variant", "backend", "tokens/video", "GFLOPs/video", "latency ms (min-max)",
              "videos/s", "peak MiB", "speed-up")
    lines = [header]
    for r in rows:
        lines.append((r.name, r.backend, str(r.tokens_per_video), f"{r.gflops_per_video:.1f}",
                      f"{r.latency_ms:.1f} ({r.latency_min_ms:.1f}-{r.latency_max_ms:.1f})",
                      f"{r.videos_per_s:.2f}", f"{r.peak_mem_mb:.0f}", f"{r.speedup:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def rows_as_dicts(rows: Sequence[BenchRow]) -> List[dict]:
    return [asdict(r) for r in rows]
