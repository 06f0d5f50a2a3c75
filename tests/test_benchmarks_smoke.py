"""The benchmark scripts run end to end on a CPU at tiny sizes (their real runs are in BENCHMARKS.md)."""
import json
import os

import pytest
import torch

from benchmarks import bench_model, bench_ops, merge_order
from benchmarks.common import merge_shapes
from benchmarks.rowlog import read_records
from kit import timed_once
from tiny import TINY_ARGS, TINY_CONFIG, tiny_clip, video


def test_bench_ops_smoke(tmp_path, capsys):
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "match", "merge_fwd", "step_fwdbwd", "--rep-ms", "1", "--out", str(tmp_path),
                           "--jsonl", str(tmp_path / "rows.jsonl"), "--tag", "smoke"]) == 0
    rows = json.loads((tmp_path / "bench_ops.json").read_text())["rows"]
    assert {r["stage"] for r in rows} == {"imgme", "cross", "intra"}
    assert all(r["ms"] > 0 and r["gbs"] > 0 and r["impl"] == "torch" and r["compiled"] is False for r in rows)
    # On a CPU the wall time is the device time: no device-time columns, rather than copies of the wall time.
    for key in ("device_ms", "host_bound", "eager_over_device", "speedup_vs_torch_eager", "device_error",
                "copy_gbs", "sized_copy_gbs", "frac_sized_copy"):
        assert not any(key in r for r in rows)
    assert all(r["speedup_vs_torch"] == 1.0 for r in rows)
    assert (tmp_path / "bench_ops.csv").exists() and "merge_fwd" in capsys.readouterr().out
    # The JSON-lines file holds the same rows, tagged, after one environment line.
    env, *lines = read_records(str(tmp_path / "rows.jsonl"))
    assert env["environment"]["torch"] and env["tag"] == "smoke"
    assert [{k: v for k, v in r.items() if k not in ("bench", "tag")} for r in lines] == rows


def test_bandwidth_is_held_to_the_large_copy_and_to_a_copy_of_as_many_bytes():
    assert bench_ops.bandwidth_columns(2_000_000, 0.002, 4000.0, 2000.0) == {
        "gbs": pytest.approx(1000.0), "copy_gbs": 4000.0, "frac_copy_bw": pytest.approx(0.25),
        "sized_copy_gbs": 2000.0, "frac_sized_copy": pytest.approx(0.5)}
    assert bench_ops.bandwidth_columns(2_000_000, None, 4000.0, 2000.0)["frac_sized_copy"] is None
    assert bench_ops.bandwidth_columns(2_000_000, 0.002, None) == {"gbs": pytest.approx(1000.0)}
    # On a CPU the wall time is the device's, and there is no device copy to hold a row to.
    assert bench_ops.sized_copy_gbs(1 << 20, torch.float16, torch.device("cpu"), rep_ms=1) is None


def test_bench_ops_marks_each_compiled_row(tmp_path):
    """The compiled reference is compiled per shape (Dynamo's eager backend here, for speed)."""
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "match", "--impls", "torch", "torch.compile", "--compile-at", "",
                           "--compile-backend", "eager", "--rep-ms", "1", "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    rows = read_records(str(tmp_path / "r.jsonl"))[1:]
    compiled = [r for r in rows if r["impl"] == "torch.compile"]
    assert len(compiled) == 7 and all(r["compiled"] and r["compiled_graphs"] == 1 for r in compiled)


def test_bench_ops_times_the_encoders_step_after_attention(tmp_path):
    """``step_norm_fwd`` (residual add, merge, ln_2) runs at every merge after attention, compiled too,
    and not at a join's merge, which has no residual add before it."""
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "step_fwd", "step_norm_fwd", "--impls", "torch", "torch.compile",
                           "--compile-at", "", "--compile-backend", "eager", "--rep-ms", "1",
                           "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    rows = [r for r in read_records(str(tmp_path / "r.jsonl"))[1:] if r["op"] == "step_norm_fwd"]
    after_attention = [s for s in merge_shapes("ViT-B-32", 1) if s.stage != "cross"]
    assert {r["stage"] for r in rows} == {"imgme", "intra"} and len(rows) == 2 * len(after_attention)
    assert all(r["ms"] > 0 and r["gbs"] > 0 for r in rows)
    step = {(r["layer"], r["stage"]): r["bytes"] for r in read_records(str(tmp_path / "r.jsonl"))[1:]
            if r["op"] == "step_fwd" and r["impl"] == "torch"}
    for r in rows:  # one more read of x (the residual), the LayerNorm written, its weight and bias read
        assert r["bytes"] > step[(r["layer"], r["stage"])]


