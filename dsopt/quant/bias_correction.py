"""Empirical bias correction: cancel the mean shift that int8 weight rounding adds per channel.

Rounding a weight to its int8 grid changes it by dW = dequantize(quantize(W)) - W, and so
shifts each output channel's mean by dW . E[x] (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction", section 4.2, the empirical variant; AIMET's
"bias correction"). Subtracting that shift from the bias makes the quantized layer's mean
output per channel equal the float layer's, over the calibration data.

The math is numpy (`weight_error`, `InputMean`, `linear_bias_shift`, `conv_bias_shift`);
`BiasCorrection` applies it to the compute nodes of a graphsurgeon graph that
`quantize-static` is about to quantize, with E[x] streamed from the calibration data.

Conv is exact including zero padding: the mean input map over the batch (shape [C, *spatial])
goes through conv(m, dW) with the node's strides, pads, dilations and group, and the channel's
shift is the mean of that map over the output positions. When the spatial size varies between
samples the mean map is undefined and the per-channel means stand in (padding then ignored).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from dsopt.pattern import fresh_name, is_graph_output, read_constant
from dsopt.quant.calibration import Probe
from dsopt.quant.grid import INT8, Grid, dequantize, per_channel_symmetric

__all__ = [
    "BiasCorrection",
    "InputMean",
    "conv_bias_shift",
    "linear_bias_shift",
    "weight_error",
]

#: The ops whose bias this module corrects.
OPS = ("Conv", "Gemm", "MatMul")


def weight_error(weight: np.ndarray, axis: int | None, grid: Grid = INT8) -> np.ndarray:
    """The rounding error dequantize(quantize(W)) - W in float64, symmetric per index along `axis`.

    `axis` None quantizes per tensor (one scale). This is the rounding quantize-static's
    int8 weights carry (`per_channel_symmetric`, then DequantizeLinear in float32).
    """
    weight = np.asarray(weight, np.float32)
    if axis is None:
        q, scale = per_channel_symmetric(weight.reshape(1, -1), 0, grid)
        restored = dequantize(q, scale.reshape(1, 1)).reshape(weight.shape)
    else:
        q, scale = per_channel_symmetric(weight, axis, grid)
        shape = [1] * weight.ndim
        shape[axis % weight.ndim] = -1
        restored = dequantize(q, scale.reshape(shape))
    return restored.astype(np.float64) - weight.astype(np.float64)


@dataclasses.dataclass
class InputMean:
    """E[x] of one compute input, reduced as samples stream past (float64 sums).

    Args:
        spatial: Conv layout [N, C, *spatial]: keeps the mean map over N ([C, *spatial]) and
            the per-channel mean. Otherwise the mean feature vector along `axis` over all
            other axes (MatMul/Gemm inputs).
        axis: The feature axis when not `spatial` (-1 for MatMul and Gemm, 0 for a Gemm
            with transA).
    """

    spatial: bool
    axis: int = -1
    _map: np.ndarray | None = None
    _maps: int = 0
    _varying: bool = False
    _total: np.ndarray | None = None
    _count: int = 0
    _rank: int | None = None

    def add(self, value: np.ndarray) -> None:
        """Adds one sample (a batch of any size)."""
        value = np.asarray(value, np.float64)
        self._rank = value.ndim if self._rank in (None, value.ndim) else -1
        if self.spatial:
            if value.ndim < 3:
                raise ValueError(f"a Conv input has rank >= 3, got shape {list(value.shape)}")
            total = value.sum(axis=(0, *range(2, value.ndim)))
            count = value.size // value.shape[1]
            if not self._varying:
                if self._map is None:
                    self._map = value.sum(axis=0)
                elif self._map.shape == value.shape[1:]:
                    self._map += value.sum(axis=0)
                else:
                    self._varying, self._map = True, None
                self._maps += value.shape[0]
        else:
            features = np.moveaxis(value, self.axis, -1)
            total = features.reshape(-1, features.shape[-1]).sum(axis=0)
            count = features.size // max(features.shape[-1], 1)
        if self._total is None:
            self._total = total
        elif self._total.shape != total.shape:
            raise ValueError(
                f"the channel count changed between samples ({self._total.shape[0]} then "
                f"{total.shape[0]})"
            )
        else:
            self._total = self._total + total
        self._count += count

    @property
    def rank(self) -> int | None:
        """The samples' rank (None before the first, -1 when it varied)."""
        return self._rank

    @property
    def count(self) -> int:
        """Positions (rows, or batch x spatial positions) averaged so far."""
        return self._count

    def value(self) -> np.ndarray | None:
        """The mean map [C, *spatial] (Conv, fixed spatial size), else the mean per channel."""
        if self._total is None or self._count == 0:
            return None
        if self.spatial and self._map is not None and self._maps:
            return self._map / self._maps
        return self._total / self._count


