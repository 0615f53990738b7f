"""GPTQ: rounding a weight so that its layer's output error, not the weight error, is small.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". For a linear layer `Y = X W` (W [K, N]) and calibration inputs X, the output
error of a quantized W' is `tr((W - W')^T H (W - W'))` with the Hessian `H = sum X^T X`
([K, K]). GPTQ quantizes W one input feature (row k of W, a "column" of the paper's
[N, K] weight) at a time and spreads the rounding error of feature k over the features not
yet quantized, along the row of the upper Cholesky factor of H^-1 (the optimal brain
surgeon update), in lazy batches of 128 features.

Pure numpy, no graph code. Scales and zero points sit on exactly the grids of
`dsopt.quant.grid`: `affine_params` (min-max) of each group of `block_size` features,
computed when the group's first feature is reached, from the weights as the error feedback
has left them, over the group's range shrunk by the factor (1, 0.98, ..., 0.5) whose
rounding error, weighted per feature by diag(H), is smallest (min-max alone loses to HQQ at
2 bits; per-channel scales stay plain min-max of the original weight); rounding is
`grid.quantize` (QuantizeLinear) and the error fed back is that of
`grid.dequantize` (DequantizeLinear). So `gptq_blocks`, `gptq_per_channel` and
`gptq_matmul_nbits_layout` return what `quantize_blocks`, per-channel min-max and
`matmul_nbits_layout` return, in the same shapes and dtypes, and every emitter takes them
unchanged.

Details: `damp` (default 0.01) times the mean of diag(H) is added to diag(H) (ten times more,
up to three times, when H^-1 has no Cholesky factor); a feature that never took a non-zero
value (diag 0, hence a zero row and column) gets H[k, k] = 1, which decouples it: it is
rounded to nearest, keeps its weight (the paper zeroes it; unseen inputs may not be zero)
and sends no error elsewhere. Memory is one float64 [K, K] matrix plus the weight in float64.
"""

from __future__ import annotations

import math

import numpy as np

from dsopt.quant.grid import Grid, affine_params, dequantize, pack, quantize

__all__ = [
    "LAZY_BATCH",
    "Hessian",
    "gptq",
    "gptq_blocks",
    "gptq_matmul_nbits_layout",
    "gptq_per_channel",
]

#: Features quantized between two updates of the rest of the weight (the paper's B).
LAZY_BATCH = 128
#: Shrink factors of a group's min-max range tried for its scale (1 first: min-max itself).
_SHRINK = tuple(1.0 - 0.02 * i for i in range(26))
#: Dampening retries (each ten times the last) when H^-1 has no Cholesky factor.
_RETRIES = 3


