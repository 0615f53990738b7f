from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from dsopt import numerics
from dsopt.pass_infra import PassContext
from dsopt.passes import ConvertQoperator, FoldQdq
from dsopt.passes.convert_qoperator import SKIP_REASONS
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/convert-qoperator")
CONTRIB = ConvertQoperator(contrib=True)
RULES = ("qlinear-conv", "qlinear-matmul", "matmul-integer", "qlinear-add", "qlinear-mul")


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 13]>\n' + text)


def golden(case: str) -> onnx.ModelProto:
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    return onnx.parser.parse_model(path.read_text())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(CONTRIB, case)


@pytest.mark.parametrize(
    ("case", "expected", "ops"),
    [
        (
            "qlinear_conv",
            {"qlinear-conv": 1},
            ["QuantizeLinear", "QLinearConv", "DequantizeLinear"],
        ),
        (
            "qlinear_matmul",
            {"qlinear-matmul": 1},
            ["QuantizeLinear", "QLinearMatMul", "DequantizeLinear"],
        ),
        (
            "matmul_integer",
            {"matmul-integer": 1},
            ["QuantizeLinear", "MatMulInteger", "Cast", "Mul"],
        ),
        (
            "qlinear_add_mul",
            {"qlinear-add": 1, "qlinear-mul": 1},
            ["QuantizeLinear", "QuantizeLinear", "QLinearAdd", "QLinearMul", "DequantizeLinear"],
        ),
        (
            "kept",
            {
                "skipped-float-bias": 1,
                "skipped-per-axis-activation": 1,
                "skipped-no-output-q": 1,
                "skipped-operand-not-dq": 2,
            },
            None,
        ),
    ],
)
def test_golden_stats(case, expected, ops):
    model = golden(case)
    rewritten, result = apply_pass(CONTRIB, model)
    assert {k: v for k, v in fired(result.stats).items() if k != "removed-dead"} == expected
    assert set(result.stats) == {*RULES, "removed-dead", *(f"skipped-{r}" for r in SKIP_REASONS)}
    assert op_types(rewritten.graph) == (ops if ops is not None else op_types(model.graph))


def integer_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float output replaced by the integers its final DQ reads."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    producers = {out: node for node in copy.graph.node for out in node.output}
    for info in copy.graph.output:
        node = producers.get(info.name)
        if node is not None and node.op_type == "DequantizeLinear":
            copy.graph.node.remove(node)
            zero = next(t for t in copy.graph.initializer if t.name == node.input[2])
            node_out = node.input[0]
            for other in copy.graph.node:
                other.output[:] = [info.name if o == node_out else o for o in other.output]
            info.type.tensor_type.elem_type = zero.data_type
    return copy


@pytest.mark.parametrize("case", ["qlinear_conv", "qlinear_matmul", "qlinear_add_mul"])
def test_integer_outputs_within_one_step_on_random_inputs(case):
    model = integer_outputs(golden(case))
    rewritten, result = apply_pass(CONTRIB, model)  # check_pass wants integer outputs equal
    onnx.checker.check_model(rewritten, full_check=True)
    assert result.changed
    differing = 0
    for seed in range(20):
        feeds = numerics.random_inputs(model, seed=seed)
        feeds = {k: (v * 3).astype(v.dtype) for k, v in feeds.items()}  # cover the ranges
        want, got = numerics.run_model(model, feeds), numerics.run_model(rewritten, feeds)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and value.dtype.kind in "iu"
            steps = np.abs(got[name].astype(np.int64) - value.astype(np.int64))
            assert steps.max() <= 1, (name, seed)
            differing += int(np.count_nonzero(steps))
    total = sum(v.size for v in want.values()) * 20
    assert differing < total / 10  # a rare tie, not a systematic offset