def test_bench_model_smoke(tmp_path, tiny_model_file):
    assert bench_model.main(["--device", "cpu", "--models", tiny_model_file, "--batches", "2", "--rep-ms", "1",
                             "--out", str(tmp_path), "--jsonl", str(tmp_path / "rows.jsonl"), *TINY_ARGS]) == 0
    record = json.loads((tmp_path / "bench_model.json").read_text())
    variants = {(r["mode"], r["variant"]) for r in record["rows"]}
    assert variants == {(m, v) for m in ("infer", "train") for v in ("open_clip", "tempme-eager", "tempme-torch")}
    assert record["environment"]["torch"]
    for r in record["rows"]:  # the FLOPs bound beside the measured speed-up
        assert r["speedup_vs_open_clip"] > 0 and r["compiled"] is False
        assert r["flops_bound_speedup"] == (1.0 if r["variant"] == "open_clip" else
                                            record["rows"][0]["gflops_per_video"] / r["gflops_per_video"])
    assert any(r["flops_bound_speedup"] > 1 for r in record["rows"])
    layers = json.loads((tmp_path / "bench_layers.json").read_text())["rows"]
    assert len(layers) == 2 * 5  # stem + 4 blocks, unmerged and TempMe
    assert all(r["ms"] > 0 and "device_ms" not in r and "host_bound" not in r for r in layers)  # no GPU here
    lines = read_records(str(tmp_path / "rows.jsonl"))
    assert [r["bench"] for r in lines[1:]] == ["bench_model"] * 6 + ["bench_layers"] * 5 + ["bench_last_block"] \
        + ["bench_layers"] * 5
    last = lines[-6]  # logged after TempMe's per-layer times were taken, before they were logged
    assert last["layer"] == 3 and last["full_ms"] > 0 and last["trimmed_ms"] > 0


def test_bench_model_times_compiled_training(tmp_path, tiny_model_file):
    """A compiled variant in training compiles the forward once (one graph, its backward with it) and its
    gradients are checked against the eager variant's."""
    assert bench_model.main(["--device", "cpu", "--models", tiny_model_file, "--batches", "2", "--rep-ms", "1",
                             "--modes", "train", "--variants", "open_clip", "open_clip+compile", "--compile",
                             "--compile-backend", "aot_eager", "--no-layer-times",
                             "--jsonl", str(tmp_path / "rows.jsonl"), *TINY_ARGS]) == 0
    rows = {r["variant"]: r for r in read_records(str(tmp_path / "rows.jsonl"))[1:]}
    assert rows.keys() == {"open_clip", "open_clip+compile"}
    compiled = rows["open_clip+compile"]
    assert compiled["mode"] == "train" and compiled["compiled"] and compiled["compiled_graphs"] == 1
    assert compiled["agrees"] and compiled["ms"] > 0


def _bench_train(tmp_path, tiny_model_file, *extra):
    """``bench_train`` on the tiny model, LoRA, one timed step: its environment record and rows."""
    from benchmarks import bench_train

    path = tmp_path / "rows.jsonl"
    assert bench_train.main(["--device", "cpu", "--model", tiny_model_file, "--batch", "2", "--context-length", "8",
                             "--modes", "lora", "--repeats", "1", "--warmup", "0", "--jsonl", str(path),
                             *extra, *TINY_ARGS]) == 0
    return read_records(str(path))


def test_bench_train_smoke(tmp_path, tiny_model_file):
    env, *rows = _bench_train(tmp_path, tiny_model_file, "--tag", "train")
    assert env["bench"] == "bench_train" and env["environment"]["torch"]
    assert [(r["mode"], r["variant"], r["backend"]) for r in rows] == [("lora", "unmerged", "-"),
                                                                       ("lora", "TempMe", "torch")]
    assert rows[0]["speedup"] == 1.0 and rows[1]["step_ms"] > 0 and rows[1]["peak_mem_mb"] > 0


