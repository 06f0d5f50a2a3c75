"""benchmarks.floors: the add + merge + LayerNorm bytes, before and after each fusion."""
import pytest

from benchmarks import floors
from benchmarks.common import MergeShape

SHAPE = MergeShape("ViT-B-16", 16, 0, "imgme", 192, 197, 1, 64, 768, 2)


def test_norm_fusion_saves_one_read_of_the_merged_tokens():
    saved = floors.norm_step_bytes(SHAPE, 2, "unfused") - floors.norm_step_bytes(SHAPE, 2, "fused")
    assert saved == 192 * 195 * 768 * 2


def test_add_fusion_saves_the_sum_written_and_read_back():
    saved = floors.norm_step_bytes(SHAPE, 2, "fused") - floors.norm_step_bytes(SHAPE, 2, "fused_add")
    assert saved == 2 * 192 * 197 * 768 * 2


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant='fast' is not one of"):
        floors.norm_step_bytes(SHAPE, 2, "fast")


def test_norm_table_covers_every_merge_after_attention():
    text = floors.norm_table("ViT-B-16", 16, "fp16", 3.0e12, 7.9e14)
    rows = [line for line in text.splitlines() if line.startswith("| L")]
    assert [r.split("|")[1].split()[0] for r in rows] == [f"L{i}" for i in range(12)]
    # The step reads every head's keys (768 channels), which its match averages as it reads them.
    assert ("| L0 imgme | 192 x 197 | 2 | 463.3 MB, 154.4 us | 405.8 MB, 135.3 us | 289.6 MB, 96.5 us "
            "| 57.6 us, 38.4 us, -0.3 us | 4.6 us | 84.8 us |") in text


def test_add_norm_table_saves_one_read_per_fused_add():
    """Every ops.add_norm of the forward (the MLP residuals not before a join, the last block's two):
    one op saves the read of the sum that a separate LayerNorm makes."""
    text = floors.add_norm_table("ViT-B-16", 16, "fp16", 3.0e12)
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| L")]
    assert rows == [f"L{i} mlp+ln_1" for i in (0, 1, 2, 3, 4, 5, 6, 10)] + ["L11 attn+ln_2", "L11 mlp+ln_post"]
    assert "| L0 mlp+ln_1 | 192 x 195 | 287.5 MB, 95.8 us | 230.0 MB, 76.7 us | 19.2 us |" in text
    assert "| forward total (10 ops) | | 2021.0 MB, 673.7 us | 1616.8 MB, 538.9 us | 134.7 us |" in text
