"""The shared test kit fails where it should: a NaN, a wrong shape, an error past the dtype's bound."""
import pytest
import torch

from kit import ALL_DTYPES, DTYPES, INT_SENTINEL, REAL_SHAPES, VALUE_TOL, assert_close, nan_output


@pytest.mark.parametrize("dtype", ALL_DTYPES.values(), ids=ALL_DTYPES.keys())
def test_assert_close_takes_the_dtype_bound_and_not_more(dtype):
    want = torch.linspace(-3, 3, 7, dtype=torch.float64)
    atol, rtol = VALUE_TOL[dtype]
    within = want + 0.5 * (atol + rtol * want.abs())
    assert_close(within, want, dtype, "within")
    beyond = want.clone()
    beyond[3] += 2 * (atol + rtol * want[3].abs())
    with pytest.raises(AssertionError, match="beyond: max abs diff"):
        assert_close(beyond, want, dtype, "beyond")


def test_assert_close_refuses_nan_and_a_shape_that_only_broadcasts():
    want = torch.zeros(2, 3)
    with pytest.raises(AssertionError, match="never written"):
        assert_close(torch.full((2, 3), float("nan")), want, torch.float32, "x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(1, 3), want, torch.float32, "x")


def test_nan_output_matches_no_result():
    for dtype in DTYPES.values():
        assert nan_output((2, 3), dtype, "cpu").isnan().all()
    ints = nan_output((4,), torch.int64, "cpu")
    assert ints.dtype == torch.int64 and (ints == INT_SENTINEL).all()
    assert (nan_output((4,), torch.int32, "cpu") < -(2 ** 20)).all()


def test_real_shapes_are_valid_merges():
    for param in REAL_SHAPES:
        b, n, c, ch, r = param.values
        assert b > 0 and ch > 0 and 0 < r <= (n - c) // 2, param.id
