"""The reference ops on hand-worked examples, their invariants, and the op boundary's input checks."""
import pytest
import torch

from tempme_fast import ops
from tempme_fast.ops import reference


def _tokens(*rows):
    return torch.tensor(rows, dtype=torch.float64)[None]


def test_split_positions_follow_the_spec():
    for c, n in [(1, 50), (2, 10), (12, 41), (0, 7)]:
        a, b = reference.split_positions(n, c)
        patches = list(range(c, n))
        assert a.tolist() == [p for p in patches if p % 2 == 0]
        assert b.tolist() == [p for p in patches if p % 2 == 1]
        assert reference.split_sizes(n, c) == (len(a), len(b))
    # c odd: A takes the patches at odd patch index (1, 3, ...); c even: the even ones.
    assert reference.split_positions(5, 1)[0].tolist() == [2, 4]  # patch index 1 and 3
    assert reference.split_positions(6, 2)[0].tolist() == [2, 4]  # patch index 0 and 2


def test_hand_worked_merge():
    # c=1: A = positions 2, 4; B = positions 1, 3. Position 2 is nearly parallel to 1, position 4
    # a little less so to 3, so r=1 merges position 2 into position 1.
    metric = _tokens([5, 5], [1, 0], [1, 0.1], [0, 1], [0.2, 1])
    scores, dst = reference.best_match(metric, protected=1)
    assert dst.tolist() == [[0, 1]]
    torch.testing.assert_close(scores, torch.tensor([[1 / 1.01 ** 0.5, 1 / 1.04 ** 0.5]], dtype=torch.float64))
    plan = reference.match(metric, r=1, protected=1)
    assert plan.merged.tolist() == [[0]] and plan.dst.tolist() == [[0]] and plan.kept.tolist() == [[1]]
    x = _tokens([0.0], [10.0], [20.0], [30.0], [40.0])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]], dtype=torch.float64)
    out, out_size = reference.merge(x, size, plan)
    # Order: class token, kept A (position 4), then B (position 1 merged with 2, position 3).
    assert out[0, :, 0].tolist() == [0.0, 40.0, (10 + 3 * 20) / 4, 30.0]
    assert out_size.tolist() == [[1.0, 1.0, 4.0, 1.0]]


def test_ties_go_to_the_lowest_index():
    # Every A token is equally close to both B tokens: dst is B index 0; the ranking keeps A order.
    metric = _tokens([1, 1], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0], [1, 0])
    plan = reference.match(metric, r=2, protected=1)
    assert plan.dst.tolist() == [[0, 0]]
    assert plan.merged.tolist() == [[0, 1]] and plan.kept.tolist() == [[2]]


def test_r_zero_is_identity_and_r_max_halves():
    torch.manual_seed(0)
    x, metric = torch.randn(3, 11, 8), torch.randn(3, 11, 4)
    size = torch.ones(3, 11, 1)
    out, s = ops.merge(x, size, ops.match(metric, 0, 1, backend="torch"), backend="torch")
    assert out is x and s is size
    plan = ops.match(metric, ops.max_r(11, 1), 1, backend="torch")
    out, s = ops.merge(x, size, plan, backend="torch")
    assert out.shape == (3, 6, 8) and s.shape == (3, 6, 1)


@pytest.mark.parametrize("c", [1, 2, 12])
def test_merge_invariants(c):
    torch.manual_seed(c)
    n = 41
    x, metric = torch.randn(4, n, 16), torch.randn(4, n, 8)
    size = torch.randint(1, 5, (4, n, 1)).float()
    plan = reference.match(metric, reference.max_r(n, c), c)
    out, out_size = reference.merge(x, size, plan)
    torch.testing.assert_close(out_size.sum(1), size.sum(1))
    torch.testing.assert_close(out[:, :c], x[:, :c], rtol=0, atol=0)
    # Merging identical tokens changes nothing.
    same = x[:, :1].expand(-1, n, -1).contiguous()
    out, _ = reference.merge(same, size, plan)
    torch.testing.assert_close(out, same[:, :n - plan.r])
    # Total "mass" is conserved: sum of size * x before and after.
    out, out_size = reference.merge(x.double(), size.double(), plan)
    torch.testing.assert_close((out * out_size).sum(1), (x.double() * size).sum(1))


