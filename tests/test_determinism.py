"""Repeated runs give bit-identical results: the Triton ops and the whole encoder, forward and backward.

Here the Triton kernels run in the interpreter (or on the GPU when there is one); the real sizes
are checked on a GPU by ``test_cuda_determinism.py``. What holds where (also in the README):

- Triton backend merge ops (``best_match``, ``match``, ``merge`` forward and backward): deterministic
  by construction on every device. No atomics: each B token gathers its sources in rank order.
- Torch backend on the CPU: deterministic (its ``scatter_add`` and ``gather`` backward run
  sequentially per output there).
- Torch backend on CUDA: ``scatter_add`` (forward) and the ``gather`` backward use atomics, so merged
  values may differ in the last bits from run to run unless ``torch.use_deterministic_algorithms(True)``.
- Whole-model gradients on CUDA (either backend): PyTorch's fused attention backward is not
  deterministic by default; ``torch.use_deterministic_algorithms(True)`` with
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` makes it so.
"""
import pytest
import torch

from kit import parametrize_dtypes
from tempme_fast import apply_tempme, ops
from tempme_fast.ops import reference as ref
from tempme_fast.ops import triton_ops
from tiny import TINY_CONFIG, tiny_clip, video

pytestmark = pytest.mark.interpreter


def _run_model(model, v, mask, seed=0):
    """Embedding, the input gradient and every parameter gradient for a fixed random upstream gradient."""
    model.zero_grad(set_to_none=True)
    v = v.clone().requires_grad_()
    emb = model.encode_video(v, mask)
    upstream = torch.randn(emb.shape, generator=torch.Generator().manual_seed(seed)).to(emb)
    emb.backward(upstream)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return emb.detach(), v.grad, grads


def _assert_bitwise(first, second):
    emb1, gv1, grads1 = first
    emb2, gv2, grads2 = second
    assert torch.equal(emb1, emb2)
    assert torch.equal(gv1, gv2)
    assert grads1.keys() == grads2.keys() and "visual.tempme_frame_pos.2" in grads1
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_encoder_forward_and_backward_repeat_bit_for_bit(backend, device):
    if backend == "torch" and device == "cuda":
        pytest.skip("the torch backend's scatter_add is not deterministic on CUDA (see the module docstring)")
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend).train().to(device)
    with torch.no_grad():
        for p in model.visual.tempme_frame_pos.values():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    v = video(1, 4, seed=3).to(device)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool, device=device)
    _assert_bitwise(_run_model(model, v, mask), _run_model(model, v, mask))


@parametrize_dtypes()
def test_triton_ops_repeat_bit_for_bit_over_many_tiles(dtype, monkeypatch, device):
    """16-wide tiles walk every multi-tile loop; a hub plan sends 12 A tokens into 2 B tokens, where a
    sum in any other order would round differently."""
    monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 16)
    g = torch.Generator().manual_seed(1)
    n, c, r = 41, 1, 12
    metric = torch.randn(2, n, 20, generator=g).to(dtype).to(device)
    x = torch.randn(2, n, 20, generator=g).to(dtype).to(device)
    size = torch.randint(1, 600, (2, n, 1), generator=g).float().to(device)
    na, _ = ref.split_sizes(n, c)
    hub = ref.MergePlan(torch.arange(r).expand(2, -1).to(device), (torch.arange(r) % 2).expand(2, -1).to(device),
                        torch.arange(r, na).expand(2, -1).to(device), n, c)
    upstream = torch.randn(2, n - r, 20, generator=g).to(dtype).to(device)

    def run():
        plan = ops.match(metric, r, c, backend="triton")
        scores = ops.best_match(metric, c, backend="triton")
        results = [*plan[:3], *scores]
        for p in (plan, hub):
            xr = x.clone().requires_grad_()
            out, out_size = ops.merge(xr, size, p, backend="triton")
            out.backward(upstream)
            results += [out, out_size, xr.grad]
        return results

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


def test_torch_backend_on_cpu_repeats_bit_for_bit_with_hub_plans():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 41, 16, generator=g, requires_grad=True)
    size = torch.randint(1, 600, (2, 41, 1), generator=g).float()
    plan = ref.MergePlan(torch.arange(15).expand(2, -1), torch.zeros(2, 15, dtype=torch.int64),
                         torch.arange(15, 20).expand(2, -1), 41, 1)
    runs = []
    for _ in range(2):
        out, out_size = ops.merge(x, size, plan, backend="torch")
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
        runs.append((out, out_size, gx))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
