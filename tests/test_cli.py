import json
import subprocess
import sys

import pytest

from tempme_fast.cli import main
from tiny import TINY_ARGS



def test_bench_on_a_tiny_model(tiny_model_file, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", tiny_model_file, "--batch", "2", "--repeats", "2", "--no-progress",
                 "--json", str(out), *TINY_ARGS]) == 0
    table = capsys.readouterr().out
    assert "open_clip (unmerged)" in table and "TempMe" in table and "speed-up (min-max)" in table
    header = table.splitlines()[0]
    assert "custom schedule (imgme_r=1" in header and "batch of 2 videos" in header and "FLOPs bound" in table
    record = json.loads(out.read_text())
    unmerged, tempme = record["rows"]
    assert unmerged["tokens_per_video"] == 4 * 17 and tempme["tokens_per_video"] < unmerged["tokens_per_video"]
    assert tempme["gflops_per_video"] < unmerged["gflops_per_video"]
    assert tempme["backend"] == "torch" and unmerged["speedup"] == 1.0
    assert tempme["speedup_min"] <= tempme["speedup"] <= tempme["speedup_max"] and tempme["flops_bound"] > 1
    assert isinstance(record["warnings"], list) and record["repeats"] == 2
    assert all(r["latency_ms"] > 0 and r["peak_mem_mb"] > 0 for r in record["rows"])
    assert record["config"]["clip_layers"] == [2, 3]
    # TempMe's count, and what the trimmed last block runs
    assert tempme["gflops_executed"] < tempme["gflops_per_video"]
    assert unmerged["gflops_executed"] == unmerged["gflops_per_video"]
    assert "last block computes only the class tokens" in table


def test_bench_times_the_full_last_block_on_request(tiny_model_file, capsys):
    assert main(["bench", "--model", tiny_model_file, "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--no-progress", "--full-last-block", *TINY_ARGS]) == 0
    rows = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()]
    assert "TempMe" in rows and "TempMe, full last block" in rows


def test_schedule_command(capsys):
    assert main(["schedule"]) == 0
    assert "97 tokens per video (unmerged: 600)" in capsys.readouterr().out


def test_bad_arguments_exit_with_a_message(tiny_model_file, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "--model", tiny_model_file, "--frames", "10", "--no-progress"])
    assert err.value.code == 2
    assert "frames=10 is not divisible by the clip groups (2, 2, 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "no-such-model", "--no-progress", *TINY_ARGS])
    assert "--model 'no-such-model' is not an open_clip model name" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "tempme_fast", "schedule", "--tokens-per-frame", "197"],
                            capture_output=True, text=True, check=True)
    assert "layer  8  clipme" in result.stdout
