from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsopt.errors import UsageError
from dsopt.pass_infra import PassContext
from dsopt.passes import QuantizeStatic
from dsopt.quant.calibration import CalibrationData
from dsopt.testing import (
    PROPERTY_EXAMPLES,
    apply_pass,
    check_pass,
    op_types,
    ort_optimized_ops,
    strategies,
)
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/quantize-static")


def _ctx(model: onnx.ModelProto, count: int = 4, seed: int = 0, **shapes) -> PassContext:
    feeds = [strategies.random_feeds(model, seed=seed + i) for i in range(count)]
    return PassContext(calibration=CalibrationData.from_feeds(feeds))


def _conv_net(blocks: int = 3, channels: int = 8) -> onnx.ModelProto:
    """A residual conv net: stem conv, `blocks` conv-relu-conv-add-relu blocks, pooled head."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def weight(name, shape):
        inits.append(
            onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
        )
        return name

    conv = lambda x, y, name, k=3: onnx.helper.make_node(  # noqa: E731
        "Conv", [x, weight(f"{name}_w", [channels, channels if x != "x" else 3, k, k]),
                 weight(f"{name}_b", [channels])], [y], name=name, pads=[k // 2] * 4)  # fmt: skip
    nodes.append(conv("x", "s", "stem"))
    nodes.append(onnx.helper.make_node("Relu", ["s"], ["h0"]))
    for i in range(blocks):
        nodes += [
            conv(f"h{i}", f"a{i}", f"c{i}a"),
            onnx.helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            conv(f"r{i}", f"b{i}", f"c{i}b"),
            onnx.helper.make_node("Add", [f"b{i}", f"h{i}"], [f"s{i}"]),
            onnx.helper.make_node("Relu", [f"s{i}"], [f"h{i + 1}"]),
        ]
    nodes += [
        onnx.helper.make_node("GlobalAveragePool", [f"h{blocks}"], ["p"]),
        onnx.helper.make_node("Flatten", ["p"], ["f"]),
        onnx.helper.make_node(
            "Gemm", ["f", weight("fc_w", [channels, 5]), weight("fc_b", [5])], ["y"], name="fc"
        ),
    ]  # fmt: skip
    graph = onnx.helper.make_graph(
        nodes,
        "net",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    model = onnx.parser.parse_model(case.read_text())
    run_golden(QuantizeStatic(keep_first=False, keep_last=False), case, ctx=_ctx(model))


def test_conv_net_runs_as_int8_kernels_in_onnxruntime():
    model = _conv_net()
    rewritten, result = check_pass(QuantizeStatic(), model, ctx=_ctx(model, 8))
    ops = ort_optimized_ops(rewritten)
    # stem and fc stay float (first/last layers); the 6 block convs and the 2 inner adds run
    # int8; the last add feeds only float ops (pool -> fc), so it stays float too.
    assert result.stats["quantized-nodes"] == 8
    assert ops["QLinearConv"] == 6 and ops["QLinearAdd"] == 2
    assert ops["Conv"] == 1 and ops["Gemm"] == 1
    # Relu after a quantized conv is absorbed: no float Relu between int8 convs.
    assert ops["Relu"] <= 2


def test_int8_weights_and_int32_biases():
    model = _conv_net(blocks=1)
    rewritten, result = apply_pass(QuantizeStatic(), model, _ctx(model))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert any(v.dtype == np.int8 and v.ndim == 4 for v in weights.values())
    assert any(v.dtype == np.int32 for v in weights.values())
    assert result.stats["int8-weights"] == result.stats["int32-biases"] == 2


def test_keep_first_and_last_can_be_overridden():
    model = _conv_net(blocks=1)
    _, kept = apply_pass(QuantizeStatic(), model, _ctx(model))
    _, all_in = apply_pass(QuantizeStatic(keep_first=False, include="fc"), model, _ctx(model))
    assert kept.stats["int8-weights"] == 2
    assert all_in.stats["int8-weights"] == 4
    _, none = apply_pass(QuantizeStatic(exclude="Conv"), model, _ctx(model))
    assert none.stats["quantized-nodes"] == 0 and not none.changed


def test_detector_head_does_not_share_one_scale_between_boxes_and_scores():
    # Concat of pixel boxes (0..640) with 0-1 class scores, read by an int8 MatMul: one uint8
    # scale for the Concat would put every score within half a step (1.25) of zero.
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 8, 4] x) => (float[1, 8, 6] y, float[1, 8, 2] z)
      <float[4, 4] wb = {1.,0.,0.,0., 0.,1.,0.,0., 0.,0.,1.,0., 0.,0.,0.,1.},
       float[4, 2] ws = {1.,-1., 0.5,0.5, -1.,1., 0.2,0.1}, float[1] k = {640.0},
       float[6, 2] wz = {1.,0., 0.,1., 1.,0., 0.,1., 1.,0., 0.,1.}> {
      b0 = MatMul (x, wb)
      b1 = Sigmoid (b0)
      boxes = Mul (b1, k)
      s0 = MatMul (x, ws)
      scores = Sigmoid (s0)
      y = Concat <axis = -1> (boxes, scores)
      z = MatMul (y, wz)
    }""")
    feeds = strategies.random_feeds(model, seed=42)
    ref = ort.InferenceSession(model.SerializeToString()).run(["y"], feeds)[0]

    def score_error(**options):
        rewritten, _ = apply_pass(
            QuantizeStatic(keep_first=False, keep_last=False, **options), model, _ctx(model, 8)
        )
        got = ort.InferenceSession(rewritten.SerializeToString()).run(["y"], feeds)[0]
        return rewritten, float(np.abs(got[..., 4:] - ref[..., 4:]).max())

    rewritten, error = score_error()
    shared, shared_error = score_error(concat_ratio=1e9)
    assert error < 0.02  # the scores keep two decimals
    assert shared_error > 0.2  # what one shared scale does to them
    assert op_types(shared.graph).count("QuantizeLinear") > op_types(rewritten.graph).count(
        "QuantizeLinear"
    )


