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
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/quantize-static")


def _ctx(model: onnx.ModelProto, count: int = 4, seed: int = 0, **shapes) -> PassContext:
    feeds = [strategies.random_feeds(model, seed=seed + i) for i in range(count)]
    return PassContext(calibration=CalibrationData.from_feeds(feeds))


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    """The op types onnxruntime's CPU provider runs after its own QDQ fusions."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "ort.onnx").graph.node)


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


def test_conv_net_runs_as_int8_kernels_in_onnxruntime(tmp_path):
    model = _conv_net()
    rewritten, result = check_pass(QuantizeStatic(), model, ctx=_ctx(model, 8))
    ops = _optimized_ops(rewritten, tmp_path)
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