def test_bench_train_times_compiled_steps(tmp_path, tiny_model_file):
    """``--compile``: every variant again with both towers compiled, as ``TrainConfig(compile=...)`` trains."""
    _, *rows = _bench_train(tmp_path, tiny_model_file, "--compile", "aot_eager")
    assert [r["variant"] for r in rows] == ["unmerged", "TempMe", "unmerged+compile", "TempMe+compile"]
    for row in rows[2:]:
        assert row["compiled"] and row["compiled_graphs"] == 1 and row["compile_backend"] == "aot_eager"
        assert row["step_ms"] > 0 and row["fwd_bwd_mem_mb"] > 0


def test_a_failing_case_costs_only_its_own_row(tmp_path, monkeypatch):
    real = bench_ops.op_fn

    def op_fn(op, *args):
        if op == "match":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(op, *args)
    monkeypatch.setattr(bench_ops, "op_fn", op_fn)
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "match", "merge_fwd", "--rep-ms", "1", "--jsonl", str(tmp_path / "r.jsonl")]) == 1
    rows = read_records(str(tmp_path / "r.jsonl"))[1:]
    assert [r["op"] for r in rows] == ["match", "merge_fwd"] * 7
    assert all(r["error"] == "RuntimeError: CUDA out of memory (simulated)" and "ms" not in r
               for r in rows if r["op"] == "match")
    assert all("error" not in r and r["ms"] > 0 for r in rows if r["op"] == "merge_fwd")


def test_bench_model_leaves_the_launch_switch_as_it_found_it(monkeypatch):
    # The suite's fallback (TEMPME_FAST_CACHED_LAUNCH=0) turns the cached launch off for a whole stage:
    # a variant must not turn it back on, and the -jit variant's own switch must not outlive it.
    from tempme_fast.ops import launch

    model, clip = tiny_clip(), video(1, TINY_CONFIG.frames)
    for before in (False, True):
        monkeypatch.setattr(launch, "CACHED", before)
        bench_model.bench_variant(model, TINY_CONFIG, "tempme-torch", "infer", clip, rep_ms=1)
        assert launch.CACHED is before


