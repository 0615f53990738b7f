"""dsopt.quant.lint: predictions checked against onnxruntime's own optimized graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from dsopt.pass_infra import PassContext
from dsopt.passes import QuantizeStatic
from dsopt.plugin import PluginHost
from dsopt.quant.calibration import CalibrationData
from dsopt.quant.kernels import ONNXRUNTIME_CPU, TVM_RELAX, kernels_for
from dsopt.quant.lint import FINDING_KINDS, lint
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, strategies

_Q, _DQ = "QuantizeLinear", "DequantizeLinear"
_C = 8


class _Builder:
    """A QDQ test graph: x -> Q/DQ -> conv1 -> Q/DQ -> <middle> [-> Q/DQ] -> out."""

    def __init__(self, zero_point=128, dtype=np.uint8):
        self.nodes, self.inits = [], []
        self.zero_point, self.dtype = zero_point, dtype

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def qdq(self, x, name, scale=0.05, zero_point=None, axis=None):
        zp = self.zero_point if zero_point is None else zero_point
        if axis is None:
            s, z, kw = np.float32(scale), self.dtype(zp), {}
        else:
            s, z, kw = np.full(_C, scale, np.float32), np.full(_C, zp, self.dtype), {"axis": axis}
        self.const(f"{name}_scale", s)
        self.const(f"{name}_zp", z)
        params = [f"{name}_scale", f"{name}_zp"]
        self.nodes.append(oh.make_node(_Q, [x, *params], [f"{name}_q"], name=f"{name}_Q", **kw))
        self.nodes.append(
            oh.make_node(_DQ, [f"{name}_q", *params], [f"{name}_dq"], name=f"{name}_DQ", **kw)
        )
        return f"{name}_dq"

    def weight(self, name, shape, dtype=np.int8, per_channel=True):
        w = np.random.default_rng(0).integers(-60, 60, shape).astype(dtype)
        n = shape[0] if per_channel else 1
        scale = np.full(n, 0.01, np.float32) if per_channel else np.float32(0.01)
        zero = np.zeros(n, dtype) if per_channel else dtype(0)
        ins = [self.const(f"{name}_w", w), self.const(f"{name}_ws", scale)]
        ins.append(self.const(f"{name}_wz", zero))
        kw = {"axis": 0} if per_channel else {}
        self.nodes.append(oh.make_node(_DQ, ins, [f"{name}_wdq"], name=f"{name}_wDQ", **kw))
        return f"{name}_wdq"

    def conv(self, x, name, bias=None, **kw):
        ins = [x, self.weight(name, (_C, _C, 3, 3), **kw)]
        if bias is not None:
            b = self.const(f"{name}_b", np.arange(_C, dtype=np.int32))
            s = self.const(f"{name}_bs", np.full(_C, bias, np.float32))
            z = self.const(f"{name}_bz", np.zeros(_C, np.int32))
            self.nodes.append(oh.make_node(_DQ, [b, s, z], [f"{name}_bdq"], axis=0))
            ins.append(f"{name}_bdq")
        self.nodes.append(oh.make_node("Conv", ins, [f"{name}_y"], pads=[1, 1, 1, 1], name=name))
        return f"{name}_y"

    def op(self, op, inputs, name=None, **attrs):
        name = name or f"the_{op}"
        self.nodes.append(oh.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def model(self, out, opset=17):
        self.nodes.append(oh.make_node("Identity", [out], ["out"], name="to_output"))
        graph = oh.make_graph(
            self.nodes,
            "g",
            [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, _C, 8, 8])],
            [oh.make_tensor_value_info("out", TensorProto.FLOAT, None)],
            self.inits,
        )
        return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


def _case(middle, tail_q=True, opset=17, **options):
    b = _Builder(**options)
    x = b.qdq("x", "in")
    y = b.qdq(b.conv(x, "conv1"), "c1")
    y = middle(b, y, x)
    if tail_q:
        y = b.qdq(y, "tail")
    return b.model(y, opset)


def _ort_optimized(model, tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    path = tmp_path / "ort_optimized.onnx"
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(path)


def _ort_float_between(optimized):
    """Float nodes of onnxruntime's graph that still read a DQ and/or feed a Q."""
    producers = {o: n for n in optimized.graph.node for o in n.output}
    readers = {}
    for node in optimized.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = set()
    for node in optimized.graph.node:
        if node.op_type in (_Q, _DQ, "Transpose") or node.op_type.startswith("QLinear"):
            continue
        reads_dq = any(
            producers.get(i) is not None
            and producers[i].op_type == _DQ
            and producers[i].input[0] not in {t.name for t in optimized.graph.initializer}
            for i in node.input
        )
        feeds_q = any(r.op_type == _Q for o in node.output for r in readers.get(o, []))
        if reads_dq or feeds_q:
            found.add(node.name or node.op_type)
    return found