def test_mask_fill_values_stay_float():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x, float[2, 4] mask) => (float[2, 4] y) <float[4, 4] w = {
      1.,0.,0.,0., 0.,1.,0.,0., 0.,0.,1.,0., 0.,0.,0.,1.}> {
      a = MatMul (x, w)
      b = MatMul (a, w)
      y = Add (b, mask)
    }""")
    feeds = [
        {"x": np.random.default_rng(i).standard_normal((2, 4)).astype(np.float32),
         "mask": np.where(np.eye(2, 4) > 0, 0.0, -3.4e38).astype(np.float32)}
        for i in range(4)
    ]  # fmt: skip
    ctx = PassContext(calibration=CalibrationData.from_feeds(feeds))
    rewritten, _ = apply_pass(QuantizeStatic(keep_first=False, keep_last=False), model, ctx)
    add = next(n for n in rewritten.graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in rewritten.graph.node for o in n.output}
    assert "mask" in add.input  # the mask is read as it is, never quantized
    assert producers.get(add.input[0]) == "DequantizeLinear"


def test_needs_calibration_and_valid_options():
    model = _conv_net(blocks=1)
    with pytest.raises(UsageError, match="needs calibration data"):
        apply_pass(QuantizeStatic(), model)
    with pytest.raises(UsageError, match="method 'kl' is unknown"):
        apply_pass(QuantizeStatic(method="kl"), model, _ctx(model))


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_methods(method):
    model = _conv_net(blocks=1)
    check_pass(QuantizeStatic(method=method), model, ctx=_ctx(model, 4))


_QUANTIZABLE = (
    "Conv", "MatMul", "Gemm", "Relu", "Add", "Mul", "Sigmoid", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Flatten", "Split", "Slice",
)  # fmt: skip


@given(
    model=st.one_of(
        strategies.models(containing=("Conv", "Relu"), ops=_QUANTIZABLE, opset=17),
        strategies.models(containing=("MatMul", "Add"), ops=_QUANTIZABLE, opset=17),
    )
)
@settings(
    max_examples=max(PROPERTY_EXAMPLES // 4, 25),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_property(model):
    ctx = _ctx(model, 3)
    feeds = next(iter(ctx.calibration))
    rewritten, result = check_pass(
        QuantizeStatic(keep_first=False, keep_last=False), model, feeds=feeds, ctx=ctx
    )
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
    if result.changed:
        assert "QuantizeLinear" in op_types(rewritten.graph)


# -- If/Loop/Scan bodies -------------------------------------------------------------------
def _vi(name, shape, elem=onnx.TensorProto.FLOAT):
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def _if_conv_model(channels: int = 8) -> onnx.ModelProto:
    """y = If(c): Conv-Relu-Conv in each branch, on outer-scope weights; w2/b2 in both."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)
        for name, shape, scale in [
            ("w1_then", [channels, 3, 3, 3], 0.3), ("b1_then", [channels], 0.1),
            ("w1_else", [channels, 3, 3, 3], 0.3), ("b1_else", [channels], 0.1),
            ("w2", [4, channels, 3, 3], 0.2), ("b2", [4], 0.1),
        ]
    ]  # fmt: skip

    def branch(tag):
        make, pads = onnx.helper.make_node, [1] * 4
        nodes = [
            make("Conv", ["x", f"w1_{tag}", f"b1_{tag}"], [f"{tag}_a"], f"{tag}_conv1", pads=pads),
            make("Relu", [f"{tag}_a"], [f"{tag}_r"]),
            make("Conv", [f"{tag}_r", "w2", "b2"], [f"{tag}_y"], f"{tag}_conv2", pads=pads),
        ]
        return onnx.helper.make_graph(nodes, tag, [], [_vi(f"{tag}_y", [1, 4, 8, 8])])

    if_node = onnx.helper.make_node(
        "If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else")
    )
    graph = onnx.helper.make_graph(
        [if_node],
        "if_net",
        [_vi("c", [], onnx.TensorProto.BOOL), _vi("x", [1, 3, 8, 8])],
        [_vi("y", [1, 4, 8, 8])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _loop_matmul_model(width: int = 16) -> onnx.ModelProto:
    """y = Loop(n, s=x): s <- Relu(s @ w) + s, with w an outer-scope initializer."""
    rng = np.random.default_rng(1)
    weight = np.linalg.qr(rng.standard_normal((width, width)))[0].astype(np.float32)
    make = onnx.helper.make_node
    body = onnx.helper.make_graph(
        [
            make("Identity", ["cond"], ["cond_out"]),
            make("MatMul", ["s", "w"], ["m"], "body_matmul"),
            make("Relu", ["m"], ["m_relu"]),
            make("Add", ["m_relu", "s"], ["s_next"]),
        ],
        "body",
        [_vi("i", [], onnx.TensorProto.INT64), _vi("cond", [], onnx.TensorProto.BOOL),
         _vi("s", [2, width])],
        [_vi("cond_out", [], onnx.TensorProto.BOOL), _vi("s_next", [2, width])],
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [make("Loop", ["n", "", "x"], ["y"], body=body)],
        "loop_net",
        [_vi("n", [], onnx.TensorProto.INT64), _vi("x", [2, width])],
        [_vi("y", [2, width])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _bodies(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for n in model.graph.node for a in n.attribute if a.type == a.GRAPH}


def _relative_errors(model, rewritten, feeds) -> tuple[float, float]:
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0].ravel()
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, feeds)[0].ravel()
    cosine = float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got)))
    return cosine, float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _if_ctx(model, count=8):
    rng = np.random.default_rng(7)
    feeds = [
        {"c": np.array(i % 2 == 0), "x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
        for i in range(count)
    ]
    return PassContext(calibration=CalibrationData.from_feeds(feeds))


def test_if_branches_get_int8_islands_on_outer_scope_weights():
    model = _if_conv_model()
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for taken in (True, False):
        feeds = {"c": np.array(taken), "x": x}
        # checker (full), onnxruntime within the declared bound, idempotence.
        rewritten, result = check_pass(QuantizeStatic(), model, feeds=feeds, ctx=_if_ctx(model))
        cosine, rel_l2 = _relative_errors(model, rewritten, feeds)
        assert cosine >= 0.98 and rel_l2 <= 0.2
    # keep_first/keep_last read the top graph only: both convs of each branch are int8.
    assert result.stats["quantized-nodes"] == result.stats["subgraph-nodes"] == 4
    assert result.stats["int8-weights"] == 3 and result.stats["int32-biases"] == 4
    onnx.checker.check_model(rewritten, full_check=True)
    top = Counter(n.op_type for n in rewritten.graph.node)
    producers = {o: n for g in [rewritten.graph, *_bodies(rewritten).values()] for n in g.node
                 for o in n.output}  # fmt: skip
    # w2 is read by both branches: one DequantizeLinear, before the If; x (a top input) is
    # quantized where it is computed, in the top graph.
    assert top["DequantizeLinear"] == 2 and top["QuantizeLinear"] == 1
    for tag, body in _bodies(rewritten).items():
        ops = Counter(n.op_type for n in body.node)
        assert ops["QuantizeLinear"] >= 2 and ops["Conv"] == 2, tag
        local = {t.name: t for t in body.initializer}
        for conv in (n for n in body.node if n.op_type == "Conv"):
            assert all(producers[i].op_type == "DequantizeLinear" for i in conv.input), conv.name
        first = next(n for n in body.node if n.op_type == "Conv")
        int8 = local[producers[first.input[1]].input[0]]  # dequantized inside the branch
        assert int8.data_type == onnx.TensorProto.INT8
        assert producers[first.input[0]].input[0] == "x_quantized"


def test_loop_body_matmul_on_an_outer_scope_weight_runs_int8():
    model = _loop_matmul_model()
    rng = np.random.default_rng(4)
    calib = [
        {"n": np.array(1 + i % 4), "x": rng.standard_normal((2, 16)).astype(np.float32)}
        for i in range(8)
    ]
    ctx = PassContext(calibration=CalibrationData.from_feeds(calib))
    feeds = {"n": np.array(3), "x": rng.standard_normal((2, 16)).astype(np.float32)}
    rewritten, result = check_pass(QuantizeStatic(), model, feeds=feeds, ctx=ctx)
    cosine, rel_l2 = _relative_errors(model, rewritten, feeds)
    assert cosine >= 0.98 and rel_l2 <= 0.2
    assert result.stats["subgraph-nodes"] == 1 and result.stats["int8-weights"] == 1
    body = _bodies(rewritten)["body"]
    ops = Counter(n.op_type for n in body.node)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 3  # s, m_relu, w
    matmul = next(n for n in body.node if n.op_type == "MatMul")
    weight_dq = next(n for n in body.node if n.output[0] == matmul.input[1])
    assert weight_dq.op_type == "DequantizeLinear"
    assert {t.name: t.data_type for t in body.initializer}[
        weight_dq.input[0]
    ] == onnx.TensorProto.INT8
    assert [o.name for o in body.output] == ["cond_out", "s_next"]


def test_onnxruntime_quantize_static_leaves_if_branches_float(tmp_path):
    # For comparison: onnxruntime 1.32's quantizer (QDQ, MinMax) on the same If model writes
    # no Q/DQ at all (its top graph holds only the If, and it does not enter the branches),
    # while quantize-static above runs all four branch convs in int8.
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    model = _if_conv_model()
    feeds = iter(_if_ctx(model).calibration)

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    onnx.save(model, tmp_path / "float.onnx")
    quantize_static(
        tmp_path / "float.onnx",
        tmp_path / "int8.onnx",
        Reader(),
        quant_format=QuantFormat.QDQ,
        calibrate_method=CalibrationMethod.MinMax,
    )
    theirs = onnx.load(tmp_path / "int8.onnx")
    assert [n.op_type for n in theirs.graph.node] == ["If"]
    for body in _bodies(theirs).values():
        assert [n.op_type for n in body.node] == ["Conv", "Relu", "Conv"]


def _in_loop_body(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` as the body of a one-iteration Loop (weights outer scope), outputs squeezed."""
    graph = model.graph
    made = {o for n in graph.node for o in n.output}
    if not all(o.name in made for o in graph.output):
        return None
    body = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["cond"], ["cond_out"]), *graph.node],
        "body",
        [_vi("i", [], onnx.TensorProto.INT64), _vi("cond", [], onnx.TensorProto.BOOL)],
        [_vi("cond_out", [], onnx.TensorProto.BOOL), *graph.output],
        value_info=graph.value_info,
    )
    stacked = [f"{o.name}_stacked" for o in graph.output]
    nodes = [onnx.helper.make_node("Loop", ["trips", ""], stacked, body=body)]
    outputs = []
    for out, name in zip(graph.output, stacked, strict=True):
        nodes.append(onnx.helper.make_node("Squeeze", [name, "axis0"], [f"{out.name}_out"]))
        outputs.append(onnx.helper.make_tensor_value_info(
            f"{out.name}_out", out.type.tensor_type.elem_type, None))  # fmt: skip
    extra = [
        onnx.numpy_helper.from_array(np.array(1, np.int64), "trips"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    wrapped = onnx.helper.make_graph(
        nodes, "wrapped", graph.input, outputs, [*graph.initializer, *extra]
    )
    return onnx.helper.make_model(wrapped, opset_imports=model.opset_import)


@given(model=strategies.models(containing=("Conv", "Relu"), ops=_QUANTIZABLE, opset=17))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_inside_a_loop_body(model):
    wrapped = _in_loop_body(model)
    if wrapped is None:
        return
    ctx = _ctx(wrapped, 3)
    feeds = next(iter(ctx.calibration))
    rewritten, result = check_pass(QuantizeStatic(), wrapped, feeds=feeds, ctx=ctx)
    assert result.stats.get("subgraph-nodes", 0) == result.stats["quantized-nodes"]
    if result.changed:
        assert "QuantizeLinear" in op_types(_bodies(rewritten)["body"])
