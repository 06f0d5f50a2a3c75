"""The accuracy checks (``tempme_fast.ops.accuracy``) and the benchmarks' oracle (``benchmarks.oracle``):
right outputs agree, and each kind of wrong output is caught and named."""
import json

import pytest
import torch

from benchmarks import bench_attention, bench_ops, oracle
from benchmarks.common import MergeShape
from benchmarks.rowlog import read_records
from kit import timed_once, untimed_steps
from tempme_fast import ops
from tempme_fast.ops import accuracy, triton_ops
from tempme_fast.ops import reference as ref

N, C, R = 61, 1, 17
NA, NB = ref.split_sizes(N, C)
SHAPE = MergeShape("test", 1, 0, "imgme", 3, N, C, 16, 24, R)
# A join of 2 clips of 31 tokens (1 class token each), 3 joined clips of a video: its metric is the joined x.
JOIN = MergeShape("test", 1, 8, "cross", 3, 62, 2, 24, 24, 17, group=2)


def _inputs(dtype=torch.float32, seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(shape.rows, shape.tokens, shape.channels, generator=g).to(dtype)
    x = torch.randn(shape.rows, shape.tokens, shape.width, generator=g).to(dtype)
    size = torch.randint(1, 5, (shape.rows, shape.tokens, 1), generator=g).float()
    return metric, x, size


def _swap_last_merged_with_first_kept(plan, metric):
    """A plan that merges the best kept token instead of the last merged one, each to its best B token."""
    sim = accuracy.cosine_scores(metric, plan.protected)
    best, dst = sim.max(dim=-1)
    kept_best = best.gather(1, plan.kept).argmax(dim=1, keepdim=True)
    top_kept = plan.kept.gather(1, kept_best)
    merged = torch.cat([plan.merged[:, :-1], top_kept], dim=1)
    kept = torch.cat([plan.kept[plan.kept != top_kept].view(plan.kept.shape[0], -1), plan.merged[:, -1:]], 1)
    return plan._replace(merged=merged, dst=dst.gather(1, merged), kept=kept.sort(dim=1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_the_reference_plan_agrees_exactly(dtype):
    metric, _, _ = _inputs(dtype)
    report = accuracy.plan_agreement(ref.match(metric, R, C), metric, R, C)
    assert report == {"agrees": True, "near_ties": 0}


@pytest.mark.interpreter
def test_the_triton_plan_and_its_grouping_agree():
    metric, _, _ = _inputs()
    plan = ops.match(metric, R, C, backend="triton")
    assert plan.src is not None and accuracy.plan_agreement(plan, metric, R, C) == {"agrees": True, "near_ties": 0}


def _bad_plans(plan, metric):
    src, offsets = ref.group_sources(plan.merged, plan.dst, NB)
    yield "joins a B token", plan._replace(dst=(plan.dst + 1) % NB)
    yield "kept token scores", _swap_last_merged_with_first_kept(plan, metric)
    yield "highest score first", plan._replace(merged=plan.merged.flip(1), dst=plan.dst.flip(1))
    yield "not a partition", plan._replace(kept=plan.kept.clamp(max=plan.kept[:, :1]))
    yield "kept is not increasing", plan._replace(kept=plan.kept.flip(1))
    yield "dst outside", plan._replace(dst=plan.dst + NB)
    yield "shapes", plan._replace(merged=plan.merged[:, 1:])
    yield "grouping", plan._replace(src=src.flip(1), offsets=offsets)
    yield "grouping", plan._replace(src=src, offsets=offsets.roll(1, dims=1))


def test_each_wrong_plan_is_named():
    metric, _, _ = _inputs()
    plan = ref.match(metric, R, C)
    src, offsets = ref.group_sources(plan.merged, plan.dst, NB)
    assert accuracy.plan_agreement(plan._replace(src=src, offsets=offsets), metric, R, C)["agrees"]
    for words, bad in _bad_plans(plan, metric):
        report = accuracy.plan_agreement(bad, metric, R, C)
        assert not report["agrees"] and words in report["disagreement"], (words, report)


def test_near_ties_are_counted_not_refused():
    """Two A tokens with the same metric vector tie exactly: either may be merged, and the one the plan
    did not choose as the reference would counts as a near-tie."""
    metric, _, _ = _inputs()
    plan = ref.match(metric, R, C)
    a_pos, _ = ref.split_positions(N, C)
    last, first_kept = plan.merged[0, -1], plan.kept[0, 0]
    metric[0, a_pos[first_kept]] = metric[0, a_pos[last]]  # a copy: the same score and best B token
    plan = ref.match(metric, R, C)
    i = int((plan.merged[0] == min(last, first_kept)).nonzero())
    swapped = plan.merged.clone()
    swapped[0, i] = max(last, first_kept)
    kept = plan.kept.clone()
    kept[0][kept[0] == max(last, first_kept)] = min(last, first_kept)
    report = accuracy.plan_agreement(plan._replace(merged=swapped, kept=kept.sort(dim=1).values), metric, R, C)
    assert report == {"agrees": True, "near_ties": 1}


def test_tolerance_ratio():
    want = torch.tensor([1.0, -2.0, 0.0])
    assert accuracy.tolerance_ratio(want + 1e-6, want, torch.float32) == pytest.approx(1e-6 / 1e-5, rel=1e-3)  # at 0
    assert accuracy.tolerance_ratio(want.half(), want, torch.float16) == 0.0
    assert accuracy.tolerance_ratio(want + 1e-3, want, torch.float32) > 1
    assert accuracy.tolerance_ratio(torch.tensor([float("nan"), 0, 0]), want, torch.float32) == float("inf")
    assert accuracy.tolerance_ratio(want[:2], want, torch.float32) == float("inf")
    assert accuracy.scaled_error_ratio(want + 1e-3, want, torch.float16) == pytest.approx(1e-3 / (3e-3 * 2), rel=1e-4)
    assert accuracy.scaled_error_ratio(want * float("inf"), want, torch.float16) == float("inf")


def _reference_outputs(op, metric, x, size):
    """What ``op`` returns on the reference, with the upstream gradient and LayerNorm inputs of the oracle."""
    plan = ref.match(metric, R, C)
    if op == "best_match":
        return ref.best_match(metric, C), None
    if op == "match":
        return plan, None
    if op in ("merge_fwd", "step_fwd"):
        return ref.merge(x, size, plan), plan
    if op == "step_norm_fwd":
        residual, weight, bias = oracle.norm_inputs(x)
        return ref.merge_norm(x, size, plan, weight, bias, oracle.NORM_EPS, residual=residual), plan
    if op == "join_norm_fwd":
        clips, sizes, frame_pos, weight, bias = oracle.join_inputs(JOIN, metric, size)
        *out, plan = ref.join_merge_norm(clips, sizes, JOIN.group, JOIN.protected // JOIN.group, JOIN.r, weight,
                                         bias, oracle.NORM_EPS, frame_pos)
        return out, plan
    if op == "join_norm_fwdbwd":
        clips, sizes, frame_pos, weight, bias = oracle.join_inputs(JOIN, metric, size)
        leaves = [clips.requires_grad_(True), frame_pos.requires_grad_(True)]
        out, _, ln, plan = ref.join_merge_norm(clips, sizes, JOIN.group, JOIN.protected // JOIN.group, JOIN.r, weight,
                                               bias, oracle.NORM_EPS, frame_pos)
        return (*torch.autograd.grad((out, ln), leaves, oracle.join_grads(JOIN, metric)), out.detach()), plan
    xg = x.detach().requires_grad_(True)
    out, _ = ref.merge(xg, size, plan)
    return torch.autograd.grad(out, xg, oracle.upstream_grad(x, N - R)), plan


def _spoiled(op, out):
    """``out`` with one value moved well past its tolerance."""
    if op == "best_match":
        scores, dst = out
        return scores, torch.where(torch.arange(dst.shape[1]) == 3, (dst + 1) % NB, dst)
    first = out[0].clone()
    first[1, 5, 7] += 0.05
    return (first, *out[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", [op for op in bench_ops.OPS if op != "match"])
def test_the_oracle_takes_the_reference_and_refuses_a_spoiled_output(op, dtype):
    shape = JOIN if op in bench_ops.JOIN_OPS else SHAPE
    metric, x, size = _inputs(dtype, shape=shape)
    out, plan = _reference_outputs(op, metric, x, size)
    good = oracle.check_op(op, shape, metric, x, size, out, plan)
    assert good["agrees"] and good["tol_ratio"] <= 1 and good["near_ties"] == 0, good
    bad = oracle.check_op(op, shape, metric, x, size, _spoiled(op, out), plan)
    assert not bad["agrees"] and bad["disagreement"].split(":")[0] in ("x", "grad x", "dst"), bad


@pytest.mark.interpreter
def test_best_match_scores_take_either_rounding_of_the_head_mean():
    """A metric averaged over 7 heads in float16: torch's mean and the Triton kernel's (a float32 sum in head
    order, times float32 1/7, rounded once) land one unit in the last place apart in some elements, and
    their scores then differ by more than SCORE_TOL. The oracle holds each score to the nearer rounding:
    the kernel's output agrees; a score moved past the tolerance still fails."""
    heads, per_head = 7, 16
    g = torch.Generator().manual_seed(5)
    metric = (1.5 * torch.randn(SHAPE.rows, N, heads * per_head, generator=g)).half()
    shape = MergeShape("test", 1, 0, "imgme", SHAPE.rows, N, C, heads * per_head, 24, R, heads)
    means = accuracy.head_means(metric, heads)
    assert len(means) == 2 and (means[0] != means[1]).any()
    scores, dst = ops.best_match(metric, C, backend="triton", heads=heads)
    torch_best = accuracy.cosine_scores(means[0], C).max(dim=-1).values
    kernel_best = accuracy.cosine_scores(means[1], C).max(dim=-1).values
    assert (scores.double() - kernel_best).abs().max() <= accuracy.SCORE_TOL[torch.float16]
    assert (scores.double() - torch_best).abs().max() > accuracy.SCORE_TOL[torch.float16]  # the case is met
    good = oracle.check_op("best_match", shape, metric, None, None, (scores, dst))
    assert good["agrees"] and good["tol_ratio"] <= 1, good
    bad = oracle.check_op("best_match", shape, metric, None, None, (scores + 3e-5, dst))
    assert not bad["agrees"] and bad["disagreement"].startswith("scores:"), bad
    assert len(accuracy.head_means(metric.float(), heads)) == len(accuracy.head_means(metric, 1)) == 1


def test_the_oracle_names_a_wrong_size_and_layernorm():
    metric, x, size = _inputs()
    (merged, out_size, ln), plan = _reference_outputs("step_norm_fwd", metric, x, size)
    for what, out in (("size", (merged, out_size + 1, ln)), ("ln", (merged, out_size, ln * 1.01))):
        bad = oracle.check_op("step_norm_fwd", SHAPE, metric, x, size, out, plan)
        assert bad["disagreement"].startswith(what + ":"), bad
    bad = oracle.check_op("merge_fwd", SHAPE, metric, x, size, (merged, out_size), plan._replace(dst=plan.dst.flip(1)))
    assert bad["disagreement"].startswith("plan:"), bad


@pytest.mark.interpreter
def test_the_join_is_held_to_either_rounding_of_its_position_embedding():
    """The torch backend adds the position embedding in x's dtype before merging, the Triton kernel in float32 as
    it merges: each agrees (with the nearer sum); a join that leaves the embedding out, or merges it twice, does
    not."""
    metric, x, size = _inputs(torch.float16, shape=JOIN)
    clips, sizes, frame_pos, weight, bias = oracle.join_inputs(JOIN, metric, size)
    assert torch.equal(ref.join_clips(clips, JOIN.group, 1), metric) and frame_pos.abs().max() > 0
    plan = ref.match(metric, JOIN.r, JOIN.protected)
    for backend in ("torch", "triton"):
        *out, _ = ops.join_merge_norm(clips, sizes, 2, 1, JOIN.r, weight, bias, oracle.NORM_EPS, frame_pos,
                                      backend=backend)
        good = oracle.check_op("join_norm_fwd", JOIN, metric, x, size, out, plan)
        assert good["agrees"], (backend, good)
    for wrong in (torch.zeros_like(frame_pos), 2 * frame_pos):
        *out, _ = ops.join_merge_norm(clips, sizes, 2, 1, JOIN.r, weight, bias, oracle.NORM_EPS, wrong,
                                      backend="triton")
        bad = oracle.check_op("join_norm_fwd", JOIN, metric, x, size, out, plan)
        assert not bad["agrees"] and bad["disagreement"].startswith("x:"), bad
    # The join's backward: the Triton op's gradients agree; a wrong position-embedding gradient, or merged tokens
    # that are not the forward's, are named.
    grad_x, grad_pos, merged = bench_ops.op_fn("join_norm_fwdbwd", "triton", JOIN, metric, x, size)[0]()
    assert oracle.check_op("join_norm_fwdbwd", JOIN, metric, x, size, (grad_x, grad_pos, merged), plan)["agrees"]
    for what, out in (("grad frame_pos", (grad_x, grad_pos * 1.05, merged)), ("x", (grad_x, grad_pos, merged + 0.05))):
        bad = oracle.check_op("join_norm_fwdbwd", JOIN, metric, x, size, out, plan)
        assert bad["disagreement"].startswith(what + ":"), bad


def test_bench_ops_rows_agree(tmp_path):
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--impls", "torch", "--rep-ms", "1", "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    rows = read_records(str(tmp_path / "r.jsonl"))[1:]
    assert len(rows) == 9 * 7 - 3 - 2 * 4  # no step_norm_fwd at the three joins, the join's two ops only there
    assert all(r["agrees"] is True and r["tol_ratio"] <= 1 and r["near_ties"] == 0 for r in rows), rows


@pytest.mark.interpreter
def test_a_wrong_kernel_fails_its_benchmark_row(tmp_path, monkeypatch):
    """A Triton merge that writes one value wrong: its rows say so, and the run exits 1."""
    real = triton_ops.merge

    def merge(x, size, plan):
        out, out_size = real(x, size, plan)
        return out.index_add(1, torch.tensor([out.shape[1] - 1]), torch.ones_like(out[:, -1:])), out_size
    monkeypatch.setattr(triton_ops, "merge", merge)
    # Two shapes (an image merge and a join's), one timed call each: the interpreter is slow.
    shapes = bench_ops.merge_shapes
    monkeypatch.setattr(bench_ops, "merge_shapes", lambda model, batch: shapes(model, batch)[:2])
    timed_once(monkeypatch, bench_ops)
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--impls", "torch", "triton", "--ops", "merge_fwd", "--rep-ms", "1",
                           "--jsonl", str(tmp_path / "r.jsonl")]) == 1
    rows = read_records(str(tmp_path / "r.jsonl"))[1:]
    assert {r["stage"] for r in rows} == {"imgme", "cross"} and len(rows) == 4
    assert all(r["agrees"] is (r["impl"] == "torch") for r in rows)
    assert all(r["disagreement"].startswith("x: ") for r in rows if r["impl"] == "triton")


def test_bench_attention_rows_agree_and_a_wrong_one_does_not(tmp_path, monkeypatch):
    out = tmp_path / "a.jsonl"
    args = ["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32", "--impls", "sdpa",
            "sdpa-nobias", "eager", "--rep-ms", "1", "--jsonl", str(out)]
    assert bench_attention.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 * 2 * 3 and all(r["tol_ratio"] <= 1 for r in rows)
    # The released code's arithmetic is measured, not judged.
    assert all(r["agrees"] is True for r in rows if r["impl"] != "eager")
    assert not any("agrees" in r for r in rows if r["impl"] == "eager")
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda q, k, v, size, **kw: real(q, k, v, size, **kw) * 1.01)
    out.unlink()
    assert bench_attention.main(args) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["agrees"] is False and r["disagreement"].startswith("out:") for r in rows if r["impl"] != "eager")
    assert all(r["tol_ratio"] > 1 and "agrees" not in r for r in rows if r["impl"] == "eager")


@pytest.mark.interpreter
def test_bench_model_holds_the_triton_encoder_to_the_torch_one(tmp_path, tiny_model_file, monkeypatch):
    """Inference rows of the Triton encoder carry its embeddings' error against the torch backend's; an encoder
    whose attention writes wrong values fails its row (the Triton variants run here in the interpreter)."""
    from benchmarks import bench_model
    from tiny import TINY_ARGS

    monkeypatch.setattr(bench_model, "runnable", lambda variant, mode, device, compile_: "graph" not in variant
                        and "compile" not in variant and "jit" not in variant)
    # One timed call a row: the interpreter is slow, and the check is what this test is about.
    timed_once(monkeypatch, bench_model)
    args = ["--device", "cpu", "--models", tiny_model_file, "--batches", "2", "--modes", "infer", "--rep-ms", "1",
            "--variants", "tempme-torch", "tempme-triton", "--no-layer-times", "--jsonl", str(tmp_path / "m.jsonl"),
            *TINY_ARGS]
    assert bench_model.main(args) == 0
    rows = {r["variant"]: r for r in read_records(str(tmp_path / "m.jsonl"))[1:]}
    assert "agrees" not in rows["tempme-torch"]  # the reference itself
    assert rows["tempme-triton"]["agrees"] is True and rows["tempme-triton"]["rel_err"] <= 1e-4
    real = triton_ops.merge_norm

    def merge_norm(*args, **kwargs):
        x, size, ln = real(*args, **kwargs)
        return x, size, ln * 1.5
    monkeypatch.setattr(triton_ops, "merge_norm", merge_norm)
    (tmp_path / "m.jsonl").unlink()
    assert bench_model.main(args) == 1
    rows = {r["variant"]: r for r in read_records(str(tmp_path / "m.jsonl"))[1:]}
    assert rows["tempme-triton"]["agrees"] is False and rows["tempme-triton"]["rel_err"] > 1e-2
    assert rows["tempme-triton"]["disagreement"].startswith("embedding: relative error")


@pytest.mark.interpreter
def test_bench_model_holds_the_triton_gradients_to_the_torch_ones(tmp_path, tiny_model_file, monkeypatch):
    """Training rows of the Triton encoder carry the largest error of a parameter's gradient against the torch
    backend's; a backward that doubles the temporal position embedding's gradient (one small parameter among
    many) fails its row and names it."""
    from benchmarks import bench_model
    from tiny import TINY_ARGS

    monkeypatch.setattr(bench_model, "runnable", lambda variant, mode, device, compile_: variant in
                        ("tempme-torch", "tempme-triton"))
    timed_once(monkeypatch, bench_model)
    args = ["--device", "cpu", "--models", tiny_model_file, "--batches", "2", "--modes", "train", "--rep-ms", "1",
            "--no-layer-times", "--jsonl", str(tmp_path / "m.jsonl"), *TINY_ARGS]
    assert bench_model.main(args) == 0
    rows = {r["variant"]: r for r in read_records(str(tmp_path / "m.jsonl"))[1:]}
    assert "agrees" not in rows["tempme-torch"]
    assert rows["tempme-triton"]["agrees"] is True and rows["tempme-triton"]["rel_err"] <= 1e-5
    real = triton_ops._merge_bwd

    def merge_bwd(*args, **kwargs):
        grad_x, pos_part = real(*args, **kwargs)
        return grad_x, None if pos_part is None else 2 * pos_part
    monkeypatch.setattr(triton_ops, "_merge_bwd", merge_bwd)
    (tmp_path / "m.jsonl").unlink()
    assert bench_model.main(args) == 1
    row = {r["variant"]: r for r in read_records(str(tmp_path / "m.jsonl"))[1:]}["tempme-triton"]
    assert row["agrees"] is False and row["rel_err"] == pytest.approx(1.0, rel=1e-3)
    assert row["disagreement"].startswith("gradient of visual.tempme_frame_pos.")


def test_gradient_check_names_a_missing_parameter():
    g = {"a": torch.ones(3), "b": torch.ones(2)}
    assert oracle.check_gradients(g, dict(g), torch.float16) == {"agrees": True, "rel_err": 0.0}
    out = oracle.check_gradients({"a": g["a"]}, g, torch.float16)
    assert out["agrees"] is False and "one side only, e.g. b" in out["disagreement"]
    out = oracle.check_gradients({"a": g["a"], "b": torch.full((2,), float("nan"))}, g, torch.float16)
    assert out["agrees"] is False and out["disagreement"].startswith("gradient of b")


@pytest.mark.interpreter
def test_bench_train_holds_the_triton_gradients_to_the_torch_ones(tmp_path, tiny_model_file, monkeypatch):
    """The training-step benchmark checks its Triton row at the weights before any timed step; a merge backward
    that drops half of every gradient fails it and the run."""
    from benchmarks import bench_train
    from tiny import TINY_ARGS

    untimed_steps(monkeypatch, bench_train)  # the check is the point here, not the steps
    path = tmp_path / "rows.jsonl"
    args = ["--device", "cpu", "--model", tiny_model_file, "--batch", "2", "--context-length", "8", "--modes",
            "full", "--backends", "torch", "triton", "--repeats", "1", "--warmup", "0", "--jsonl", str(path),
            *TINY_ARGS]
    assert bench_train.main(args) == 0
    rows = {r["backend"]: r for r in read_records(str(path))[1:]}
    assert "agrees" not in rows["-"] and "agrees" not in rows["torch"]
    assert rows["triton"]["agrees"] is True and rows["triton"]["rel_err"] <= 1e-4
    real = triton_ops._merge_bwd
    monkeypatch.setattr(triton_ops, "_merge_bwd", lambda *a, **k: (lambda gx, pos: (gx / 2, pos))(*real(*a, **k)))
    path.unlink()
    assert bench_train.main(args) == 1
    row = {r["backend"]: r for r in read_records(str(path))[1:]}["triton"]
    assert row["agrees"] is False and row["disagreement"].startswith("gradient of ")
    assert bench_train.main([*args, "--no-check"]) == 0
