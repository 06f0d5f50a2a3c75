"""Device time beside eager time, and where a forward's time goes: the parts that run without a GPU."""
import json

import pytest
import torch

from benchmarks import bench_attention, profile
from benchmarks.devicetime import basis_ms, device_ms, graph_calls, host_columns, input_sets, kernel_us, speedups
from benchmarks.rowlog import read_records
from tiny import TINY_ARGS

MB = 1 << 20
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("set_bytes, sets", [(1 * MB, 64), (4 * MB, 30), (40 * MB, 3), (200 * MB, 1)])
def test_input_sets_exceed_twice_the_l2_cache_up_to_the_cap(set_bytes, sets):
    assert input_sets(set_bytes, 60 * MB) == sets
    assert sets == 64 or sets * set_bytes >= 2 * 60 * MB  # out of L2 unless capped
    assert sets == 1 or (sets - 1) * set_bytes < 2 * 60 * MB  # and no more sets than that takes


def test_input_sets_refuse_nonsense():
    with pytest.raises(ValueError, match="set_bytes=0 must be > 0"):
        input_sets(0, 60 * MB)
    with pytest.raises(ValueError, match="max_sets=0"):
        input_sets(MB, 60 * MB, max_sets=0)


@pytest.mark.parametrize("sets, calls", [(1, 16), (3, 18), (16, 16), (64, 64)])
def test_a_graph_holds_whole_passes_through_the_sets(sets, calls):
    assert graph_calls(sets) == calls and calls % sets == 0


def test_host_bound_and_speedups_come_from_device_time_on_a_gpu():
    triton = {"ms": 0.20, "device_ms": 0.02}
    torch_row = {"ms": 0.50, "device_ms": 0.10}
    assert host_columns(0.20, triton) == {"eager_over_device": pytest.approx(10.0), "host_bound": True}
    assert host_columns(0.11, torch_row)["host_bound"] is False
    assert speedups(triton, torch_row, CUDA, "s") == {"s": pytest.approx(5.0), "s_eager": pytest.approx(2.5)}
    # Without a device figure on either side there is no device speed-up, only the eager one.
    assert speedups({"ms": 0.2}, torch_row, CUDA, "s") == {"s": None, "s_eager": pytest.approx(2.5)}
    assert basis_ms({"ms": 0.2}, CUDA) is None


def test_on_a_cpu_the_wall_time_is_the_device_time_and_no_device_column_is_made():
    assert device_ms(lambda i: (lambda: None), 1, CPU) == {}
    assert host_columns(1.0, {"ms": 1.0}) == {}
    assert speedups({"ms": 1.0}, {"ms": 3.0}, CPU, "s") == {"s": pytest.approx(3.0)}


def test_bench_attention_rows_on_a_cpu_are_appended_without_device_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    seen = []

    def sink(row):  # the file already holds every row measured before this one
        seen.append(len(path.read_text().splitlines()) if path.exists() else 0)
    rows = bench_attention.run(CPU, ["ViT-B-32"], [1], ["fp32"], ["sdpa", "fold"], ["fwd"], rep_ms=1, sink=sink)
    assert len(rows) == 8 and all(r["ms"] > 0 for r in rows)
    for key in ("device_ms", "host_bound", "eager_over_device", "speedup_vs_mask_eager"):
        assert not any(key in r for r in rows)
    assert all(r["speedup_vs_mask"] > 0 for r in rows)
    assert bench_attention.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                                 "--impls", "sdpa", "--modes", "fwd", "--rep-ms", "1", "--jsonl", str(path)]) == 0
    assert len(path.read_text().splitlines()) == 4