def test_qlinear_add_needs_the_target_or_the_option():
    model = golden("qlinear_add_mul")
    _, plain = check_pass(ConvertQoperator(), model)
    assert not plain.changed and plain.stats["skipped-contrib-disabled"] == 2
    ort_ctx = PassContext(fused_ops=frozenset({"com.microsoft::QLinearAdd"}))
    rewritten, result = check_pass(ConvertQoperator(), model, ctx=ort_ctx)
    assert fired(result.stats)["qlinear-add"] == 1 and result.stats["qlinear-mul"] == 0
    assert "QLinearAdd" in op_types(rewritten.graph) and "Mul" in op_types(rewritten.graph)


HEADER_CONV = """
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y)
      <float xs = {0.02}, uint8 xz = {128}, int8 xz8 = {0}, WEIGHTS, float ys = {0.05},
       uint8 yz = {100}, int8 yz8 = {3}, float[3] ws = {0.004, 0.0025, 0.0055}> {
"""
WEIGHTS = "int8[3, 2, 1, 1] w = {12, -5, 33, 7, -60, 21}, uint8[3, 2, 1, 1] wu = {1, 2, 3, 4, 5, 6}"
SKIPS = {
    "weight-not-constant": """
        wq = QuantizeLinear <axis = 0> (wf, ws, wz)
        wd = DequantizeLinear <axis = 0> (wq, ws, wz)""",
    "weight-zero-points": """
        wd = DequantizeLinear <axis = 0> (w, ws, wzs)""",
    "weight-axis": """
        wd = DequantizeLinear <axis = 1> (w, ws2, wz2)""",
    "types": """
        wd = DequantizeLinear <axis = 0> (wu, ws, wzu)""",
}


@pytest.mark.parametrize("reason", SKIPS, ids=SKIPS)
def test_conv_islands_that_do_not_fit_are_counted(reason):
    extra = (
        "float[3, 2, 1, 1] wf = {0.1, -0.2, 0.3, 0.4, -0.5, 0.6}, int8[3] wz = {0, 0, 0}, "
        "int8[3] wzs = {0, 1, 0}, float[2] ws2 = {0.01, 0.02}, int8[2] wz2 = {0, 0}, "
        "uint8[3] wzu = {0, 0, 0}"
    )
    x_zero = "xz8" if reason == "types" else "xz"  # int8 x with uint8 weights
    text = (
        HEADER_CONV.replace("WEIGHTS", f"{WEIGHTS}, {extra}")
        + f"""
        xq = QuantizeLinear (x, xs, {x_zero})
        xd = DequantizeLinear (xq, xs, {x_zero})
        {SKIPS[reason]}
        c = Conv (xd, wd)
        cq = QuantizeLinear (c, ys, {"yz8" if reason == "types" else "yz"})
        y = DequantizeLinear (cq, ys, {"yz8" if reason == "types" else "yz"})
    }}"""
    )
    _, result = check_pass(CONTRIB, parse(text))
    assert fired(result.stats) == {f"skipped-{reason}": 1}


def test_output_read_twice_is_left_alone():
    model = golden("qlinear_matmul")
    model.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [2, 3, 2]))
    _, result = check_pass(CONTRIB, model)
    assert fired(result.stats) == {"skipped-output-shared": 1}


