"""Integer grids: scales and zero points, rounding, block-wise quantization and bit packing.

Pure numpy, no graph code. Every function computes exactly what the ONNX operators compute:
`quantize` is QuantizeLinear (x / scale in float32, round half to even, + zero point,
saturate), `dequantize` is DequantizeLinear ((q - zp) as float32 times the float32 scale,
one rounding), `pack`/`unpack` are the ONNX int4/uint4/int2/uint2 storage layouts (onnx's own
packing does the work) and `matmul_nbits_layout` is the layout of onnxruntime's
`com.microsoft.MatMulNBits`.

Three bits: the grid arithmetic works for any width from 2 to 8, but 3 bits have no ONNX
storage type and onnxruntime 1.32's MatMulNBits rejects `bits=3` ("Only 2b, 4b and 8b
quantization is supported"), so `pack`, `Grid.onnx_dtype` and `matmul_nbits_layout` refuse
them with a ValueError.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "INT7",
    "INT8",
    "STORABLE_BITS",
    "UINT8",
    "Grid",
    "affine_params",
    "dequantize",
    "matmul_nbits_layout",
    "pack",
    "per_channel_symmetric",
    "quantize",
    "quantize_blocks",
    "unpack",
]

Method = Literal["rtn", "hqq"]

#: Widths with an ONNX storage type (and MatMulNBits support in onnxruntime 1.32).
STORABLE_BITS = (2, 4, 8)

#: (bits, signed) -> (onnx TensorProto type, ml_dtypes storage type used for packing).
_STORAGE = {
    (8, True): (onnx.TensorProto.INT8, np.int8),
    (8, False): (onnx.TensorProto.UINT8, np.uint8),
    (4, True): (onnx.TensorProto.INT4, ml_dtypes.int4),
    (4, False): (onnx.TensorProto.UINT4, ml_dtypes.uint4),
    (2, True): (onnx.TensorProto.INT2, ml_dtypes.int2),
    (2, False): (onnx.TensorProto.UINT2, ml_dtypes.uint2),
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """An integer grid of `bits` bits, two's complement when `signed`.

    Args:
        bits: Width, 2 to 8.
        signed: [-2**(bits-1), 2**(bits-1) - 1] when True, [0, 2**bits - 1] otherwise.
    """

    bits: int
    signed: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"a grid has 2 to 8 bits, not {self.bits}")

    @property
    def qmin(self) -> int:
        """The smallest grid value."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """The largest grid value."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def onnx_dtype(self) -> int:
        """The ONNX element type (TensorProto.INT8, UINT4, ...); ValueError for 3, 5-7 bits."""
        return _storage(self.bits, self.signed)[0]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype holding unpacked values: int8 or uint8."""
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def symmetric_zero_point(self) -> int:
        """The zero point of symmetric quantization: 0 signed, 2**(bits-1) unsigned."""
        return 0 if self.signed else 2 ** (self.bits - 1)


INT8 = Grid(8, True)
#: int8 storage of 7-bit values: u8 x s7 pair sums fit int16 (onnxruntime's AVX2 kernels).
INT7 = Grid(7, True)
UINT8 = Grid(8, False)


def _storage(bits: int, signed: bool) -> tuple[int, type]:
    try:
        return _STORAGE[(bits, signed)]
    except KeyError:
        raise ValueError(
            f"{bits}-bit values have no ONNX storage type (only {STORABLE_BITS} bits); "
            "onnxruntime 1.32's MatMulNBits rejects them too"
        ) from None


# -- affine quantization -----------------------------------------------------------------------
#: Elements per chunk of `quantize` on large tensors.
_CHUNK_ELEMENTS = 1 << 22


def quantize(
    values: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, grid: Grid
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), in grid dtype.

    `x / scale` is a float32 division, as onnxruntime computes it; scale and zero point
    broadcast against `values`.
    """
    values, scale = np.asarray(values, np.float32), np.asarray(scale, np.float32)
    zero = np.asarray(zero_point, np.float64)
    shape = np.broadcast_shapes(values.shape, scale.shape, zero.shape)
    out = np.empty(shape, grid.numpy_dtype)
    if out.ndim == 0 or out.size <= _CHUNK_ELEMENTS:
        ratio = values / scale
        shifted = np.rint(ratio).astype(np.float64) + zero
        out[...] = np.clip(shifted, grid.qmin, grid.qmax)
        return out
    # Large weights go in row chunks: the float64 temporaries stay a few MB, not 8x the
    # weight (a 1 GB float32 matrix used to peak at 7 GB here).
    views = [np.broadcast_to(a, shape) for a in (values, scale, zero)]
    step = max(1, _CHUNK_ELEMENTS // max(1, out[0].size))
    for start in range(0, shape[0], step):
        v, s, z = (view[start : start + step] for view in views)
        ratio = v / s
        np.rint(ratio, out=ratio)
        shifted = ratio.astype(np.float64)
        shifted += z
        np.clip(shifted, grid.qmin, grid.qmax, out=shifted)
        out[start : start + step] = shifted
    return out


def dequantize(
    q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int | None = 0
) -> np.ndarray:
    """ONNX DequantizeLinear: float32(q - zero_point) * float32(scale), one rounding."""
    zero = 0 if zero_point is None else np.asarray(zero_point, np.int32)
    centered = (np.asarray(q).astype(np.int32) - zero).astype(np.float32)
    return centered * np.asarray(scale, np.float32)


def affine_params(
    low: np.ndarray | float, high: np.ndarray | float, grid: Grid, *, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point mapping [low, high] onto `grid` (per tensor or per channel).

    onnxruntime's min-max formula (`quant_utils.compute_scale_zp`) over the full grid:
    the range is widened to include 0; symmetric ranges become [-m, m] with
    m = max(|low|, |high|), scale = 2m / (qmax - qmin) and zp = `grid.symmetric_zero_point`;
    otherwise scale = (high - low) / (qmax - qmin) and zp = round(qmin - low / scale), both
    computed in float64. A range whose scale is below float32's smallest normal gets scale
    1 (zp 0 asymmetric; the symmetric zp stays, so every value dequantizes to 0).

    Returns:
        (scale as float32, zero point in `grid.numpy_dtype`), shaped like the broadcast of
        `low` and `high`.
    """
    low64 = np.minimum(np.asarray(low, np.float64), 0.0)
    high64 = np.maximum(np.asarray(high, np.float64), 0.0)
    if symmetric:
        magnitude = np.maximum(np.abs(low64), np.abs(high64))
        low64, high64 = -magnitude, magnitude
    scale = (high64 - low64) / float(grid.qmax - grid.qmin)
    degenerate = ~(scale >= np.finfo(np.float32).tiny)
    safe = np.where(degenerate, 1.0, scale)
    if symmetric:
        zero = np.full(np.shape(safe), grid.symmetric_zero_point, np.float64)
    else:
        zero = np.where(degenerate, 0.0, np.round(grid.qmin - low64 / safe))
    zero = np.clip(zero, grid.qmin, grid.qmax)
    return safe.astype(np.float32), zero.astype(grid.numpy_dtype)


def per_channel_symmetric(
    weight: np.ndarray, axis: int, grid: Grid = INT8
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization with one scale per index along `axis` (zero point 0).

    Returns:
        (q in `grid.numpy_dtype`, scale float32 of shape `[weight.shape[axis]]`).

    Raises:
        ValueError: `grid` is unsigned (its symmetric zero point would not be 0).
    """
    if not grid.signed:
        raise ValueError("per_channel_symmetric needs a signed grid (zero point 0)")
    weight = np.asarray(weight, np.float32)
    axis = axis % weight.ndim
    others = tuple(i for i in range(weight.ndim) if i != axis)
    low = weight.min(axis=others) if weight.size else np.zeros(weight.shape[axis], np.float32)
    high = weight.max(axis=others) if weight.size else np.zeros(weight.shape[axis], np.float32)
    scale, _ = affine_params(low, high, grid, symmetric=True)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return quantize(weight, scale.reshape(shape), 0, grid), scale


# -- block-wise quantization ---------------------------------------------------------------------
def quantize_blocks(
    weight: np.ndarray,
    axis: int,
    block_size: int,
    grid: Grid,
    *,
    symmetric: bool,
    method: Method = "rtn",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Block-wise quantization along `axis` (the reduction axis), blocks of `block_size`.

    Shapes follow the opset-21 blocked DequantizeLinear: scale and zero point have
    `weight.shape` with `axis` replaced by ceil(K / block_size); the last block may be
    partial. `method="rtn"` is min-max (`affine_params`) plus round to nearest.

    `method="hqq"` is data-free half-quadratic optimization (Badri & Shaji 2023, "HQQ"):
    20 iterations alternating a rounding step, an l_0.7 shrinkage of the reconstruction
    error (beta 10, growing by 1.01 per step, measured in units of the block's step so it
    does not depend on the weight's magnitude) and a closed-form update of the zero point
    (asymmetric) or of the scale (symmetric, where the zero point is fixed). The paper's zero
    points are real numbers; ONNX needs integers, so the zero point is rounded and the scale
    re-fitted by least squares before the final rounding. Each block then keeps whichever of
    HQQ and RTN reconstructs it with the smaller L2 error, so HQQ is never worse than RTN.

    Returns:
        (q in `grid.numpy_dtype`, scale float32, zero point in the grid dtype, or None when
        symmetric on a signed grid, where it is 0).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    if method not in ("rtn", "hqq"):
        raise ValueError(f"method must be 'rtn' or 'hqq', not {method!r}")
    weight = np.asarray(weight, np.float32)
    axis = axis % weight.ndim
    blocks, valid, length = _to_blocks(weight, axis, block_size)
    low = np.where(valid, blocks, np.inf).min(axis=-1)
    high = np.where(valid, blocks, -np.inf).max(axis=-1)
    scale, zero = affine_params(low, high, grid, symmetric=symmetric)
    scale, zero = scale[..., None], zero[..., None]
    if method == "hqq":
        scale, zero = _hqq(blocks, valid, scale, zero, grid, symmetric=symmetric)
    q_blocks = quantize(blocks, scale, zero, grid)
    q = _from_blocks(q_blocks, weight.shape, axis, length)
    scale_out = np.moveaxis(scale[..., 0], -1, axis)
    zero_out = np.moveaxis(zero[..., 0], -1, axis)
    if symmetric and grid.signed:
        return q, np.ascontiguousarray(scale_out), None
    return q, np.ascontiguousarray(scale_out), np.ascontiguousarray(zero_out)


def _to_blocks(
    weight: np.ndarray, axis: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`weight` as [..., n_blocks, block_size] blocks along `axis` (moved last), zero padded."""
    moved = np.moveaxis(weight, axis, -1)
    length = moved.shape[-1]
    n_blocks = max(1, math.ceil(length / block_size))
    padded = np.zeros((*moved.shape[:-1], n_blocks * block_size), np.float32)
    padded[..., :length] = moved
    valid = np.zeros(n_blocks * block_size, bool)
    valid[:length] = True
    shape = (*moved.shape[:-1], n_blocks, block_size)
    return padded.reshape(shape), valid.reshape(n_blocks, block_size), length


def _from_blocks(blocks: np.ndarray, shape: tuple[int, ...], axis: int, length: int) -> np.ndarray:
    flat = blocks.reshape(*blocks.shape[:-2], -1)[..., :length]
    return np.ascontiguousarray(np.moveaxis(flat, -1, axis)).reshape(shape)


_HQQ_ITERATIONS = 20
_HQQ_LP = 0.7
_HQQ_BETA = 10.0
_HQQ_KAPPA = 1.01


def _hqq(
    blocks: np.ndarray,
    valid: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    grid: Grid,
    *,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """HQQ scales and integer zero points per block, each no worse than the given RTN ones."""
    w = blocks.astype(np.float64)
    mask = np.broadcast_to(valid, w.shape).astype(np.float64)
    count = np.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    step = scale.astype(np.float64)
    offset = zero.astype(np.float64)
    best_step, best_offset = step.copy(), offset.copy()
    best_error = np.full(step.shape, np.inf)
    beta = _HQQ_BETA
    for _ in range(_HQQ_ITERATIONS):
        q = np.clip(np.rint(w / step + offset), grid.qmin, grid.qmax)
        error = (w - (q - offset) * step) / step
        mean_abs = (np.abs(error) * mask).sum(axis=-1, keepdims=True) / count
        better = mean_abs < best_error
        best_error = np.where(better, mean_abs, best_error)
        best_step = np.where(better, step, best_step)
        best_offset = np.where(better, offset, best_offset)
        shrunk = _shrink_lp(error, beta)
        target = w - shrunk * step
        if symmetric:
            centered = (q - offset) * mask
            denominator = (centered * centered).sum(axis=-1, keepdims=True)
            numerator = (target * centered).sum(axis=-1, keepdims=True)
            fitted = numerator / np.where(denominator > 0, denominator, 1.0)
            step = np.where((denominator > 0) & (fitted > 0), fitted, step)
        else:
            offset = ((q - target / step) * mask).sum(axis=-1, keepdims=True) / count
        beta *= _HQQ_KAPPA
    integer_offset = np.clip(np.rint(best_offset), grid.qmin, grid.qmax)
    if symmetric:
        integer_offset = np.full_like(best_offset, grid.symmetric_zero_point)
    refit = _refit_scale(w, mask, best_step, integer_offset, grid)
    candidate = (refit.astype(np.float32), integer_offset.astype(grid.numpy_dtype))
    rtn_error = _block_error(blocks, valid, scale, zero, grid)
    hqq_error = _block_error(blocks, valid, *candidate, grid)
    keep = hqq_error < rtn_error
    return np.where(keep, candidate[0], scale), np.where(keep, candidate[1], zero)


def _shrink_lp(x: np.ndarray, beta: float) -> np.ndarray:
    """The generalized soft-threshold of HQQ for an l_p penalty (p < 1)."""
    magnitude = np.abs(x)
    threshold = np.power(magnitude + 1e-8, _HQQ_LP - 1.0) / beta
    return np.sign(x) * np.maximum(magnitude - threshold, 0.0)


def _refit_scale(
    w: np.ndarray, mask: np.ndarray, step: np.ndarray, zero: np.ndarray, grid: Grid
) -> np.ndarray:
    """Least-squares scale for the integer zero point `zero` (two rounding/fit rounds)."""
    for _ in range(2):
        q = np.clip(np.rint(w / step + zero), grid.qmin, grid.qmax)
        centered = (q - zero) * mask
        denominator = (centered * centered).sum(axis=-1, keepdims=True)
        numerator = (w * centered).sum(axis=-1, keepdims=True)
        fitted = numerator / np.where(denominator > 0, denominator, 1.0)
        ok = (denominator > 0) & (fitted >= np.finfo(np.float32).tiny) & np.isfinite(fitted)
        step = np.where(ok, fitted, step)
    return step


def _block_error(
    blocks: np.ndarray, valid: np.ndarray, scale: np.ndarray, zero: np.ndarray, grid: Grid
) -> np.ndarray:
    """Squared L2 reconstruction error per block, as DequantizeLinear would reconstruct it."""
    restored = dequantize(quantize(blocks, scale, zero, grid), scale, zero)
    diff = (restored.astype(np.float64) - blocks) * valid
    return (diff * diff).sum(axis=-1, keepdims=True)


# -- packing ---------------------------------------------------------------------------------------
def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """`q` flattened and packed as ONNX stores int4/uint4 (2 per byte) or int2/uint2 (4).

    Element 0 takes the lowest bits of byte 0; a trailing partial byte is zero padded.
    Signed dtypes pack as int4/int2, unsigned ones as uint4/uint2 (values must fit); 8 bits
    returns the bytes as they are. onnx's own `numpy_helper.from_array` does the packing.

    Raises:
        ValueError: `bits` is not 2, 4 or 8, or a value lies outside the grid.
    """
    values = np.asarray(q)
    if values.dtype.kind not in "iu":
        raise ValueError(f"pack takes integer values, not {values.dtype}")
    grid = Grid(bits, values.dtype.kind == "i")
    storage = _storage(bits, grid.signed)[1]
    if values.size and (values.min() < grid.qmin or values.max() > grid.qmax):
        raise ValueError(f"values outside [{grid.qmin}, {grid.qmax}] do not fit {bits} bits")
    typed = values.astype(grid.numpy_dtype).astype(storage).reshape(-1)
    tensor = numpy_helper.from_array(typed)
    return np.frombuffer(tensor.raw_data, np.uint8).copy()


def unpack(packed: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """The first `count` values of bytes packed as `pack` does, as int8 (signed) or uint8.

    onnx's `numpy_helper.to_array` does the unpacking.
    """
    grid = Grid(bits, signed)
    data = np.ascontiguousarray(packed, np.uint8).reshape(-1)
    needed = math.ceil(count * bits / 8)
    if data.size < needed:
        raise ValueError(f"{data.size} bytes hold fewer than {count} {bits}-bit values")
    tensor = onnx.TensorProto(dims=[count], data_type=grid.onnx_dtype)
    tensor.raw_data = data[:needed].tobytes()
    return numpy_helper.to_array(tensor).astype(grid.numpy_dtype)


def _pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """Packs each row (last axis) of unsigned `q` separately: [..., ceil(n * bits / 8)]."""
    per_byte = 8 // bits
    rows = q.reshape(-1, q.shape[-1])
    width = math.ceil(rows.shape[-1] / per_byte) * per_byte
    padded = np.zeros((rows.shape[0], width), np.uint8)
    padded[:, : rows.shape[-1]] = rows
    return pack(padded, bits).reshape(*q.shape[:-1], width // per_byte)


# -- onnxruntime MatMulNBits ------------------------------------------------------------------
def matmul_nbits_layout(
    weight_kn: np.ndarray,
    bits: int,
    block_size: int,
    *,
    symmetric: bool,
    method: Method = "rtn",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The constant inputs of `com.microsoft.MatMulNBits` (onnxruntime 1.32) for W [K, N].

    Blocks run along K on an unsigned `bits`-bit grid (`quantize_blocks` on W.T). Symmetric
    blocks use the op's default zero point 2**(bits-1), so no zero-point input is needed.

    Returns:
        B: uint8 [N, n_blocks, block_size * bits / 8], each block packed like ONNX
            uint4/uint2 (element 0 in the low bits; K padded with the zero point).
        scales: float32 [N, n_blocks].
        zero_points: uint8 [N, ceil(n_blocks * bits / 8)], packed the same way per row, or
            None when symmetric.

    Raises:
        ValueError: `bits` is not 2, 4 or 8, or `block_size` is not a power of two >= 16.
    """
    if bits not in STORABLE_BITS:
        raise ValueError(f"MatMulNBits takes bits 2, 4 or 8 (onnxruntime 1.32), not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, not {block_size}")
    weight = np.asarray(weight_kn, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"MatMulNBits quantizes a 2-D weight [K, N], not {list(weight.shape)}")
    grid = Grid(bits, False)
    k, n = weight.shape
    q, scale, zero = quantize_blocks(
        weight.T, 1, block_size, grid, symmetric=symmetric, method=method
    )
    n_blocks = scale.shape[1]
    padded = np.full((n, n_blocks * block_size), grid.symmetric_zero_point, np.uint8)
    if zero is not None:
        padded[:] = np.repeat(zero, block_size, axis=1)
    padded[:, :k] = q
    blob = block_size * bits // 8
    b = (padded if bits == 8 else pack(padded, bits)).reshape(n, n_blocks, blob)
    if symmetric:
        return b, scale.astype(np.float32), None
    assert zero is not None
    zero_points = zero if bits == 8 else _pack_rows(zero, bits)
    return b, scale.astype(np.float32), np.ascontiguousarray(zero_points, np.uint8)