def test_bench_ops_tiles_give_the_library_result(one_thread):
    """Every tile spec of ``--tiles`` computes what the library's tiles compute (Triton interpreter):
    the same plan, and the same merged tokens up to float32 rounding."""
    import pytest
    import torch

    from tempme_fast import ops
    from tempme_fast.ops import triton_ops

    g = torch.Generator().manual_seed(5)
    metric, x = torch.randn(3, 41, 16, generator=g), torch.randn(3, 41, 24, generator=g)
    size = torch.randint(1, 4, (3, 41, 1), generator=g).float()
    want_plan = ops.match(metric, 7, 1, backend="torch")
    want = ops.merge(x, size, want_plan, backend="torch")
    originals = (triton_ops._match_tiles, triton_ops._merge_fwd_tiles, triton_ops._plan_sort_block,
                 triton_ops._merge_norm_tiles, triton_ops.PLAN_SORT_MIN)
    for spec in ("match:16x16x16x4-ieee", "match:16x32x8x4-tf32x3", "merge:8x16x4", "merge:16x32x4", "merge:8x16x4-s3",
                 "merge:16x16x4-g16", "merge:32x32x4-g32", "merge:16x16x4-p4", "merge:8x32x4-p8", "merge:1x32x4-c4",
                 "merge:4x16x4-c2", "merge:1x16x1-c8", "merge:8x32x4-p1-c4", "merge:8x16x4-s2-p2-c2", "plan:sort",
                 "plan:count"):
        with bench_ops.op_tiles(spec):
            plan = ops.match(metric, 7, 1, backend="triton")
            got = ops.merge(x, size, plan, backend="triton")
        for field in ("merged", "dst", "kept"):
            assert torch.equal(getattr(plan, field), getattr(want_plan, field)), (spec, field)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The merge that also writes the LayerNorm (after the residual add), at other token tiles and warps.
    weight, bias = torch.randn(24, generator=g), torch.randn(24, generator=g)
    want_norm = ops.merge_norm(x, size, want_plan, weight, bias, 1e-5, residual=x.flip(1), backend="torch")
    for spec, stages in (("norm:1x4", {}), ("norm:8x8-s2", {"SRC_STAGES": 2}), ("norm:4x4-p1", {"SPLIT_T": 1}),
                         ("norm:8x8-p2", {"SPLIT_T": 2}), ("norm:1x2-c4", {"SRC_CHUNK": 4}),
                         ("norm:4x4-p1-c4", {"SPLIT_T": 1, "SRC_CHUNK": 4}), ("norm:1x8-c8", {"SRC_CHUNK": 8})):
        with bench_ops.op_tiles(spec):
            assert triton_ops._merge_norm_tiles(3, 34, 24, 4, False) == dict(
                dict(BLOCK_T=int(spec[5]), BLOCK_D=32, num_warps=int(spec[7]), SRC_CHUNK=1), **stages)
            got = ops.merge_norm(x, size, want_plan, weight, bias, 1e-5, residual=x.flip(1), backend="triton")
        for a, b in zip(got, want_norm):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (triton_ops._match_tiles, triton_ops._merge_fwd_tiles, triton_ops._plan_sort_block,
            triton_ops._merge_norm_tiles, triton_ops.PLAN_SORT_MIN) == originals
    # heads:mean: the keys averaged by torch before the match, the same plan as the match that averages them.
    keys = torch.randn(3, 41, 4, 3, 16, generator=g)[:, :, :, 1].flatten(2)  # 4 heads, a strided view
    want_heads = ops.match(keys, 7, 1, backend="torch", heads=4)
    with bench_ops.op_tiles("heads:mean"):
        assert triton_ops.HEADS_IN_MATCH is False
        got_heads = ops.match(keys, 7, 1, backend="triton", heads=4)
    assert triton_ops.HEADS_IN_MATCH is True
    for field in ("merged", "dst", "kept"):
        assert torch.equal(getattr(got_heads, field), getattr(want_heads, field)), field
    # Each plan path takes its own path at this row (20 A tokens: below PLAN_SORT_MIN, so the library counts).
    for spec, width in (("plan:sort", 32), ("plan:count", 0)):
        with bench_ops.op_tiles(spec):
            assert triton_ops._plan_sort_block(20, torch.float32) == width
            assert triton_ops._plan_sort_block(20, torch.float64) == 0
    for bad in ("merge:8x16", "match:16x16x16x4", "match:16x16x16x4-tf32", "merge:12x16x4", "attn:8x8x8", "plan:fast",
                "plan:sort-ieee", "norm:4x4x4", "norm:3x4", "merge:8x16x4-s0", "norm:2x4-t3", "match:16x16x16x4-s2",
                "merge:8x16x4-g16", "merge:16x16x4-g8", "merge:16x16x4-g24", "norm:4x4-g16", "merge:16x16x4-g",
                "heads:sum", "heads:", "merge:8x16x4-p16", "merge:8x16x4-p0", "merge:8x16x4-p3", "norm:4x4-p8",
                "match:16x16x16x4-p2", "merge:8x16x4-p", "merge:8x16x4-c3", "norm:1x2-c16", "match:16x16x16x4-c2",
                "merge:8x16x4-c", "merge:8x16x4-c4-p1", "merge:8x16x4-p1-p1", "merge:16x16x4-g16-c4", "norm:4x4-p1-",
                "merge:8x16x4--c4", "merge:8x16x4-", "norm:4x4-s2-s2", "merge:8x16x4-p1-x4"):
        with pytest.raises(ValueError, match="--tiles"):
            bench_ops.parse_tiles(bad)


def test_bench_ops_tiles_rows(tmp_path, monkeypatch):
    timed_once(monkeypatch, bench_ops)
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "merge_fwd", "--impls", "torch", "--tiles", "merge:64x1024x4", "--rep-ms", "1",
                           "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    rows = read_records(str(tmp_path / "r.jsonl"))[1:]
    assert {r["impl"] for r in rows} == {"torch", "triton:merge:64x1024x4"} and len(rows) == 14
    assert all(r["speedup_vs_torch"] > 0 for r in rows)
    # Each row's output was held against the float64 merge by its plan (benchmarks.oracle).
    assert all(r["agrees"] is True and 0 < r["tol_ratio"] <= 1 and r["near_ties"] == 0 for r in rows), rows


