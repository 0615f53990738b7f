from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from onnx import TensorProto, helper, numpy_helper

from dsopt import numerics
from dsopt.pass_infra import verify_model
from dsopt.passes.convert_float16 import DEFAULT_BLOCK_OPS, ConvertFloat16
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden
from dsopt.testing.strategies import random_feeds

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/convert-float16")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
TOL = ConvertFloat16.tolerance


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + text)


def elem_types(values) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


def fp16_initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(ConvertFloat16(), case)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("mlp_blocks_exp", {"nodes": 4, "blocked": 1, "casts": 4, "initializers": 2, "io": 1}),
        ("shared_weight", {"nodes": 2, "blocked": 1, "casts": 2, "initializers": 1, "io": 1}),
        ("cast_pair_cancelled", {"nodes": 2, "casts": 1, "initializers": 1, "pairs": 1, "io": 1}),
        ("shape_math_stays_float32", {"nodes": 1, "casts": 2, "io": 1}),
        ("layer_norm_fp16_input", {"nodes": 2, "blocked": 1, "casts": 2, "initializers": 3}),
    ],
)
def test_golden_stats(case, expected):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    _, result = apply_pass(ConvertFloat16(), onnx.parser.parse_model(path.read_text()))
    assert fired(result.stats) == expected


def test_declares_a_lossy_precision_pass():
    assert ConvertFloat16.stage == "precision" and ConvertFloat16.exactness == "lossy"
    assert 0 < TOL <= 1e-2
    assert {o.name: o.default for o in ConvertFloat16.options()} == {
        "keep_io_types": True,
        "block_ops": "",
        "samples": 16,
        "headroom": 16.0,
        "calibrated_unblock": False,
        "dtype": "float16",
        "weights_only": False,
    }
    assert {"Exp", "Pow", "ReduceSum", "GlobalAveragePool", "Range"} <= set(DEFAULT_BLOCK_OPS)
    assert "Softmax" not in DEFAULT_BLOCK_OPS and "LayerNormalization" not in DEFAULT_BLOCK_OPS


def test_float32_interface_is_kept_by_default():
    model = parse("""
    g (float[2, 4] x) => (float[2, 3] y) <float[4, 3] w = {1.0, -1.0, 0.5, 2.0, -0.5, 1.5,
                                                          1.0, 2.0, 3.0, 0.1, 0.2, 0.3}> {
      y = MatMul (x, w)
    }""")
    rewritten, _ = check_pass(ConvertFloat16(), model)
    assert elem_types(rewritten.graph.input) == [TensorProto.FLOAT]
    assert elem_types(rewritten.graph.output) == [TensorProto.FLOAT]
    assert fp16_initializers(rewritten) == {"w"}
    assert op_types(rewritten.graph) == ["Cast", "MatMul", "Cast"]


def test_without_keep_io_types_the_interface_is_float16():
    model = parse("""
    g (float[2, 4] x) => (float[2, 4] y, float[2, 1] s) <int64[1] a = {1}> {
      y = Sigmoid (x)
      s = ReduceSum <keepdims = 1> (y, a)
    }""")
    rewritten, _ = apply_pass(ConvertFloat16(keep_io_types=False), model)
    assert verify_model(rewritten) is None
    assert elem_types(rewritten.graph.input) == [TensorProto.FLOAT16]
    # The blocked ReduceSum's output is cast down to the float16 interface too.
    assert elem_types(rewritten.graph.output) == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    feeds = {"x": np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)}
    reference = numerics.run_model(model, feeds, label="fp32")
    got = numerics.run_model(rewritten, {"x": feeds["x"].astype(np.float16)}, label="fp16")
    for name in ("y", "s"):
        np.testing.assert_allclose(got[name], reference[name], rtol=TOL, atol=TOL)


def test_block_ops_option_keeps_more_ops_float32():
    model = parse("""
    g (float[2, 4] x) => (float[2, 4] y) {
      t = Tanh (x)
      y = Sigmoid (t)
    }""")
    rewritten, result = check_pass(ConvertFloat16.from_options({"block_ops": "Sigmoid"}), model)
    assert fired(result.stats) == {"nodes": 1, "blocked": 1, "casts": 2}
    assert op_types(rewritten.graph) == ["Cast", "Tanh", "Cast", "Sigmoid"]


