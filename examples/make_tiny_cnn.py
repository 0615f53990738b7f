"""Writes examples/tiny_cnn.onnx: a small CNN spelled the way exporters spell them.

It has what real exported models carry and dsopt removes: Identity and inference Dropout
nodes, a Flatten written as Shape->Gather->Unsqueeze->Concat->Reshape, weights transposed by
a node at run time, a duplicated subexpression and a dead branch. Batch size is dynamic (N).
Run: python examples/make_tiny_cnn.py [OUT.onnx]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        value = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        return numpy_helper.from_array(value, name)

    inits = [
        weight("conv1.w", 8, 3, 3, 3),
        weight("conv1.b", 8),
        weight("conv2.w", 16, 8, 3, 3),
        weight("conv2.b", 16),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn.var"),
        weight("fc.w_t", 10, 16),  # stored transposed; a Transpose node fixes it at run time
        weight("fc.b", 10),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Identity", ["input"], ["x0"]),
        helper.make_node("Conv", ["x0", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.w", "conv2.b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c2", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b2"]
        ),
        helper.make_node("Relu", ["b2"], ["r2"]),
        helper.make_node("Relu", ["b2"], ["r2_again"]),  # duplicate of r2
        helper.make_node("Add", ["r2", "r2_again"], ["sum2"]),
        helper.make_node("Mul", ["sum2", "one"], ["scaled"]),  # multiply by 1
        helper.make_node("GlobalAveragePool", ["scaled"], ["gap"]),
        helper.make_node("Dropout", ["gap"], ["drop"]),
        helper.make_node("Shape", ["drop"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["drop", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["fc.w_t"], ["fc.w"], perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "fc.w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc.b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("Sigmoid", ["logits"], ["unused"]),  # dead branch
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dsopt-example"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny_cnn.onnx")
    onnx.save_model(build(), out)
    print(f"wrote {out}")
