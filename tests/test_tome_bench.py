"""``tempme bench --image`` on the tiny model: the rows, their order and what they measure."""
import json

from tempme_fast.cli import main


def test_bench_image_rows(tiny_model_file, tmp_path, capsys, one_thread):
    out = tmp_path / "image.json"
    assert main(["bench", "--image", "--model", tiny_model_file, "--device", "cpu", "--batch", "2", "--repeats", "2",
                 "--warmup", "0", "--tome-r", "2", "4", "2", "--backends", "torch", "torch", "--no-progress",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "images/s" in table and "tokens/image" in table and "ToMe r=4" in table
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["open_clip (unmerged)", "ToMe r=2", "ToMe r=4"]  # each r and backend once
    assert json.loads(out.read_text())["command"].startswith("tempme bench --image --model ")
    # 17 tokens per image; r=2 over 4 layers leaves 9; r=4 clamps at the last layer (5 -> 3).
    assert [r["tokens_per_video"] for r in rows] == [17, 9, 3]
    flops = [r["gflops_per_video"] for r in rows]
    assert flops[0] > flops[1] > flops[2] > 0
    assert rows[0]["speedup"] == 1.0 and all(r["videos_per_s"] > 0 for r in rows)


def test_bench_image_interleaves_and_warns_of_noise(tiny_model_file, tmp_path, capsys, one_thread, monkeypatch):
    """It ran the variants in one order every repetition, and never warned when its speed-ups were noise."""
    from tempme_fast.tome import bench

    timed, current = [], []
    real_set = bench._set

    def set_and_note(model, r, backend):
        current[:] = [r]
        return real_set(model, r, backend)

    fake = iter([2.0, 1.0, 3.0, 1.0])  # unmerged 2 ms and ToMe 1 ms, then ToMe 3 ms and unmerged 1 ms: 2x, then 1/3x

    def time_calls(fn, device, calls, warmup):
        if not calls:
            return []
        timed.append(current[0])
        return [next(fake)]
    monkeypatch.setattr(bench, "_set", set_and_note)
    monkeypatch.setattr(bench, "time_calls", time_calls)
    out = tmp_path / "image.json"
    assert main(["bench", "--image", "--model", tiny_model_file, "--device", "cpu", "--batch", "1", "--repeats", "2",
                 "--warmup", "0", "--tome-r", "2", "--backends", "torch", "--no-progress", "--json", str(out)]) == 0
    assert timed == [None, 2, 2, None]  # unmerged first, then ToMe first
    assert "warning: ToMe r=2 (torch): the per-repetition speed-ups range over 0.33-2.00x" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["warnings"] and record["repeats"] == 2 and record["threads"] == 1
    assert set(record["load_average"]) == {"before", "after"}
