"""The cached Triton launch (tempme_fast.ops.launch) hands the compiled kernels what Triton's path would.

Without a GPU the check runs Triton's own launch path on a stand-in sm_90 device
(``benchmarks.host.fake_device``), in a process of its own: TRITON_INTERPRET (set by conftest.py)
swaps the kernels for the interpreter's, which ``launch`` passes straight to Triton. On a GPU the
cached and uncached launches are compared by their outputs.
"""
import subprocess
import sys

import pytest
import torch

from kit import ROOT, process_env
from tempme_fast import ops
from tempme_fast.ops import launch


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=process_env(False), capture_output=True, text=True,
                          timeout=timeout)


def test_cached_launches_reach_the_same_compiled_kernel_with_the_same_arguments():
    # Two forwards, a training step and one merge step at four alignments/dtypes: every cached
    # launch must pick Triton's compiled variant and pass it Triton's arguments, and a second pass
    # must not bind arguments through Triton at all.
    result = _python("-m", "benchmarks.host", "--launch-check")
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip().splitlines()[0]
    assert "mismatches 0" in line and "second pass 0" in line, line
    variants = int(line.split("Triton variants ")[1].split(",")[0])
    assert variants >= 40, line  # forward, backward, alignment and dtype variants were all seen


REBOUND = """
import torch
from collections import Counter
from benchmarks import host
from tempme_kernels import best_match

calls = [c for c in host.count(host._encode("ViT-B-32", torch.float16, 1)).calls
         if c[0].fn.__name__ == "_best_match_fwd_kernel"][:1]
binds = Counter()
with host.fake_device(binds=binds):
    host._replay(calls, cached=True)
    host._replay(calls, cached=True)
    assert sum(binds.values()) == 1, binds  # the second launch skipped Triton's path
    if not best_match._best_match_fwd_kernel.used_global_vals:
        print("unwatched")  # this Triton does not check the kernel's globals either
        raise SystemExit(0)
    old = best_match.RANGES_PER_STEP
    best_match.RANGES_PER_STEP = type(old)(old.value)  # rebound, same value
    host._replay(calls, cached=True)
    assert sum(binds.values()) == 2, binds  # back through Triton, which compares the values
    best_match.RANGES_PER_STEP = type(old)(old.value + 1)
    try:
        host._replay(calls, cached=True)
    except RuntimeError as e:
        assert "RANGES_PER_STEP" in str(e), e
    else:
        raise AssertionError("a changed global went unnoticed")
    finally:
        best_match.RANGES_PER_STEP = old
print("ok")
"""


def test_a_global_rebound_after_compilation_sends_the_launch_back_through_triton():
    result = _python("-c", REBOUND)
    if result.stdout.strip().endswith("unwatched"):
        pytest.skip("this Triton does not record the globals a kernel reads")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_interpreted_kernels_go_straight_to_triton():
    # In the interpreter (the CPU test runs) nothing is cached: the kernels are not JITFunctions.
    if torch.cuda.is_available():
        pytest.skip("the kernels are compiled here")
    launch.clear_cache()
    metric = torch.randn(2, 20, 8)
    ops.match(metric, 3, 1, backend="triton")
    assert not launch._CACHE


class _Refused:
    """A kernel as Triton's interpreter before 3.7 runs one under numpy 2.4: the launch fails inside it."""

    def __getitem__(self, grid):
        def run(*args, **meta):
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return run


@pytest.mark.parametrize("interpreting", ["1", None])
def test_an_interpreter_that_numpy_refuses_is_named_with_the_fix(monkeypatch, interpreting):
    if interpreting:
        monkeypatch.setenv("TRITON_INTERPRET", interpreting)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for call in (lambda: launch.launch(_Refused(), (1,), torch.zeros(1)),
                 lambda: launch.Launcher(_Refused(), (1,))(torch.zeros(1))):
        if interpreting:  # named, with the versions and what to install
            with pytest.raises(RuntimeError, match=r"interpreter of triton .* numpy .* Install numpy<2\.4, or "
                                                   r"triton>=3\.7") as raised:
                call()
            assert isinstance(raised.value.__cause__, TypeError)
        else:  # compiled kernels never meet it: the error passes unchanged
            with pytest.raises(TypeError, match="only 0-dimensional"):
                call()


@pytest.mark.cuda
def test_cached_launch_equals_tritons_launch_on_a_gpu():
    torch.manual_seed(0)
    x = torch.randn(4, 50, 768, device="cuda", dtype=torch.float16)
    metric = torch.randn(4, 50, 64, device="cuda", dtype=torch.float16)
    size = torch.rand(4, 50, 1, device="cuda") + 0.5
    # The same shapes at an address that is not 16-byte aligned: another compiled variant.
    shifted = torch.empty(x.numel() + 1, device="cuda", dtype=torch.float16)[1:].view_as(x).copy_(x)
    outputs, previous = {}, launch.CACHED
    for cached in (False, True, True):
        launch.CACHED = cached
        launch.clear_cache()
        try:
            for _ in range(2):  # the second call of a variant takes the cached path
                runs = []
                for inp in (x, shifted):
                    plan = ops.match(metric, 8, 1, backend="triton")
                    runs.append(ops.merge(inp, size, plan, backend="triton"))
            outputs.setdefault(cached, []).append(runs)
            if cached:
                assert launch._CACHE, "no launch was cached"
        finally:
            launch.CACHED = previous
    reference = outputs[False][0]
    for runs in outputs[True]:
        for got, want in zip(runs, reference):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    for g, w in zip(reference[1], reference[0]):  # misaligned input, same result
        torch.testing.assert_close(g, w, rtol=0, atol=0)
