"""dsopt.quant.grid: ONNX-exact rounding, ranges, block-wise layouts and bit packing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from dsopt.quant.grid import (
    INT8,
    UINT8,
    Grid,
    affine_params,
    dequantize,
    matmul_nbits_layout,
    pack,
    per_channel_symmetric,
    quantize,
    quantize_blocks,
    unpack,
)

GRIDS = [Grid(bits, signed) for bits in (2, 4, 8) for signed in (True, False)]


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _expand(blocked: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    """Per-block parameters repeated to one per element along `axis`."""
    return np.take(np.repeat(blocked, block_size, axis=axis), np.arange(length), axis=axis)


def _weights(max_side: int = 80) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=max_side),
        elements=st.floats(-100, 100, width=32),
    )


# -- grids ------------------------------------------------------------------------------------
def test_grid_ranges_and_types():
    assert (INT8.qmin, INT8.qmax, UINT8.qmin, UINT8.qmax) == (-128, 127, 0, 255)
    assert (Grid(4, True).qmin, Grid(4, True).qmax, Grid(2, False).qmax) == (-8, 7, 3)
    assert Grid(4, True).onnx_dtype == TensorProto.INT4
    assert Grid(2, False).onnx_dtype == TensorProto.UINT2
    assert Grid(4, False).numpy_dtype == np.uint8 and Grid(2, True).numpy_dtype == np.int8
    with pytest.raises(ValueError, match="no ONNX storage type"):
        Grid(3, True).onnx_dtype  # noqa: B018
    with pytest.raises(ValueError, match="2 to 8 bits"):
        Grid(9, True)


def test_quantize_rounds_half_to_even_and_saturates_like_quantize_linear():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, 0.26], np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [8])],
        [numpy_helper.from_array(np.float32(1.0), "s"), numpy_helper.from_array(np.int8(0), "z")],
    )
    (expected,) = _run(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), {"x": x}
    )
    got = quantize(x, np.float32(1.0), 0, INT8)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, [0, 2, 2, 0, -2, 127, -128, 0])


@given(
    q=hnp.arrays(np.uint8, st.integers(1, 64)),
    scale=st.floats(2**-20, 1024.0, width=32),
    zero=st.integers(0, 255),
)
@settings(max_examples=50)
def test_dequantize_is_bit_exact_with_dequantize_linear(q, scale, zero):
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [len(q)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(q)])],
        [
            numpy_helper.from_array(np.float32(scale), "s"),
            numpy_helper.from_array(np.uint8(zero), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (expected,) = _run(model, {"q": q})
    got = dequantize(q, np.float32(scale), np.uint8(zero))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


# -- ranges --------------------------------------------------------------------------------------
def test_affine_params_match_onnxruntime_min_max_formula():
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    rng = np.random.default_rng(0)
    for grid in (INT8, UINT8, Grid(4, False), Grid(4, True)):
        for symmetric in (False, True):
            for _ in range(20):
                low, high = np.sort(rng.normal(size=2).astype(np.float32) * 3)
                scale, zero = affine_params(low, high, grid, symmetric=symmetric)
                qmin, qmax = (
                    np.array(grid.qmin, grid.numpy_dtype),
                    np.array(grid.qmax, grid.numpy_dtype),
                )
                zero_ort, scale_ort = compute_scale_zp(low, high, qmin, qmax, symmetric=symmetric)
                assert scale == scale_ort and zero == zero_ort, (grid, symmetric, low, high)


def test_affine_params_include_zero_and_never_divide_by_zero():
    scale, zero = affine_params(np.float32(2.0), np.float32(5.0), UINT8, symmetric=False)
    assert zero == 0 and scale == pytest.approx(5.0 / 255)  # range widened to [0, 5]
    scale, zero = affine_params(
        np.zeros(3, np.float32), np.zeros(3, np.float32), INT8, symmetric=True
    )
    np.testing.assert_array_equal(scale, 1.0)
    np.testing.assert_array_equal(zero, 0)
    _, zero = affine_params(0.0, 0.0, Grid(4, False), symmetric=True)
    assert zero == 8  # the symmetric zero point stays 2**(bits-1)
    scale, _ = affine_params(np.float32(-1.0), np.float32(0.5), INT8, symmetric=True)
    assert scale == np.float32(1.0 / 127.5)


@given(
    values=hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-1e4, 1e4, width=32)),
    grid=st.sampled_from(GRIDS),
    symmetric=st.booleans(),
)
@settings(max_examples=150)
def test_round_trip_error_is_at_most_half_a_step(values, grid, symmetric):
    scale, zero = affine_params(values.min(), values.max(), grid, symmetric=symmetric)
    restored = dequantize(quantize(values, scale, zero, grid), scale, zero)
    bound = scale * 0.5 * (1 + 1e-5) + np.abs(values) * 1e-6
    assert np.all(np.abs(restored.astype(np.float64) - values) <= bound)


@given(weight=_weights(24), axis=st.integers(0, 1))
@settings(max_examples=80)
def test_per_channel_symmetric(weight, axis):
    q, scale = per_channel_symmetric(weight, axis)
    assert q.dtype == np.int8 and scale.shape == (weight.shape[axis],) and scale.dtype == np.float32
    broadcast = scale.reshape((-1, 1) if axis == 0 else (1, -1))
    restored = dequantize(q, broadcast, 0)
    bound = broadcast * 0.5 * (1 + 1e-5) + np.abs(weight) * 1e-6
    assert np.all(np.abs(restored.astype(np.float64) - weight) <= bound)


# -- blocks ----------------------------------------------------------------------------------------
@given(
    weight=_weights(),
    axis=st.integers(0, 1),
    block_size=st.sampled_from([16, 32, 64]),
    grid=st.sampled_from([g for g in GRIDS if g.bits < 8]),
    symmetric=st.booleans(),
)
@settings(max_examples=100)
def test_blocks_have_onnx_blocked_shapes_and_rtn_bound(weight, axis, block_size, grid, symmetric):
    q, scale, zero = quantize_blocks(weight, axis, block_size, grid, symmetric=symmetric)
    length = weight.shape[axis]
    expected = list(weight.shape)
    expected[axis] = -(-length // block_size)
    assert q.shape == weight.shape and q.dtype == grid.numpy_dtype
    assert list(scale.shape) == expected and scale.dtype == np.float32
    assert (zero is None) == (symmetric and grid.signed)
    if zero is not None:
        assert list(zero.shape) == expected and zero.dtype == grid.numpy_dtype
    full_scale = _expand(scale, axis, block_size, length)
    full_zero = 0 if zero is None else _expand(zero, axis, block_size, length)
    restored = dequantize(q, full_scale, full_zero)
    bound = full_scale * 0.5 * (1 + 1e-5) + np.abs(weight) * 1e-6
    assert np.all(np.abs(restored.astype(np.float64) - weight) <= bound)


@given(
    weight=_weights(),
    bits=st.sampled_from([2, 4]),
    symmetric=st.booleans(),
    block_size=st.sampled_from([16, 32]),
)
@settings(max_examples=60)
def test_hqq_is_never_worse_than_rtn_per_block(weight, bits, symmetric, block_size):
    grid = Grid(bits, symmetric)
    errors = {}
    for method in ("rtn", "hqq"):
        q, scale, zero = quantize_blocks(
            weight, 0, block_size, grid, symmetric=symmetric, method=method
        )
        full_scale = _expand(scale, 0, block_size, weight.shape[0])
        full_zero = 0 if zero is None else _expand(zero, 0, block_size, weight.shape[0])
        diff = dequantize(q, full_scale, full_zero).astype(np.float64) - weight
        per_block = np.add.reduceat(diff * diff, np.arange(0, weight.shape[0], block_size), axis=0)
        errors[method] = per_block
        if zero is not None:
            assert np.issubdtype(zero.dtype, np.integer)  # ONNX needs integer zero points
    assert np.all(errors["hqq"] <= errors["rtn"])


def test_hqq_improves_low_bit_gaussian_weights():
    weight = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    totals = {}
    for method in ("rtn", "hqq"):
        q, scale, zero = quantize_blocks(
            weight, 0, 64, Grid(2, False), symmetric=False, method=method
        )
        restored = dequantize(q, np.repeat(scale, 64, 0), np.repeat(zero, 64, 0))
        totals[method] = float(np.sum((restored - weight) ** 2))
    assert totals["hqq"] < 0.9 * totals["rtn"], totals


# -- packing ----------------------------------------------------------------------------------
@given(
    data=st.data(),
    bits=st.sampled_from([2, 4]),
    signed=st.booleans(),
    count=st.integers(1, 67),
)
@settings(max_examples=150)
def test_pack_unpack_round_trip_and_match_onnx(data, bits, signed, count):
    grid = Grid(bits, signed)
    q = data.draw(hnp.arrays(grid.numpy_dtype, count, elements=st.integers(grid.qmin, grid.qmax)))
    packed = pack(q, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack(packed, bits, count, signed), q)
    # byte for byte what onnx.helper.make_tensor stores for an INT4/UINT4/INT2/UINT2 tensor
    reference = helper.make_tensor("t", grid.onnx_dtype, [count], q.tolist())
    reference_bytes = np.array(reference.int32_data, np.uint8)
    np.testing.assert_array_equal(packed, reference_bytes)
    assert numpy_helper.to_array(reference).astype(np.int8).tolist() == q.astype(np.int8).tolist()


def test_pack_layout_low_bits_first():
    assert pack(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert pack(np.array([-1, 0, 7], np.int8), 4).tolist() == [0x0F, 0x07]
    assert pack(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [0b00111001, 0b11]


def test_pack_rejects_values_outside_the_grid_and_three_bits():
    with pytest.raises(ValueError, match="do not fit 4 bits"):
        pack(np.array([16], np.uint8), 4)
    with pytest.raises(ValueError, match="do not fit 4 bits"):
        pack(np.array([-9], np.int8), 4)
    with pytest.raises(ValueError, match="no ONNX storage type"):
        pack(np.array([1], np.uint8), 3)
    with pytest.raises(ValueError, match="bits 2, 4 or 8"):
        matmul_nbits_layout(np.ones((32, 2), np.float32), 3, 32, symmetric=True)


# -- MatMulNBits ------------------------------------------------------------------------------
def _matmul_nbits_model(k, n, bits, block_size, b, scales, zeros):
    names = ["a", "B", "scales"] + (["zeros"] if zeros is not None else [])
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros, "zeros"))
    node = helper.make_node(
        "MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
        block_size=block_size,
    )  # fmt: skip
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    imports = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


@pytest.mark.parametrize(
    ("k", "n", "bits", "block_size", "symmetric", "method"),
    [
        (64, 8, 4, 32, True, "rtn"),
        (70, 5, 4, 32, False, "rtn"),  # partial last block, odd N
        (100, 3, 2, 16, False, "hqq"),  # 7 blocks: packed zero points need a padded byte
        (40, 6, 8, 16, False, "rtn"),
        (40, 6, 2, 64, True, "hqq"),  # K below one block
        (48, 4, 4, 16, False, "hqq"),
    ],
)
def test_matmul_nbits_layout_reproduces_the_weight_in_onnxruntime(
    k, n, bits, block_size, symmetric, method
):
    rng = np.random.default_rng(k + n + bits)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    b, scales, zeros = matmul_nbits_layout(
        weight, bits, block_size, symmetric=symmetric, method=method
    )
    n_blocks = -(-k // block_size)
    assert b.shape == (n, n_blocks, block_size * bits // 8) and b.dtype == np.uint8
    assert scales.shape == (n, n_blocks) and scales.dtype == np.float32
    if symmetric:
        assert zeros is None
    else:
        assert zeros.shape == (n, -(-n_blocks * bits // 8)) and zeros.dtype == np.uint8
    grid = Grid(bits, False)
    q, scale, zero = quantize_blocks(
        weight, 0, block_size, grid, symmetric=symmetric, method=method
    )
    restored = dequantize(q, _expand(scale, 0, block_size, k), _expand(zero, 0, block_size, k))
    a = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = _run(_matmul_nbits_model(k, n, bits, block_size, b, scales, zeros), {"a": a})
    np.testing.assert_allclose(y, a @ restored, rtol=1e-5, atol=1e-5)