@pytest.mark.interpreter
def test_bench_model_serial_variant_gathers_one_source_a_step(monkeypatch):
    """``tempme-triton-serial`` runs every merge on the tiles that gather one source a step
    (``triton_ops.MANY_SOURCES_DIVISOR = 0``: no merge counts as one of many sources), ``tempme-triton`` the
    library's, where the tiny model's later merges do; the switch is left as it was found."""
    import torch

    from tempme_fast.ops import triton_ops

    many = []
    library = triton_ops._many_sources
    monkeypatch.setattr(triton_ops, "_many_sources", lambda r, nb: many.append(library(r, nb)) or many[-1])
    timed_once(monkeypatch, bench_model)
    model = tiny_clip()
    clip = video(1, TINY_CONFIG.frames)
    divisor = triton_ops.MANY_SOURCES_DIVISOR
    with torch.no_grad():
        bench_model.bench_variant(model, TINY_CONFIG, "tempme-triton-serial", "infer", clip, rep_ms=1)
    assert many and not any(many)
    assert triton_ops.MANY_SOURCES_DIVISOR == divisor > 0
    many.clear()
    with torch.no_grad():
        bench_model.bench_variant(model, TINY_CONFIG, "tempme-triton", "infer", clip, rep_ms=1)
    assert any(many)


def test_bench_model_mlp_variant_fuses_the_mlp_and_restores_the_switch(monkeypatch):
    """``tempme-triton-mlp`` runs each block's c_fc and GELU as one linear_act (``encoder.FUSED_MLP``), and
    leaves the switch as it found it."""
    import torch

    from tempme_fast import encoder
    from tempme_fast.ops import triton_linear

    calls = []
    fused = triton_linear.linear_act
    monkeypatch.setattr(triton_linear, "linear_act", lambda *a: calls.append(a[3]) or fused(*a))
    timed_once(monkeypatch, bench_model)
    model = tiny_clip().to(torch.float16)
    clip = video(1, TINY_CONFIG.frames).to(torch.float16)
    row = bench_model.bench_variant(model, TINY_CONFIG, "tempme-triton-mlp", "infer", clip, rep_ms=1)
    act = encoder._mlp_activation(model.visual.transformer.resblocks[0].mlp)  # the tiny model's: QuickGELU
    assert row["variant"] == "tempme-triton-mlp" and calls and set(calls) == {act} == {"quick_gelu"}
    assert encoder.FUSED_MLP is False
    calls.clear()
    bench_model.bench_variant(model, TINY_CONFIG, "tempme-triton", "infer", clip, rep_ms=1)
    assert calls == []


def test_merge_order_places_the_b_tokens_first(tiny_model_file, capsys):
    """Every merge's row: its clips' busiest B tokens start later in the grid order before than now."""
    assert merge_order.main(["--model", tiny_model_file, "--videos", "2", "--all", *TINY_ARGS]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert rows
    for row in rows:
        before, now = (float(v) for v in row[4].split("->"))
        assert now < before


def test_bench_ops_on_the_encoders_plans(tmp_path):
    """``--plans encoder`` merges by the metrics the encoder makes (random weights): at ViT-B/32's layer-10 join
    one B token gathers many more sources than random metrics send to any; ``--layers`` keeps those merges."""
    counts = {}
    for plans in ("random", "encoder"):
        assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                               "--ops", "merge_fwd", "--impls", "torch", "--plans", plans, "--layers", "9", "10",
                               "--rep-ms", "1", "--jsonl", str(tmp_path / f"{plans}.jsonl")]) == 0
        rows = read_records(str(tmp_path / f"{plans}.jsonl"))[1:]
        assert {(r["layer"], r["stage"]) for r in rows} == {(9, "cross"), (9, "intra"), (10, "cross"), (10, "intra")}
        assert all(r["plans"] == plans and r["agrees"] is True for r in rows)
        counts[plans] = {(r["layer"], r["stage"]): r["max_sources"] for r in rows}
    assert max(counts["random"].values()) <= 6 < 2 * max(counts["random"].values()) < counts["encoder"][(10, "cross")]
    with pytest.raises(SystemExit):
        bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--layers", "3"])