def test_merge_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    size = torch.rand(2, 9, dtype=torch.float64) + 0.5
    plan = reference.match(torch.randn(2, 9, 4), 3, 1)
    assert torch.autograd.gradcheck(lambda t: reference.merge(t, size, plan)[0], (x,))


def test_join_clips_order_and_frame_pos():
    # 1 video of 4 clips, 3 tokens each (1 class token); values encode (clip, token).
    x = torch.tensor([[[10 * k + t] for t in range(3)] for k in range(4)], dtype=torch.float32)
    joined = reference.join_clips(x, group=2, protected=1)
    assert joined[..., 0].tolist() == [[0, 10, 1, 2, 11, 12], [20, 30, 21, 22, 31, 32]]
    pos = torch.tensor([100.0, 200.0, 300.0, 400.0]).view(1, 4, 1, 1)
    joined = reference.join_clips(x, group=2, protected=1, frame_pos=pos)
    assert joined[..., 0].tolist() == [[100, 210, 101, 102, 211, 212], [320, 430, 321, 322, 431, 432]]
    sizes = reference.join_clips(torch.ones(4, 3), group=4, protected=1)
    assert sizes.shape == (1, 12)


def test_proportional_attention_counts_a_merged_token_as_its_copies():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 8, dtype=torch.float64).unbind(0)
    size = torch.tensor([[2.0, 1, 1, 3, 1]], dtype=torch.float64)
    out = reference.attention(q[None], k[None], v[None], size)
    reps = torch.tensor([2, 1, 1, 3, 1])
    dup = reference.attention(q[None], k.repeat_interleave(reps, dim=1)[None], v.repeat_interleave(reps, dim=1)[None], None)
    torch.testing.assert_close(out, dup)
    eager = reference.attention(q[None], k[None], v[None], size, impl="eager")
    torch.testing.assert_close(out, eager)


@pytest.mark.parametrize("call, exc, message", [
    (lambda: ops.match(torch.randn(10, 4), 1, 1), ValueError, r"shape \[B', N, C\]"),
    (lambda: ops.match(torch.randn(2, 10, 4), 5, 1), ValueError, r"r=5 must be in \[0, \(N - protected\) // 2\] = \[0, 4\]"),
    (lambda: ops.match(torch.randn(2, 10, 4), -1, 1), ValueError, "r=-1"),
    (lambda: ops.match(torch.randn(2, 10, 4), 1, 9), ValueError, "protected=9"),
    (lambda: ops.match(torch.randn(0, 10, 4), 1, 1), ValueError, "empty batch"),
    (lambda: ops.match(torch.randn(2, 10, 4).int(), 1, 1), TypeError, "dtype torch.int32"),
    (lambda: ops.match(torch.randn(2, 10, 4), 1, 1, backend="cuda"), ValueError, "backend='cuda'"),
    (lambda: ops.best_match(torch.randn(2, 10, 4), 1.0), TypeError, "protected must be an int"),
])
def test_op_input_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_merge_rejects_mismatched_plan_and_size():
    plan = ops.match(torch.randn(2, 10, 4), 2, 1, backend="torch")
    with pytest.raises(ValueError, match="plan was made for"):
        ops.merge(torch.randn(2, 12, 4), torch.ones(2, 12), plan)
    with pytest.raises(ValueError, match="size must have shape"):
        ops.merge(torch.randn(2, 10, 4), torch.ones(2, 10, 2), plan)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", torch.zeros(1))
    assert ops.resolve_backend("auto", torch.zeros(1)) == "torch"
