"""``tempme_fast.compile_kernels``: a patched model's Triton variants recorded on a meta copy and
compiled ahead into Triton's cache.

On the CPU (processes of their own, without ``TRITON_INTERPRET``): the meta recording launches, one
by one, the variants that the model's own forward and backward launch (``benchmarks.host.gpu_like``
runs them on CPU tensors as on CUDA, launches stubbed); a compile for sm_90 fills the cache where a
second call finds every variant, from a script without a main guard. On a GPU (marked ``cuda``):
after compiling ahead, ``encode_video`` and its backward compile nothing.
"""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import tempme_fast
from kit import ROOT, process_env
from tiny import TINY_CONFIG, tiny_clip


def _python(code: str, cache_dir, tmp_path, timeout=600) -> subprocess.CompletedProcess:
    # A process of its own: TRITON_INTERPRET (set by conftest.py) swaps the kernels for the interpreter's.
    script = tmp_path / "script.py"
    script.write_text(code)  # a script without an `if __name__ == "__main__"` guard, as users write them
    env = process_env(False, TRITON_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env["PYTHONPATH"]])
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def binder_api():
    pytest.importorskip("triton")
    from tempme_fast.ops.recording import binder_available

    if not binder_available():
        pytest.skip("this Triton lacks the binder API that compiling ahead goes through")


SAME_AS_THE_RUN = """
import json, torch
import tempme_fast
from benchmarks import host
from tempme_fast.ops.recording import Launch, variant_key
from tempme_fast.precompile import record_launches
from tiny import TINY_CONFIG, tiny_clip

out = []
for dtype in (torch.float16, torch.float32):
    for training in (False, True):
        model = tempme_fast.apply_tempme(tiny_clip().to(dtype), TINY_CONFIG)
        weight = model.visual.conv1.weight
        recorded = record_launches(model, (2,), training=training)
        assert model.visual.conv1.weight is weight and weight.device.type == "cpu"  # the model is not touched
        counts = host.Counts()
        video = torch.randn(2, 4, 3, 32, 32).to(dtype)
        with host.gpu_like(counts):
            with torch.no_grad():
                model.encode_video(video)
            if training:
                model.encode_video(video).sum().backward()
        run = [Launch(k, tuple(g), a, kw) for k, g, a, kw, _ in counts.calls]
        out.append({"dtype": str(dtype), "training": training, "recorded": [list(variant_key(l, 90)) for l in recorded],
                    "run": [list(variant_key(l, 90)) for l in run]})
print(json.dumps(out))
"""