def test_the_encoders_metrics_are_its_merges_and_keep_their_layout():
    """One metric per merge shape, as the encoder passed it (after attention: a view of the q | k | v
    projection); rolled over clips for another input set, in the same layout, with the same plans in that order."""
    import torch

    from benchmarks.common import encoder_metrics, shifted_metric
    from tempme_fast.ops import reference

    shapes = merge_shapes("ViT-B-32", 1)
    metrics = encoder_metrics("ViT-B-32", 1, torch.float32, "cpu")
    assert set(metrics) == {(s.layer, s.stage) for s in shapes}
    for s in shapes:
        m = metrics[(s.layer, s.stage)]
        assert m.shape == (s.rows, s.tokens, s.channels) and m.stride(-1) == 1
        assert m.stride(1) == (3 * s.channels if s.heads > 1 else s.channels)
        moved = shifted_metric(m, 1)
        assert moved.stride() == m.stride() and shifted_metric(m, 0) is m
        plan, again = reference.match(m, s.r, s.protected, s.heads), reference.match(moved, s.r, s.protected, s.heads)
        assert torch.equal(again.dst, plan.dst.roll(1, 0)) and torch.equal(again.merged, plan.merged.roll(1, 0))


@pytest.mark.interpreter
def test_bench_ops_times_each_tile_spec_at_the_ops_it_tiles(tmp_path, monkeypatch):
    """A ``merge:`` spec makes rows of the merge forward only, a ``norm:`` spec of the merges with their LayerNorm
    only (after attention and at a join): elsewhere they would time the library's tiles under their names."""
    timed_once(monkeypatch, bench_ops)  # (each row's check still runs its kernel)
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "merge_fwd", "step_norm_fwd", "join_norm_fwd", "--impls", "triton",
                           "--layers", "10",
                           "--tiles", "merge:8x256x4-c4", "norm:4x4-p1-c4", "--plans", "encoder", "--rep-ms", "1",
                           "--jsonl", str(tmp_path / "r.jsonl")]) == 0
    rows = read_records(str(tmp_path / "r.jsonl"))[1:]
    assert sorted((r["op"], r["stage"], r["impl"]) for r in rows) == [
        ("join_norm_fwd", "cross", "triton"), ("join_norm_fwd", "cross", "triton:norm:4x4-p1-c4"),
        ("merge_fwd", "cross", "triton"), ("merge_fwd", "cross", "triton:merge:8x256x4-c4"),
        ("merge_fwd", "intra", "triton"), ("merge_fwd", "intra", "triton:merge:8x256x4-c4"),
        ("step_norm_fwd", "intra", "triton"), ("step_norm_fwd", "intra", "triton:norm:4x4-p1-c4")]
    assert all(r["agrees"] is True for r in rows), rows


def test_the_recorded_metrics_give_the_plans_the_encoder_made():
    """A metric recorded at a match still gives that match's plan after the forward (nothing writes over it)."""
    import torch

    from benchmarks.common import recorded_matches, source_counts
    from tempme_fast import apply_tempme
    from tempme_fast.ops import reference

    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    with torch.no_grad(), recorded_matches(keep_metric=True) as plans:
        model.encode_video(video(2, TINY_CONFIG.frames))
    assert {p["heads"] for p in plans} == {1, 2}  # joins and merges after attention
    for p in plans:
        plan = reference.match(p["metric"], p["r"], p["protected"], p["heads"])
        assert torch.equal(source_counts(plan.dst, p["counts"].shape[1]), p["counts"])