# -- a small QDQ conv net, as a static quantizer writes it ---------------------------------------
def qdq_conv_net(channels: int = 16, size: int = 32) -> onnx.ModelProto:
    """Three Convs (a Relu folded into each Q) with uint8 activations, per-channel int8
    weights and int32 biases, as a static quantizer writes them."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def qdq(x, scale, zero, out):
        s, z = const(f"{out}_s", np.float32(scale)), const(f"{out}_z", np.uint8(zero))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{out}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{out}_q", s, z], [out]))
        return out

    x, x_scale, c_in = qdq("x", 8 / 255, 128, "x_dq"), np.float32(8 / 255), 3
    for i in range(3):
        w = rng.standard_normal((channels, c_in, 3, 3)).astype(np.float32) / np.sqrt(9 * c_in)
        w_scale = (np.abs(w).reshape(channels, -1).max(axis=1) / 63).astype(np.float32)
        w_q = np.clip(np.rint(w / w_scale[:, None, None, None]), -63, 63).astype(np.int8)
        bias_scale = (x_scale * w_scale).astype(np.float32)
        b_q = np.rint(rng.standard_normal(channels) * 0.1 / bias_scale).astype(np.int32)
        ws = const(f"w{i}_s", w_scale)
        wz = const(f"w{i}_z", np.zeros(channels, np.int8))
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [const(f"w{i}", w_q), ws, wz], [f"w{i}_dq"], axis=0
            )
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [const(f"b{i}", b_q), const(f"b{i}_s", bias_scale)],
                [f"b{i}_dq"],
                axis=0,
            )
        )
        nodes.append(
            helper.make_node("Conv", [x, f"w{i}_dq", f"b{i}_dq"], [f"c{i}"], pads=[1, 1, 1, 1])
        )
        # uint8 with zero point 0 clamps at 0: the Relu a quantizer folds into the Q
        x = qdq(f"c{i}", 6 / 255, 0 if i < 2 else 128, f"a{i}")
        x_scale, c_in = np.float32(6 / 255), channels
    graph = helper.make_graph(
        nodes,
        "qdq_conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_conv_net_becomes_qlinear_convs_within_one_step():
    model = qdq_conv_net()
    rewritten, result = check_pass(ConvertQoperator(), model)
    assert fired(result.stats) == {"qlinear-conv": 3, "removed-dead": 9}
    assert op_types(rewritten.graph) == ["QuantizeLinear", *["QLinearConv"] * 3, "DequantizeLinear"]
    step = 6 / 255
    rng = np.random.default_rng(3)
    for _ in range(3):
        feeds = {"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)}
        (want,), (got,) = (numerics.run_model(m, feeds).values() for m in (model, rewritten))
        assert np.abs(got - want).max() <= step * 1.0001


# -- properties ------------------------------------------------------------------------------------
#: Ops that amplify a one-step difference little, so float outputs stay within a step or so;
#: activations capped at 8 keep a step below about 0.1.
_OPS = ("Conv", "MatMul", "Gemm", "Relu", "Add", "Mul", "MaxPool", "Reshape", "Transpose")
_OPS += ("Concat", "Flatten", "Sigmoid", "Identity", "Slice")
_ISLANDS = st.one_of(
    *(strategies.qdq_models(containing=(op,), ops=_OPS, max_abs=8.0) for op in ("Conv", "MatMul"))
)


def folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The QAT weights stored as integers, as `fold-qdq` leaves them."""
    return apply_pass(FoldQdq(), model)[0]


@given(model=_ISLANDS)
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    model = folded(model)
    rewritten, result = check_pass(CONTRIB, model)
    converted = sum(result.stats[r] for r in RULES)
    kinds = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "QLinearAdd", "QLinearMul")
    assert sum(op_types(rewritten.graph).count(k) for k in kinds) == converted
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    assert [(o.name, o.type.tensor_type.elem_type) for o in rewritten.graph.output] == outputs


#: Small graphs around the op each rule converts, so that `find` meets the rule quickly.
_RULE_OPS = {
    "qlinear-conv": "Conv",
    "qlinear-matmul": "MatMul",
    "matmul-integer": "MatMul",
    "qlinear-add": "Add",
    "qlinear-mul": "Mul",
}


@pytest.mark.parametrize("rule", RULES)
def test_the_shared_strategy_reaches_every_rule(rule):
    op = _RULE_OPS[rule]
    islands = strategies.qdq_models(containing=(op,), ops=(op, "Relu"), max_ops=3, max_abs=8.0)
    found = find(
        islands.map(folded),
        lambda m: apply_pass(CONTRIB, m)[1].stats[rule] > 0,
        settings=settings(max_examples=300, database=None, phases=[Phase.generate]),
    )  # the first hit is enough: shrinking it would cost minutes
    assert apply_pass(CONTRIB, found)[1].stats[rule] > 0
