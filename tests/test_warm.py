"""``benchmarks.warm``: the Triton variants the benchmarks launch, compiled ahead into Triton's cache.

On the CPU: what is recorded, and that a compile for sm_90 lands in the cache where a second run
finds every variant. On a GPU (marked ``cuda``): after warming, the real launches compile nothing.
"""
import json
import os
import subprocess
import sys

import pytest

from kit import ROOT, process_env


def _env(cache_dir) -> dict:
    # A process of its own: TRITON_INTERPRET (set by conftest.py) swaps the kernels for the interpreter's.
    return process_env(False, TRITON_CACHE_DIR=str(cache_dir))


def _python(code_or_args, cache_dir, timeout=600) -> subprocess.CompletedProcess:
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def binder_api():
    pytest.importorskip("triton")
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
        pytest.skip("this Triton lacks the binder API benchmarks.codegen compiles through")


RECORD = """
import json
from collections import Counter
from benchmarks import codegen, warm
from tempme_fast.precompile import distinct_launches
out = {}
for sets in (["model"], ["ops"], ["attention"], ["model", "ops", "attention"]):
    launches = warm.record_launches(["ViT-B-32"], [1], ["fp16"], sets)
    kept = distinct_launches(launches, 90)
    out["+".join(sets)] = {"recorded": len(launches), "kernels": dict(Counter(l.kernel.fn.__name__ for l in kept)),
                           "keys": [list(codegen.variant_key(l, 90)) for l in kept]}
again = distinct_launches(warm.record_launches(["ViT-B-32"], [1], ["fp16"], ["model", "ops", "attention"]), 90)
out["again"] = [list(codegen.variant_key(l, 90)) for l in again]
print(json.dumps(out))
"""


