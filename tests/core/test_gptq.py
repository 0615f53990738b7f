"""dsopt.quant.gptq: GPTQ rounding on the grids of dsopt.quant.grid."""

from __future__ import annotations

import numpy as np
import pytest

from dsopt.quant.gptq import (
    Hessian,
    gptq,
    gptq_blocks,
    gptq_matmul_nbits_layout,
    gptq_per_channel,
)
from dsopt.quant.grid import (
    INT8,
    Grid,
    dequantize,
    matmul_nbits_layout,
    per_channel_symmetric,
    quantize_blocks,
    unpack,
)


def _correlated(rng, rows, k):
    mixing = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
    return lambda: rng.standard_normal((rows, k)).astype(np.float32) @ mixing


def _expand(blocked, size, length, axis=0):
    return np.take(np.repeat(blocked, size, axis=axis), np.arange(length), axis=axis)


def test_hessian_accumulates_rows_and_drops_non_finite_ones():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    hessian = Hessian(4)
    hessian.add(x)
    bad = x.copy()
    bad[0, 0, 1] = np.nan
    hessian.add(bad)
    rows = x.reshape(-1, 4).astype(np.float64)
    expected = rows.T @ rows * 2 - np.outer(rows[0], rows[0])
    np.testing.assert_allclose(hessian.matrix, expected, rtol=1e-12)
    assert hessian.rows == 11


def test_diagonal_hessian_per_channel_is_round_to_nearest():
    """Without correlations no error is fed anywhere: per-channel GPTQ is RTN exactly."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 10)).astype(np.float32)
    hessian = np.diag(rng.uniform(0.5, 2.0, 48))
    q, scale, zero = gptq_per_channel(w, 1, INT8, symmetric=True, hessian=hessian)
    q_rtn, scale_rtn = per_channel_symmetric(w, 1)
    assert zero is None
    np.testing.assert_array_equal(q, q_rtn)
    np.testing.assert_array_equal(scale, scale_rtn)


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (2, False)])
def test_blocks_have_the_layout_of_quantize_blocks_and_lower_output_error(bits, symmetric):
    rng = np.random.default_rng(bits)
    k, n, size = 70, 12, 16  # a partial last block
    sample = _correlated(rng, 256, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    hessian = Hessian(k)
    hessian.add(sample())
    grid = Grid(bits, symmetric)
    q, scale, zero = gptq_blocks(w, 0, size, grid, symmetric=symmetric, hessian=hessian.matrix)
    q_rtn, scale_rtn, zero_rtn = quantize_blocks(w, 0, size, grid, symmetric=symmetric)
    assert q.dtype == q_rtn.dtype and q.shape == q_rtn.shape
    assert scale.dtype == np.float32 and scale.shape == scale_rtn.shape == (5, n)
    assert (zero is None) == (zero_rtn is None)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    full_zero = 0 if zero is None else _expand(zero, size, k)
    restored = dequantize(q, _expand(scale, size, k), full_zero)
    rtn_zero = 0 if zero_rtn is None else _expand(zero_rtn, size, k)
    restored_rtn = dequantize(q_rtn, _expand(scale_rtn, size, k), rtn_zero)
    held_out = sample()
    error = np.linalg.norm(held_out @ (w - restored))
    assert error < 0.9 * np.linalg.norm(held_out @ (w - restored_rtn))
    # the transposed layout (Gemm transB: blocks along axis 1) rounds the same way
    q_t, scale_t, _ = gptq_blocks(w.T, 1, size, grid, symmetric=symmetric, hessian=hessian.matrix)
    np.testing.assert_array_equal(q_t, q.T)
    np.testing.assert_array_equal(scale_t, scale.T)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_layout_matches_the_rtn_layout_and_the_blocks(symmetric):
    rng = np.random.default_rng(2)
    k, n, size = 80, 6, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = _correlated(rng, 128, k)()
    hessian = x.T.astype(np.float64) @ x
    b, scale, zero = gptq_matmul_nbits_layout(w, 4, size, symmetric=symmetric, hessian=hessian)
    b_rtn, scale_rtn, zero_rtn = matmul_nbits_layout(w, 4, size, symmetric=symmetric)
    assert b.shape == b_rtn.shape and b.dtype == np.uint8
    assert scale.shape == scale_rtn.shape and scale.dtype == np.float32
    assert (zero is None) == (zero_rtn is None)
    if zero is not None:
        assert zero.shape == zero_rtn.shape and zero.dtype == np.uint8
    # the packed values are GPTQ's unsigned blocks of W.T
    q, blocks_scale, blocks_zero = gptq(
        w.T, hessian, Grid(4, False), symmetric=symmetric, group_size=size
    )
    unpacked = unpack(b.reshape(n, -1), 4, n * b.shape[1] * b.shape[2] * 2, signed=False)
    np.testing.assert_array_equal(unpacked.reshape(n, -1)[:, :k], q)
    np.testing.assert_array_equal(scale, blocks_scale)
    if zero is not None:
        stored = unpack(zero, 4, zero.size * 2, signed=False).reshape(n, -1)[:, : scale.shape[1]]
        np.testing.assert_array_equal(stored, blocks_zero)


def test_dead_features_keep_their_weights_and_stay_finite():
    """A feature that is always 0 (diag 0) is rounded to nearest and feeds no error."""
    rng = np.random.default_rng(3)
    k, n = 32, 5
    x = _correlated(rng, 64, k)()
    x[:, [3, 17]] = 0.0
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scale, _ = gptq_per_channel(w, 1, INT8, symmetric=True, hessian=x.T.astype(np.float64) @ x)
    restored = dequantize(q, scale)
    q_rtn, scale_rtn = per_channel_symmetric(w, 1)
    np.testing.assert_array_equal(q[[3, 17]], q_rtn[[3, 17]])
    assert np.isfinite(restored).all() and np.abs(restored[[3, 17]]).max() > 0
    # all features dead: H = 0 -> identity after the fix, per-channel GPTQ is RTN
    q_zero, _, _ = gptq_per_channel(w, 1, INT8, symmetric=True, hessian=np.zeros((k, k)))
    np.testing.assert_array_equal(q_zero, q_rtn)
    assert np.array_equal(scale, scale_rtn)


def test_bad_hessians_are_refused():
    w = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="Hessian is"):
        gptq(w, np.eye(4), INT8, symmetric=True)
    bad = np.eye(8)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        gptq(w, bad, INT8, symmetric=True)
