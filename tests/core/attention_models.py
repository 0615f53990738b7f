"""Attention graphs spelled the way torch's exporters write them (for detector and pass tests)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Spellings observed in torch 2.13 exports of transformers BERT/GPT-2 (eager and sdpa).
SPELLINGS = (
    "legacy",  # Kᵀ = Transpose(0,2,3,1)(Reshape(k)); scores Mul 1/sqrt(H)  (TorchScript eager)
    "div",  # as legacy, Div by sqrt(H)
    "sqrt-split",  # Mul by H**-0.25 on Q and on Kᵀ; Softmax -> IsNaN/Where guard (sdpa)
    "dynamo-sdpa",  # Kᵀ = Reshape(-1,L,H) -> Transpose(0,2,1) -> Reshape(B,N,H,L) of K
    "kt-transpose",  # K heads (0,2,1,3) then Transpose(0,1,3,2) at the MatMul
    "bnsh",  # 4-D q, k, v graph inputs (B, N, S, H), Kᵀ by Transpose(0,1,3,2)
    "bnsh-kt",  # 4-D q, v and Kᵀ (B, N, H, L) as graph inputs
)
MASKS = (
    None,
    "additive",
    "boolean",
    "boolean-inverted",
    "causal-const",
    "causal-bool",
    "causal-trilu",
    "causal-where-add",
)
NEAR_MISSES = (None, "softmax-axis", "scale-input", "extra-reader", "mask-shape", "probs-output")

_F = TensorProto.FLOAT
_MIN = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to build: sizes, spelling, mask kind, fused QKV, near miss, opset."""

    batch: int = 2
    seq: int = 4
    heads: int = 2
    size: int = 4
    spelling: str = "legacy"
    mask: str | None = None
    fused_qkv: bool = False
    near_miss: str | None = None
    opset: int = 17
    dropout: bool = False


