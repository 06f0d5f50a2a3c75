"""The GPU suite's machinery on a CPU: one deadline, rows kept as measured, an archive that holds them.

The stages here are stubs (a few lines of Python) so the tests take seconds; the real stage list is
checked for shape only.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from benchmarks.common import Compiled
from benchmarks.rowlog import RowLog, read_rows
from benchmarks.suite import DEFAULT_BUDGET_S, ENCODER_MERGE_TILES, ENCODER_NORM_TILES, MERGE_TILES, NORM_TILES, \
    ROOT, Archiver, Stage, gpu_stages, plan_text, run_suite, select_stages, triton_cache_entries
from benchmarks.suite import main as suite_main
from kit import Parsed, process_env, stop_at_parse

# A benchmark that never ends: one row every 50 ms through the real row log.
SLOW_ROWS = """
import os, sys, time
from benchmarks.rowlog import RowLog
log = RowLog(sys.argv[1], "stub", {"device": "stub"}, "slow")
i = 0
while True:
    log({"i": i, "pid": os.getpid()}); i += 1; time.sleep(0.05)
"""


def _members(archive):
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_a_stage_stopped_by_the_deadline_keeps_its_rows_in_the_archive(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "suite.tar.gz"
    rows = str(out / "rows.jsonl")
    stages = [
        Stage("slow", [sys.executable, "-c", SLOW_ROWS, rows], cap=100),
        Stage("never", [sys.executable, "-c", "print('unreachable')"], cap=100),
        Stage("last", [sys.executable, "-c", "print('plots here')"], cap=1.5, final=True),
    ]
    t0 = time.time()
    status = run_suite(str(out), stages, deadline=t0 + 5, archive=str(archive), every=0.5, min_stage_s=0.5)
    elapsed = time.time() - t0
    assert status == 1
    assert elapsed < 5 + 2  # the deadline holds: the final stage's time was kept back from the slow one
    files = _members(archive)
    assert set(files) == {"out/rows.jsonl", "out/stages.jsonl", "out/suite.log"}
    kept = [json.loads(line) for line in files["out/rows.jsonl"].splitlines()]
    assert kept[0]["environment"] == {"device": "stub"}
    assert [r["i"] for r in kept[1:]] == list(range(len(kept) - 1)) and len(kept) > 3
    assert all(r["bench"] == "stub" and r["tag"] == "slow" for r in kept[1:])
    stages_run = [json.loads(line) for line in files["out/stages.jsonl"].splitlines()]
    assert [(s["stage"], s["outcome"]) for s in stages_run] == [("slow", "timeout"), ("never", "skipped"),
                                                                ("last", "ok")]
    assert 3.0 < stages_run[0]["limit_s"] <= 3.5  # 5 s less the 1.5 s kept for the final stage
    assert "plots here" in files["out/suite.log"] and "unreachable" not in files["out/suite.log"]
    assert not os.path.exists(str(archive) + ".part")


def test_each_stage_records_what_it_added_to_the_triton_cache(tmp_path, monkeypatch):
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    add = "import os, sys; [os.makedirs(os.path.join(sys.argv[1], f'k{i}')) for i in range(int(sys.argv[2]))]"
    stages = [Stage("three", [sys.executable, "-c", add, str(cache), "3"], cap=30),
              Stage("none", [sys.executable, "-c", "pass"], cap=30)]
    out = tmp_path / "out"
    assert run_suite(str(out), stages, deadline=time.time() + 60, min_stage_s=0.5) == 0
    records = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [r["triton_cache_new"] for r in records] == [3, 0]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "absent"))
    assert triton_cache_entries() is None


def test_the_archive_is_current_while_a_stage_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    archive = str(tmp_path / "a.tar.gz")
    log = RowLog(str(out / "rows.jsonl"), "stub", {})
    archiver = Archiver(str(out), archive, every=0.05)
    try:
        log({"i": 0})
        for _ in range(100):  # up to 5 s for a snapshot that holds the row
            time.sleep(0.05)
            if os.path.exists(archive) and '"i": 0' in _members(archive).get("out/rows.jsonl", ""):
                break
        else:
            pytest.fail("no snapshot of the archive holds the row written before it")
    finally:
        archiver.close()


def test_a_cut_off_last_line_is_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    log = RowLog(str(path), "bench_ops", {"device": "x"}, "t")
    log({"ms": 1.0})
    with open(path, "a") as f:
        f.write('{"bench": "bench_ops", "ms": 2')  # a process killed mid-write
    assert read_rows(str(path)) == [{"bench": "bench_ops", "tag": "t", "ms": 1.0}]
    assert read_rows(str(path), "bench_model") == []


def test_each_shape_compiles_afresh_past_the_recompile_limit():
    """Nine shapes through functions of one code object: without a reset, Dynamo stops compiling at 8."""
    import torch

    for n in range(1, 10):
        compiled = Compiled(lambda t: t * 2 + 1, backend="eager")
        assert torch.equal(compiled(torch.ones(n)), torch.full((n,), 3.0))
        assert compiled.record() == {"compiled": True, "compiled_graphs": 1, "compile_backend": "eager"}


def test_pytest_results_are_written_one_line_per_test(tmp_path):
    (tmp_path / "test_stub.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skipped(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('setup broke')\n"
        "def test_setup_error(broken): pass\n")
    results = tmp_path / "tests.jsonl"
    env = process_env()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.testlog",
                    "--results-jsonl", str(results), "test_stub.py"], cwd=tmp_path, env=env, capture_output=True,
                   timeout=120)
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "finish"
    outcomes = {r["nodeid"].split("::")[1]: r["outcome"] for r in lines[1:-1]}
    assert outcomes == {"test_ok": "passed", "test_bad": "failed", "test_skipped": "skipped",
                        "test_setup_error": "error"}
    assert "one is not two" in next(r["reason"] for r in lines if r.get("nodeid", "").endswith("test_bad"))
    assert lines[-1]["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}


def test_the_stage_list_puts_the_headline_first_then_the_merge_sweeps_the_profile_and_the_tests(tmp_path):
    stages = gpu_stages(str(tmp_path))
    names = [s.name for s in stages]
    assert names[:14] == ["preflight", "warm", "model_headline", "ops_headline", "merge_scaling", "merge_tiles",
                          "norm_tiles", "norm1_tiles", "encoder_tiles", "profile", "attention", "kernel_tests",
                          "cuda_tests", "model_tests"]
    # Then the 16-bit match's tiles (its joins ran at 0.15-0.28 of the copy), the plan's paths (its last program
    # shortened since the third run), the attention's.
    assert names[14:17] == ["match_tiles", "plan_paths", "attention_tiles"]
    assert names[-1] == "plots" and stages[-1].final and not any(s.final for s in stages[:-1])
    # The warm-up compiles what the benchmarks launch: every model, batch and dtype they run.
    warm = stages[1].argv
    values = lambda argv, option: argv[argv.index(option) + 1:next(  # noqa: E731
        (i for i in range(argv.index(option) + 1, len(argv)) if argv[i].startswith("--")), len(argv))]
    for s in stages:
        if "benchmarks.bench_model" in s.argv or "benchmarks.bench_ops" in s.argv:
            assert set(values(s.argv, "--models")) <= set(values(warm, "--models")), s.name
            assert set(values(s.argv, "--batches")) <= set(values(warm, "--batches")), s.name
            assert set(values(s.argv, "--dtypes")) <= set(values(warm, "--dtypes")), s.name
    # The merge forward at a second batch beside the headline's, for the report's fixed cost and rate per byte.
    scaling = stages[names.index("merge_scaling")].argv
    assert values(scaling, "--models") == values(stages[3].argv, "--models") and values(scaling, "--batches") == ["8"]
    assert values(scaling, "--ops") == ["merge_fwd"] and values(scaling, "--impls") == ["triton"]
    headline = stages[2].argv
    assert headline[headline.index("--batches") + 1:headline.index("--batches") + 3] == ["1", "16"]
    assert {"tempme-eager", "tempme-torch", "tempme-triton", "tempme-triton+graph"} <= set(headline)
    profile = stages[names.index("profile")].argv
    assert profile[profile.index("--cases") + 1:profile.index("--cases") + 3] == ["ViT-B-16:16", "ViT-B-32:1"]
    model_tests = stages[names.index("model_tests")].argv
    assert {"tests/test_graphs.py", "tests/test_model_triton.py", "tests/test_attention.py"} <= set(model_tests)
    # The merge sweeps at one video, and a second time at 32 videos at layers 8-10, run on the encoder's own plans;
    # their candidates are the random sweeps' (which benchmarks.warm compiles), each at the op it tiles.
    for name in ("norm1_tiles", "encoder_tiles"):
        assert values(stages[names.index(name)].argv, "--plans") == ["encoder"], name
    encoder = stages[names.index("encoder_tiles")].argv
    assert values(encoder, "--layers") == ["8", "9", "10"] and values(encoder, "--batches") == ["32"]
    assert values(encoder, "--ops") == ["merge_fwd", "step_norm_fwd", "join_norm_fwd"]
    for name in ("norm_tiles", "norm1_tiles"):  # the merges with their LayerNorm: after attention and at the joins
        assert values(stages[names.index(name)].argv, "--ops") == ["step_norm_fwd", "join_norm_fwd"], name
    assert set(values(encoder, "--tiles")) == set(ENCODER_MERGE_TILES + ENCODER_NORM_TILES)
    assert set(ENCODER_MERGE_TILES) <= set(MERGE_TILES) and set(ENCODER_NORM_TILES) <= set(NORM_TILES)
    # Right after the training rows, the profile of training calls says where their time goes.
    assert names.index("profile_train") == names.index("model_train") + 1
    assert values(stages[names.index("profile_train")].argv, "--modes") == ["train"]
    for s in stages:
        if "benchmarks.bench_" in " ".join(s.argv) or "benchmarks.profile" in s.argv or "benchmarks.warm" in s.argv:
            assert s.argv[s.argv.index("--jsonl") + 1] == str(tmp_path / "rows.jsonl")
        assert 0 < s.expect <= s.cap  # every stage has a measured or estimated duration within its limit
    # A first call with the default budget is expected to finish the headline and the merge sweeps.
    assert sum(s.expect for s in stages[:names.index("profile")]) + stages[-1].expect <= DEFAULT_BUDGET_S
    cpu = gpu_stages(str(tmp_path), device="cpu")
    assert all("triton" not in s.argv for s in cpu)  # no Triton impl asked for where it would be interpreted
    assert "warm" not in [s.name for s in cpu]  # nothing to compile for on a CPU


def test_every_stage_parses_its_options_and_names_tests_that_exist(tmp_path, monkeypatch):
    """A stage whose module refuses its options, or that runs a test file or test that is not there, would spend
    its share of a GPU run on an error: each stage's command goes through its module's own parser (stopped
    there), and each test path and test name it gives exists."""
    stop_at_parse(monkeypatch)
    checked = set()
    for s in gpu_stages(str(tmp_path)):
        assert s.argv[1] == "-m" and s.argv[2].startswith("benchmarks."), s.name
        module, args = s.argv[2], s.argv[3:]
        if module == "benchmarks.shards":
            for arg in args[args.index("--") + 1:]:
                path, _, test = arg.removeprefix("--ignore=").partition("::")
                if not path.startswith("tests"):
                    continue
                assert os.path.exists(os.path.join(ROOT, path)), (s.name, arg)
                if test:
                    with open(os.path.join(ROOT, path)) as f:
                        assert f"def {test}(" in f.read(), (s.name, arg)
        # A resumable stage's restart after a lost CUDA context adds --resume (benchmarks.suite.run_resuming).
        for extra in ([], ["--resume"]) if s.resumable else ([],):
            try:
                importlib.import_module(module).main([*args, *extra])
            except Parsed:
                checked.add(module)
                continue
            except SystemExit as e:
                pytest.fail(f"stage {s.name}: {module} refused its options {extra} (exit {e.code})")
            pytest.fail(f"stage {s.name}: {module} ran past its parser")
    assert {"benchmarks.bench_ops", "benchmarks.bench_model", "benchmarks.shards", "benchmarks.warm"} <= checked
    assert {s.name for s in gpu_stages(str(tmp_path)) if s.resumable} >= {"ops_headline", "model_headline", "profile",
                                                                         "attention", "train_step"}


def test_every_measuring_stage_passes_its_modules_checks_on_a_gpu(tmp_path, monkeypatch, capsys):
    """Past the parser each script checks what the parser cannot (the schedule, the models, ``--compile-at`` against
    its sweep, ``--layers``, the output paths): a stage refused there would also spend its share of a GPU run on
    an error. Each measuring stage runs here as on the GPU (its device taken as CUDA) up to the environment
    record that every script makes just before its first measurement."""
    import torch

    class Checked(Exception):
        pass

    def environment(*args, **kwargs):
        raise Checked

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "a GPU")
    checked = set()
    for s in gpu_stages(str(tmp_path)):
        module = importlib.import_module(s.argv[2])
        if not hasattr(module, "environment"):  # (tests, warm-up, preflight, plots: no such checks)
            continue
        monkeypatch.setattr(module, "parsed_device", lambda parser, name: torch.device("cuda"), raising=False)
        monkeypatch.setattr(module, "environment", environment)
        for extra in ([], ["--resume"]) if s.resumable else ([],):
            try:
                module.main([*s.argv[3:], *extra])
            except Checked:
                checked.add(s.name)
                continue
            except SystemExit as e:
                pytest.fail(f"stage {s.name}: {s.argv[2]} refused its options {extra} (exit {e.code}): "
                            f"{capsys.readouterr().err.strip().splitlines()[-1:]}")
            pytest.fail(f"stage {s.name}: {s.argv[2]} measured nothing")
    assert {"model_headline", "ops_headline", "merge_tiles", "profile", "attention", "train_step"} <= checked


def test_only_and_skip_pick_stages_and_refuse_unknown_names(tmp_path):
    stages = gpu_stages(str(tmp_path))
    picked = select_stages(stages, skip=["preflight", "model_headline", "plots"])
    assert [s.name for s in picked] == [s.name for s in stages if s.name not in ("preflight", "model_headline",
                                                                                  "plots")]
    assert [s.name for s in select_stages(stages, only=["plots", "profile"], skip=["plots"])] == ["profile"]
    with pytest.raises(ValueError, match=r"--skip: unknown stage\(s\) \['nope'\]; valid: \['preflight'"):
        select_stages(stages, skip=["nope"])
    with pytest.raises(ValueError, match="--only: unknown"):
        select_stages(stages, only=["profile", "bogus"])


def test_the_plan_sets_expected_seconds_against_the_budget():
    stages = [Stage("a", [], cap=100, expect=60), Stage("b", [], cap=100, expect=50),
              Stage("c", [], cap=100, expect=30), Stage("plots", [], cap=20, final=True, expect=10)]
    text = plan_text(stages, budget=125)
    lines = {line.split()[0]: line for line in text.splitlines()[1:-1]}
    assert "past the budget" not in lines["a"] and "past the budget" not in lines["b"]  # 60 + 50 + 10 kept back
    assert "past the budget" in lines["c"]
    assert "kept back" in lines["plots"]
    assert text.splitlines()[-1] == ("plan: 150 s expected, 320 s of caps, against a budget of 125 s: 25 s over; "
                                     "the stages past the budget are expected not to run")
    assert plan_text(stages, budget=150).splitlines()[-1].endswith("against a budget of 150 s")


def test_the_suite_prints_its_plan_and_skips(tmp_path, capsys):
    assert suite_main([str(tmp_path / "o"), "--list", "--budget", "450", "--skip", "other_tests"]) == 0
    text = capsys.readouterr().out
    assert "profile " in text and "other_tests" not in text
    assert "against a budget of 45" in text  # 450 s less the moment it took to get there
    with pytest.raises(SystemExit):
        suite_main([str(tmp_path / "o"), "--list", "--skip", "nope"])
    assert "--skip: unknown stage(s) ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_suite_sh_runs_a_stage_and_archives(tmp_path):
    """The shell wrapper end to end: options, setup lines, one real stage (the preflight), the archive."""
    out, archive = tmp_path / "out", tmp_path / "r.tar.gz"
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--budget", "300",
                           "--archive", str(archive), "--device", "cpu", "--only", "preflight", str(out)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    files = _members(archive)
    facts = files["out/environment.txt"]
    for key in ("python:", "torch:", "triton:", "C compiler:", "Python.h:", "torchvision:", "timm:",
                "triton launch:", "context probe: skipped (no CUDA device)"):
        assert key in facts
    assert "$TRITON_INTERPRET: unset" in facts  # the wrapper clears it
    assert "[setup] open_clip" in files["out/suite.log"]


@pytest.mark.parametrize("order", ["out-first", "out-last", "wheels-after-out"])
def test_gpu_suite_sh_takes_stage_names_only_after_only(tmp_path, order):
    """--only and --skip take the lower-case words after them, never OUTDIR or the wheels folder: OUTDIR
    after --only once became a stage name, and a last stage name the wheels folder."""
    out, wheels = str(tmp_path / "out"), str(tmp_path / "wheels")
    only = ["--only", "preflight", "plots"]
    argv = {"out-first": [out, *only], "out-last": [*only, out],
            "wheels-after-out": [*only, out, wheels]}[order]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--device", "cpu", "--list",
                           *argv], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    words = [line.split() for line in done.stdout.splitlines()]
    listed = [w[0] for w in words if w[1:2] == ["cap"] and w[0] != "stage"]  # not the plan's header
    assert listed == ["preflight", "plots"]
    assert os.path.isdir(out)


def test_gpu_suite_sh_refuses_a_bad_budget(tmp_path):
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--budget", "-5",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--budget -5" in done.stderr


def test_report_tables_come_from_the_archive(tmp_path, capsys):
    from benchmarks import report

    out = tmp_path / "run"
    out.mkdir()
    (out / "environment.txt").write_text("gpu 0: NVIDIA H100 80GB HBM3, sm_90\ntorch: 2.11.0 at /x\n"
                                         "context probe: ok (host us per probe: 21.5)\n")
    (out / "stages.jsonl").write_text(json.dumps({"stage": "ops_headline", "outcome": "timeout", "rc": -15,
                                                  "seconds": 60.2, "limit_s": 60}) + "\n")
    ops = RowLog(str(out / "rows.jsonl"), "bench_ops", {"device": "H100"}, "headline")
    ops({"op": "copy", "impl": "torch", "copy_gbs": 2950.0})
    ops({"model": "ViT-B-16", "batch": 32, "op": "step_fwd", "impl": "triton", "ms": 0.25, "compiled": False,
         "speedup_vs_torch": 6.5})
    (out / "tests.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"event": "start"}, {"nodeid": "tests/a.py::t1", "outcome": "passed"},
        {"nodeid": "tests/a.py::t2", "outcome": "failed", "reason": "x"}]) + "\n")
    archive = tmp_path / "run.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname="run")
    assert report.main([str(archive)]) == 0
    text = capsys.readouterr().out
    assert "Card: NVIDIA H100 80GB HBM3, sm_90" in text and "; context probe: ok (host us per probe: 21.5)" in text
    assert "| run | ops_headline | timeout | -15 | 60.2 | 60 |" in text
    assert "2950 GB/s (run, headline)" in text
    # Written before device times existed, on a GPU: its speed-up was the eager one.
    assert "| run | headline | ViT-B-16 | 32 | - | - | - | - | - | step_fwd | triton | False | - | 0.25 | - | - | - " \
           "| - | - | - | 6.5 |" in text
    assert "| tests/a.py | 1 | 1 |" in text and "- tests/a.py::t2: failed" in text


def test_report_reads_what_a_cut_off_archive_holds(tmp_path, capsys):
    """A copy of an archive that stopped early gives the tables of the files before the cut, and a note."""
    from benchmarks import report

    out = tmp_path / "run"
    out.mkdir()
    (out / "environment.txt").write_text("gpu 0: NVIDIA H200, sm_90\n")
    ops = RowLog(str(out / "rows.jsonl"), "bench_ops", {"device": "H200"}, "headline")
    ops({"op": "copy", "impl": "torch", "copy_gbs": 4100.0})
    (out / "zz_padding.bin").write_bytes(os.urandom(200_000))  # incompressible, archived last
    archive = tmp_path / "run.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("environment.txt", "rows.jsonl", "zz_padding.bin"):
            tar.add(out / name, arcname=f"run/{name}")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:100_000])
    assert report.main([str(cut)]) == 0
    captured = capsys.readouterr()
    assert "cut.tar.gz is cut off after 2 entries" in captured.err and "4100 GB/s (run, headline)" in captured.out


def test_a_suite_stopped_from_outside_stops_its_stage_and_archives_a_last_time(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "a.tar.gz"
    driver = (
        "import sys\n"
        "from benchmarks.suite import Stage, run_suite\n"
        f"stage = Stage('slow', [sys.executable, '-c', {SLOW_ROWS!r}, {str(out / 'rows.jsonl')!r}], cap=100)\n"
        f"run_suite({str(out)!r}, [stage], deadline=1e12, archive={str(archive)!r}, every=1000)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT)
    rows = out / "rows.jsonl"
    for _ in range(600):  # the stub's first rows, then stop the suite
        time.sleep(0.05)
        if rows.exists() and len(rows.read_text().splitlines()) >= 3:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    kept = [json.loads(line) for line in _members(archive)["out/rows.jsonl"].splitlines()[1:]]
    assert len(kept) >= 2  # only the last snapshot (every=1000 s) can hold them
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # the stage went down with the suite
        os.kill(kept[0]["pid"], 0)


def _suite_folder(path, card, stages, rows, tests):
    path.mkdir()
    (path / "environment.txt").write_text(f"gpu 0: {card}\ntorch: 2.11.0 at /x\n")
    (path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    log = RowLog(str(path / "rows.jsonl"), "bench_ops", {"device": card}, "headline")
    for bench, row in rows:
        log(row, bench=bench)
    (path / "tests.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tests))


def test_report_joins_the_calls_of_a_session_with_device_columns_and_the_profile(tmp_path, capsys):
    from benchmarks import report

    ops_row = {"model": "ViT-B-16", "batch": 32, "dtype": "fp16", "layer": 10, "stage": "cross", "op": "merge_fwd",
               "impl": "triton", "compiled": False, "ms": 0.6, "device_ms": 0.05, "host_bound": True, "gbs": 2000.0,
               "frac_copy_bw": 0.5, "frac_sized_copy": 0.8, "speedup_vs_torch": 3.0, "speedup_vs_torch_eager": 1.5,
               "agrees": True, "tol_ratio": 0.2, "near_ties": 0}
    # A row written before device times and checks existed: its speed-up is the eager one.
    old_row = {k: v for k, v in ops_row.items()
               if not k.startswith(("device", "host", "speedup_vs_torch_", "agrees", "tol_ratio", "near_ties",
                                     "frac_sized"))}
    wrong_row = {**ops_row, "impl": "triton:merge:8x256x4-s3", "agrees": False, "tol_ratio": 40.0,
                 "disagreement": "x: 40x its tolerance"}
    profile = [{"model": "ViT-B-32", "batch": 1, "dtype": "fp16", "variant": "tempme-triton", **r} for r in (
        {"kind": "kernel", "name": "_merge_fwd_kernel", "group": "merge/match", "calls": 15.0, "us": 90.0},
        {"kind": "kernel", "name": "sm90_xmma_gemm", "group": "GEMM", "calls": 48.0, "us": 400.0},
        {"kind": "group", "group": "GEMM", "calls": 48.0, "us": 400.0, "share": 0.8},
        {"kind": "group", "group": "merge/match", "calls": 15.0, "us": 90.0, "share": 0.2},
        {"kind": "forward", "wall_ms": 18.2, "kernel_ms": 0.49, "host_ms": 17.71, "launches": 63.0})]
    _suite_folder(tmp_path / "call1", "NVIDIA H200, sm_90",
                  [{"stage": "cuda_tests", "outcome": "timeout", "rc": -15, "seconds": 100.2, "limit_s": 100}],
                  [("bench_ops", old_row)],
                  [{"nodeid": "tests/a.py::t1", "outcome": "failed", "reason": "x"}])
    _suite_folder(tmp_path / "call2", "NVIDIA H200, sm_90",
                  [{"stage": "warm", "outcome": "ok", "rc": 0, "seconds": 21.0, "limit_s": 90,
                    "triton_cache_new": 374},
                   {"stage": "profile", "outcome": "ok", "rc": 0, "seconds": 30.0, "limit_s": 70,
                    "triton_cache_new": 2}],
                  [("warm", {"arch": 90, "jobs": 16, "variants": 187, "compiled": 187, "cache_hits": 0, "failed": 0,
                             "seconds": 20.5, "compile_s": 240.0, "stubs": True})]
                  + [("bench_ops", ops_row), ("bench_ops", wrong_row)] + [("profile", r) for r in profile],
                  [{"nodeid": "tests/a.py::t1", "outcome": "passed"},
                   {"nodeid": "tests/b.py::t2", "outcome": "passed"}])
    assert report.main([str(tmp_path / "call1"), str(tmp_path / "call2"), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("## GPU results: NVIDIA H200, sm_90\n")
    assert "| call1 | cuda_tests | timeout | -15 | 100 | 100 | - |" in text
    assert "| call2 | warm | ok | 0 | 21 | 90 | 374 |" in text and "| call2 | profile | ok | 0 | 30 | 70 | 2 |" in text
    assert "| call2 | 90 | 16 | 187 | 187 | 0 | 0 | 20.5 | 240 | True |" in text
    # The first call's row has no device time: dashes, never a number made up from the eager time.
    assert "| call1 | headline | ViT-B-16 | 32 | fp16 | 10 | cross | - | - | merge_fwd | triton | False | - | 0.6 " \
           "| - | - | 2e+03 | 0.5 | - | - | 3 |" in text
    assert "| call2 | headline | ViT-B-16 | 32 | fp16 | 10 | cross | - | - | merge_fwd | triton | False | True " \
           "| 0.6 | 0.05 | True | 2e+03 | 0.5 | 0.8 | 3 | 1.5 |" in text
    # A row whose result was wrong is listed apart, with what failed.
    assert "### Rows that do not agree with their reference" in text
    assert "| call2 | headline | ViT-B-16 | 32 | fp16 | - | 10 | merge_fwd | - | triton:merge:8x256x4-s3 | - | - " \
           "| x: 40x its tolerance |" in text
    assert "### Where the forward's time goes" in text
    assert "| call2 | ViT-B-32 | 1 | fp16 | tempme-triton | - | 18.2 | 0.49 | 17.7 | 63 | 0.4 | 0.09 |" in text
    assert "| call2 | ViT-B-32 | 1 | fp16 | tempme-triton | - | sm90_xmma_gemm | GEMM | 48 | 400 |" in text
    # A test that failed in the first call and passed in the second counts once, as passed.
    assert "| tests/a.py | 1 |" in text and "| tests/b.py | 1 |" in text and "t1: failed" not in text
    assert report.main([str(tmp_path / "call1"), "--tags", "compiled"]) == 0
    assert "Merge ops" not in capsys.readouterr().out


def test_report_refuses_a_source_that_is_neither_folder_nor_archive(tmp_path, capsys):
    from benchmarks import report

    (tmp_path / "x.txt").write_text("not an archive")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "x.txt")])
    assert "neither a folder nor a .tar.gz archive" in capsys.readouterr().err


@pytest.mark.parametrize("line, fallback", [("ok (host us per launch: Triton's path 9.0, cached 4.0)", False),
                                            ("skipped (no CUDA device)", False),
                                            ("WRONG RESULT (x = 7, expected 8040)", True)])
def test_a_preflight_without_a_working_cached_launch_sends_later_stages_through_triton(tmp_path, monkeypatch, line,
                                                                                       fallback):
    monkeypatch.setenv("TEMPME_FAST_CACHED_LAUNCH", "1")  # restored after the test, whatever the suite sets
    out = tmp_path / "out"
    env_file = str(out / "environment.txt")
    write = f"open({env_file!r}, 'w').write('triton launch: ok\\ncached launch: ' + {line!r} + '\\n')"
    seen = "import os; print('launch env', os.environ.get('TEMPME_FAST_CACHED_LAUNCH'))"
    stages = [Stage("preflight", [sys.executable, "-c", write], cap=30),
              Stage("next", [sys.executable, "-c", seen], cap=30)]
    assert run_suite(str(out), stages, deadline=time.time() + 60, min_stage_s=0.5) == 0
    log = (out / "suite.log").read_text()
    assert ("launch env 0" in log) == fallback and ("launch env 1" in log) != fallback
    assert ("TEMPME_FAST_CACHED_LAUNCH=0 from here" in log) == fallback


def test_report_picks_the_fastest_candidate_that_agrees(tmp_path, capsys):
    """A sweep's winner per shape is the fastest candidate that agrees with float64: a faster one that does
    not agree never wins, and its total is marked as not agreeing."""
    from benchmarks import report

    def row(layer, impl, device_ms, agrees=True):
        return ("bench_ops", {"model": "ViT-B-16", "batch": 32, "dtype": "fp16", "layer": layer, "stage": "cross",
                              "op": "merge_fwd", "impl": impl, "ms": 1.0, "device_ms": device_ms, "agrees": agrees,
                              "frac_copy_bw": 0.1 / device_ms})
    rows = [row(8, "triton", 0.2), row(8, "triton:merge:8x256x4", 0.1), row(8, "triton:merge:16x128x4-s3", 0.15),
            row(10, "triton", 0.1), row(10, "triton:merge:8x256x4", 0.05, agrees=False),
            row(10, "triton:merge:16x128x4-s3", 0.08)]
    _suite_folder(tmp_path / "sweep", "NVIDIA H200, sm_90", [], rows, [])
    per_shape, summed = report.sweep_tables(report.load(str(tmp_path / "sweep"), "s").rows)
    assert [(e["layer"], e["best"]) for e in per_shape] == [(8, "merge:8x256x4"), (10, "merge:16x128x4-s3")]
    assert per_shape[0]["speedup"] == pytest.approx(2.0) and per_shape[1]["best_frac_copy_bw"] == pytest.approx(1.25)
    assert [(t["candidate"], t["shapes"], t["agrees"]) for t in summed] == [("merge:8x256x4", 2, False),
                                                                           ("merge:16x128x4-s3", 2, True)]
    assert summed[1]["speedup"] == pytest.approx(0.3 / 0.23)
    assert report.main([str(tmp_path / "sweep"), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "### Tile sweeps (bench_ops --tiles): the fastest candidate per shape" in text
    assert "| sweep | headline | ViT-B-16 | 32 | fp16 | 10 | cross | - | - | merge_fwd | 0.1 " \
           "| merge:16x128x4-s3 | 0.08 " \
           "| 1.25 | 1 | 1.25 |" in text


def test_report_reads_out_the_attention_sweep(tmp_path, capsys):
    """The attention tile sweep reads out like the merge ones: per shape the fastest agreeing candidate against
    the library's tiles, beside SDPA without a bias; rows of the attention stage (another tag) stay out of it."""
    from benchmarks import report

    def row(layer, impl, device_ms, agrees=True, tag="attention_tiles"):
        return ("attention", {"tag": tag, "model": "ViT-B-16", "batch": 16, "dtype": "fp16", "layer": layer,
                              "mode": "fwd", "impl": impl, "ms": 1.0, "device_ms": device_ms, "agrees": agrees})
    rows = [row(1, "sdpa-nobias", 0.12), row(1, "triton", 0.29), row(1, "triton:128x64x8x3", 0.2),
            row(1, "triton:64x32x4x2", 0.1, agrees=False), row(8, "sdpa-nobias", 0.07), row(8, "triton", 0.15),
            row(8, "triton:128x64x8x3", 0.16), row(8, "triton:64x32x4x2", 0.12),
            row(8, "triton", 0.01, tag="attention")]
    _suite_folder(tmp_path / "att", "NVIDIA H200, sm_90", [], rows, [])
    per_shape, summed = report.sweep_tables(report.load(str(tmp_path / "att"), "s").rows, "attention")
    assert [(e["layer"], e["best"], e["nobias_ms"]) for e in per_shape] == [(1, "128x64x8x3", 0.12),
                                                                           (8, "64x32x4x2", 0.07)]
    assert per_shape[0]["library_ms"] == 0.29 and per_shape[1]["speedup"] == pytest.approx(1.25)
    assert [(t["candidate"], t["mode"], t["agrees"]) for t in summed] == [("64x32x4x2", "fwd", False),
                                                                         ("128x64x8x3", "fwd", True)]
    assert summed[1]["speedup"] == pytest.approx(0.44 / 0.36)
    assert report.main([str(tmp_path / "att"), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "### Tile sweeps (bench_attention --fwd-tiles): the fastest candidate per shape" in text
    assert "Tile sweeps (bench_ops" not in text


def test_report_reads_the_gpu_targets_from_the_rows(tmp_path, capsys):
    """Each target from its rows: the weakest shape decides; the sweep's best agreeing tiles per shape are read
    beside the library's; a target without rows is `not measured`, never met; rows on the encoder's plans are not
    the targets'."""
    from benchmarks import report

    def op(layer, stage, name, impl, **values):
        return ("bench_ops", {"model": "ViT-B-16", "batch": 32, "dtype": "fp16", "layer": layer, "stage": stage,
                              "op": name, "impl": impl, "ms": 0.2, "device_ms": 0.1, "agrees": True, **values})

    def model(batch, variant, ms, speedup=None, bound=1.52):
        return ("bench_model", {"model": "ViT-B-32", "batch": batch, "dtype": "fp16", "mode": "infer",
                                "variant": variant, "ms": ms, "speedup_vs_open_clip": speedup,
                                "flops_bound_speedup": bound})
    rows = [op(0, "imgme", "step_fwd", "triton", speedup_vs_torch=7.6), op(10, "cross", "step_fwd", "triton",
                                                                            speedup_vs_torch=5.4),
            op(0, "imgme", "merge_fwd", "triton", frac_copy_bw=0.40), op(10, "cross", "merge_fwd", "triton",
                                                                         frac_copy_bw=0.15, frac_sized_copy=0.2),
            op(0, "imgme", "merge_fwd", "triton:merge:16x128x4", frac_copy_bw=0.70),
            op(10, "cross", "merge_fwd", "triton:merge:16x128x4", frac_copy_bw=0.65),
            op(10, "cross", "merge_fwd", "triton:merge:8x256x4", frac_copy_bw=0.90, agrees=False),
            # On the encoder's plans (bench_ops --plans encoder): not the targets' rows, which are on random ones.
            op(10, "cross", "merge_fwd", "triton", frac_copy_bw=0.05, plans="encoder"),
            op(10, "cross", "merge_fwd", "triton:merge:8x256x1-p1-c4", frac_copy_bw=0.95, plans="encoder"),
            model(16, "open_clip", 6.7, 1.0, 1.0), model(16, "tempme-triton", 6.75, 0.99),
            model(16, "tempme-triton+graph", 4.77, 1.41), model(1, "open_clip+graph", 1.07, 4.5, 1.0),
            model(1, "tempme-triton+graph", 1.16, 4.2), model(1, "tempme-triton-mean+graph", 1.02, 4.8)]
    _suite_folder(tmp_path / "t", "NVIDIA H200, sm_90", [], rows, [])
    table = report.targets_table(report.load(str(tmp_path / "t"), "t").rows)
    got = [(t["target"].split(",")[0], t["model"], t["measured"] and round(t["measured"], 3), t["status"])
           for t in table]
    assert got == [("merge step vs reference", "ViT-B-16", 5.4, "met"),
                   ("merge forward", "ViT-B-16", 0.15, "missed"),
                   ("merge forward", "ViT-B-16", 0.65, "met"),
                   ("encoder at 16 videos", "ViT-B-32", round(1.41 / 1.52, 3), "met"),
                   ("one video", "ViT-B-32", round(1.07 / 1.02, 3), "met")]
    assert table[0]["where"] == "L10 cross (2 shapes)" and "tempme-triton-mean+graph 1.02 ms" in table[4]["where"]
    # The weakest merge row's share of a copy of its own bytes follows where it is, where it was measured.
    assert table[1]["where"] == "L10 cross (2 shapes); 0.20 of a copy of as many bytes"
    assert table[2]["where"] == "L10 cross (2 shapes)"
    models_only = report.targets_table([dict(r, bench=bench) for bench, r in rows[9:]])
    assert [t["status"] for t in models_only] == ["not measured"] * 3 + ["met", "met"]
    assert report.main([str(tmp_path / "t"), "--markdown"]) == 0
    assert "### GPU targets" in capsys.readouterr().out


def test_report_pairs_the_one_video_times_within_one_run_and_dtype(tmp_path):
    """The one-video target divides open_clip+graph by TempMe's time of the same run and dtype: over two runs
    that each missed it, it divided one run's open_clip+graph by the other's TempMe time and read `met`."""
    from benchmarks import report

    def model(variant, ms, dtype="fp16"):
        return ("bench_model", {"model": "ViT-B-16", "batch": 1, "dtype": dtype, "mode": "infer", "variant": variant,
                                "ms": ms})
    _suite_folder(tmp_path / "a", "NVIDIA H200, sm_90", [], [model("open_clip+graph", 1.0),
                                                              model("tempme-triton-mlp+graph", 1.1),
                                                              model("open_clip+graph", 3.0, "fp32")], [])
    _suite_folder(tmp_path / "b", "NVIDIA H200, sm_90", [], [model("open_clip+graph", 2.0),
                                                              model("tempme-triton+graph", 2.5)], [])
    rows = [r for name in ("a", "b") for r in report.load(str(tmp_path / name), name).rows]
    one = report.targets_table(rows)[-1]
    assert one["target"].startswith("one video") and one["measured"] == pytest.approx(1.0 / 1.1)
    assert one["status"] == "missed"
    assert one["where"] == "a, fp16: tempme-triton-mlp+graph 1.1 ms, open_clip+graph 1 ms"


def test_report_never_sets_an_eager_time_against_a_device_time(tmp_path):
    """A sweep row whose device timing failed (`device_error`, its eager `ms` kept) is compared with nothing:
    its eager time against another row's device time made a speed-up of the host's share. Rows of a run without
    device times (a CPU) are still compared on their wall times."""
    from benchmarks import report

    def op(layer, impl, ms, device_ms=None, plans="random", tag="merge_tiles"):
        timing = {"device_ms": device_ms} if device_ms else {"device_error": "RuntimeError: capture failed"}
        return ("bench_ops", {"tag": tag, "model": "ViT-B-16", "batch": 32, "dtype": "fp16", "layer": layer,
                              "stage": "cross", "plans": plans, "op": "merge_fwd", "impl": impl, "ms": ms,
                              "agrees": True, **timing})
    rows = [op(0, "triton", 0.30), op(0, "triton:merge:a", 0.31, 0.10),  # the library's device time failed
            op(8, "triton", 0.6, 0.2), op(8, "triton:merge:a", 0.5, 0.1), op(8, "triton:merge:b", 0.05),
            op(8, "triton", 0.9, plans="encoder", tag="encoder_tiles"),
            op(8, "triton:merge:a", 0.8, 0.1, plans="encoder", tag="encoder_tiles")]
    _suite_folder(tmp_path / "g", "NVIDIA H200, sm_90", [], rows, [])
    loaded = report.load(str(tmp_path / "g"), "g").rows
    per_shape, summed = report.sweep_tables(loaded)
    assert [(e["layer"], e["best"], e["speedup"]) for e in per_shape] == [(8, "merge:a", pytest.approx(2.0))]
    assert [(t["candidate"], t["shapes"], t["speedup"]) for t in summed] == [("merge:a", 1, pytest.approx(2.0))]
    assert report.plans_table(loaded) == []  # on the encoder's plans the library has no device time
    cpu = [{k: v for k, v in r.items() if not k.startswith("device")} for r in loaded
           if r.get("layer") == 8 and r.get("plans") == "random"]
    per_shape, _ = report.sweep_tables(cpu)
    assert [(e["layer"], e["best"], e["speedup"]) for e in per_shape] == [(8, "merge:b", pytest.approx(12.0))]


def test_report_puts_each_candidate_on_random_and_encoder_plans_side_by_side(tmp_path, capsys):
    """Over the shapes a candidate ran at on both kinds of plans, against the library's rows of the same sweep:
    one that wins on random plans and loses on the encoder's ranks below one that wins a little on both."""
    from benchmarks import report

    def op(tag, layer, stage, impl, ms, plans=None, **values):
        return ("bench_ops", {"model": "ViT-B-16", "batch": 32, "dtype": "fp16", "layer": layer, "stage": stage,
                              "op": "merge_fwd", "impl": impl, "ms": 2 * ms, "device_ms": ms, "tag": tag,
                              **({"plans": plans} if plans else {}), **values})
    rows = [op("merge_tiles", 10, "cross", "triton", 0.10), op("merge_tiles", 10, "cross", "triton:merge:a", 0.05),
            op("merge_tiles", 10, "cross", "triton:merge:b", 0.08),
            op("merge_tiles", 0, "imgme", "triton", 0.20), op("merge_tiles", 0, "imgme", "triton:merge:a", 0.02),
            op("encoder_tiles", 10, "cross", "triton", 0.30, "encoder"),
            op("encoder_tiles", 10, "cross", "triton:merge:a", 0.60, "encoder"),
            op("encoder_tiles", 10, "cross", "triton:merge:b", 0.24, "encoder", agrees=False),
            op("encoder_tiles", 10, "cross", "triton:merge:c", 0.10, "encoder")]  # (c: never on random plans)
    _suite_folder(tmp_path / "p", "NVIDIA H200, sm_90", [], rows, [])
    table = report.plans_table(report.load(str(tmp_path / "p"), "p").rows)
    got = [(t["candidate"], t["shapes"], round(t["random_speedup"], 3), round(t["encoder_speedup"], 3),
            round(t["worst_speedup"], 3), t["agrees"]) for t in table]
    assert got == [("merge:b", 1, 1.25, 1.25, 1.25, False), ("merge:a", 1, 2.0, 0.5, 0.5, True)]
    assert report.main([str(tmp_path / "p"), "--markdown"]) == 0
    assert "### Tile sweeps on random plans and on the encoder's" in capsys.readouterr().out


def test_report_reads_each_shape_across_batches_as_a_fixed_cost_and_a_rate_per_byte(tmp_path, capsys):
    """The line through a shape's two largest batches: 4 us once and 2 TB/s a byte, at a 4 TB/s copy, read back
    as such; a shape timed at one batch, one whose time fell as its bytes grew, and the rows of the reference,
    of sweep candidates, of compiled code and on the encoder's plans are left out."""
    from benchmarks import report

    def op(batch, ms, layer=10, stage="cross", impl="triton", **values):
        mb = 2.0 * batch
        return ("bench_ops", {"model": "ViT-B-16", "batch": batch, "dtype": "fp16", "layer": layer, "stage": stage,
                              "op": "merge_fwd", "impl": impl, "ms": 2 * ms, "device_ms": ms, "bytes": mb * 1e6,
                              "copy_gbs": 4000.0, "frac_copy_bw": mb * 1e6 / (ms * 1e-3) / 4e12, "agrees": True,
                              **values})

    def line(batch):  # 4 us once, then 2 TB/s
        return 4e-3 + 2.0 * batch * 1e6 / 2e12 * 1e3
    rows = [op(1, 0.050), op(8, line(8)), op(32, line(32)),  # (batch 1 is not on the line: only 8 and 32 count)
            op(32, 0.001, impl="torch"), op(32, 0.001, impl="triton:merge:8x256x4"),
            op(32, 0.001, compiled=True), op(32, 0.001, plans="encoder"),
            op(32, line(32), layer=9),  # one batch only
            op(8, 0.050, layer=8), op(32, 0.040, layer=8)]  # time fell
    _suite_folder(tmp_path / "s", "NVIDIA H200, sm_90", [], rows, [])
    table = report.scaling_table(report.load(str(tmp_path / "s"), "s").rows)
    assert [(t["layer"], t["batches"]) for t in table] == [(10, "8,32")]
    got = table[0]
    assert got["fixed_us"] == pytest.approx(4.0) and got["marginal_gbs"] == pytest.approx(2000.0)
    assert got["frac_copy_marginal"] == pytest.approx(0.5) and got["mb"] == pytest.approx(64.0)
    assert got["device_us"] == pytest.approx(line(32) * 1e3)
    assert report.main([str(tmp_path / "s"), "--markdown"]) == 0
    assert "### Merge ops across batch sizes: a fixed cost and a rate per byte" in capsys.readouterr().out


def test_rows_after_a_cut_off_line_start_a_line_of_their_own(tmp_path):
    """A writer killed mid-line leaves a last line without its end: the next RowLog's lines are kept whole,
    and a broken line anywhere but at the end is reported, not dropped without a word."""
    from benchmarks.rowlog import RowLog, read_records

    path = tmp_path / "rows.jsonl"
    path.write_text('{"bench": "x", "row": 1}\n{"bench": "x", "ro')
    assert read_records(str(path)) == [{"bench": "x", "row": 1}]  # a cut-off last line: skipped quietly
    log = RowLog(str(path), "y", {"device": "cpu"})
    log({"row": 2})
    with pytest.warns(UserWarning, match=r"rows.jsonl:2: not a JSON line, skipped"):
        records = read_records(str(path))
    assert [r.get("row") for r in records] == [1, None, 2] and records[1]["environment"] == {"device": "cpu"}
