"""Bit-for-bit repeatability on a GPU at the real sizes (ViT-B/32 and ViT-B/16 shapes): skipped without CUDA.

- The Triton merge ops, forward and backward, at the shapes the model meets (including hub plans
  where many A tokens merge into one B token): identical across runs, with no special setting.
- The whole encoder's forward on the Triton backend: identical across runs, with no special setting.
- The whole encoder's forward and backward on either backend: identical across runs under
  ``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (checked in a
  fresh process, since cuBLAS reads that variable when it starts). Without them, PyTorch's fused
  attention backward and the torch backend's ``scatter_add`` may reorder float sums.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from kit import HALF_DTYPES, REAL_SHAPES, REAL_WIDTH, ROOT, parametrize_dtypes, process_env
from tempme_fast import TempMeConfig, apply_tempme, ops
from tempme_fast.ops import reference as ref

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]



@parametrize_dtypes()
@pytest.mark.parametrize("b, n, c, ch, r", REAL_SHAPES)
def test_triton_ops_repeat_at_real_sizes(b, n, c, ch, r, dtype):
    g = torch.Generator(device="cuda").manual_seed(n)
    metric = torch.randn(b, n, ch, device="cuda", generator=g).to(dtype)
    x = torch.randn(b, n, REAL_WIDTH, device="cuda", generator=g).to(dtype)
    size = torch.randint(1, 600, (b, n, 1), device="cuda", generator=g).float()
    upstream = torch.randn(b, n - r, REAL_WIDTH, device="cuda", generator=g).to(dtype)
    na, _ = ref.split_sizes(n, c)
    # Every merged A token into B token 0 or 1: long sums whose order would show in the last bits.
    hub = ref.MergePlan(torch.arange(r, device="cuda").expand(b, -1), (torch.arange(r, device="cuda") % 2).expand(b, -1),
                        torch.arange(r, na, device="cuda").expand(b, -1), n, c)

    def run():
        plan = ops.match(metric, r, c, backend="triton")
        results = [*plan[:3], *ops.best_match(metric, c, backend="triton")]
        for p in (plan, hub):
            xr = x.clone().requires_grad_()
            out, out_size = ops.merge(xr, size, p, backend="triton")
            out.backward(upstream)
            results += [out, out_size, xr.grad]
        torch.cuda.synchronize()
        return results

    first = run()
    for _ in range(2):
        for a, b_ in zip(first, run()):
            assert torch.equal(a, b_)


@parametrize_dtypes(HALF_DTYPES)
def test_triton_encoder_forward_repeats_at_real_size(dtype):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).to("cuda", dtype).eval()
    apply_tempme(model, TempMeConfig(), backend="triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    video = torch.randn(16, 12, 3, 224, 224, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
        first = model.encode_video(video)
        for _ in range(3):
            assert torch.equal(model.encode_video(video), first)


_DETERMINISTIC_CASES = [(backend, dtype) for dtype in ("float32", "bfloat16") for backend in ("triton", "torch")]

# Every case in one fresh process: one start-up and one set of kernel compilations instead of four
# (one process per case took 36 s for float32-triton alone on an H200 host). Two videos of 12 frames at
# ViT-B/32's real width keep every kernel and every merge of the schedule at a fraction of the time.
_DETERMINISTIC_SCRIPT = textwrap.dedent("""
    import sys
    import torch, open_clip
    from tempme_fast import TempMeConfig, apply_tempme

    torch.use_deterministic_algorithms(True)

    def check(backend, dtype):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).to("cuda", dtype).train()
        apply_tempme(model, TempMeConfig(), backend=backend)
        g = torch.Generator(device="cuda").manual_seed(1)
        video = torch.randn(2, 12, 3, 224, 224, device="cuda", generator=g).to(dtype)
        upstream = torch.randn(2, 512, device="cuda", generator=g).to(dtype)

        def run():
            model.zero_grad(set_to_none=True)
            emb = model.encode_video(video)
            emb.backward(upstream)
            torch.cuda.synchronize()
            return [emb.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

        first = run()
        for _ in range(2):
            for i, (a, b) in enumerate(zip(first, run())):
                if not torch.equal(a, b):
                    return f"tensor {i} differs"
        return "bitwise-identical"

    for case in sys.argv[1:]:
        backend, dtype = case.split(":")
        try:
            result = check(backend, getattr(torch, dtype))
        except Exception as e:
            result = f"raised {type(e).__name__}: {e}".replace("\\n", " ")[:500]
        print(f"case {backend}:{dtype} {result}", flush=True)
""")


@pytest.fixture(scope="module")
def deterministic_results():
    done = subprocess.run([sys.executable, "-c", _DETERMINISTIC_SCRIPT, *[f"{b}:{d}" for b, d in _DETERMINISTIC_CASES]],
                          env=process_env(False, CUBLAS_WORKSPACE_CONFIG=":4096:8"), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    results = dict(line[len("case "):].split(" ", 1) for line in done.stdout.splitlines() if line.startswith("case "))
    return results, done.stderr[-4000:]


@pytest.mark.parametrize("backend, dtype", _DETERMINISTIC_CASES)
def test_encoder_forward_backward_repeat_in_deterministic_mode(backend, dtype, deterministic_results):
    results, stderr = deterministic_results
    assert results.get(f"{backend}:{dtype}") == "bitwise-identical", stderr
