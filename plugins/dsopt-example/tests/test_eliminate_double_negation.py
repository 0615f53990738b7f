"""Tests of the example plugin, written with dsopt.testing like any plugin's tests."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import onnx
from onnx import TensorProto, helper

from dsopt.plugin import PluginHost
from dsopt.testing import apply_pass, check_pass
from dsopt_example import EliminateDoubleNegation


def _model(nodes, output="y"):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_double_negation_removed_and_outputs_equal():
    model = _model(
        [
            helper.make_node("Neg", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ]
    )
    rewritten, result = check_pass(
        EliminateDoubleNegation(),
        model,
        feeds={"x": np.random.default_rng(0).standard_normal((2, 3), np.float32)},
    )
    assert result.stats["removed-pairs"] == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Relu"]


def test_single_negation_and_graph_output_kept():
    model = _model([helper.make_node("Neg", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])])
    rewritten, result = apply_pass(EliminateDoubleNegation(), model)
    assert not result.changed
    assert [n.op_type for n in rewritten.graph.node] == ["Neg", "Neg"]
    onnx.checker.check_model(rewritten, full_check=True)


def test_plugin_found_through_entry_point_and_slotted_into_default_pipeline():
    names = {ep.name for ep in importlib.metadata.entry_points(group="dsopt")}
    assert "example" in names
    host = PluginHost()
    assert host.passes.providers["eliminate-double-negation"] == "example"
    from dsopt.driver import build_pipeline

    pipeline, _ = build_pipeline(host, passes=None, target="onnxruntime")
    order = pipeline.names()
    assert order.index("eliminate-double-negation") == order.index("eliminate-noops") + 1
