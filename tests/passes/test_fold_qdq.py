from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from onnx import TensorProto, helper, numpy_helper

from dsopt.errors import ModelError
from dsopt.passes import FoldQdq
from dsopt.passes.fold_qdq import QuantParams, quantize, round_trips
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fold-qdq")
HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'
RULES = {"dq-q", "quantize-constant", "layout-through", "removed-dead"}
#: onnxruntime rewrites that change the values of a QDQ graph (or, QDQS8ToU8Transformer,
#: break a valid opset-21 one, onnxruntime#25526): DoubleQDQPairsRemover merges
#: Q -> DQ -> Q -> DQ into one pair of other parameters, QDQSelectorActionTransformer fuses
#: QLinear* kernels (lookup tables, integer requantization). Whether they fire depends on the
#: neighbourhood, so they may fire on one of two equivalent graphs only.
ORT_QDQ_REWRITES = ("DoubleQDQPairsRemover", "QDQSelectorActionTransformer", "QDQS8ToU8Transformer")


def parse(text: str, opset: int = 13) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER.format(opset=opset) + text)


def run(
    model: onnx.ModelProto, feeds, *, optimize: bool = False, disabled=()
) -> dict[str, np.ndarray]:
    """onnxruntime CPU outputs, with the session settings of dsopt.numerics."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    try:
        session = ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(disabled),
        )
    except Exception as e:  # onnxruntime's errors derive from Exception only
        raise ModelError(f"onnxruntime cannot load the model: {e}") from e
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=True) for k in a
    )


def count(model: onnx.ModelProto, op: str) -> int:
    return op_types(model.graph).count(op)


# -- golden cases --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FoldQdq(), case)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("dq_q_chain", {"dq-q": 2, "removed-dead": 1}),
        ("qat_weight", {"quantize-constant": 1}),
        ("layout_through", {"layout-through": 4, "removed-dead": 4}),
        ("kept", {}),
        ("subgraph", {"dq-q": 1}),
    ],
)
def test_golden_stats(case, expected):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    rewritten, result = apply_pass(FoldQdq(), onnx.parser.parse_model(path.read_text()))
    assert fired(result.stats) == expected
    assert set(result.stats) == RULES


def test_layout_through_keeps_a_float_reader_and_the_output_name():
    path = next(p for p in GOLDEN if p.name.startswith("layout_through."))
    model = onnx.parser.parse_model(path.read_text())
    rewritten, _ = check_pass(FoldQdq(), model)
    producers = {out: node for node in rewritten.graph.node for out in node.output}
    assert producers["flat_f"].op_type == "DequantizeLinear"  # the graph output, now DQ(int)
    assert producers["fq"].op_type == "Reshape"  # the Reshape works on int8
    assert producers["pq"].op_type == "MaxPool" and producers["jq"].op_type == "Concat"
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in rewritten.graph.output]
    assert outputs == [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]


# -- the rules on small cases ----------------------------------------------------------------------
def test_q_of_a_graph_input_round_trip_becomes_identity_for_an_output():
    model = parse("""
    g (uint8[4] q) => (uint8[4] y) <float s = {0.25}, uint8 z = {3}> {
      d = DequantizeLinear (q, s, z)
      y = QuantizeLinear (d, s, z)
    }""")
    rewritten, result = check_pass(FoldQdq(), model, feeds={"q": np.arange(4, dtype=np.uint8)})
    assert fired(result.stats) == {"dq-q": 1, "removed-dead": 1}
    assert op_types(rewritten.graph) == ["Identity"]
    assert rewritten.graph.output[0].name == "y"


def test_missing_zero_points_compare_equal_to_explicit_zeros():
    model = parse("""
    g (float[4] x) => (float[4] y) <float s = {0.25}, uint8 z = {0}> {
      q = QuantizeLinear (x, s)
      d = DequantizeLinear (q, s, z)
      q2 = QuantizeLinear (d, s, z)
      y = DequantizeLinear (q2, s)
    }""")
    rewritten, result = check_pass(FoldQdq(), model)
    assert fired(result.stats)["dq-q"] == 1
    assert op_types(rewritten.graph) == ["QuantizeLinear", "DequantizeLinear"]


def test_per_axis_round_trip_folds_when_axes_agree():
    model = parse("""
    g (float[2, 3] x) => (float[2, 3] y)
      <float[3] s = {0.1, 0.2, 0.3}, int8[3] z = {0, 1, -1}, float[3] s2 = {0.1, 0.2, 0.3}> {
      q = QuantizeLinear <axis = 1> (x, s, z)
      d = DequantizeLinear <axis = -1> (q, s, z)
      q2 = QuantizeLinear <axis = 1> (d, s2, z)
      y = DequantizeLinear <axis = 1> (q2, s, z)
    }""")
    _, result = check_pass(FoldQdq(), model)
    assert fired(result.stats)["dq-q"] == 1


NEAR_MISSES = {
    "other-scale": """
        g (float[4] x) => (float[4] y) <float s = {0.25}, float s2 = {0.5}, uint8 z = {3}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          y_in = QuantizeLinear (d, s2, z)
          y = DequantizeLinear (y_in, s2, z)
        }""",
    "other-type": """
        g (float[4] x) => (float[4] y) <float s = {0.25}, uint8 z = {0}, int8 z8 = {0}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          y_in = QuantizeLinear (d, s, z8)
          y = DequantizeLinear (y_in, s, z8)
        }""",
    "other-axis": """
        g (float[3, 3] x) => (float[3, 3] y)
          <float[3] s = {0.1, 0.2, 0.3}, uint8[3] z = {0, 0, 0}> {
          d_in = QuantizeLinear <axis = 0> (x, s, z)
          d = DequantizeLinear <axis = 0> (d_in, s, z)
          y_in = QuantizeLinear <axis = 1> (d, s, z)
          y = DequantizeLinear <axis = 1> (y_in, s, z)
        }""",
    "subnormal-scale": """
        g (float[4] x) => (float[4] y) <float s = {1e-45}, uint8 z = {3}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          y_in = QuantizeLinear (d, s, z)
          y = DequantizeLinear (y_in, s, z)
        }""",
    "dynamic-scale": """
        g (float[4] x, float s) => (float[4] y) <uint8 z = {3}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          y_in = QuantizeLinear (d, s, z)
          y = DequantizeLinear (y_in, s, z)
        }""",
    "per-axis-through-transpose": """
        g (float[2, 3] x) => (float[3, 2] y)
          <float[3] s = {0.1, 0.2, 0.3}, uint8[3] z = {1, 2, 3}> {
          d_in = QuantizeLinear <axis = 1> (x, s, z)
          d = DequantizeLinear <axis = 1> (d_in, s, z)
          t = Transpose (d)
          y_in = QuantizeLinear <axis = 0> (t, s, z)
          y = DequantizeLinear <axis = 0> (y_in, s, z)
        }""",
    "non-layout-op": """
        g (float[4] x) => (float[4] y) <float s = {0.25}, uint8 z = {3}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          r = Relu (d)
          y_in = QuantizeLinear (r, s, z)
          y = DequantizeLinear (y_in, s, z)
        }""",
    "concat-of-a-float-input": """
        g (float[4] x, float[4] x2) => (float[8] y) <float s = {0.25}, uint8 z = {3}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          c = Concat <axis = 0> (d, x2)
          y_in = QuantizeLinear (c, s, z)
          y = DequantizeLinear (y_in, s, z)
        }""",
    "maxpool-indices-read": """
        g (float[1, 1, 4, 4] x) => (float[1, 1, 2, 2] y, int64[1, 1, 2, 2] i)
          <float s = {0.25}, uint8 z = {3}> {
          d_in = QuantizeLinear (x, s, z)
          d = DequantizeLinear (d_in, s, z)
          p, i = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (d)
          y_in = QuantizeLinear (p, s, z)
          y = DequantizeLinear (y_in, s, z)
        }""",
    "quantized-weight-is-an-output": """
        g (float[4] x) => (int8[2] wq, float[4] y)
          <float[2] w = {0.5, -0.3}, float s = {0.01}, int8 z = {0}> {
          wq = QuantizeLinear (w, s, z)
          y = Relu (x)
        }""",
}


@pytest.mark.parametrize("text", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(text):
    _, result = check_pass(FoldQdq(), parse(text))
    assert not result.changed, fired(result.stats)


def test_maxpool_needs_opset_12_for_integers():
    text = """
    g (float[1, 1, 4, 4] x) => (float[1, 1, 2, 2] y) <float s = {0.25}, int8 z = {3}> {
      d_in = QuantizeLinear (x, s, z)
      d = DequantizeLinear (d_in, s, z)
      p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (d)
      y_in = QuantizeLinear (p, s, z)
      y = DequantizeLinear (y_in, s, z)
    }"""
    _, at_11 = check_pass(FoldQdq(), parse(text, opset=11))
    _, at_12 = check_pass(FoldQdq(), parse(text, opset=12))
    assert not at_11.changed
    assert fired(at_12.stats)["layout-through"] == 1


def test_int16_takes_reshape_but_not_maxpool():
    text = """
    g (float[1, 1, 4, 4] x) => (float[1, 1, 2, 2] y, float[1, 16] r)
      <float s = {0.001}, int16 z = {7}, int64[2] shape = {1, 16}> {
      d_in = QuantizeLinear (x, s, z)
      d = DequantizeLinear (d_in, s, z)
      p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (d)
      y_in = QuantizeLinear (p, s, z)
      y = DequantizeLinear (y_in, s, z)
      f = Reshape (d, shape)
      r_in = QuantizeLinear (f, s, z)
      r = DequantizeLinear (r_in, s, z)
    }"""
    rewritten, result = check_pass(FoldQdq(), parse(text, opset=21))
    assert fired(result.stats)["layout-through"] == 1
    assert op_types(rewritten.graph).count("QuantizeLinear") == 2  # x's, and MaxPool's


def test_quantizes_a_scalar_constant_keeping_its_shape():
    model = parse("""
    g (float[3] x) => (float[3] y) <float c = {0.37}, float s = {0.01}, int8 z = {2}> {
      cq = QuantizeLinear (c, s, z)
      cd = DequantizeLinear (cq, s, z)
      y = Mul (x, cd)
    }""")
    rewritten, result = check_pass(FoldQdq(), model)
    assert fired(result.stats) == {"quantize-constant": 1}
    (stored,) = [t for t in rewritten.graph.initializer if t.name == "cq"]
    assert list(stored.dims) == [] and numpy_helper.to_array(stored) == 39


# -- the offline quantization matches onnxruntime bit for bit ------------------------------------
@pytest.mark.parametrize(
    ("dtype", "opset"),
    [(np.uint8, 13), (np.int8, 13), (np.uint8, 19), (np.int8, 21), (np.int16, 21), (np.uint16, 21)],
)
@pytest.mark.parametrize("per_axis", [False, True])
def test_quantize_matches_onnxruntime_bit_for_bit(dtype, opset, per_axis):
    rng = np.random.default_rng(opset + per_axis)
    info = np.iinfo(dtype)
    shape = (4, 3, 5, 6)
    if per_axis:
        scale = rng.uniform(1e-3, 0.5, 3).astype(np.float32)
        zero = rng.integers(info.min // 2, info.max // 2, 3).astype(dtype)
        params = QuantParams(np.dtype(dtype), scale, zero, 1)
        broadcast = scale.reshape(1, 3, 1, 1)
    else:
        scale, zero = np.float32(rng.uniform(1e-3, 0.5)), np.asarray(info.max // 3, dtype)
        params = QuantParams(np.dtype(dtype), np.asarray(scale), zero, None)
        broadcast = scale
    ties = ((rng.integers(-400, 400, shape) + 0.5) * broadcast).astype(np.float32)
    spread = (rng.standard_normal(shape) * 40 * broadcast).astype(np.float32)
    weight = np.where(rng.random(shape) < 0.5, ties, spread).astype(np.float32)
    weight.flat[:6] = [1e30, -1e30, 0.0, -0.0, 3.4e38, -3.4e38]
    node = helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, shape)],
        [
            helper.make_tensor_value_info(
                "q", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape
            )
        ],
        [numpy_helper.from_array(np.asarray(scale), "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (expected,) = run(model, {"w": weight}).values()
    assert np.array_equal(quantize(weight, params), expected)


def test_round_trips_refuses_scales_that_lose_integers():
    int8 = np.dtype(np.int8)
    zero = np.zeros((), np.int8)
    for scale in (0.0, 1e-45, -0.0, np.inf, np.nan, -0.1):
        assert not round_trips(QuantParams(int8, np.asarray(scale, np.float32), zero, None))
    for scale in (1e-30, 0.0039215689, 1.0, 3e30):
        assert round_trips(QuantParams(int8, np.asarray(scale, np.float32), zero, None))


def test_round_trip_claim_holds_in_onnxruntime():
    """Q(DQ(q)) == q in onnxruntime for every uint8 value and assorted scales/zero points."""
    rng = np.random.default_rng(0)
    q = np.arange(256, dtype=np.uint8).reshape(1, -1)
    for _ in range(20):
        scale = np.float32(10 ** rng.uniform(-30, 30))
        zero = np.uint8(rng.integers(0, 256))
        params = QuantParams(np.dtype(np.uint8), np.asarray(scale), np.asarray(zero), None)
        assert round_trips(params)
        model = parse(f"""
        g (uint8[1, 256] q) => (uint8[1, 256] y)
          <float s = {{{float(scale)!r}}}, uint8 z = {{{zero}}}> {{
          y_in = DequantizeLinear (q, s, z)
          y = QuantizeLinear (y_in, s, z)
        }}""")
        assert np.array_equal(run(model, {"q": q})["y"], q)


# -- a QAT export --------------------------------------------------------------------------------
def qat_conv_net() -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-GlobalAveragePool-Gemm as torch's QAT export writes it: uint8
    activations through Q -> DQ, float weights through per-channel int8 Q -> DQ, float bias."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(x, scale, zero, out, axis=None, dtype=np.uint8):
        s = const(f"{out}_scale", np.asarray(scale, np.float32))
        z = const(f"{out}_zero_point", np.asarray(zero, dtype))
        attrs = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{out}_q"], **attrs))
        nodes.append(helper.make_node("DequantizeLinear", [f"{out}_q", s, z], [out], **attrs))
        return out

    def weight(name, shape, axis):
        w = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        rows = np.abs(np.moveaxis(w, axis, 0).reshape(shape[axis], -1)).max(axis=1)
        return qdq(const(name, w), rows / 127, np.zeros(shape[axis]), f"{name}_dq", axis, np.int8)

    x = qdq("x", 4 / 255, 128, "x_dq")
    nodes.append(
        helper.make_node(
            "Conv",
            [
                x,
                weight("w1", (8, 3, 3, 3), 0),
                const("b1", rng.standard_normal(8, dtype=np.float32) * 0.1),
            ],
            ["c1"],
            pads=[1, 1, 1, 1],
        )
    )
    nodes.append(helper.make_node("Relu", ["c1"], ["r1"]))
    r1 = qdq("r1", 3 / 255, 0, "r1_dq")
    nodes.append(helper.make_node("MaxPool", [r1], ["p1"], kernel_shape=[2, 2], strides=[2, 2]))
    p1 = qdq("p1", 3 / 255, 0, "p1_dq")
    nodes.append(helper.make_node("Conv", [p1, weight("w2", (4, 8, 3, 3), 0)], ["c2"]))
    c2 = qdq("c2", 6 / 255, 120, "c2_dq")
    nodes.append(helper.make_node("GlobalAveragePool", [c2], ["g"]))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    f = qdq("f", 4 / 255, 128, "f_dq")
    nodes.append(helper.make_node("Gemm", [f, weight("w3", (5, 4), 0)], ["y"], transB=1))
    graph = helper.make_graph(
        nodes,
        "qat_conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_qat_export_gets_int8_weights_and_the_same_outputs():
    model = qat_conv_net()
    rewritten, result = check_pass(FoldQdq(), model)
    assert fired(result.stats) == {"quantize-constant": 3, "layout-through": 1, "removed-dead": 1}
    stored = {t.name: t.data_type for t in rewritten.graph.initializer}
    assert [stored[f"w{i}_dq_q"] for i in (1, 2, 3)] == [TensorProto.INT8] * 3
    assert not {"w1", "w2", "w3"} & set(stored)  # the float weights are gone
    assert count(rewritten, "QuantizeLinear") == count(model, "QuantizeLinear") - 4
    rng = np.random.default_rng(1)
    for _ in range(3):
        feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
        for optimize in (False, True):
            assert identical(
                run(model, feeds, optimize=optimize), run(rewritten, feeds, optimize=optimize)
            )


# -- properties ----------------------------------------------------------------------------------
def test_a_model_without_qdq_is_left_alone():
    model = parse("g (float[2, 3] x) => (float[3, 2] y) { r = Relu (x)\n y = Transpose (r) }")
    _, result = check_pass(FoldQdq(), model)
    assert not result.changed and set(result.stats) == RULES


@given(model=strategies.models(max_ops=8))
@settings(max_examples=max(1, PROPERTY_EXAMPLES // 4))
def test_property_models_without_qdq_are_unchanged(model):
    _, result = check_pass(FoldQdq(), model)
    assert not result.changed


@given(model=strategies.qdq_models())
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(FoldQdq(), model)
    folds = (
        result.stats["dq-q"] + result.stats["quantize-constant"] + result.stats["layout-through"]
    )
    assert count(rewritten, "QuantizeLinear") == count(model, "QuantizeLinear") - folds
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    assert [(o.name, o.type.tensor_type.elem_type) for o in rewritten.graph.output] == outputs
    constants = {t.name for t in rewritten.graph.initializer}
    assert not any(
        n.op_type == "QuantizeLinear" and n.input[0] in constants for n in rewritten.graph.node
    )
    feeds = strategies.random_feeds(model)
    assert identical(run(model, feeds), run(rewritten, feeds))


@given(model=strategies.qdq_models())
@settings(max_examples=max(1, PROPERTY_EXAMPLES // 2))
def test_qdq_models_are_valid_runnable_and_not_saturated(model):
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    quantized = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_empty_tensor_value_info(name) for name in quantized if name not in known
    )
    inputs = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    floats = [name for name in inputs.values() if name not in known]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in floats)
    values = run(probe, strategies.random_feeds(model))
    for name in quantized:
        q, source = values[name], values.get(inputs[name])
        if source is None:  # a constant weight
            continue
        info = np.iinfo(q.dtype)
        # A constant tensor may sit on one bound, a two-valued one (Sign, a comparison) on
        # both: min-max scales map its two values exactly onto qmin and qmax.
        if np.unique(source).size > 2:
            assert not np.isin(q, (info.min, info.max)).all(), f"{name} is all saturated"


def test_qdq_models_rejects_a_negative_max_abs():
    with pytest.raises(ValueError, match="max_abs"):
        strategies.qdq_models(max_abs=-1.0)
