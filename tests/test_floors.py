"""benchmarks.floors: the merge + LayerNorm bytes, before and after the fusion."""
from benchmarks import floors
from benchmarks.common import MergeShape


def test_fusion_saves_one_read_of_the_merged_tokens():
    s = MergeShape("ViT-B-16", 16, 0, "imgme", 192, 197, 1, 64, 768, 2)
    saved = floors.norm_step_bytes(s, 2, fused=False) - floors.norm_step_bytes(s, 2, fused=True)
    assert saved == 192 * 195 * 768 * 2


def test_norm_table_covers_every_merge_after_attention():
    text = floors.norm_table("ViT-B-16", 16, "fp16", 3.0e12, 7.9e14)
    rows = [line for line in text.splitlines() if line.startswith("| L")]
    assert [r.split("|")[1].split()[0] for r in rows] == [f"L{i}" for i in range(12)]
    assert "| L0 imgme | 192 x 197 | 2 | 235.8 MB, 78.6 us | 178.3 MB, 59.4 us | 57.5 MB, 19.2 us |" in text
