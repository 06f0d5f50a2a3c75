"""What the op and model tests share: the dtypes, their tolerances, NaN-filled outputs, one closeness
check, the real-size shapes and the environment of a fresh process.

    from kit import DTYPES, VALUE_TOL, assert_close, parametrize_dtypes
"""
import argparse
import io
import os
import time
from typing import Dict

import pytest
import torch

from tempme_fast.ops import accuracy

# The checkout: tests run tempme_fast and benchmarks from it in fresh processes too.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(interpret: bool = True, **extra: str) -> Dict[str, str]:
    """The environment of a fresh Python process started by a test: the checkout first on PYTHONPATH,
    ahead of what was there (a machine without pip keeps open_clip on it), and ``extra``. Without
    ``interpret``, no TRITON_INTERPRET (which conftest.py sets on a machine without a GPU): the
    process compiles real kernels."""
    env = {k: v for k, v in os.environ.items() if interpret or k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


# The activation dtypes the fast paths serve, by the short names the test ids use.
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF_DTYPES: Dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# float64 too: the reference ops keep it (the oracle's dtype).
ALL_DTYPES: Dict[str, torch.dtype] = {**DTYPES, "fp64": torch.float64}

# (atol, rtol) of a merged value or gradient against float64, and of cosine scores: the library's own
# promise (tempme_fast.ops.accuracy), which the benchmarks also hold every timed row to.
VALUE_TOL, SCORE_TOL = accuracy.VALUE_TOL, accuracy.SCORE_TOL

# What a fresh integer output holds before a kernel writes it: far outside every valid index.
INT_SENTINEL = -(2 ** 40)
INT32_SENTINEL = -(2 ** 30)

# (clips, tokens per clip, protected, metric width, r) of ViT-B/16 at 32 videos x 12 frames: a per-frame
# merge on the key metric, the three cross-clip merges after its joins, and the last intra-clip merge.
REAL_SHAPES = [
    pytest.param(384, 197, 1, 64, 2, id="B384-N197-c1-C64-r2"),
    pytest.param(192, 362, 2, 768, 108, id="B192-N362-c2-C768-r108"),
    pytest.param(96, 458, 4, 768, 137, id="B96-N458-c4-C768-r137"),
    pytest.param(32, 867, 12, 768, 260, id="B32-N867-c12-C768-r260"),
    pytest.param(32, 547, 12, 64, 54, id="B32-N547-c12-C64-r54"),
]
# The hidden width of those models.
REAL_WIDTH = 768


def timed_once(monkeypatch, *modules) -> None:
    """Each of ``modules``' ``measure_ms`` (``benchmarks.common``'s, as the module imported it) calls its function
    once and gives that call's wall time: for tests of what a benchmark runs, checks and records, not of its
    figures. A row of a real-size kernel in the interpreter takes seconds a call, and the real one calls it at
    least five times."""
    def measure_ms(fn, *timing_args, **timing_kwargs):
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"ms": ms, "ms_p20": ms, "ms_p80": ms}
    for module in modules:
        assert hasattr(module, "measure_ms"), f"{module.__name__} does not call measure_ms"
        monkeypatch.setattr(module, "measure_ms", measure_ms)


class Parsed(Exception):
    """Raised by ``ArgumentParser.parse_args`` under :func:`stop_at_parse` once a command's options parsed."""


def held_lock(path, pid: str = "4242"):
    """The lock file ``path`` (``tempme_fast.outputs.exclusive``'s) as another running writer holds it, its pid
    written (``pid=""``: not yet); the lock goes when the returned file is closed. Skips without ``fcntl``."""
    fcntl = pytest.importorskip("fcntl")
    other = open(path, "w")
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write(f"{pid}\n" if pid else "")
    other.flush()
    return other


def pickled_afresh(obj, monkeypatch):
    """``obj`` through ``torch.save`` and ``torch.load``, loaded as a new process would: with no patched model
    class (``tempme_fast.subclass``) made yet."""
    import tempme_fast.subclass

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    monkeypatch.setattr(tempme_fast.subclass, "_CLASSES", {})
    return torch.load(buffer, weights_only=False)


def stop_at_parse(monkeypatch) -> list:
    """Make every ``ArgumentParser.parse_args`` raise :class:`Parsed` once it has parsed: a command's ``main``
    then checks its options through its own parser and runs nothing past it. Returns the parsers that parsed,
    in order (filled as they do)."""
    real = argparse.ArgumentParser.parse_args
    parsers = []

    def parse_only(self, args=None, namespace=None):
        parsers.append(self)
        real(self, args, namespace)
        raise Parsed
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    return parsers


def untimed_steps(monkeypatch, bench_train) -> None:
    """``bench_train`` (the module) runs no timed step and no memory probe (each step costs a forward and backward,
    in the interpreter): for tests of which rows and checks it runs. Every step takes 1 ms and 1 MiB."""
    monkeypatch.setattr(bench_train, "time_calls", lambda *args, **kwargs: [1.0])
    monkeypatch.setattr(bench_train, "peak_memory_mb", lambda *args, **kwargs: 1.0)


def parametrize_dtypes(table: Dict[str, torch.dtype] = DTYPES, name: str = "dtype"):
    """``@pytest.mark.parametrize`` over the dtypes of ``table``, ids by their short names."""
    return pytest.mark.parametrize(name, list(table.values()), ids=list(table))


def dtype_layout_cases(shapes, letters: str = "BND"):
    """``pytest.param(*shape, dtype, layout)`` for every 3-dim ``shape`` and float dtype (float64 too), the memory
    layouts (``test_triton_ops.make_tokens``) taking turns; ids such as ``B2-N50-D768-fp16-transposed``."""
    layouts = ("contiguous", "transposed", "sliced")
    cases = []
    for i, shape in enumerate(shapes):
        for name, dtype in {**DTYPES, "fp64": torch.float64}.items():
            layout = layouts[(i + len(name)) % 3]
            dims = "-".join(f"{letter}{n}" for letter, n in zip(letters, shape))
            cases.append(pytest.param(*shape, dtype, layout, id=f"{dims}-{name}-{layout}"))
    return cases


def nan_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh buffer that no correct result matches: NaN for floats, a far negative sentinel for ints.

    Patched over a launcher's output allocator, it makes an element the kernel never wrote fail the
    comparison instead of passing on whatever ``torch.empty`` happened to hold.
    """
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, INT_SENTINEL if dtype == torch.int64 else INT32_SENTINEL, dtype=dtype, device=device)


def fill_outputs_with_nan(monkeypatch, module, allocator: str = "_new_output") -> None:
    """Make ``module.<allocator>(shape, dtype, device)`` return :func:`nan_output` for this test."""
    monkeypatch.setattr(module, allocator, nan_output)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Every element within ``atol + rtol * |expected|`` of :data:`VALUE_TOL` for ``dtype``, and no NaN.

    Compared in float64 on the CPU; the message gives the max abs difference and the bounds.
    """
    atol, rtol = VALUE_TOL[dtype]
    assert not actual.isnan().any(), f"{what}: NaN (an output element was never written)"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = atol + rtol * expected.double().cpu().abs()
    assert (diff <= bound).all(), f"{what}: max abs diff {diff.max().item():.3g} (atol {atol}, rtol {rtol})"
