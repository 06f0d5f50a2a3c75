"""Retrieval metrics against hand-computed ranks, ties included, and the dual-softmax re-ranking."""
import numpy as np
import pytest
import torch

from tempme_fast.retrieval.metrics import (dual_softmax, rank_metrics, retrieval_metrics, text_to_video_ranks,
                                           video_to_text_ranks)

# Rows are texts, columns videos; text i belongs to video i.
HAND = np.array([
    [0.9, 0.1, 0.2, 0.3],  # diagonal highest                        -> rank 1
    [0.8, 0.5, 0.7, 0.1],  # 0.8 and 0.7 above 0.5                   -> rank 3
    [0.1, 0.2, 0.3, 0.4],  # 0.4 above 0.3                           -> rank 2
    [0.5, 0.6, 0.7, 0.1],  # everything above 0.1                    -> rank 4
])
# Columns as video queries: video 0 -> 1; video 1: 0.6 above 0.5 -> 2; video 2: 0.7, 0.7 above
# 0.3 -> 3; video 3: 0.3 and 0.4 above 0.1, and text 1 ties at 0.1 -> 4 pessimistic, 3 optimistic.


def clip4clip_style_ranks(sim):
    """Position of the diagonal in each row sorted by decreasing similarity (valid without ties)."""
    order = np.argsort(-sim, axis=1, kind="stable")
    return np.array([int(np.nonzero(order[i] == i)[0][0]) + 1 for i in range(sim.shape[0])])


