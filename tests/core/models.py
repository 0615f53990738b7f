"""Small hand-built models shared by the core tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny(opset: int = 17) -> onnx.ModelProto:
    """x -> Identity -> Add(c) -> Relu -> y, with a dead Sigmoid."""
    c = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "c")
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["x1"]),
            helper.make_node("Add", ["x1", "c"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
            helper.make_node("Sigmoid", ["a"], ["dead"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [c],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test"
    )
    model.ir_version = 8
    model.metadata_props.add(key="author", value="dsopt-tests")
    return model