@pytest.mark.parametrize("module", ["bench_model", "profile"])
def test_a_budget_gives_each_model_its_own_schedule(module, monkeypatch, tmp_path):
    """``--budget`` derives the schedule per model of ``--models`` / ``--cases`` (ViT-B/32 and ViT-B/16 differ in
    depth and tokens); without it, every model runs the one schedule its options give."""
    import importlib

    from tempme_fast import TempMeConfig

    monkeypatch.chdir(tmp_path)
    script = importlib.import_module(f"benchmarks.{module}")
    got = []

    class Stop(Exception):
        pass

    def stand_in(*args, **kwargs):  # what the script would measure, without measuring it
        got.append(args)
        raise Stop

    monkeypatch.setattr(script, "run", stand_in)
    models = ["--models", "ViT-B-32", "ViT-B-16"] if module == "bench_model" else ["--cases", "ViT-B-32:1",
                                                                                     "ViT-B-16:2"]
    for extra in (["--budget", "0.6"], ["--clip-layers", "5", "7", "9"]):
        got.clear()
        with pytest.raises(Stop):
            script.main(["--device", "cpu", *models, *extra])
        configs = next(a for a in got[0] if isinstance(a, dict))
        if extra[0] == "--budget":
            want = {m: TempMeConfig.for_model(m, 12, flops_ratio=0.6) for m in ("ViT-B-32", "ViT-B-16")}
            assert want["ViT-B-32"] != want["ViT-B-16"]
        else:
            want = dict.fromkeys(("ViT-B-32", "ViT-B-16"), TempMeConfig(clip_layers=(5, 7, 9)))
        assert configs == want


