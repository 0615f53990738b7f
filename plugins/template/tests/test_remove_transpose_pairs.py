"""The template pass, tested with dsopt.testing like any plugin's pass."""

from __future__ import annotations

import numpy as np
from dsopt_myplugin import RemoveTransposePairs
from onnx import TensorProto, helper

from dsopt.testing import check_pass


def _model(second_perm):
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0]),
            helper.make_node("Transpose", ["t"], ["u"], perm=second_perm),
            helper.make_node("Relu", ["u"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_cancelling_pair_removed_and_outputs_equal():
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4), np.float32)}
    rewritten, result = check_pass(RemoveTransposePairs(), _model([2, 0, 1]), feeds=feeds)
    assert result.stats["removed-pairs"] == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Relu"]


def test_non_cancelling_pair_kept():
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4), np.float32)}
    rewritten, result = check_pass(RemoveTransposePairs(), _model([1, 2, 0]), feeds=feeds)
    assert not result.changed
    assert [n.op_type for n in rewritten.graph.node] == ["Transpose", "Transpose", "Relu"]
