"""A lost CUDA context costs a stage one row or one test (benchmarks.context), simulated on a CPU.

The probe itself needs a faulted GPU; here it is replaced by one that says "lost" where a test wants it, and the
rest (the row kept, the exit status, the stage or shard started again, what the new process skips) runs as it
would on a GPU.
"""
import json
import subprocess
import sys
import time

import pytest

from benchmarks import bench_attention, bench_model, bench_ops, bench_train, context, profile, report
from benchmarks.context import CONTEXT_LOST_EXIT, MAX_RESTARTS, Resume, context_lost
from benchmarks.rowlog import RowLog, read_rows
from benchmarks.suite import Stage, run_suite
from kit import ROOT, untimed_steps
from tiny import TINY_ARGS


def _lost_on_call(monkeypatch, module, calls):
    """``module.context_lost`` (the probe the benchmarks' rows go through) says "lost" from its ``calls``-th call
    (1-based) on, as a faulted context stays lost."""
    seen = []

    def probe(device):
        seen.append(device)
        return len(seen) >= calls
    monkeypatch.setattr(module, "context_lost", probe)


def test_a_cpu_context_is_never_lost():
    import torch
    assert not context_lost(torch.device("cpu")) and not context_lost("cpu")


def test_resume_skips_rows_logged_under_the_tag_and_candidates_that_lost_the_context(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    log = RowLog(path, "bench_ops", {}, "sweep")
    log({"layer": 0, "op": "merge_fwd", "impl": "triton"})
    log({"layer": 0, "op": "merge_fwd", "impl": "triton:a", "context_lost": True, "error": "illegal address"})
    RowLog(path, "bench_ops", {}, "other")({"layer": 1, "op": "merge_fwd", "impl": "triton"})
    resume = Resume(path, "bench_ops", "sweep", ("layer", "op", "impl"), ("op", "impl"))
    assert resume.skip({"layer": 0, "op": "merge_fwd", "impl": "triton"})
    assert not resume.skip({"layer": 1, "op": "merge_fwd", "impl": "triton"})  # (the other tag's row)
    assert resume.skip({"layer": 5, "op": "merge_fwd", "impl": "triton:a"})  # the lost candidate, at any shape
    assert not resume.skip({"layer": 5, "op": "merge_bwd", "impl": "triton:a"})
    assert resume.logged({"layer": 0, "op": "merge_fwd", "impl": "triton"})["impl"] == "triton"
    assert resume.value("error", impl="triton:a") == "illegal address" and resume.value("copy_gbs") is None
    assert Resume(str(tmp_path / "absent.jsonl"), "bench_ops", "sweep", ("op",), ("op",)).rows == []


def _ops_argv(path, *extra):
    return ["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32", "--impls", "torch",
            "--ops", "merge_fwd", "merge_bwd", "--no-check", "--rep-ms", "1", "--jsonl", path, "--tag", "t", *extra]


def test_bench_ops_keeps_the_row_that_lost_the_context_and_resumes_after_it(tmp_path, monkeypatch):
    """The third row loses the context: the process exits with CONTEXT_LOST_EXIT keeping three rows, the last
    marked; resumed, it measures every row it had not, but none more of the candidate that lost it."""
    path = str(tmp_path / "rows.jsonl")
    _lost_on_call(monkeypatch, context, 3)
    assert bench_ops.main(_ops_argv(path)) == CONTEXT_LOST_EXIT
    first = read_rows(path, "bench_ops")
    assert [r.get("context_lost", False) for r in first] == [False, False, True]
    lost = first[-1]
    assert (lost["op"], lost["impl"]) == ("merge_fwd", "torch")
    assert (lost["layer"], lost["stage"]) != (first[0]["layer"], first[0]["stage"])

    monkeypatch.setattr(context, "context_lost", lambda device: False)
    assert bench_ops.main(_ops_argv(path, "--resume")) == 0
    rows = read_rows(path, "bench_ops")
    keys = [tuple(r[k] for k in bench_ops.ROW_KEYS) for r in rows]
    assert len(keys) == len(set(keys))  # no row measured twice
    later = rows[3:]
    assert later and {r["op"] for r in later} == {"merge_bwd"}  # merge_fwd on torch lost the context
    shapes = sorted({(r["layer"], r["stage"]) for r in rows})
    assert sorted((r["layer"], r["stage"]) for r in rows if r["op"] == "merge_bwd") == shapes


def test_resume_needs_the_rows_file(capsys):
    with pytest.raises(SystemExit) as e:
        bench_ops.main(["--device", "cpu", "--resume"])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    for module in (bench_attention, bench_model, profile):
        with pytest.raises(SystemExit) as e:
            module.main(["--device", "cpu", "--resume"])
        assert e.value.code == 2 and "--jsonl" in capsys.readouterr().err


def test_bench_attention_resumes_after_a_lost_context(tmp_path, monkeypatch):
    path = str(tmp_path / "rows.jsonl")
    argv = ["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32", "--impls", "sdpa",
            "fold", "--modes", "fwd", "--no-check", "--rep-ms", "1", "--jsonl", path, "--tag", "t"]
    _lost_on_call(monkeypatch, context, 2)
    assert bench_attention.main(argv) == CONTEXT_LOST_EXIT
    first = read_rows(path, "attention")
    assert [(r["impl"], r.get("context_lost", False)) for r in first] == [("sdpa", False), ("fold", True)]
    monkeypatch.setattr(context, "context_lost", lambda device: False)
    assert bench_attention.main([*argv, "--resume"]) == 0
    later = read_rows(path, "attention")[2:]
    assert later and {r["impl"] for r in later} == {"sdpa"}  # fold lost the context: none more of it
    assert later[0]["layer"] != first[0]["layer"]


def test_bench_model_resumes_after_a_lost_context_without_the_variant_that_lost_it(tmp_path, monkeypatch,
                                                                                   tiny_model_file):
    """tempme-torch loses the context at one video: resumed, the run measures open_clip at two (its speed-up
    against a base measured there) and the per-layer times, and nothing of tempme-torch; resumed once more, it
    measures nothing at all."""
    path = str(tmp_path / "rows.jsonl")
    argv = ["--device", "cpu", "--models", tiny_model_file, "--batches", "1", "2", "--modes", "infer", "--variants",
            "open_clip", "tempme-torch", "--no-check", "--rep-ms", "1", "--jsonl", path, "--tag", "t", *TINY_ARGS]
    _lost_on_call(monkeypatch, context, 2)
    assert bench_model.main(argv) == CONTEXT_LOST_EXIT
    first = read_rows(path)
    assert [(r["variant"], r["batch"], r.get("context_lost", False)) for r in first] == [
        ("open_clip", 1, False), ("tempme-torch", 1, True)]
    monkeypatch.setattr(context, "context_lost", lambda device: False)
    assert bench_model.main([*argv, "--resume"]) == 0
    later = read_rows(path)[2:]
    model_rows = [r for r in later if r["bench"] == "bench_model"]
    assert [(r["variant"], r["batch"]) for r in model_rows] == [("open_clip", 2)]
    assert model_rows[0]["speedup_vs_open_clip"] == 1.0
    assert {r["variant"] for r in later if r["bench"] == "bench_layers"} == {"unmerged", "tempme"}
    assert bench_model.main([*argv, "--resume"]) == 0
    assert len(read_rows(path)) == len(first) + len(later)


def test_profile_resumes_after_a_lost_context_without_the_variant_that_lost_it(tmp_path, monkeypatch,
                                                                               tiny_model_file):
    """A case's rows are logged together, the last one marked where the context was lost after it."""
    path = str(tmp_path / "rows.jsonl")
    argv = ["--device", "cpu", "--cases", f"{tiny_model_file}:1", f"{tiny_model_file}:2", "--forwards", "1",
            "--repeats", "1", "--jsonl", path, "--tag", "t", *TINY_ARGS]
    _lost_on_call(monkeypatch, context, 2)
    assert profile.main(argv) == CONTEXT_LOST_EXIT
    first = read_rows(path)
    lost = [r for r in first if r.get("context_lost")]
    assert len(lost) == 1 and lost[0] is first[-1] and (lost[0]["variant"], lost[0]["batch"]) == ("tempme-torch", 1)
    assert {(r["variant"], r["batch"]) for r in first} == {("open_clip", 1), ("tempme-torch", 1)}
    monkeypatch.setattr(context, "context_lost", lambda device: False)
    assert profile.main([*argv, "--resume"]) == 0
    assert {(r["variant"], r["batch"]) for r in read_rows(path)[len(first):]} == {("open_clip", 2)}


def _train_argv(tiny_model_file, path, modes=("lora", "full")):
    return ["--device", "cpu", "--model", tiny_model_file, "--batch", "2", "--context-length", "8", "--modes", *modes,
            "--backends", "torch", "--repeats", "1", "--warmup", "0", "--jsonl", path, "--tag", "t",
            *TINY_ARGS]


def test_bench_train_resumes_after_a_lost_context_without_the_variant_that_lost_it(tmp_path, monkeypatch,
                                                                                   tiny_model_file):
    """TempMe loses the context in the LoRA step: resumed, the run measures the full step unmerged (its speed-up
    against a base measured there) and no TempMe row at all; resumed once more, it measures nothing."""
    path = str(tmp_path / "rows.jsonl")
    argv = _train_argv(tiny_model_file, path)
    _lost_on_call(monkeypatch, context, 2)
    assert bench_train.main(argv) == CONTEXT_LOST_EXIT
    first = read_rows(path)
    assert [(r["mode"], r["variant"], r.get("context_lost", False)) for r in first] == [
        ("lora", "unmerged", False), ("lora", "TempMe", True)]
    monkeypatch.setattr(context, "context_lost", lambda device: False)
    assert bench_train.main([*argv, "--resume"]) == 0
    later = read_rows(path)[2:]
    assert [(r["mode"], r["variant"]) for r in later] == [("full", "unmerged")] and later[0]["speedup"] == 1.0
    assert bench_train.main([*argv, "--resume"]) == 0
    assert len(read_rows(path)) == 3


def test_bench_train_blames_a_gradient_check_that_lost_the_context_on_its_own_variant(tmp_path, monkeypatch,
                                                                                      tiny_model_file):
    """The Triton gradient check (run before any timed step) faults: the TempMe row keeps the check's error and the
    mark, and nothing is timed. Resumed, the check does not run again (its compiled variant, a candidate of its own,
    is timed without it), the variant that lost the context is skipped, and the rest is measured."""
    checks = []

    def gradient_check(*args, **kwargs):
        checks.append(args[1])
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(bench_train, "gradient_check", gradient_check)
    # Which rows and checks run is the point here: no step is run (compiling one in the interpreter takes 30 s).
    untimed_steps(monkeypatch, bench_train)
    _lost_on_call(monkeypatch, context, 1)
    path = str(tmp_path / "rows.jsonl")
    argv = [a if a != "torch" else "triton" for a in _train_argv(tiny_model_file, path, modes=["lora"])]
    argv += ["--compile", "eager"]
    assert bench_train.main(argv) == CONTEXT_LOST_EXIT
    first = read_rows(path)
    assert checks == ["lora"] and [(r["mode"], r["variant"], r["backend"]) for r in first] == [
        ("lora", "TempMe", "triton")]
    assert first[0]["context_lost"] and not first[0]["agrees"] and "illegal memory access" in first[0]["error"]
    assert "illegal memory access" in first[0]["disagreement"] and "step_ms" not in first[0]
    monkeypatch.setattr(context, "context_lost", lambda device: False)
    assert bench_train.main([*argv, "--resume"]) == 0
    later = read_rows(path)[1:]
    assert checks == ["lora"]
    assert [r["variant"] for r in later] == ["unmerged", "unmerged+compile", "TempMe+compile"]
    assert all(r["step_ms"] == 1.0 and "agrees" not in r and not r.get("context_lost") for r in later)


def test_bench_train_keeps_a_step_that_raised_as_its_own_row(tmp_path, monkeypatch, tiny_model_file):
    """The unmerged step raises: its row names the error, the TempMe row is measured without a base to divide by,
    and the run exits 1."""
    real, calls = bench_train.time_calls, []

    def time_calls(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)
    monkeypatch.setattr(bench_train, "time_calls", time_calls)
    path = str(tmp_path / "rows.jsonl")
    assert bench_train.main(_train_argv(tiny_model_file, path, modes=["lora"])) == 1
    rows = read_rows(path)
    assert [(r["variant"], r.get("error")) for r in rows] == [("unmerged", "RuntimeError: out of memory"),
                                                              ("TempMe", None)]
    assert rows[1]["step_ms"] > 0 and "speedup" not in rows[1]


# A stage that loses its context on its first process (and, with "always", on every one): the stub exits as
# bench_ops does, and writes one line per process so the test counts them.
LOSING = """
import sys
with open(sys.argv[1], "a") as f:
    f.write(" ".join(sys.argv[2:]) + "\\n")
always = "always" in sys.argv
sys.exit(%d if always or "--resume" not in sys.argv else 0)
""" % CONTEXT_LOST_EXIT


@pytest.mark.parametrize("always", [False, True])
def test_a_stage_that_lost_its_context_goes_on_with_resume(tmp_path, monkeypatch, always):
    from benchmarks import suite

    stub = tmp_path / "losing_stub.py"
    stub.write_text(LOSING)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    monkeypatch.setattr(suite, "RESUMABLE", ("losing_stub",))
    calls = tmp_path / "calls.txt"
    argv = [sys.executable, "-m", "losing_stub", str(calls), *(["always"] if always else [])]
    stages = [Stage("sweep", argv, cap=60), Stage("plain", [sys.executable, "-c", f"exit({CONTEXT_LOST_EXIT})"], 60)]
    out = tmp_path / "out"
    assert run_suite(str(out), stages, deadline=time.time() + 120, min_stage_s=0.5) == 1
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    sweep, plain = records
    attempts = MAX_RESTARTS + 1 if always else 2
    assert len(calls.read_text().splitlines()) == attempts
    assert all(line.endswith("--resume") for line in calls.read_text().splitlines()[1:])
    assert sweep["restarts"] == attempts - 1 and len(sweep["rcs"]) == attempts
    assert sweep["rcs"][-1] == (CONTEXT_LOST_EXIT if always else 0)
    assert sweep["outcome"] == "failed"  # a candidate faulted: never ok, though the rest was measured
    assert (plain["outcome"], plain["rc"], plain.get("restarts")) == ("failed", CONTEXT_LOST_EXIT, None)
    assert "the CUDA context is lost" in (out / "suite.log").read_text()


TESTS = """
import pytest

@pytest.mark.parametrize("k", range(7))
def test_numbered(k):
    assert {failing}
"""
# Every failure "loses the context", as a faulted kernel would.
CONFTEST = """
import benchmarks.testlog
benchmarks.testlog._context_lost = lambda: True
"""


def _run_shards(tmp_path, failing):
    (tmp_path / "test_numbered.py").write_text(TESTS.format(failing=failing))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    results = tmp_path / "tests.jsonl"
    done = subprocess.run([sys.executable, "-m", "benchmarks.shards", "1", "--", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.testlog", "--results-jsonl", str(results), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_numbered.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    return done, [line for line in lines if "nodeid" in line and "event" not in line], \
        [line for line in lines if "event" in line]


def test_a_shard_that_lost_its_context_runs_its_other_tests_in_a_new_process(tmp_path):
    done, tests, events = _run_shards(tmp_path, "k != 2")
    assert done.returncode == 1, done.stdout + done.stderr  # the test after which it was lost failed
    assert sorted(t["nodeid"].split("[")[1].rstrip("]") for t in tests) == [str(k) for k in range(7)]
    assert [t["outcome"] for t in tests].count("failed") == 1
    assert [e["event"] for e in events] == ["start", "context_lost", "finish", "start", "finish"]
    assert events[2]["exitstatus"] == CONTEXT_LOST_EXIT and "the CUDA context is lost" in done.stdout


def test_a_shard_that_keeps_losing_its_context_stops_after_its_restarts(tmp_path):
    done, tests, events = _run_shards(tmp_path, "False")
    assert done.returncode == CONTEXT_LOST_EXIT
    assert len(tests) == MAX_RESTARTS + 1 and {t["outcome"] for t in tests} == {"failed"}
    assert sum(e["event"] == "context_lost" for e in events) == MAX_RESTARTS + 1


def test_skip_logged_needs_the_results_file(tmp_path):
    (tmp_path / "test_numbered.py").write_text(TESTS.format(failing="True"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.testlog",
                           "--skip-logged", "--rootdir", str(tmp_path), str(tmp_path / "test_numbered.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4 and "--results-jsonl" in done.stdout + done.stderr


def test_report_lists_the_rows_that_lost_the_context_and_the_restarts(tmp_path, capsys):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "stages.jsonl").write_text(json.dumps({"stage": "merge_tiles", "outcome": "failed", "rc": 0,
                                                     "restarts": 1, "rcs": [CONTEXT_LOST_EXIT, 0]}) + "\n")
    log = RowLog(str(folder / "rows.jsonl"), "bench_ops", {"device": "H200"}, "merge_tiles")
    log({"model": "ViT-B-16", "batch": 32, "dtype": "fp16", "layer": 0, "stage": "imgme", "op": "merge_fwd",
         "impl": "triton:merge:16x128x4-g16", "error": "AcceleratorError: an illegal memory access",
         "context_lost": True})
    trained = RowLog(str(folder / "rows.jsonl"), "bench_train", {"device": "H200"}, "train")
    trained({"model": "ViT-B-16", "batch": 32, "precision": "bf16", "mode": "lora", "variant": "TempMe+compile",
             "backend": "triton", "error": "AcceleratorError: an illegal memory access", "context_lost": True})
    assert report.main([str(folder), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "### Rows that lost the CUDA context" in text and "triton:merge:16x128x4-g16" in text
    section = text[text.index("### Rows that lost the CUDA context"):]
    assert "| bench_train |" in section and "TempMe+compile" in section  # every benchmark's rows
    assert "| limit_s | restarts |" in text


@pytest.mark.parametrize("code", [0, 1, CONTEXT_LOST_EXIT])
def test_a_benchmark_ends_with_its_status_and_after_a_lost_context_at_once(code):
    done = subprocess.run([sys.executable, "-c", "import atexit; from benchmarks.context import exit_for_good; "
                           "atexit.register(print, 'torn down'); print('rows kept'); exit_for_good(%d)" % code],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == code and "rows kept" in done.stdout
    assert ("torn down" in done.stdout) == (code != CONTEXT_LOST_EXIT)  # no teardown after a lost context


# On a GPU: a real fault (a device-side assert: an index far out of bounds), not a stand-in for one.
FAULTING_TESTS = """
import torch

def test_0_before():
    assert torch.ones(2, device="cuda").sum().item() == 2

def test_1_fault():
    x = torch.zeros(4, device="cuda")
    x[torch.tensor([1 << 30], device="cuda")].sum().item()

def test_2_after():
    assert torch.ones(2, device="cuda").sum().item() == 2
"""


@pytest.mark.cuda
def test_a_kernel_fault_on_the_gpu_costs_its_shard_one_test(tmp_path):
    """The probe finds the context of a process whose kernel faulted lost, and the test after the fault runs
    (and passes) in a fresh process."""
    path = tmp_path / "test_faulting.py"
    path.write_text(FAULTING_TESTS)
    results = tmp_path / "tests.jsonl"
    done = subprocess.run([sys.executable, "-m", "benchmarks.shards", "1", "--", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.testlog", "--results-jsonl", str(results), "--rootdir", str(tmp_path),
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    outcomes = [(t["nodeid"].split("::")[1], t["outcome"]) for t in lines if "nodeid" in t and "event" not in t]
    assert outcomes == [("test_0_before", "passed"), ("test_1_fault", "failed"), ("test_2_after", "passed")], \
        done.stdout + done.stderr
    assert [e["nodeid"].split("::")[1] for e in lines if e.get("event") == "context_lost"] == ["test_1_fault"]
    assert done.returncode == 1


@pytest.mark.cuda
def test_the_probe_finds_a_healthy_context_not_lost_and_says_what_it_costs():
    from benchmarks.preflight import context_probe

    line = context_probe(probes=20)
    assert line.startswith("ok (host us per probe: "), line


def test_logged_nodeids_leave_out_a_line_cut_off_by_a_kill(tmp_path):
    from benchmarks.testlog import logged_nodeids

    results = tmp_path / "tests.jsonl"
    assert logged_nodeids(str(results)) == set()
    results.write_text('{"nodeid": "tests/a.py::t1", "outcome": "passed"}\n{"env": 1}\n'
                       '{"nodeid": "tests/a.py::t2", "outcome": "failed"}\n{"nodeid": "tests/a.py::t3", "outc')
    assert logged_nodeids(str(results)) == {"tests/a.py::t1", "tests/a.py::t2"}


def test_rows_measured_before_a_stop_reach_the_outputs_written_at_the_end(tmp_path, monkeypatch, capsys):
    """Without --jsonl, a lost context or any error ended bench_ops, bench_model and bench_train without writing
    --out or --json, while the message said that every row was kept and --resume would go on (it refuses to
    without --jsonl)."""
    _lost_on_call(monkeypatch, context, 3)
    out = tmp_path / "ops"
    argv = _ops_argv(str(tmp_path / "x.jsonl"), "--out", str(out))
    argv = argv[:argv.index("--jsonl")] + argv[argv.index("--tag"):]  # (no --jsonl)
    assert bench_ops.main(argv) == CONTEXT_LOST_EXIT
    rows = json.loads((out / "bench_ops.json").read_text())["rows"]
    assert [r.get("context_lost", False) for r in rows] == [False, False, True]
    err = capsys.readouterr().err
    assert f"every row before it is kept (--out {out}): run again (with --jsonl, --resume goes on from a stop)" in err
    monkeypatch.setattr(context, "context_lost", lambda device: False)

    # Any other error (Ctrl-C here) after a row: the row is written, and the error raised again.
    calls = []

    def measured_then_stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return {"ms": 1.0, "gflops_per_video": 1.0}
    monkeypatch.setattr(bench_model, "bench_variant", measured_then_stopped)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        bench_model.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                          "--modes", "infer", "--no-layer-times", "--no-check", "--rep-ms", "1", "--out", str(out)])
    rows = json.loads((out / "bench_model.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["ms"] == 1.0
    assert f"KeyboardInterrupt stopped the run; the rows measured before it are in --out {out}" in \
        capsys.readouterr().err