class Hessian:
    """The running `sum X^T X` (float64 [K, K]) of a layer input X, reshaped to [-1, K].

    Rows holding a non-finite value are left out (they would poison every entry).
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.matrix = np.zeros((k, k), np.float64)
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        """Accumulates the rows of `x` (any shape whose last axis is K)."""
        rows = np.asarray(x).reshape(-1, self.k).astype(np.float64)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            rows = rows[finite]
        self.matrix += rows.T @ rows
        self.rows += len(rows)


def gptq(
    weight_nk: np.ndarray,
    hessian: np.ndarray,
    grid: Grid,
    *,
    symmetric: bool,
    group_size: int | None = None,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of `weight_nk` [N, K] (rows are outputs) against the input Hessian [K, K].

    Args:
        weight_nk: The weight, one row per output, K input features along axis 1.
        hessian: `sum X^T X` of the layer's inputs (positive semi-definite).
        grid: The integer grid.
        symmetric: Symmetric min-max scales (zero point `grid.symmetric_zero_point`).
        group_size: Features sharing a scale and zero point (the last group may be partial);
            None is one group per row (per-channel scales of the original weight).
        damp: Dampening, as a fraction of the mean of diag(H).

    Returns:
        (q [N, K] in `grid.numpy_dtype`, scale float32 [N, G], zero point [N, G] in the grid
        dtype), G = ceil(K / group_size) groups.

    Raises:
        ValueError: Shapes disagree, or H is not finite.
        numpy.linalg.LinAlgError: H^-1 has no Cholesky factor even after more dampening.
    """
    w = np.asarray(weight_nk, np.float32).astype(np.float64)
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian is {list(hessian.shape)}, the weight has K = {k}")
    if not np.isfinite(hessian).all():
        raise ValueError("the Hessian holds non-finite values")
    group = k if group_size is None else group_size
    if group < 1:
        raise ValueError(f"group_size must be positive, not {group_size}")
    upper = _inverse_cholesky(hessian, damp)
    importance = np.maximum(np.diagonal(hessian), 0.0)
    search = group_size is not None
    n_groups = max(1, math.ceil(k / group))
    q = np.zeros((n, k), grid.numpy_dtype)
    scale = np.ones((n, n_groups), np.float32)
    zero = np.zeros((n, n_groups), grid.numpy_dtype)
    batch = max(LAZY_BATCH, group if group_size is not None else 0)
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        block = w[:, start:stop].copy()
        errors = np.zeros_like(block)
        inverse = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % group == 0:
                end = min(column + group, k)
                current = block[:, i : end - start]
                if end > stop:  # the group runs past this batch: bring its tail up to date
                    tail = w[:, stop:end] - errors[:, :i] @ upper[start : start + i, stop:end]
                    current = np.concatenate([current, tail], axis=1)
                values = current.astype(np.float32)
                s, z = _group_params(values, grid, symmetric, importance[column:end], search)
                scale[:, column // group], zero[:, column // group] = s, z
            g = column // group
            value = block[:, i]
            q[:, column] = quantize(value.astype(np.float32), scale[:, g], zero[:, g], grid)
            restored = dequantize(q[:, column], scale[:, g], zero[:, g]).astype(np.float64)
            error = (value - restored) / inverse[i, i]
            block[:, i:] -= np.outer(error, inverse[i, i:])
            errors[:, i] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return q, scale, zero


def _group_params(
    values: np.ndarray, grid: Grid, symmetric: bool, importance: np.ndarray, search: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point [N] of one group of features `values` [N, g].

    Min-max of the group, or (`search`) of the group's range shrunk by the factor in
    `_SHRINK` whose rounding error, each feature weighted by its diag(H) `importance` (the
    output error an isolated error there causes), is smallest; ties keep the wider range.
    """
    low, high = values.min(axis=1), values.max(axis=1)
    scale, zero = affine_params(low, high, grid, symmetric=symmetric)
    if not search:
        return scale, zero
    best = None
    for factor in _SHRINK:
        s, z = affine_params(low * factor, high * factor, grid, symmetric=symmetric)
        restored = dequantize(
            quantize(values, s[:, None], z[:, None], grid), s[:, None], z[:, None]
        )
        error = ((restored - values).astype(np.float64) ** 2) @ importance
        if best is None:
            best = error
            continue
        better = error < best
        best = np.where(better, error, best)
        scale, zero = np.where(better, s, scale), np.where(better, z, zero)
    return scale, zero


def _inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray:
    """The upper Cholesky factor U of (H + dampening)^-1 = U^T U, dead features decoupled."""
    h = np.array(hessian, np.float64)
    diagonal = np.diagonal(h).copy()
    dead = ~(diagonal > 0)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    base = damp * float(np.mean(np.diagonal(h)))
    identity = np.eye(len(h))
    # With J the reversal permutation and J H J = L L^T: H^-1 = U^T U for U = J L^-1 J,
    # which is upper triangular; one Cholesky factor and one inverse instead of two and two.
    reverse = slice(None, None, -1)
    for attempt in range(_RETRIES + 1):
        damped = h + max(base, 1e-12) * 10.0**attempt * identity
        try:
            lower = np.linalg.cholesky(damped[reverse, reverse])
        except np.linalg.LinAlgError:
            if attempt == _RETRIES:
                raise
            continue
        upper = np.linalg.inv(lower)[reverse, reverse]
        return np.triu(upper)
    raise AssertionError("unreachable")  # pragma: no cover


def gptq_blocks(
    weight: np.ndarray,
    axis: int,
    block_size: int,
    grid: Grid,
    *,
    symmetric: bool,
    hessian: np.ndarray,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`quantize_blocks` of a 2-D `weight` (blocks along `axis`, its K axis), rounded by GPTQ.

    Returns:
        (q like `weight`, scale with `axis` replaced by ceil(K / block_size), zero point
        likewise, or None when symmetric on a signed grid), as `quantize_blocks` returns.
    """
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"GPTQ rounds 2-D weights, not {list(weight.shape)}")
    axis = axis % 2
    weight_nk = weight.T if axis == 0 else weight
    q, scale, zero = gptq(
        weight_nk, hessian, grid, symmetric=symmetric, group_size=block_size, damp=damp
    )
    if axis == 0:
        q, scale, zero = q.T, scale.T, zero.T
    q, scale = np.ascontiguousarray(q), np.ascontiguousarray(scale)
    if symmetric and grid.signed:
        return q, scale, None
    return q, scale, np.ascontiguousarray(zero)


def gptq_per_channel(
    weight: np.ndarray,
    axis: int,
    grid: Grid,
    *,
    symmetric: bool,
    hessian: np.ndarray,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-channel min-max quantization of a 2-D `weight` (channels along `axis`), by GPTQ.

    The scales (and zero points) are those of the original weight per channel, exactly as
    min-max quantization per channel computes them; only the rounding differs.

    Returns:
        (q like `weight`, scale float32 [channels], zero point [channels], or None when
        symmetric on a signed grid).
    """
    weight = np.asarray(weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"GPTQ rounds 2-D weights, not {list(weight.shape)}")
    axis = axis % 2
    weight_nk = weight if axis == 0 else weight.T
    q, scale, zero = gptq(weight_nk, hessian, grid, symmetric=symmetric, damp=damp)
    q = np.ascontiguousarray(q if axis == 0 else q.T)
    if symmetric and grid.signed:
        return q, scale[:, 0].copy(), None
    return q, scale[:, 0].copy(), zero[:, 0].copy()


def gptq_matmul_nbits_layout(
    weight_kn: np.ndarray,
    bits: int,
    block_size: int,
    *,
    symmetric: bool,
    hessian: np.ndarray,
    damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`dsopt.quant.grid.matmul_nbits_layout` of W [K, N], with the blocks rounded by GPTQ.

    Returns:
        (B uint8 [N, n_blocks, block_size * bits / 8], scales float32 [N, n_blocks], packed
        zero points uint8 [N, ceil(n_blocks * bits / 8)] or None when symmetric), laid out
        exactly as `matmul_nbits_layout` lays them out.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits takes bits 2, 4 or 8 (onnxruntime 1.32), not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block_size >= 16, not {block_size}")
    weight = np.asarray(weight_kn, np.float32)
    grid = Grid(bits, False)
    k, n = weight.shape
    q, scale, zero = gptq(
        weight.T, hessian, grid, symmetric=symmetric, group_size=block_size, damp=damp
    )
    n_blocks = scale.shape[1]
    padded = np.full((n, n_blocks * block_size), grid.symmetric_zero_point, np.uint8)
    if not symmetric:
        padded[:] = np.repeat(zero, block_size, axis=1)
    padded[:, :k] = q
    blob = block_size * bits // 8
    b = (padded if bits == 8 else pack(padded, bits)).reshape(n, n_blocks, blob)
    if symmetric:
        return b, scale, None
    if bits == 8:
        return b, scale, np.ascontiguousarray(zero, np.uint8)
    per_byte = 8 // bits
    width = math.ceil(n_blocks / per_byte) * per_byte
    rows = np.zeros((n, width), np.uint8)
    rows[:, :n_blocks] = zero
    return b, scale, pack(rows, bits).reshape(n, width // per_byte)
