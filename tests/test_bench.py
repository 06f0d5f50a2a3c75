"""``tempme bench`` stays honest under noise: interleaved variants, ratio-of-pairs speed-ups with their
spread, warnings on a wide spread or a loaded machine."""
import pytest
import torch

from tempme_fast import bench
from tempme_fast.bench import BenchRow, bench_model, noise_warnings, schedule_name
from tempme_fast.config import TempMeConfig
from tiny import TINY_CONFIG, tiny_clip


def test_variants_alternate_and_load_between_repetitions_cancels(monkeypatch, one_thread):
    """Each repetition slows down 3x more than the one before (load arriving); unmerged takes 2 units,
    TempMe 1. Timed in blocks the ratio would follow the load; paired per repetition it is exactly 2."""
    order, model = [], tiny_clip()

    def fake_time_calls(fn, device, repeats, warmup, tick=None):
        if repeats == 0:
            return []
        merged = model.tempme.config.merges
        order.append("T" if merged else "U")
        load = 3.0 ** ((len(order) - 1) // 2)  # the repetition's index
        return [load * (1.0 if merged else 2.0)]

    monkeypatch.setattr(bench, "time_calls", fake_time_calls)
    rows = bench_model(model, TINY_CONFIG, batch=1, device=torch.device("cpu"),
                       dtype=torch.float32, backends=["torch", "torch"], repeats=4, warmup=0, progress=False)
    assert order == ["U", "T", "T", "U", "U", "T", "T", "U"]  # a backend named twice is timed once
    unmerged, tempme = rows
    assert tempme.speedup == pytest.approx(2.0) and tempme.speedup_min == pytest.approx(2.0)
    assert tempme.speedup_max == pytest.approx(2.0) and unmerged.speedup == 1.0
    assert tempme.flops_bound == pytest.approx(unmerged.gflops_per_video / tempme.gflops_per_video)
    assert tempme.flops_bound > 1 and not hasattr(model, "tempme")  # left as it came


def _row(speedup, lo, hi):
    return BenchRow("TempMe", "torch", 97, 69.0, 1.0, 1.0, 1.0, 1.0, 1.0, speedup, lo, hi, lo, hi, 1.5)


def test_noise_warnings():
    base = _row(1.0, 1.0, 1.0)
    quiet = [base, _row(1.5, 1.48, 1.53)]
    assert noise_warnings(quiet, threads=2, load_before=0.1, load_after=2.1, cores=4) == []
    [wide] = noise_warnings([base, _row(1.2, 0.8, 1.5)], threads=2, load_before=0.1, load_after=2.1, cores=4)
    assert "0.80-1.50x" in wide and "noisy" in wide
    # Another process keeps one core busy: 1.0 + our 2 threads on a 2-core machine.
    [loaded] = noise_warnings(quiet, threads=2, load_before=1.0, load_after=3.0, cores=2)
    assert "load average 1.0" in loaded and "0 cores this run left free" in loaded and "2 threads used" in loaded
    [one] = noise_warnings(quiet, threads=1, load_before=2.0, load_after=None, cores=2)
    assert "1 core this run left free" in one and "1 thread used" in one
    assert noise_warnings(quiet, threads=1, load_before=None, load_after=None, cores=2) == []
    # Background noise below half a core, or a load average still decaying from a run just before.
    assert noise_warnings(quiet, threads=2, load_before=0.4, load_after=2.3, cores=2) == []


def test_schedule_names():
    assert schedule_name(TempMeConfig()) == "released schedule"
    assert schedule_name(TempMeConfig(frames=24)) == "released schedule"
    assert schedule_name(TempMeConfig.unmerged(12)) == "no merging"
    assert schedule_name(TINY_CONFIG) == "custom schedule (imgme_r=1, clip_layers=(2, 3), clip_groups=(2, 2))"


def test_cli_warns_on_a_loaded_machine(tiny_model_file, monkeypatch, capsys):
    from tempme_fast.cli import main
    from tiny import TINY_ARGS

    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    assert main(["bench", "--model", tiny_model_file, "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--device", "cpu", "--no-progress", *TINY_ARGS]) == 0
    captured = capsys.readouterr()
    assert "batch of 1 video," in captured.out and "(1 thread)" in captured.out
    assert "warning: load average 64.0 from other processes exceeds" in captured.err