def test_hand_made_ranks_and_metrics():
    np.testing.assert_array_equal(text_to_video_ranks(HAND), [1, 3, 2, 4])
    np.testing.assert_array_equal(video_to_text_ranks(HAND), [1, 2, 3, 4])
    np.testing.assert_array_equal(video_to_text_ranks(HAND, ties="optimistic"), [1, 2, 3, 3])
    m = retrieval_metrics(HAND)
    assert m["t2v"] == {"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.5, "R-Sum": 225.0}
    assert m["v2t"] == {"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.5, "R-Sum": 225.0}
    assert retrieval_metrics(HAND, ties="optimistic")["v2t"]["MnR"] == 2.25


def test_known_ranks_beyond_ten():
    """A 12x12 matrix built so that text i's video ranks exactly wanted[i]."""
    wanted = np.array([1, 1, 2, 5, 6, 10, 11, 12, 3, 1, 7, 4])
    n = len(wanted)
    sim = np.zeros((n, n))
    for i, r in enumerate(wanted):
        others = [j for j in range(n) if j != i]
        sim[i, others] = np.arange(1, n)  # distinct values 1..11
        sim[i, i] = n - r + 0.5  # exactly r - 1 of the others lie above
    np.testing.assert_array_equal(text_to_video_ranks(sim), wanted)
    np.testing.assert_array_equal(text_to_video_ranks(sim), clip4clip_style_ranks(sim))
    m = rank_metrics(wanted)
    assert m["R@1"] == pytest.approx(100 * 3 / 12)
    assert m["R@5"] == pytest.approx(100 * 7 / 12)
    assert m["R@10"] == pytest.approx(100 * 10 / 12)
    assert m["MdR"] == 4.5
    assert m["MnR"] == pytest.approx(wanted.mean())
    assert m["R-Sum"] == pytest.approx(m["R@1"] + m["R@5"] + m["R@10"])


@pytest.mark.parametrize("n", [1, 7, 50])
def test_agrees_with_the_standard_position_rule_without_ties(n):
    sim = np.random.default_rng(n).standard_normal((n, n))
    np.testing.assert_array_equal(text_to_video_ranks(sim), clip4clip_style_ranks(sim))
    np.testing.assert_array_equal(video_to_text_ranks(sim), clip4clip_style_ranks(sim.T))


def test_ties_rank_pessimistically_by_default():
    sim = np.array([
        [0.5, 0.5, 0.5, 0.9],  # two ties with the diagonal and one above: ranks 2..4 -> 4 (pess.), 2 (opt.)
        [0.1, 0.2, 0.0, 0.0],  # no tie: rank 1
        [0.3, 0.3, 0.3, 0.3],  # all tied: rank 4 (pess.), 1 (opt.)
        [0.0, 0.0, 0.0, 0.0],
    ])
    np.testing.assert_array_equal(text_to_video_ranks(sim), [4, 1, 4, 4])
    np.testing.assert_array_equal(text_to_video_ranks(sim, ties="optimistic"), [2, 1, 1, 1])


def test_a_collapsed_encoder_scores_zero_not_perfect():
    sim = np.full((10, 10), 0.25)
    m = retrieval_metrics(sim)
    for direction in ("t2v", "v2t"):
        assert m[direction]["R@1"] == 0.0 and m[direction]["R@5"] == 0.0 and m[direction]["R@10"] == 100.0
        assert m[direction]["MdR"] == 10.0 and m[direction]["MnR"] == 10.0
    assert retrieval_metrics(sim, ties="optimistic")["t2v"]["R@1"] == 100.0


def test_several_captions_per_video():
    # Texts 0 and 1 describe video 0, text 2 describes video 1.
    sim = np.array([
        [0.2, 0.9],  # text 0: its video 0 ranks 2
        [0.8, 0.1],  # text 1: rank 1
        [0.3, 0.4],  # text 2: video 1 ranks 1
    ])
    targets = [0, 0, 1]
    np.testing.assert_array_equal(text_to_video_ranks(sim, targets), [2, 1, 1])
    # Video 0: its best caption (text 1, 0.8) against text 2 (0.3) -> 1.
    # Video 1: its caption text 2 (0.4) against text 0 (0.9) and text 1 (0.1) -> 2.
    np.testing.assert_array_equal(video_to_text_ranks(sim, targets), [1, 2])


def test_torch_input_and_identity():
    m = retrieval_metrics(torch.eye(5), dsl=True)
    for key in ("t2v", "v2t", "dsl_t2v", "dsl_v2t"):
        assert m[key] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.0, "R-Sum": 300.0}


def test_dual_softmax_values_and_reranking():
    sim = np.array([[0.50, 0.52],
                    [0.20, 0.53]])
    out = dual_softmax(sim, temperature=100.0)
    # Column-wise (over texts) softmax of 100 * sim, times sim.
    col0 = np.exp([50.0, 20.0]) / np.exp([50.0, 20.0]).sum()
    col1 = np.exp([52.0, 53.0]) / np.exp([52.0, 53.0]).sum()
    expected_t2v = sim * np.stack([col0, col1], axis=1)
    np.testing.assert_allclose(out["t2v"], expected_t2v, rtol=1e-12)
    row0 = np.exp([50.0, 52.0]) / np.exp([50.0, 52.0]).sum()
    row1 = np.exp([20.0, 53.0]) / np.exp([20.0, 53.0]).sum()
    np.testing.assert_allclose(out["v2t"], sim.T * np.stack([row0, row1], axis=1), rtol=1e-12)
    # Video 1 is a hub that every text likes; DSL discounts it for text 0.
    m = retrieval_metrics(sim, dsl=True)
    assert m["t2v"]["R@1"] == 50.0
    assert m["dsl_t2v"]["R@1"] == 100.0


@pytest.mark.parametrize("bad, match", [
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "non-finite"),
    (np.ones((2, 3)), "square"),
    (np.ones((0, 0)), "non-empty"),
    (np.ones(4), "2-D"),
])
def test_bad_matrices_are_named(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        retrieval_metrics(bad)
    assert "sim" in str(info.value)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ties"):
        text_to_video_ranks(np.eye(2), ties="average")
    with pytest.raises(ValueError, match="text_to_video"):
        text_to_video_ranks(np.ones((2, 2)), [0, 2])
    with pytest.raises(ValueError, match="no caption"):
        video_to_text_ranks(np.ones((2, 2)), [0, 0])
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(np.eye(2), temperature=0)
    with pytest.raises(ValueError, match="1-based"):
        rank_metrics([0, 1])
