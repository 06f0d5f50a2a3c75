"""What conftest.py changes in the test processes: the Triton interpreter patches ``triton.language`` once a launch."""
import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _twice(x):
    return x * 2


@triton.jit
def _plain_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs) * 2)


@triton.jit
def _nested_kernel(x_ptr, out_ptr, N: tl.constexpr, CALLS: tl.constexpr, FAIL: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    for _ in tl.static_range(CALLS):
        x = _twice(x)
    tl.static_assert(not FAIL, "asked to fail")
    tl.store(out_ptr + offs, x)


@pytest.mark.interpreter
def test_a_launch_patches_the_language_once_and_undoes_it(monkeypatch):
    """A kernel calling a jit function 5 times patches the language as often as one calling none (once), computes
    what it did, and leaves ``triton.language`` as it found it, also when it raised: the next launch patches it
    once again."""
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "once_a_launch", False)
    patched = []
    builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *args: patched.append(1) or builtin(*args))
    originals = (tl.arange, tl.load, tl.tensor.__add__)
    x = torch.arange(8, dtype=torch.float32)
    out = torch.empty_like(x)

    _plain_kernel[(1,)](x, out, N=8)
    once = len(patched)
    assert once > 0 and torch.equal(out, 2 * x)
    patched.clear()
    _nested_kernel[(1,)](x, out, N=8, CALLS=5, FAIL=False)
    assert len(patched) == once and torch.equal(out, 32 * x)
    assert (tl.arange, tl.load, tl.tensor.__add__) == originals
    with pytest.raises(Exception, match="asked to fail"):
        _nested_kernel[(1,)](x, out, N=8, CALLS=1, FAIL=True)
    assert (tl.arange, tl.load, tl.tensor.__add__) == originals
    patched.clear()
    _nested_kernel[(1,)](x, out, N=8, CALLS=2, FAIL=False)
    assert len(patched) == once and torch.equal(out, 4 * x)