def build(spec: Spec, seed: int = 0) -> onnx.ModelProto:
    """The model for `spec`: inputs x (B, S, D) (or q, k, v heads) [+ mask], output y."""
    rng = np.random.default_rng(seed)
    b, s, n, h = spec.batch, spec.seq, spec.heads, spec.size
    if spec.near_miss == "mask-shape":
        b = 1  # the mask's batch of 3 then grows the scores (a valid model, not attention)
    d = n * h
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs = [helper.make_tensor_value_info("y", _F, None)]
    counter = [0]

    def const(value: np.ndarray, hint: str = "c") -> str:
        counter[0] += 1
        name = f"{hint}{counter[0]}"
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(op_type: str, ins: list[str], **attrs: object) -> str:
        counter[0] += 1
        out = f"{op_type.lower()}{counter[0]}"
        nodes.append(helper.make_node(op_type, ins, [out], name=out, **attrs))
        return out

    four_d = spec.spelling.startswith("bnsh")
    if four_d:
        inputs += [helper.make_tensor_value_info("q", _F, [b, n, s, h])]
        if spec.spelling == "bnsh-kt":
            inputs.append(helper.make_tensor_value_info("kt", _F, [b, n, h, s]))
            kt = "kt"
        else:
            inputs.append(helper.make_tensor_value_info("k", _F, [b, n, s, h]))
            kt = op("Transpose", ["k"], perm=[0, 1, 3, 2])
        inputs.append(helper.make_tensor_value_info("v", _F, [b, n, s, h]))
        q4, v4 = "q", "v"
    else:
        inputs.append(helper.make_tensor_value_info("x", _F, [b, s, d]))
        if spec.fused_qkv:
            qkv = op("MatMul", ["x", const(rng.standard_normal((d, 3 * d)).astype(np.float32))])
            counter[0] += 1
            names = [f"split{counter[0]}_{i}" for i in range(3)]
            nodes.append(
                helper.make_node(
                    "Split", [qkv, const(np.array([d, d, d], np.int64))], names, axis=2
                )
            )
            q3, k3, v3 = names
        else:
            q3, k3, v3 = (
                op("MatMul", ["x", const(rng.standard_normal((d, d)).astype(np.float32))])
                for _ in range(3)
            )
        shape = const(np.array([b, s, -1, h], np.int64))
        qr, kr, vr = (op("Reshape", [t, shape]) for t in (q3, k3, v3))
        q4 = op("Transpose", [qr], perm=[0, 2, 1, 3])
        v4 = op("Transpose", [vr], perm=[0, 2, 1, 3])
        if spec.spelling in ("legacy", "div", "sqrt-split"):
            kt = op("Transpose", [kr], perm=[0, 2, 3, 1])
        else:
            k4 = op("Transpose", [kr], perm=[0, 2, 1, 3])
            if spec.spelling == "kt-transpose":
                kt = op("Transpose", [k4], perm=[0, 1, 3, 2])
            else:
                flat = op("Reshape", [k4, const(np.array([-1, s, h], np.int64))])
                flat_t = op("Transpose", [flat], perm=[0, 2, 1])
                kt = op("Reshape", [flat_t, const(np.array([b, n, h, s], np.int64))])

    scale = 1.0 / math.sqrt(h)
    if spec.spelling in ("sqrt-split", "dynamo-sdpa"):
        root = const(np.array(math.sqrt(scale), np.float32))
        q4 = op("Mul", [q4, root])
        kt = op("Mul", [kt, root])
        scores = op("MatMul", [q4, kt])
        if spec.near_miss == "scale-input":
            inputs.append(helper.make_tensor_value_info("scale", _F, []))
            scores = op("Mul", [scores, "scale"])
    else:
        scores = op("MatMul", [q4, kt])
        if spec.near_miss == "scale-input":
            inputs.append(helper.make_tensor_value_info("scale", _F, []))
            scores = op("Mul", [scores, "scale"])
        elif spec.spelling == "div":
            scores = op("Div", [scores, const(np.array(math.sqrt(h), np.float32))])
        else:
            scores = op("Mul", [scores, const(np.array(scale, np.float32))])
    if spec.near_miss == "extra-reader":
        outputs.append(helper.make_tensor_value_info("side", _F, None))
        nodes.append(helper.make_node("Relu", [scores], ["side"]))

    tri = np.tril(np.ones((s, s), bool))
    kind = spec.mask
    if kind == "additive":
        shape = [3, 1, 1, s] if spec.near_miss == "mask-shape" else [b, 1, 1, s]
        inputs.append(helper.make_tensor_value_info("mask", _F, shape))
        scores = op("Add", [scores, "mask"])
    elif kind in ("boolean", "boolean-inverted"):
        shape = [3, 1, 1, s] if spec.near_miss == "mask-shape" else [b, 1, 1, s]
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, shape))
        fill = const(np.array(_MIN, np.float32))
        branches = [scores, fill] if kind == "boolean" else [fill, scores]
        scores = op("Where", ["mask", *branches])
    elif kind == "expanded":
        # transformers: Where(Expand(And(ones(1,1,S,1), pad(B,1,1,L)), (B,1,S,L)), 0, min)
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [b, 1, 1, s]))
        both = op("And", [const(np.ones((1, 1, s, 1), bool)), "mask"])
        wide = op("Expand", [both, const(np.array([b, 1, s, s], np.int64))])
        zero, low = const(np.array(0.0, np.float32)), const(np.array(_MIN, np.float32))
        scores = op("Add", [scores, op("Where", [wide, zero, low])])
    elif kind == "causal-const":
        scores = op("Add", [scores, const(np.where(tri, 0, _MIN).astype(np.float32))])
    elif kind == "causal-bool":
        scores = op("Where", [const(tri.reshape(1, 1, s, s)), scores, const(np.float32(_MIN))])
    elif kind == "causal-trilu":
        ones = op(
            "ConstantOfShape",
            [const(np.array([s, s], np.int64))],
            value=numpy_helper.from_array(np.array([1], np.bool_)),
        )
        cond = op("Trilu", [ones], upper=0)
        scores = op("Where", [cond, scores, const(np.float32(-np.inf))])
    elif kind == "causal-where-add":
        scores = op("Where", [const(tri.reshape(1, 1, s, s)), scores, const(np.float32(_MIN))])
        inputs.append(helper.make_tensor_value_info("mask", _F, [b, 1, 1, s]))
        scores = op("Add", [scores, "mask"])

    probs = op("Softmax", [scores], axis=2 if spec.near_miss == "softmax-axis" else -1)
    if spec.spelling in ("sqrt-split", "dynamo-sdpa"):
        isnan = op("IsNaN", [probs])
        probs = op("Where", [isnan, const(np.array(0.0, np.float32)), probs])
    if spec.dropout:
        probs = op("Dropout", [probs])
    if spec.near_miss == "probs-output":
        outputs.append(helper.make_tensor_value_info(probs, _F, None))
    out4 = op("MatMul", [probs, v4])
    if four_d:
        nodes.append(helper.make_node("Identity", [out4], ["y"]))
    else:
        merged = op("Transpose", [out4], perm=[0, 2, 1, 3])
        nodes.append(
            helper.make_node("Reshape", [merged, const(np.array([b, s, -1], np.int64))], ["y"])
        )
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    ir = 11 if spec.opset >= 23 else 8
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)])
    model.ir_version = ir
    model.doc_string = "inverted" if kind == "boolean-inverted" else ""
    return onnx.shape_inference.infer_shapes(model)


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for `model`: normal floats; masks that keep position 0 of every row."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name == "mask":
            keep = rng.random(shape) < 0.7
            keep[..., 0] = True
            if vi.type.tensor_type.elem_type == TensorProto.BOOL:
                out[vi.name] = keep if "inverted" not in model.doc_string else ~keep
            else:
                out[vi.name] = np.where(keep, 0.0, -10000.0).astype(np.float32)
        elif vi.name == "scale":
            out[vi.name] = np.array(0.5, np.float32)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out