_F32 = np.float32


def _resize(mode):
    def middle(b, y, x):
        scales = b.const(f"scales_{mode}", np.array([1, 1, 2, 2], np.float32))
        return b.op("Resize", [y, "", scales], mode=mode)

    return middle


def _clip(low, high):
    def middle(b, y, x):
        return b.op("Clip", [y, b.const("lo", _F32(low)), b.const("hi", _F32(high))])

    return middle


#: (case id, middle, build options, lint's float nodes, the same nodes in onnxruntime's graph)
CASES = [
    ("hardswish", lambda b, y, x: b.op("HardSwish", [y]), {}, {"the_HardSwish"},
     {"HardSigmoid", "Mul"}),  # onnxruntime decomposes it (unnamed nodes)
    ("hardsigmoid", lambda b, y, x: b.op("HardSigmoid", [y]), {}, {"the_HardSigmoid"},
     {"the_HardSigmoid"}),
    ("tanh", lambda b, y, x: b.op("Tanh", [y]), {}, {"the_Tanh"}, {"the_Tanh"}),
    ("tanh-sigmoid-run", lambda b, y, x: b.op("Sigmoid", [b.op("Tanh", [y])]), {},
     {"the_Tanh", "the_Sigmoid"}, {"the_Tanh", "the_Sigmoid"}),
    ("sub", lambda b, y, x: b.op("Sub", [y, x]), {}, {"the_Sub"}, {"the_Sub"}),
    ("div", lambda b, y, x: b.op("Div", [y, x]), {}, {"the_Div"}, {"the_Div"}),
    ("add", lambda b, y, x: b.op("Add", [y, x]), {}, set(), set()),
    ("mul", lambda b, y, x: b.op("Mul", [y, x]), {}, set(), set()),
    ("add-float-constant", lambda b, y, x: b.op("Add", [y, b.const("k", _F32(0.5))]), {},
     {"the_Add"}, {"the_Add"}),
    ("concat", lambda b, y, x: b.op("Concat", [y, x], axis=1), {}, set(), set()),
    ("sigmoid", lambda b, y, x: b.op("Sigmoid", [y]), {}, set(), set()),
    ("leaky-relu", lambda b, y, x: b.op("LeakyRelu", [y]), {}, set(), set()),
    ("softmax", lambda b, y, x: b.op("Softmax", [y], axis=1), {}, set(), set()),
    ("global-average-pool", lambda b, y, x: b.op("GlobalAveragePool", [y]), {}, set(), set()),
    ("average-pool", lambda b, y, x: b.op("AveragePool", [y], kernel_shape=[2, 2]), {}, set(),
     set()),
    ("max-pool", lambda b, y, x: b.op("MaxPool", [y], kernel_shape=[2, 2]), {}, set(), set()),
    ("transpose", lambda b, y, x: b.op("Transpose", [y], perm=[0, 1, 3, 2]), {}, set(), set()),
    ("reshape", lambda b, y, x: b.op("Reshape", [y, b.const("shape", np.array([1, 8, 64]))]),
     {}, set(), set()),
    ("depth-to-space", lambda b, y, x: b.op("DepthToSpace", [y], blocksize=2), {}, set(),
     set()),
    ("space-to-depth", lambda b, y, x: b.op("SpaceToDepth", [y], blocksize=2), {},
     {"the_SpaceToDepth"}, {"the_SpaceToDepth"}),
    ("resize-nearest", _resize("nearest"), {}, set(), set()),
    ("resize-linear", _resize("linear"), {}, {"the_Resize"}, {"the_Resize"}),
    ("pad", lambda b, y, x: b.op("Pad", [y, b.const("pads", np.array([0, 0, 1, 1] * 2))]), {},
     {"the_Pad"}, {"the_Pad"}),
    ("reduce-mean", lambda b, y, x: b.op("ReduceMean", [y], axes=[2, 3]), {},
     {"the_ReduceMean"}, {"the_ReduceMean"}),
    ("relu-zp128", lambda b, y, x: b.op("Relu", [y]), {}, {"the_Relu"}, {"the_Relu"}),
    ("relu-zp0", lambda b, y, x: b.op("Relu", [y]), {"zero_point": 0}, set(), set()),
    ("relu-int8-zp0", lambda b, y, x: b.op("Relu", [y]), {"zero_point": 0, "dtype": np.int8},
     {"the_Relu"}, {"the_Relu"}),  # the int8 minimum is -128: the Relu still clamps
    ("clip-narrower", _clip(0, 6), {"zero_point": 0}, {"the_Clip"}, {"the_Clip"}),
    ("clip-covering", _clip(0, 12.75), {"zero_point": 0}, set(), set()),
    ("conv", lambda b, y, x: b.conv(y, "cA"), {}, set(), set()),
    ("conv-uint8-weight", lambda b, y, x: b.conv(y, "cA", dtype=np.uint8), {}, set(), set()),
    ("conv-per-tensor-weight", lambda b, y, x: b.conv(y, "cA", per_channel=False), {}, set(),
     set()),
    ("conv-int32-bias", lambda b, y, x: b.conv(y, "cA", bias=0.05 * 0.01), {}, set(), set()),
    ("conv-bias-wrong-scale", lambda b, y, x: b.conv(y, "cA", bias=0.003), {}, {"cA"}, {"cA"}),
    ("conv-relu-zp0", lambda b, y, x: b.op("Relu", [b.conv(y, "cA")]), {"zero_point": 0},
     set(), set()),
    ("conv-relu-zp128", lambda b, y, x: b.op("Relu", [b.conv(y, "cA")]), {}, {"cA", "the_Relu"},
     {"cA"}),  # onnxruntime runs Conv + Relu as one float FusedConv named after the Conv
    ("matmul-two-activations", lambda b, y, x: b.op("MatMul", [y, x]), {}, set(), set()),
    ("matmul-weight",
     lambda b, y, x: b.op("MatMul", [y, b.weight("mw", (8, 8), per_channel=False)]), {}, set(),
     set()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("middle", "options", "predicted", "in_ort"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_float_ops_are_the_ones_onnxruntime_leaves_between_qdq(
    middle, options, predicted, in_ort, tmp_path
):
    model = _case(middle, **options)
    report = lint(model)
    floats = {f.node for f in report.findings if f.kind in ("float-island", "unfused-qdq")}
    assert floats == (predicted - {"the_Relu"} if "cA" in predicted else predicted)
    assert report.float_ops == len(predicted)
    assert _ort_float_between(_ort_optimized(model, tmp_path)) == in_ort
    # conv1 always fuses; so does every op lint does not report.
    assert report.fused >= 1
    assert all(f.message and f.kind in FINDING_KINDS for f in report.findings)


def _per_axis_add(b, y, x):
    return b.op("Add", [b.qdq(y, "pa", axis=1), x])


def test_per_axis_activation_keeps_add_float(tmp_path):
    model = _case(_per_axis_add)
    report = lint(model)
    kinds = {(f.kind, f.node) for f in report.findings}
    assert ("per-axis-activation", "pa_Q") in kinds
    assert ("per-axis-activation", "the_Add") in kinds
    assert _ort_float_between(_ort_optimized(model, tmp_path)) == {"the_Add"}


def test_per_axis_conv_input_is_fused_by_onnxruntime_but_cannot_run(tmp_path):
    # The documented exception of the table: onnxruntime 1.32 builds the QLinearConv anyway.
    model = _case(lambda b, y, x: b.conv(b.qdq(y, "pa", axis=1), "cA"))
    report = lint(model)
    assert [(f.kind, f.node) for f in report.findings if f.op == "Conv"] == [
        ("per-axis-activation", "cA")
    ]
    optimized = _ort_optimized(model, tmp_path)
    assert [n.op_type for n in optimized.graph.node].count("QLinearConv") == 2
    session = ort.InferenceSession(
        optimized.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    with pytest.raises(Exception, match="QLinearConv"):
        session.run(None, {"x": np.ones((1, _C, 8, 8), np.float32)})


def test_conv_without_q_after_stays_float_but_matmul_does_not(tmp_path):
    conv = _case(lambda b, y, x: b.conv(y, "cA"), tail_q=False)
    assert not lint(conv).findings  # the end of the island: float output is expected
    optimized = _ort_optimized(conv, tmp_path)
    assert "Conv" in [n.op_type for n in optimized.graph.node]
    matmul = _case(
        lambda b, y, x: b.op("MatMul", [y, b.weight("mw", (8, 8), per_channel=False)]),
        tail_q=False,
    )
    report = lint(matmul)
    assert report.fused == 2 and not report.findings
    ops = [n.op_type for n in _ort_optimized(matmul, tmp_path).graph.node]
    assert "MatMulIntegerToFloat" in ops


def test_requantize_chain_is_reported_only_when_onnxruntime_keeps_it(tmp_path):
    # Q1 -> DQ1 -> Q2 -> DQ2 with one reader each: onnxruntime folds it away.
    single = _case(lambda b, y, x: b.qdq(y, "rq", scale=0.1, zero_point=100))
    assert not [f for f in lint(single).findings if f.kind == "requantize-chain"]
    assert _ort_float_between(_ort_optimized(single, tmp_path)) == set()

    def shared(b, y, x):
        again = b.qdq(y, "rq", scale=0.1, zero_point=100)
        return b.op("Add", [again, b.op("Sigmoid", [y])])

    report = lint(_case(shared))
    assert [f.node for f in report.findings if f.kind == "requantize-chain"] == ["rq_Q"]


def test_tvm_targets_fuse_no_qdq_island():
    model = _case(lambda b, y, x: b.conv(y, "cA"))
    host = PluginHost(autoload=False)
    assert kernels_for(host.get_target("x86")) is TVM_RELAX
    assert kernels_for(host.get_target("onnxruntime")) is ONNXRUNTIME_CPU
    assert kernels_for(None) is ONNXRUNTIME_CPU
    report = lint(model, host.get_target("x86"))
    assert report.fused == 0
    assert {f.node for f in report.findings} == {"conv1", "cA"}
    assert all("convert-qoperator" in f.message for f in report.findings)
    assert lint(model, host.get_target("onnxruntime")).findings == []


def test_model_without_qdq_has_nothing_to_lint():
    b = _Builder()
    report = lint(b.model(b.op("Relu", ["x"])))
    assert not report.quantized and not report.findings
    assert "nothing to lint" in report.summary()


def test_subgraphs_are_linted():
    body = _case(lambda b, y, x: b.op("Tanh", [y])).graph
    body.name = "then_body"
    del body.input[:]
    other = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["out"])],
        "else_body",
        [],
        [oh.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    cond = oh.make_tensor_value_info("cond", TensorProto.BOOL, [])
    x = oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, _C, 8, 8])
    node = oh.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other, name="if")
    graph = oh.make_graph(
        [node], "main", [cond, x], [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    report = lint(model)
    assert [(f.graph, f.node) for f in report.findings] == [("then_body", "the_Tanh")]
    assert report.to_dict()["findings"][0]["graph"] == "then_body"


def test_report_to_dict_is_json():
    report = lint(_case(lambda b, y, x: b.op("Tanh", [y])))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"]["findings"] == {"float-island": 1}
    assert data["summary"]["float_ops"] == 1 and data["summary"]["extra_qdq"] == 2
    assert data["findings"][0]["op"] == "Tanh"


_QUANTIZABLE = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Sigmoid", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Flatten", "Tanh", "Sub",
)  # fmt: skip


def _ort_fused_names(optimized):
    """Names of onnxruntime's integer nodes (QLinear*, QGemm, ...)."""
    return {
        n.name
        for n in optimized.graph.node
        if n.op_type.startswith("QLinear") or n.op_type in ("QGemm", "MatMulIntegerToFloat")
    }


@given(
    model=st.one_of(
        strategies.models(containing=("Conv", "Relu"), ops=_QUANTIZABLE, opset=17),
        strategies.models(containing=("MatMul", "Add"), ops=_QUANTIZABLE, opset=17),
    )
)
@settings(
    max_examples=max(PROPERTY_EXAMPLES // 8, 15),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_property_quantize_static_outputs_agree_with_onnxruntime(model, tmp_path):
    feeds = [strategies.random_feeds(model, seed=i) for i in range(2)]
    ctx = PassContext(calibration=CalibrationData.from_feeds(feeds))
    quantized, _ = apply_pass(QuantizeStatic(keep_first=False, keep_last=False), model, ctx)
    report = lint(quantized)
    optimized = _ort_optimized(quantized, tmp_path)
    floats = {f.node for f in report.findings if f.kind in ("float-island", "unfused-qdq")}
    # Every node lint calls float between requantizations is still float in onnxruntime ...
    assert floats <= _ort_float_between(optimized) | {""}
    # ... and none of them became an integer kernel.
    assert not floats & _ort_fused_names(optimized)


@given(model=strategies.qdq_models(max_ops=8))
@settings(
    max_examples=max(PROPERTY_EXAMPLES // 8, 15),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_property_lint_never_crashes_on_qdq_models(model):
    report = lint(model)
    ops = {n.op_type for n in model.graph.node}
    assert report.quantized == bool(ops & {_Q, _DQ})
    assert report.unfused <= report.float_ops
    assert all(f.kind in FINDING_KINDS and f.message for f in report.findings)
    json.dumps(report.to_dict())