def test_records_the_model_the_op_and_the_attention_benchmarks_launches(binder_api, tmp_path):
    done = _python(RECORD, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    model, ops, attention, every = (out[k] for k in ("model", "ops", "attention", "model+ops+attention"))
    assert set(model["kernels"]) == {"_best_match_fwd_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel",
                                     "_attention_fwd_kernel", "_attention_bwd_kernel", "_add_norm_fwd_kernel",
                                     "_embed_norm_fwd_kernel", "_linear_act_fwd_kernel"}
    assert set(ops["kernels"]) == {"_best_match_fwd_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel"}
    assert set(attention["kernels"]) == {"_attention_fwd_kernel", "_attention_bwd_kernel"}
    # The op benchmark's merge without a LayerNorm (NORM=0) is not among the model's merges (NORM=1).
    merges = lambda keys: {k[1] for k in keys if k[0] == "_merge_fwd_kernel"}  # noqa: E731
    assert merges(ops["keys"]) - merges(model["keys"])
    # Every variant once, each caller's among them, in the same order on every call.
    for part in (model, ops, attention):
        assert part["recorded"] >= len(part["keys"])
        assert {tuple(k) for k in part["keys"]} <= {tuple(k) for k in every["keys"]}
    assert len({tuple(k) for k in every["keys"]}) == len(every["keys"])
    assert out["again"] == every["keys"]


TILES = """
import json
from collections import Counter
from benchmarks import suite, warm
from tempme_fast.precompile import distinct_launches
out = {}
sweeps = suite.TILE_SWEEPS
for kind, (models, batch, dtype, specs) in sweeps.items():
    suite.TILE_SWEEPS = {kind: sweeps[kind]}  # (sweeps at one model, batch and dtype are recorded together)
    kept = distinct_launches(warm.record_launches(list(models), [batch], [dtype], ["tiles"]), 90)
    out[kind] = [len(specs), dict(Counter(l.kernel.fn.__name__ for l in kept)),
                 sorted({l.kwargs["SORT_BLOCK"] for l in kept if l.kwargs.get("PLAN")})]
suite.TILE_SWEEPS = sweeps
out["elsewhere"] = len(warm.record_launches(["ViT-B-32"], [4], ["fp16"], ["tiles"]))
print(json.dumps(out))
"""


def test_records_each_tile_sweep_candidate(binder_api, tmp_path):
    """The ``tiles`` set compiles every candidate of the suite's tile sweeps at the sweep's shapes (and
    nothing at other shapes): one attention forward variant per candidate, at least one merge and one
    match variant per candidate (the merge sweeps' plans come from the library's match), and the
    match with its plan on each path."""
    done = _python(TILES, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    specs, kernels, _ = out["attention"]
    assert kernels == {"_attention_fwd_kernel": specs}
    specs, kernels, _ = out["merge"]
    assert set(kernels) == {"_merge_fwd_kernel", "_best_match_fwd_kernel"} and kernels["_merge_fwd_kernel"] >= specs
    specs, kernels, _ = out["match"]
    assert set(kernels) == {"_best_match_fwd_kernel"} and kernels["_best_match_fwd_kernel"] >= specs
    for kind in ("norm", "norm1"):
        specs, kernels, _ = out[kind]
        assert set(kernels) == {"_merge_fwd_kernel", "_best_match_fwd_kernel"}, kind
        assert kernels["_merge_fwd_kernel"] >= specs, kind
    # The plan paths: the matches with the plan sorted (widths up to 512 at ViT-B/16's joins) and counted (at
    # the shapes of norm1's sweep too, whose merges are recorded with them).
    specs, kernels, sort_blocks = out["plan"]
    assert kernels["_best_match_fwd_kernel"] >= specs and 0 in sort_blocks and {32, 128, 512} <= set(sort_blocks)
    assert out["elsewhere"] == 0


def test_compiles_into_the_triton_cache_and_a_second_run_finds_every_variant(binder_api, tmp_path):
    cache, rows = tmp_path / "cache", tmp_path / "rows.jsonl"
    args = ["-m", "benchmarks.warm", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32", "--sets", "ops",
            "--arch", "90", "--jobs", "2", "--jsonl", str(rows), "--tag", "t"]
    first = _python(args, cache)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    second = _python(args, cache)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    summaries = [r for r in records if "variants" in r]
    assert [r["tag"] for r in summaries] == ["t", "t"] and all(r["bench"] == "warm" for r in summaries)
    a, b = summaries
    assert a["variants"] == b["variants"] > 3 and a["failed"] == b["failed"] == 0
    assert a["compiled"] == a["variants"] and a["cache_hits"] == 0
    assert b["cache_hits"] == b["variants"] and b["compiled"] == 0
    assert a["arch"] == 90 and not a["stubs"]  # no launcher stubs for a GPU that is not here
    assert len(os.listdir(cache)) >= a["variants"]
    assert "variants for sm_90" in first.stdout and f"{a['variants']} compiled" in first.stdout
    import torch

    if not torch.cuda.is_available():
        # A launcher stub that cannot be built (no CUDA driver here) leaves the compiled kernel counted as cached.
        third = _python("import json; from benchmarks import warm; print(json.dumps(warm.warm(['ViT-B-32'], [1], "
                        "['fp32'], ['ops'], arch=90, jobs=1, stubs=True)))", cache)
        assert third.returncode == 0, third.stderr[-3000:]
        c = json.loads(third.stdout.splitlines()[-1])
        assert c["cache_hits"] == c["variants"] == a["variants"] and c["failed"] == 0
        assert c["stubs_failed"] == c["variants"] and c["stub_errors"]


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "--batches [0]: every batch must be >= 1"),
    (["--jobs", "0"], "--jobs 0 must be >= 1"),
    (["--arch", "9"], "--arch 9: give a compute capability of 70 or more"),
    (["--dtypes", "fp8"], "argument --dtypes: invalid choice: 'fp8'"),
])
def test_bad_arguments_name_the_option(args, message, tmp_path):
    done = _python(["-m", "benchmarks.warm", *args], tmp_path / "cache", timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_refuses_the_interpreter_and_a_missing_arch(tmp_path):
    env = _env(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-m", "benchmarks.warm"], cwd=ROOT, env={**env, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET=1" in done.stderr and "unset it" in done.stderr
    import torch

    if not torch.cuda.is_available():
        from benchmarks import warm

        with pytest.raises(ValueError, match="arch: no CUDA device here; give the compute capability"):
            warm.warm(["ViT-B-32"], [1], ["fp16"])


WARM_THEN_LAUNCH = """
import torch
from triton import knobs
from benchmarks import bench_ops, warm
from benchmarks.common import merge_shapes, metric_tensor
from tempme_fast import ops

summary = warm.warm(["ViT-B-32"], [2], ["fp16"], ["ops"], jobs=2)
assert summary["failed"] == 0 and summary["compiled"] == summary["variants"] > 3 and summary["stubs"], summary
misses = []
knobs.compilation.listener = lambda **info: misses.append(info["src"].name) if not info["cache_hit"] else None
for s in merge_shapes("ViT-B-32", 2):
    g = torch.Generator(device="cuda").manual_seed(0)
    # As bench_ops calls the ops: after attention, every head's keys in a view of the q | k | v projection.
    metric = metric_tensor(s.rows, s.tokens, s.channels, s.heads, torch.float16, "cuda", g)
    x = torch.randn(s.rows, s.tokens, s.width, device="cuda", dtype=torch.float16, generator=g, requires_grad=True)
    size = torch.randint(1, 5, (s.rows, s.tokens, 1), device="cuda", generator=g).float()
    ops.best_match(metric, s.protected, backend="triton", heads=s.heads)
    plan = ops.match(metric, s.r, s.protected, backend="triton", heads=s.heads)
    out, _ = ops.merge(x, size, plan, backend="triton")
    torch.autograd.grad(out, x, torch.randn_like(out))
    if s.stage == "cross":  # bench_ops' join with its LayerNorm, forward alone and with its backward
        for op in bench_ops.JOIN_OPS:
            bench_ops.op_fn(op, "triton", s, *bench_ops.make_inputs(s, torch.float16, torch.device("cuda")))[0]()
torch.cuda.synchronize()
print("misses", misses)
assert not misses, misses
"""


@pytest.mark.cuda
def test_after_warming_the_real_launches_compile_nothing(tmp_path):
    done = _python(WARM_THEN_LAUNCH, tmp_path / "cache")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "misses []" in done.stdout