@pytest.mark.parametrize("name, group", [
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "GEMM"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNT", "GEMM"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("_attention_fwd_kernel", "attention"),
    ("_merge_fwd_kernel", "merge/match"), ("_best_match_fwd_kernel", "merge/match"),
    ("_match_plan_kernel", "merge/match"), ("_segment_reduce_fwd_kernel", "merge/match"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half, float>", "LayerNorm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise/other"),
    ("Memcpy DtoD (Device -> Device)", "elementwise/other"),
    ("aten::addmm", "GEMM"), ("aten::mm", "GEMM"), ("aten::mkldnn_convolution", "GEMM"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::native_layer_norm", "LayerNorm"),
    ("aten::gather", "merge/match"), ("aten::add", "elementwise/other"),
])
def test_kernel_and_op_names_fall_in_their_group(name, group):
    assert profile.group_of(name) == group


def test_summary_keeps_the_costliest_kernels_and_accounts_for_every_microsecond():
    times = {f"k{i}": (2.0, float(i + 1)) for i in range(5)}  # k4 costs most
    times["_merge_fwd_kernel"] = (15.0, 100.0)
    kernels, groups, forward = profile.summarise(times, wall=1.0, top=3)
    assert [k["name"] for k in kernels] == ["_merge_fwd_kernel", "k4", "k3", "(others)"]
    assert kernels[-1] == {"kind": "kernel", "name": "(others)", "group": "elementwise/other", "calls": 6.0,
                           "us": 6.0, "names": 3}
    total = 100.0 + 15.0
    assert sum(k["us"] for k in kernels) == pytest.approx(total) == pytest.approx(sum(g["us"] for g in groups))
    assert {g["group"]: g["us"] for g in groups}["merge/match"] == 100.0
    assert forward == {"kind": "forward", "wall_ms": 1.0, "kernel_ms": pytest.approx(0.115),
                       "host_ms": pytest.approx(0.885), "host_share": pytest.approx(0.885), "launches": 25.0}


def test_profile_runs_on_a_cpu_with_op_times(tmp_path, tiny_model_file, capsys):
    path = tmp_path / "rows.jsonl"
    assert profile.main(["--device", "cpu", "--cases", f"{tiny_model_file}:2", "--forwards", "1", "--repeats", "2",
                         "--jsonl", str(path), "--tag", "profile", *TINY_ARGS]) == 0
    env, *rows = read_records(str(path))
    assert env["bench"] == "profile" and env["environment"]["torch"]
    assert {r["variant"] for r in rows} == {"open_clip", "tempme-torch"}
    for variant in ("open_clip", "tempme-torch"):
        mine = [r for r in rows if r["variant"] == variant]
        forward = [r for r in mine if r["kind"] == "forward"]
        assert len(forward) == 1 and forward[0]["wall_ms"] > 0 and forward[0]["launches"] > 0
        groups = {r["group"]: r["us"] for r in mine if r["kind"] == "group"}
        assert set(groups) == {"attention", "merge/match", "GEMM", "LayerNorm", "elementwise/other"}
        assert sum(groups.values()) / 1e3 == pytest.approx(forward[0]["kernel_ms"])
        assert sum(r["us"] for r in mine if r["kind"] == "kernel") == pytest.approx(sum(groups.values()))
        assert groups["GEMM"] > 0 and groups["attention"] > 0
    merged = {r["group"]: r["us"] for r in rows if r["variant"] == "tempme-torch" and r["kind"] == "group"}
    assert merged["merge/match"] > 0  # the reference merge's gathers and sorts
    out = capsys.readouterr().out
    assert "aten ops, self CPU time" in out and "wall_ms" in out


def test_profile_of_training_calls_sees_the_backward(tmp_path, tiny_model_file):
    path = tmp_path / "rows.jsonl"
    assert profile.main(["--device", "cpu", "--cases", f"{tiny_model_file}:2", "--forwards", "1", "--repeats", "2",
                         "--modes", "infer", "train", "--variants", "tempme-torch", "--jsonl", str(path),
                         *TINY_ARGS]) == 0
    _, *rows = read_records(str(path))
    forward = {r["mode"]: r for r in rows if r["kind"] == "forward"}
    assert set(forward) == {"infer", "train"} and not any("error" in r for r in forward.values())
    names = {mode: {r["name"] for r in rows if r["kind"] == "kernel" and r["mode"] == mode} for mode in forward}
    # The backward's own ops, and more launches than the forward alone.
    assert any("backward" in n.lower() for n in names["train"]) and not any("backward" in n.lower()
                                                                          for n in names["infer"])
    assert forward["train"]["launches"] > forward["infer"]["launches"]


def test_profile_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        profile.main(["--device", "cpu", "--cases", "ViT-B-16"])
    assert "give MODEL:BATCH with BATCH >= 1" in capsys.readouterr().err
    for variant in ("tempme-triton", "tempme-triton-mlp"):
        with pytest.raises(SystemExit):
            profile.main(["--device", "cpu", "--variants", "open_clip", variant])
        assert f"--variants {variant} needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["--device", "cpu", "--forwards", "0"])
    assert "argument --forwards: 0 is not a positive integer" in capsys.readouterr().err


def test_profile_rows_are_json():
    kernels, groups, forward = profile.summarise({"aten::mm": (1.0, 5.0)}, wall=0.01)
    json.dumps(kernels + groups + [forward])


def test_kernel_sums_count_device_kernels_once():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, device_type, us, annotation=False):
        return SimpleNamespace(name=name, device_type=device_type, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    events = [event("aten::mm", DeviceType.CPU, 50.0), event("gemm", DeviceType.CUDA, 7.0),
              event("gemm", DeviceType.CUDA, 9.0), event("_merge_fwd_kernel", DeviceType.CUDA, 3.0),
              event("my_region", DeviceType.CUDA, 19.0, annotation=True)]  # spans the kernels above
    assert kernel_us(events) == {"gemm": [7.0, 9.0], "_merge_fwd_kernel": [3.0]}


# ---------------------------------------------------------------------------------------------
# On a GPU: the graph replay measures the device, the fallback works, the benchmarks fill the columns
# ---------------------------------------------------------------------------------------------



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_time_of_a_large_copy_is_its_eager_time():
    from benchmarks.common import measure_ms

    def make(i):
        src = torch.randn(64 << 20, device="cuda")  # 256 MB: the copy is bound by memory, not the host
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    timing = device_ms(make, 256 << 20, CUDA, rep_ms=50)
    assert timing["device_basis"] == "graph" and timing["device_sets"] == 1 and timing["device_calls"] == 16
    eager = measure_ms(make(0), CUDA, rep_ms=50)["ms"]
    assert 0.75 < eager / timing["device_ms"] < 1.33
    assert host_columns(eager, timing)["host_bound"] is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_time_of_many_tiny_launches_is_far_below_their_eager_time():
    from benchmarks.common import measure_ms

    def make(i):
        x = torch.randn(1024, device="cuda")

        def run():
            y = x
            for _ in range(30):  # 30 launches of a few microseconds each
                y = y * 1.0001 + 1
            return y
        return run
    timing = device_ms(make, 4096 + 4096, CUDA, rep_ms=20)
    assert timing["device_basis"] == "graph" and timing["device_sets"] == 64 and timing["device_calls"] == 64
    eager = measure_ms(make(0), CUDA, rep_ms=20)["ms"]
    assert host_columns(eager, timing)["host_bound"] is True, (eager, timing)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_call_that_cannot_be_captured_falls_back_to_its_kernels():
    def make(i):
        x = torch.randn(4096, device="cuda")
        return lambda: (x * 2).sum().item()  # a host synchronisation: no graph can hold it
    timing = device_ms(make, 4 * 4096, CUDA, rep_ms=10)
    assert timing["device_basis"] == "kernels" and timing["device_capture_error"]
    assert 0 < timing["device_ms"] < 1.0
    torch.cuda.synchronize()  # the failed capture left the device usable
    assert torch.ones(3, device="cuda").sum().item() == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_ops_and_attention_fill_device_columns_on_a_gpu():
    from benchmarks import bench_ops

    rows = bench_ops.run(CUDA, ["ViT-B-32"], [1], ["fp16"], ["torch", "triton"], ["merge_fwd", "merge_bwd"], rep_ms=5)
    assert len(rows) == 7 * 2 * 2 and not any("error" in r or "device_error" in r for r in rows)
    # What was timed was right: each row held against float64 (benchmarks.oracle).
    assert all(r["agrees"] is True for r in rows), [r.get("disagreement") for r in rows]
    for r in rows:
        assert r["device_ms"] > 0 and r["device_basis"] in ("graph", "kernels") and isinstance(r["host_bound"], bool)
        assert r["gbs"] == pytest.approx(r["bytes"] / (r["device_ms"] * 1e-3) / 1e9)
        # A merge of a few MB against a copy of as many bytes, timed once a size and dtype, and against 1 GiB's.
        assert 0 < r["sized_copy_gbs"] and r["frac_sized_copy"] == pytest.approx(r["gbs"] / r["sized_copy_gbs"])
        assert r["sized_copy_gbs"] == next(b["sized_copy_gbs"] for b in rows if b["bytes"] == r["bytes"])
        assert r["frac_copy_bw"] == pytest.approx(r["gbs"] / r["copy_gbs"])
        assert r["speedup_vs_torch_eager"] == pytest.approx(
            next(b["ms"] for b in rows if b["impl"] == "torch" and b["op"] == r["op"] and b["layer"] == r["layer"]
                 and b["stage"] == r["stage"]) / r["ms"])
    attention = bench_attention.run(CUDA, ["ViT-B-32"], [1], ["fp16"], ["sdpa", "triton"], ["fwd", "fwdbwd"], rep_ms=5)
    assert all(r["device_ms"] > 0 and r["speedup_vs_mask"] > 0 and r["agrees"] is True for r in attention), attention


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_on_a_gpu_sees_the_merge_kernels_and_the_host_share(tiny_model_file):
    from tiny import TINY_CONFIG

    rows = profile.run(CUDA, [(tiny_model_file, 2)], ["fp16"], ["open_clip", "tempme-triton"], forwards=2,
                       repeats=3, config=TINY_CONFIG)
    forward = {r["variant"]: r for r in rows if r["kind"] == "forward"}
    assert set(forward) == {"open_clip", "tempme-triton"} and not any("error" in r for r in forward.values())
    for r in forward.values():
        assert 0 < r["kernel_ms"] < r["wall_ms"] and r["launches"] > 10
    groups = {(r["variant"], r["group"]): r["us"] for r in rows if r["kind"] == "group"}
    assert groups[("tempme-triton", "merge/match")] > groups[("open_clip", "merge/match")]
    merge_kernels = {r["variant"] for r in rows if r["kind"] == "kernel" and "_merge_fwd_kernel" in r["name"]}
    assert merge_kernels == {"tempme-triton"}
    assert groups[("tempme-triton", "GEMM")] > 0 and groups[("tempme-triton", "attention")] > 0
    train = profile.run(CUDA, [(tiny_model_file, 2)], ["fp16"], ["tempme-triton"], forwards=2, repeats=3,
                        config=TINY_CONFIG, modes=["train"])
    trained = {r["group"]: r["us"] for r in train if r["kind"] == "group"}
    # The merge and attention backward kernels add to their groups (counted whether or not in the top rows).
    assert trained["merge/match"] > groups[("tempme-triton", "merge/match")]
    assert trained["attention"] > groups[("tempme-triton", "attention")]