@pytest.mark.parametrize("module, argv, message", [
    ("bench_ops", ["--batches", "0"], "argument --batches: 0 is not a positive integer"),
    ("bench_ops", ["--rep-ms", "nan"], "argument --rep-ms: nan is not a positive finite number"),
    ("bench_model", ["--models", "ViT-B-32", "ViT-B-16", "--budget", "0.4"],
     "--models ViT-B-32: --budget 0.4: flops_ratio=0.4 cannot be met at 12 frames"),
    ("profile", ["--budget", "0.5", "--imgme-r", "3"], "--budget derives the schedule; leave out --imgme-r"),
    ("bench_model", ["--frames", "7"], "frames=7 is not divisible by the clip groups (2, 2, 3)"),
    ("bench_train", ["--model", "nope"], "--model 'nope' is not an open_clip model name"),
    ("bench_train", ["--batch", "0"], "argument --batch: 0 is not a positive integer"),
    ("bench_train", ["--budget", "0.1"], "--budget 0.1: flops_ratio=0.1 cannot be met at 12 frames"),
    ("bench_budget", ["--budgets", "2"], "flops_ratio=2.0 must be in (0, 1]"),
    ("bench_budget", ["--frames", "7"], "flops_ratio=0.5 cannot be met at 7 frames"),
    ("bench_index", ["--workers", "-1"], "argument --workers: -1 is not an integer >= 0"),
    ("floors", ["--bandwidth", "-1"], "argument --bandwidth: -1.0 is not a positive finite number"),
    ("merge_order", ["--videos", "0"], "argument --videos: 0 is not a positive integer"),
    ("merge_order", ["--frames", "7"], "frames=7 is not divisible by the clip groups (2, 2, 3)"),
    ("profile", ["--forwards", "0"], "argument --forwards: 0 is not a positive integer"),
    ("suite", ["out", "--every", "0"], "--every 0.0 must be > 0 seconds"),
    ("bench_ops", ["--device", "cpu", "--impls", "torch", "torch.compile", "--compile-at", "ViT-B-16:3:fp16"],
     "--compile-at 'ViT-B-16:3:fp16' is not a case of this sweep"),
    ("bench_ops", ["--device", "cpu", "--compile-at", "ViT-B-16:32:fp16"], "add torch.compile to --impls"),
    ("bench_ops", ["--models", "ViT-X"], "argument --models: invalid choice: 'ViT-X'"),
    ("bench_model", ["--models", "ViT-X"], "--models 'ViT-X' is not an open_clip model name"),
    ("profile", ["--cases", "ViT-X:1"], "--cases 'ViT-X' is not an open_clip model name"),
    ("bench_index", ["--model", "ViT-X"], "--model 'ViT-X' is not an open_clip model name"),
    ("bench_index", ["--device", "tpu"], "--device 'tpu' is not a device; valid: auto, cpu, cuda, cuda:N"),
    ("bench_attention", ["--device", "cuda:99"], "--device cuda:99: "),
    ("bench_train", ["--device", "tpu"], "--device 'tpu' is not a device"),
    ("plots", ["nope"], "folder nope: no such folder"),
    # A model TempMe cannot patch (an UnsupportedModelError, which is no ConfigError: a traceback before).
    ("bench_budget", ["--model", "RN50"], "--model RN50 is a ResNet, not a ViT with a class token"),
    ("bench_model", ["--models", "RN50"], "--models RN50 is a ResNet, not a ViT with a class token"),
    ("bench_train", ["--model", "RN50"], "--model RN50 is a ResNet, not a ViT with a class token"),
    ("profile", ["--cases", "RN50:1"], "--cases RN50 is a ResNet, not a ViT with a class token"),
    ("bench_train", ["--context-length", "78"], "--context-length 78 exceeds the 77 token positions of "
                                                "ViT-B-32-quickgelu's text tower"),
    # Output paths, checked before the measurements rather than when they are done (a_file is a file).
    ("bench_budget", ["--rounds", "1", "--json", "a_file/b.json"], "--json a_file/b.json: cannot create the folder"),
    ("bench_train", ["--json", "rows.jsonl", "--jsonl", "rows.jsonl"], "--json rows.jsonl is the --jsonl file"),
    ("bench_train", ["--json", "."], "--json . is a folder; give a file path"),
    ("bench_ops", ["--device", "cpu", "--batches", "1", "--ops", "merge_fwd", "--layers", "0", "--rep-ms", "1", "--out",
                   "a_file"], "--out a_file is a file; give a folder"),
    ("bench_model", ["--device", "cpu", "--out", "a_file"], "--out a_file is a file; give a folder"),
    ("bench_index", ["--device", "cpu", "--skip-pipeline", "--query-sizes", "100", "--out", "a_file/i"],
     "--out a_file/i: cannot create the folder"),
    ("profile", ["--device", "cpu", "--jsonl", "a_file/r.jsonl"], "--jsonl a_file/r.jsonl: cannot create the folder"),
    ("bench_attention", ["--device", "cpu", "--jsonl", "a_file/r.jsonl"], "--jsonl a_file/r.jsonl: cannot create"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_benchmark_options_are_refused_in_one_line_before_any_work(module, argv, message, capsys, monkeypatch,
                                                                   tmp_path):
    """A count or a schedule that cannot be used ends in the parser's one line (exit 2): before, a zero batch or
    a budget out of reach was a traceback, some only after a model was built or other rows had run."""
    import importlib

    monkeypatch.chdir(tmp_path)  # (the suite's output folder)
    (tmp_path / "a_file").write_text("x")

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    script = importlib.import_module(f"benchmarks.{module}")
    monkeypatch.setattr("tempme_fast.loading.create_model", built)
    monkeypatch.setattr(script, "create_model", built, raising=False)
    with pytest.raises(SystemExit) as exit_:
        script.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err.splitlines()[-1], err


def test_bench_index_never_reuses_clips_of_other_settings(tmp_path):
    """The cached clips were named by their number alone: a run with longer or larger clips timed the clips an
    earlier run had left, under its own settings."""
    pytest.importorskip("av")
    from benchmarks.bench_index import make_videos

    short = make_videos(str(tmp_path), 2, 1.0, (32, 24), 4.0)
    assert make_videos(str(tmp_path), 2, 1.0, (32, 24), 4.0) == short  # the same settings: cached
    longer = make_videos(str(tmp_path), 2, 2.0, (32, 24), 4.0)
    larger = make_videos(str(tmp_path), 1, 1.0, (48, 32), 4.0)
    assert len({*short, *longer, *larger}) == 5 and all(os.path.isfile(p) for p in (*short, *longer, *larger))
    assert os.path.getsize(longer[0]) > os.path.getsize(short[0])


def test_bench_index_recall_counts_only_the_results_a_small_collection_has():
    """Exact search over fewer than 10 vectors returns all of them: recall@10 is 1.0, not n/10 (it was divided
    by 10 whatever the collection's size)."""
    import argparse

    from benchmarks.bench_index import query_rows

    args = argparse.Namespace(query_sizes=[5, 12], dim=8, queries=3, variants=["exact-numpy"], nlist=None,
                              nprobe=16, ivf_train_per_list=40, hnsw_max=100_000)
    rows = query_rows(args)
    assert [(r["vectors"], r["recall_at_10"]) for r in rows] == [(5, 1.0), (12, 1.0)]