def test_initializer_values_beyond_float16_are_clipped():
    model = parse("""
    g (float[3] x) => (float[3] y) <float[3] c = {1e6, -1e6, 1.0}> {
      y = Add (x, c)
    }""")
    rewritten, result = apply_pass(ConvertFloat16(), model)
    assert result.stats["clipped"] == 2
    (c,) = [t for t in rewritten.graph.initializer if t.name == "c"]
    assert np.isfinite(numpy_helper.to_array(c)).all()


def test_other_domains_and_subgraph_readers_stay_float32():
    then = helper.make_graph(
        [helper.make_node("Neg", ["t"], ["o"])],
        "then",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["t"], ["o2"])],
        "else",
        [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Gelu", ["t"], ["z"], domain="com.microsoft"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2]),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=8,
    )
    rewritten, result = apply_pass(ConvertFloat16(), model)
    assert result.stats["nodes"] == 1  # only Tanh
    feeds = {"x": np.array([0.5, -2.0], np.float32), "c": np.array(True)}
    reference = numerics.run_model(model, feeds, label="fp32")
    got = numerics.run_model(rewritten, feeds, label="fp16")
    for name in ("y", "z"):
        np.testing.assert_allclose(got[name], reference[name], rtol=TOL, atol=TOL)


def _classifier() -> onnx.ModelProto:
    """Conv-Relu x2, GlobalAveragePool, Gemm: 10 classes from a 3x16x16 image."""
    rng = np.random.default_rng(3)

    def const(name, *shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("f4"), name)

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1),
    ]
    weights = [
        const("w0", 16, 3, 3, 3, scale=0.3),
        const("b0", 16, scale=0.1),
        const("w1", 32, 16, 3, 3, scale=0.1),
        const("b1", 32, scale=0.1),
        const("fc", 10, 32, scale=0.3),
        const("fb", 10, scale=0.1),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [8, 10])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_classifier_keeps_its_argmax():
    """The task-level check: fp16 changes no prediction whose fp32 margin exceeds the bound."""
    model = _classifier()
    rewritten, _ = check_pass(ConvertFloat16(), model)
    assert fp16_initializers(rewritten) == {"w0", "b0", "w1", "b1", "fc", "fb"}
    rng = np.random.default_rng(0)
    kept = margins = 0
    for _ in range(4):
        feeds = {"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)}
        ref = numerics.run_model(model, feeds, label="fp32")["logits"]
        got = numerics.run_model(rewritten, feeds, label="fp16")["logits"]
        top2 = np.sort(ref, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > TOL * (1 + np.abs(top2[:, 1]))
        margins += int(clear.sum())
        kept += int((ref.argmax(1) == got.argmax(1))[clear].sum())
    assert margins >= 24 and kept == margins


#: Ops whose output jumps where the input crosses a threshold: an fp16 input a rounding step
#: away from it flips the result, so no error bound holds through them (the pass's contract
#: covers continuous graphs). CI found one: Round(x) == 1 choosing a Where branch.
DISCONTINUOUS = frozenset({"Round", "Greater", "Less", "Equal", "Where"})
CONTINUOUS_OPS = [op for op in strategies.OP_NAMES if op not in DISCONTINUOUS]


@given(model=strategies.models(ops=CONTINUOUS_OPS))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    """Valid, idempotent, float32 interface kept, outputs within 1e-2 * (1 + |y|) (onnxruntime).

    onnxruntime's CPU provider runs every op the strategy draws in float16 (ops without a
    float16 kernel get Casts around a float32 one), so no op is blocked for its sake.
    """
    rewritten, result = apply_pass(ConvertFloat16(), model)
    assert verify_model(rewritten) is None
    assert elem_types(rewritten.graph.input) == elem_types(model.graph.input)
    assert elem_types(rewritten.graph.output) == elem_types(model.graph.output)
    _, again = apply_pass(ConvertFloat16(), rewritten)
    assert not again.changed, again.stats
    report = numerics.check_equivalence(
        model, rewritten, inputs=[random_feeds(model)], rtol=TOL, atol=TOL
    )
    assert report.ok, report.to_dict()


@given(model=strategies.models())
@settings(max_examples=PROPERTY_EXAMPLES // 2)
def test_property_with_discontinuous_ops_stays_valid(model):
    """With Round/comparisons/Where drawn too the result is still valid and idempotent."""
    rewritten, _ = apply_pass(ConvertFloat16(), model)
    assert verify_model(rewritten) is None
    _, again = apply_pass(ConvertFloat16(), rewritten)
    assert not again.changed, again.stats
