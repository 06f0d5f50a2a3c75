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