def linear_bias_shift(
    delta_w: np.ndarray, mean: np.ndarray, *, transposed: bool = False
) -> np.ndarray:
    """The shift dW . E[x] per output column: `mean` [K] times dW [K, N] ([N, K] transposed)."""
    delta = np.asarray(delta_w, np.float64)
    mean = np.asarray(mean, np.float64).reshape(-1)
    return delta @ mean if transposed else mean @ delta


def conv_bias_shift(
    delta_w: np.ndarray, mean: np.ndarray, attrs: Mapping[str, Any] | None = None
) -> np.ndarray:
    """The mean over output positions of conv(`mean`, dW), per output channel.

    Args:
        delta_w: dW, [O, C / group, *kernel].
        mean: The mean input map [C, *spatial] (exact, zero padding included), or the mean
            per channel [C] (padding ignored: every tap sees the channel mean).
        attrs: The Conv node's attributes (`strides`, `pads`, `dilations`, `group`,
            `auto_pad`); absent ones take their ONNX defaults.

    Returns:
        float64 [O].
    """
    attrs = dict(attrs or {})
    delta = np.asarray(delta_w, np.float64)
    mean = np.asarray(mean, np.float64)
    group = int(attrs.get("group", 1))
    out_channels, group_channels = delta.shape[:2]
    kernel = delta.shape[2:]
    if mean.shape[0] != group * group_channels or out_channels % group:
        raise ValueError(
            f"weight {list(delta.shape)} with group {group} does not fit {mean.shape[0]} "
            "input channels"
        )
    if mean.ndim == 1:
        # taps[c, *kernel]: every tap reads the channel mean.
        taps = np.broadcast_to(mean.reshape(-1, *([1] * len(kernel))), (mean.shape[0], *kernel))
    else:
        taps = _tap_means(mean, kernel, attrs)
    grouped = delta.reshape(group, out_channels // group, group_channels, -1)
    per_tap = taps.reshape(group, group_channels, -1)
    return np.einsum("gocK,gcK->go", grouped, per_tap).reshape(out_channels)


def _tap_means(mean: np.ndarray, kernel: Sequence[int], attrs: Mapping[str, Any]) -> np.ndarray:
    """taps[c, *k]: the mean, over output positions, of the zero-padded map that tap k reads."""
    sizes = mean.shape[1:]
    rank = len(sizes)
    strides = [int(s) for s in attrs.get("strides", [1] * rank)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * rank)]
    begins, ends = _pads(sizes, kernel, strides, dilations, attrs)
    padded = np.pad(mean, [(0, 0), *zip(begins, ends, strict=True)])
    outs = [
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begins, ends, strict=True)
    ]
    if min(outs, default=1) < 1:
        raise ValueError(f"the Conv kernel {list(kernel)} does not fit the input {list(sizes)}")
    taps = np.empty((mean.shape[0], *kernel), np.float64)
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, dilations, outs, strides, strict=True)
        )
        taps[(slice(None), *tap)] = padded[(slice(None), *window)].mean(
            axis=tuple(range(1, rank + 1))
        )
    return taps