def test_the_meta_recording_launches_what_the_model_launches(binder_api, tmp_path):
    done = _python(SAME_AS_THE_RUN, tmp_path / "cache", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in json.loads(done.stdout.splitlines()[-1]):
        kernels = {key[0] for key in case["recorded"]}
        assert {"_best_match_fwd_kernel", "_merge_fwd_kernel", "_attention_fwd_kernel"} <= kernels, case["dtype"]
        assert ("_merge_bwd_kernel" in kernels) == ("_attention_bwd_kernel" in kernels) == case["training"]
        # Launch for launch: kernel, specialisation (dtypes, alignments, divisibility) and constexprs.
        assert case["recorded"] == case["run"], (case["dtype"], case["training"])


COMPILE_TWICE = """
import json, torch
import tempme_fast
from tiny import TINY_CONFIG, tiny_clip

model = tempme_fast.apply_tempme(tiny_clip().half(), TINY_CONFIG)
first = tempme_fast.compile_kernels(model, batch_sizes=(1, 3), training=True, arch=90, jobs=2)
second = tempme_fast.compile_kernels(model, batch_sizes=(1, 3), training=True, arch=90, jobs=2)
print(json.dumps([first, second]))
"""


def test_compiles_into_the_cache_where_a_second_call_finds_every_variant(binder_api, tmp_path):
    cache = tmp_path / "cache"
    done = _python(COMPILE_TWICE, cache, tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    first, second = json.loads(done.stdout.splitlines()[-1])
    assert first["failed"] == second["failed"] == 0, first["errors"] + second["errors"]
    assert first["variants"] == second["variants"] > 8 and first["launches"] > first["variants"]
    assert first["compiled"] == first["variants"] and first["cache_hits"] == 0
    assert second["cache_hits"] == second["variants"] and second["compiled"] == 0
    assert set(first["by_kernel"]) == {"_best_match_fwd_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel",
                                       "_attention_fwd_kernel", "_attention_bwd_kernel", "_add_norm_fwd_kernel",
                                       "_embed_norm_fwd_kernel"}
    assert first["arch"] == 90 and not first["stubs"]  # no launcher stubs for a GPU that is not here


def test_bad_arguments_name_what_is_valid():
    plain = tiny_clip()
    with pytest.raises(ValueError, match="model is not patched by apply_tempme"):
        tempme_fast.compile_kernels(plain, arch=90)
    with pytest.raises(ValueError, match="backend='torch'"):
        tempme_fast.compile_kernels(tempme_fast.apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch"), arch=90)
    from tempme_fast.precompile import compile_launches, record_launches

    model = tempme_fast.apply_tempme(tiny_clip(), TINY_CONFIG)
    for bad in (0, (), (0,), (1.5,), (True,)):
        with pytest.raises(ValueError, match="batch_sizes="):
            record_launches(model, bad)
    with pytest.raises(ValueError, match="dtype=torch.float64 must be None"):
        record_launches(model, (1,), torch.float64)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1: the kernels are the interpreter's"):
        record_launches(model, (1,))
    # (Under pytest the kernels are the interpreter's: compiling is refused with the reason.)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 .* unset it"):
        tempme_fast.compile_kernels(model, arch=90)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compile_launches([], arch=90)


def test_the_compile_command_refuses_before_building_the_model(tiny_model_file, monkeypatch, capsys):
    """Where nothing can be compiled (here the interpreter) or for an arch below 70, the command stops before it
    builds the model and records its launches (a ViT-L/14 at several batches takes a while), not after."""
    from tempme_fast import loading
    from tempme_fast.cli import main
    from tiny import TINY_ARGS

    monkeypatch.setattr(loading, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (read when compiling; on a GPU machine too)
    for arch, says in (("90", "TRITON_INTERPRET=1 replaces the kernels"), ("7", "arch=7 must be a compute")):
        with pytest.raises(SystemExit) as stop:
            main(["compile", "--model", tiny_model_file, *TINY_ARGS, "--arch", arch])
        assert stop.value.code == 2 and says in capsys.readouterr().err


COMPILE_THEN_RUN = """
import torch
from triton import knobs
import tempme_fast
from tiny import TINY_CONFIG, tiny_clip

model = tempme_fast.apply_tempme(tiny_clip().cuda().half(), TINY_CONFIG)
summary = tempme_fast.compile_kernels(model, batch_sizes=(2,), training=True, jobs=2)
assert summary["failed"] == 0 and summary["compiled"] == summary["variants"] > 8 and summary["stubs"], summary
misses = []
knobs.compilation.listener = lambda **info: misses.append(info["src"].name) if not info["cache_hit"] else None
video = torch.randn(2, 4, 3, 32, 32, device="cuda", dtype=torch.float16)
with torch.no_grad():
    model.encode_video(video)
model.encode_video(video).float().square().sum().backward()
torch.cuda.synchronize()
print("misses", misses)
"""


@pytest.mark.cuda
def test_after_compiling_ahead_encode_video_and_its_backward_compile_nothing(tmp_path):
    done = _python(COMPILE_THEN_RUN, tmp_path / "cache", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "misses []" in done.stdout, done.stdout[-3000:]


def test_while_one_thread_records_the_others_launch_and_run():
    from tempme_fast import ops
    from tempme_fast.ops.recording import Recorder

    metric = torch.randn(3, 21, 8, generator=torch.Generator().manual_seed(0))
    expected = ops.match(metric, 4, 1, backend="triton")
    got = {}
    recorder = Recorder("triton_ops")
    with recorder.active():
        other = threading.Thread(target=lambda: got.update(plan=ops.match(metric, 4, 1, backend="triton")))
        other.start()
        other.join()
        ops.match(metric, 4, 1, backend="triton")  # this thread's: recorded, not run
    assert [launch.kernel.fn.__name__ for launch in recorder.launches] == ["_best_match_fwd_kernel"]
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(got["plan"], name), getattr(expected, name)), name


def _tempme_compile(*argv, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tempme_fast", "compile", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_compile_command(binder_api, tiny_model_file, tmp_path):
    from tiny import TINY_ARGS

    env = process_env(False, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    args = ["--model", tiny_model_file, *TINY_ARGS, "--batch", "1", "2", "--arch", "80", "--jobs", "2"]
    done = _tempme_compile(*args, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert "4 frames, fp16, batch 1 2: " in line and "for sm_80 (" in line and " 0 already cached, 0 failed" in line
    again = _tempme_compile(*args, env=env)
    assert again.returncode == 0 and " 0 compiled, " in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    if not torch.cuda.is_available():
        lines = _tempme_compile("--model", tiny_model_file, *TINY_ARGS, env=env).stderr.strip().splitlines()
        assert lines == ["tempme compile: error: --arch: no CUDA device here; give the compute capability to compile "
                         "for (90: H100 and H200, 80: A100)"], lines
    refused = _tempme_compile(*args, env={**env, "TRITON_INTERPRET": "1"})
    assert refused.returncode == 2 and "tempme compile: error: TRITON_INTERPRET=1" in refused.stderr, refused.stderr
    # A capability no ptxas of Triton's knows: one line (LLVM would abort the process at the first kernel).
    from tempme_fast.precompile import compilable_archs

    for arch in ("71", "200") if compilable_archs() is not None else ():
        refused = _tempme_compile(*args[:-4], "--arch", arch, env=env)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"tempme compile: error: arch={arch}: Triton's ptxas cannot compile for sm_{arch}; valid: 70, " \
               in refused.stderr, refused.stderr


def test_compilable_archs_come_from_the_ptxas_triton_picks():
    from tempme_fast.precompile import compilable_archs

    known = compilable_archs()
    if known is None:
        pytest.skip("this Triton has no readable ptxas")
    assert {70, 75, 80, 86, 89, 90, 100, 120} <= set(known) and not {71, 88, 200} & set(known)
    assert known == sorted(known) and min(known) >= 70


def test_a_worker_that_dies_leaves_its_jobs_failed_with_the_reason():
    from tempme_fast.precompile import _in_processes

    job = (("no_such_kernels_module", "_kernel", (1, 1, 1), (), {}), 90, False)
    results = _in_processes([job, job, job], 2)
    assert [r["ok"] for r in results] == [False] * 3
    for r in results:
        assert r["kernel"] == "_kernel" and r["error"].startswith("worker exited with 1: "), r
        assert "No module named 'no_such_kernels_module'" in r["error"], r


def test_a_result_line_cut_off_by_a_killed_worker_counts_its_job_as_lost(tmp_path):
    """A worker killed while it printed a result left a line that stopped ``tempme compile`` with a
    JSONDecodeError; the line is now left out and its job reported lost, with the worker's exit and error."""
    from tempme_fast.precompile import RESULT, _read_results

    out = tmp_path / "out0"
    out.write_text("ptxas info: something the compiler printed\n"
                   + RESULT + '{"kernel": "_k", "ok": true, "index": 0}\n' + RESULT + '{"kernel": "_k", "o')
    assert _read_results(str(out)) == [{"kernel": "_k", "ok": True, "index": 0}]
