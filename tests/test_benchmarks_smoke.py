"""The benchmark scripts run end to end on a CPU at tiny sizes (their real runs are in BENCHMARKS.md)."""
import json

from benchmarks import bench_model, bench_ops
from tiny import TINY_ARGS


def test_bench_ops_smoke(tmp_path, capsys):
    assert bench_ops.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                           "--ops", "match", "merge_fwd", "step_fwdbwd", "--rep-ms", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_ops.json").read_text())["rows"]
    assert {r["stage"] for r in rows} == {"imgme", "cross", "intra"}
    assert all(r["ms"] > 0 and r["gbs"] > 0 and r["impl"] == "torch" for r in rows)
    assert (tmp_path / "bench_ops.csv").exists() and "merge_fwd" in capsys.readouterr().out


def test_bench_model_smoke(tmp_path, tiny_model_file):
    assert bench_model.main(["--device", "cpu", "--models", tiny_model_file, "--batches", "2", "--rep-ms", "1",
                             "--out", str(tmp_path), *TINY_ARGS]) == 0
    record = json.loads((tmp_path / "bench_model.json").read_text())
    variants = {(r["mode"], r["variant"]) for r in record["rows"]}
    assert variants == {(m, v) for m in ("infer", "train") for v in ("open_clip", "tempme-eager", "tempme-torch")}
    assert record["environment"]["torch"]
    layers = json.loads((tmp_path / "bench_layers.json").read_text())["rows"]
    assert len(layers) == 2 * 5  # stem + 4 blocks, unmerged and TempMe