def _pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    attrs: Mapping[str, Any],
) -> tuple[list[int], list[int]]:
    """Begin and end pads per spatial axis, `auto_pad` resolved as onnxruntime does."""
    rank = len(sizes)
    mode = attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            head = (total + 1) // 2 if mode == "SAME_LOWER" else total // 2
            begins.append(head)
            ends.append(total - head)
        return begins, ends
    if mode == "VALID":
        return [0] * rank, [0] * rank
    pads = [int(p) for p in attrs.get("pads", [0] * (2 * rank))]
    return pads[:rank], pads[rank:]


@dataclasses.dataclass
class _Item:
    node: gs.Node
    delta_w: np.ndarray
    mean: InputMean
    key: tuple[str, bool, int]
    shift: np.ndarray | None = None


class BiasCorrection:
    """Corrects the biases of compute nodes whose float weights are about to be quantized.

    Use in three steps around the writer that quantizes the weights:

    1. `measure(model, data)`: one streaming pass of the float model over the calibration
       data, reducing E[x] of every node's activation input.
    2. `correct()`, before biases are quantized: Conv and Gemm get `bias - shift` (a node
       without a bias gets one: Conv's third input, Gemm's C), as does the constant of a
       bias Add that alone reads a MatMul's output.
    3. `finish()`, after the writer: each other MatMul with a 2-D input gets an
       `Add(-shift)` between it and its output tensor (whatever reads it, Q or absorbed Relu,
       still reads it; onnxruntime fuses the pair into QGemm). Returns how many nodes were
       corrected. A bias-less MatMul with a higher-rank input stays uncorrected: onnxruntime
       would run MatMul + Add as a reshaped float Gemm, losing the int8 kernel.

    Args:
        graph: The float graph.
        nodes: Conv, Gemm and MatMul nodes with a constant float weight in input 1.
        channel_axis: The axis of the weight quantized per channel (None: per tensor), as
            the quantizer chooses it for the node.
        grid: The weight grid.
    """

    def __init__(
        self,
        graph: gs.Graph,
        nodes: Iterable[gs.Node],
        channel_axis: Callable[[gs.Node, np.ndarray], int | None],
        grid: Grid = INT8,
    ) -> None:
        self.graph = graph
        self.items: list[_Item] = []
        self._pending: list[_Item] = []
        self._corrected = 0
        means: dict[tuple[str, bool, int], InputMean] = {}
        for node in nodes:
            weight = read_constant(node.inputs[1]) if len(node.inputs) > 1 else None
            source = node.inputs[0] if node.inputs else None
            if node.op not in OPS or weight is None or source is None or not source.name:
                continue
            if node.op == "MatMul" and weight.ndim != 2:
                continue
            spatial = node.op == "Conv"
            axis = 0 if node.op == "Gemm" and int(node.attrs.get("transA", 0)) else -1
            key = (source.name, spatial, axis)
            mean = means.setdefault(key, InputMean(spatial, axis))
            delta = weight_error(weight, channel_axis(node, weight), grid)
            self.items.append(_Item(node, delta, mean, key))
        self._means = means

    def input_names(self) -> list[str]:
        """The activation tensors whose means are needed."""
        return list(dict.fromkeys(name for name, _, _ in self._means))

    def measure(self, model: onnx.ModelProto, data: Iterable[Mapping[str, np.ndarray]]) -> int:
        """Streams `data` through the float `model` once; returns the samples seen."""
        names = self.input_names()
        if not names:
            return 0
        samples = 0
        broken: set[tuple[str, bool, int]] = set()
        with Probe(model, names, label="bias correction") as probe:
            for values in probe.stream(data):
                samples += 1
                for key, mean in self._means.items():
                    value = values.get(key[0])
                    if key in broken or value is None or not value.size:
                        continue
                    try:
                        if np.isfinite(value).all():
                            mean.add(value)
                    except ValueError:  # a layout the node cannot read: no correction
                        broken.add(key)
        for item in self.items:
            item.shift = None if item.key in broken else self._shift(item)
        return samples

    def _shift(self, item: _Item) -> np.ndarray | None:
        mean = item.mean.value()
        if mean is None:
            return None
        node = item.node
        try:
            if node.op == "Conv":
                shift = conv_bias_shift(item.delta_w, mean, node.attrs)
            else:
                transposed = node.op == "Gemm" and bool(int(node.attrs.get("transB", 0)))
                shift = linear_bias_shift(item.delta_w, mean, transposed=transposed)
        except ValueError:
            return None  # shapes the node cannot have had at run time: leave it alone
        return shift if np.isfinite(shift).all() else None

    def correct(self) -> int:
        """Writes the corrected float biases of Conv, Gemm and MatMul-with-bias-Add nodes."""
        used = set(self.graph.tensors()) | {n.name for n in self.graph.nodes if n.name}
        for item in self.items:
            if item.shift is None:
                continue
            node = item.node
            if node.op == "MatMul":
                if self._adjust_bias_add(item, used):
                    continue
                # onnxruntime fuses a 2-D MatMul + Add into QGemm; with more dims it reshapes
                # around a float Gemm, losing the int8 kernel (measured on 1.32): left as is.
                if item.mean.rank == 2:
                    self._pending.append(item)
                continue
            if node.op == "Conv":
                shift = item.shift
            else:
                beta = float(node.attrs.get("beta", 1.0))
                if beta == 0.0:
                    continue
                shift = item.shift / beta
            old = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
            bias = read_constant(old) if old is not None else np.zeros(shift.shape, np.float32)
            if bias is None or bias.dtype != np.float32:
                continue
            base = old.name if old is not None else f"{node.name or node.op}_bias"
            constant = gs.Constant(
                fresh_name(used, f"{base}_corrected"), (bias - shift).astype(np.float32)
            )
            if len(node.inputs) > 2:
                node.inputs[2] = constant
            else:
                node.inputs.append(constant)
            self._corrected += 1
        return self._corrected

    def _adjust_bias_add(self, item: _Item, used: set[str]) -> bool:
        node, shift = item.node, item.shift
        assert shift is not None
        out = node.outputs[0]
        readers = list(out.outputs)
        if len(readers) != 1 or readers[0].op != "Add" or is_graph_output(self.graph, out):
            return False
        add = readers[0]
        if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
            return False
        index = 1 if add.inputs[0] is out else 0
        value = read_constant(add.inputs[index])
        columns = shift.shape[0]
        if value is None or value.dtype != np.float32:
            return False
        if value.ndim and (
            any(d != 1 for d in value.shape[:-1]) or value.shape[-1] not in (1, columns)
        ):
            return False
        shape = (*value.shape[:-1], columns) if value.ndim else (columns,)
        corrected = (np.broadcast_to(value, shape) - shift).astype(np.float32)
        base = add.inputs[index].name or f"{add.name or 'Add'}_bias"
        add.inputs[index] = gs.Constant(fresh_name(used, f"{base}_corrected"), corrected)
        self._corrected += 1
        return True

    def finish(self) -> int:
        """Puts an `Add(-shift)` after each MatMul without a bias Add; the corrected count."""
        used = set(self.graph.tensors()) | {n.name for n in self.graph.nodes if n.name}
        for item in self._pending:
            node, shift = item.node, item.shift
            assert shift is not None
            out = node.outputs[0]
            raw = gs.Variable(
                fresh_name(used, f"{out.name}_uncorrected"), dtype=np.float32, shape=out.shape
            )
            node.outputs[0] = raw
            self.graph.nodes.append(
                gs.Node(
                    "Add",
                    fresh_name(used, f"{node.name or 'MatMul'}_bias_correction"),
                    inputs=[
                        raw,
                        gs.Constant(
                            fresh_name(used, f"{node.name or 'MatMul'}_bias"),
                            (-shift).astype(np.float32),
                        ),
                    ],
                    outputs=[out],
                )
            )
            self._corrected += 1
        self._pending = []
        return self._corrected
