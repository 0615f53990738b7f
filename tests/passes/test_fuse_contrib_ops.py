from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.pass_infra import PassContext
from dsopt.passes.fuse_contrib_ops import RULES, FuseContribOps
from dsopt.rewrite import explain
from dsopt.targets.onnxruntime import CONTRIB_OPS
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fuse-contrib-ops")
FLOAT = onnx.TensorProto.FLOAT
PROPERTY = settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True)

#: The contrib op each rule emits.
EMITS = {
    "fused-conv": "FusedConv",
    "fused-matmul": "FusedMatMul",
    "bias-gelu": "BiasGelu",
    "bias-fast-gelu": "FastGelu",
    "quick-gelu": "QuickGelu",
    "skip-layer-norm": "SkipLayerNormalization",
}


def ctx(*without: str) -> PassContext:
    """The onnxruntime target's context, minus the contrib ops named in `without`."""
    return PassContext(fused_ops=CONTRIB_OPS - {f"com.microsoft::{op}" for op in without})


def const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(value, dtype), name)


def info(name: str, shape, elem=FLOAT) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    ir = 5 if opset < 11 else 9
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir
    )


def node(op, inputs, outputs, **attrs) -> onnx.NodeProto:
    return onnx.helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


def feeds_for(model: onnx.ModelProto, seed: int = 0, scale: float = 2.0) -> dict[str, np.ndarray]:
    """Random feeds: symbolic dim "H" is 4, every other symbolic dim 2."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        tt = value.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else 4 if d.dim_param == "H" else 2
            for d in tt.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out[value.name] = np.asarray(rng.standard_normal(shape) * scale).astype(dtype)
    return out


# -- golden ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FuseContribOps(), case, ctx())


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_nothing_fires_without_a_target(case):
    model = onnx.parser.parse_model(case.read_text())
    _, result = check_pass(FuseContribOps(), model)
    assert not result.changed and not fired(result.stats)


def test_stats_and_rule_names():
    assert [r.name for r in RULES] == list(EMITS)
    _, result = apply_pass(FuseContribOps(), conv_model(), ctx())
    assert set(result.stats) == set(EMITS)


def test_every_rule_requires_the_op_it_emits():
    for rule in RULES:
        assert rule.requires == (f"com.microsoft::{EMITS[rule.name]}",)
        assert rule.requires[0] in CONTRIB_OPS


# -- fused-conv -----------------------------------------------------------------------------


def conv_model(
    act="Relu",
    attrs=None,
    bounds=None,
    *,
    opset=17,
    dims=2,
    extra_reader=False,
    conv_is_output=False,
    dtype=np.float32,
) -> onnx.ModelProto:
    """x[1,2,4..] -> Conv(W[3,2,2..], b) -> act; `bounds` (lo, hi) are Clip inputs (None: omit)."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(1)
    spatial = [4] * dims
    out_spatial = [3] * dims
    inits = [
        const("w", rng.standard_normal([3, 2, *([2] * dims)]), dtype),
        const("b", rng.standard_normal(3), dtype),
    ]
    act_inputs = ["c"]
    for i, bound in enumerate(bounds or ()):
        if bound is None:
            act_inputs.append("")
        elif isinstance(bound, str):
            act_inputs.append(bound)
        else:
            inits.append(const(f"bound{i}", bound, dtype))
            act_inputs.append(f"bound{i}")
    nodes = [node("Conv", ["x", "w", "b"], ["c"]), node(act, act_inputs, ["y"], **(attrs or {}))]
    outputs = [info("y", [1, 3, *out_spatial], elem)]
    if extra_reader:
        nodes.append(node("Neg", ["c"], ["z"]))
        outputs.append(info("z", [1, 3, *out_spatial], elem))
    if conv_is_output:
        outputs.append(info("c", [1, 3, *out_spatial], elem))
    inputs = [info("x", [1, 2, *spatial], elem)]
    inputs += [info(b, [], elem) for b in act_inputs[1:] if b.startswith("in_")]
    return make_model(nodes, inputs, outputs, inits, opset)


CONV_FORMS = {
    "relu": ("Relu", {}, None, [], 17),
    "sigmoid": ("Sigmoid", {}, None, [], 17),
    "tanh": ("Tanh", {}, None, [], 17),
    "leaky-relu-default": ("LeakyRelu", {}, None, [0.01], 17),
    "leaky-relu": ("LeakyRelu", {"alpha": 0.3}, None, [0.3], 17),
    "hard-sigmoid": ("HardSigmoid", {"alpha": 0.4, "beta": 0.1}, None, [0.4, 0.1], 17),
    "clip-inputs": ("Clip", {}, (-0.5, 0.75), [-0.5, 0.75], 13),
    "clip-max-only": ("Clip", {}, (None, 6.0), [float(np.finfo(np.float32).min), 6.0], 13),
    "clip-no-bounds": ("Clip", {}, None, [float(np.finfo(np.float32).min), 3.4028235e38], 13),
    "clip-attrs": ("Clip", {"min": 0.0, "max": 6.0}, None, [0.0, 6.0], 10),
}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("form", CONV_FORMS)
def test_conv_activation_fuses(form, dims):
    act, attrs, bounds, params, opset = CONV_FORMS[form]
    model = conv_model(act, attrs, bounds, opset=opset, dims=dims)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx(), feeds=feeds_for(model))
    assert fired(result.stats) == {"fused-conv": 1}
    (fused,) = rewritten.graph.node
    assert (fused.op_type, fused.domain) == ("FusedConv", "com.microsoft")
    assert list(fused.input) == ["x", "w", "b"] and list(fused.output) == ["y"]
    got = {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute}
    assert got["activation"] == act.encode()
    assert got.get("activation_params", []) == pytest.approx(params)


def test_conv_keeps_its_attributes_and_a_runtime_weight():
    model = conv_model()
    conv = model.graph.node[0]
    conv.attribute.extend(
        [onnx.helper.make_attribute("pads", [1, 0, 0, 1]), onnx.helper.make_attribute("group", 1)]
    )
    model.graph.output[0].CopyFrom(info("y", [1, 3, 4, 3]))
    weight = model.graph.initializer[0]
    model.graph.input.append(info("w", list(weight.dims)))
    model.graph.initializer.remove(weight)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx(), feeds=feeds_for(model))
    assert fired(result.stats) == {"fused-conv": 1}
    got = {a.name: onnx.helper.get_attribute_value(a) for a in rewritten.graph.node[0].attribute}
    assert got["pads"] == [1, 0, 0, 1] and got["group"] == 1


CONV_NEAR_MISSES = {
    "target-lacks-fused-conv": (lambda: conv_model(), ctx("FusedConv")),
    "conv-output-read-twice": (lambda: conv_model(extra_reader=True), ctx()),
    "conv-output-is-graph-output": (lambda: conv_model(conv_is_output=True), ctx()),
    "clip-bound-not-constant": (lambda: conv_model("Clip", bounds=("in_lo", 1.0), opset=13), ctx()),
    "clip-min-above-max": (lambda: conv_model("Clip", bounds=(1.0, -1.0), opset=13), ctx()),
    "clip-bound-not-scalar": (lambda: conv_model("Clip", bounds=([0.0], 6.0), opset=13), ctx()),
    "activation-not-fusable": (lambda: conv_model("Elu"), ctx()),
}


@pytest.mark.parametrize("case", CONV_NEAR_MISSES.values(), ids=CONV_NEAR_MISSES.keys())
def test_conv_near_misses_are_kept(case):
    make, context = case
    model = make()
    _, result = check_pass(FuseContribOps(), model, ctx=context, feeds=feeds_for(model))
    assert not result.changed, fired(result.stats)


def test_conv_double_is_kept():
    # onnxruntime registers FusedConv (and Conv) for float32 only on CPU
    _, result = apply_pass(FuseContribOps(), conv_model(dtype=np.float64), ctx())
    assert not result.changed


# -- fused-matmul ---------------------------------------------------------------------------


def swap_perm(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def matmul_model(
    a_shape,
    b_shape,
    *,
    trans=(False, False),
    perms=(None, None),
    scales=(),
    transpose_read_elsewhere=False,
    product_read_elsewhere=False,
    elem=FLOAT,
    no_perm_attr=False,
) -> onnx.ModelProto:
    """MatMul(a', b') with a' = Transpose(a) when trans[0] (perm `perms[0]` or the swap).

    `scales`: (op, value, left) steps applied to the product in order.
    """
    nodes, inputs, inits, outputs = [], [], [], []
    operands = []
    for side, shape, transposed, perm in zip("ab", (a_shape, b_shape), trans, perms, strict=True):
        if not transposed:
            inputs.append(info(side, list(shape), elem))
            operands.append(side)
            continue
        perm = perm or swap_perm(len(shape))
        inverse = list(np.argsort(perm))
        inputs.append(info(side, [shape[i] for i in inverse], elem))
        attrs = {} if no_perm_attr else {"perm": perm}
        nodes.append(node("Transpose", [side], [f"{side}t"], **attrs))
        operands.append(f"{side}t")
        if transpose_read_elsewhere:
            nodes.append(node("Neg", [f"{side}t"], [f"{side}n"]))
            outputs.append(info(f"{side}n", list(shape), elem))
    nodes.append(node("MatMul", operands, ["m"]))
    out_shape = [
        *np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])),
        a_shape[-2],
        b_shape[-1],
    ]
    value = "m"
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    for i, (op, scale, left) in enumerate(scales):
        inits.append(const(f"k{i}", scale, dtype))
        ins = [f"k{i}", value] if left else [value, f"k{i}"]
        nodes.append(node(op, ins, [f"s{i}"]))
        value = f"s{i}"
    nodes.append(node("Identity", [value], ["y"]))
    if product_read_elsewhere:
        outputs.append(info("m", out_shape, elem))
    outputs.insert(0, info("y", None, elem))  # a near-miss scale may broadcast the product
    return make_model(nodes, inputs, outputs, inits)


def fused_attrs(model: onnx.ModelProto) -> dict:
    (fused,) = [n for n in model.graph.node if n.op_type == "FusedMatMul"]
    return {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute}


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((3, 4), (4, 5)),
        ((2, 3, 4), (4, 5)),
        ((3, 4), (2, 4, 5)),
        ((2, 1, 3, 4), (3, 4, 2)),
        ((1, 3, 4), (2, 2, 4, 5)),
        ((2, 2, 3, 4), (2, 1, 4, 5)),
    ],
)
@pytest.mark.parametrize("trans", [(True, False), (False, True), (True, True)])
def test_transposed_operands_fuse_with_broadcasting(a_shape, b_shape, trans):
    model = matmul_model(a_shape, b_shape, trans=trans, scales=[("Div", 4.0, False)])
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"fused-matmul": 1}
    assert op_types(rewritten.graph) == ["FusedMatMul", "Identity"]
    attrs = fused_attrs(rewritten)
    assert (attrs["transA"], attrs["transB"]) == tuple(int(t) for t in trans)
    assert attrs["alpha"] == pytest.approx(0.25)


def test_rank2_transpose_without_perm_fuses():
    model = matmul_model((3, 4), (4, 5), trans=(True, False), no_perm_attr=True)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"fused-matmul": 1}
    assert fused_attrs(rewritten)["transA"] == 1


def test_scales_chain_into_alpha():
    scales = [("Mul", 3.0, True), ("Div", 2.0, False), ("Mul", [0.5], False)]
    model = matmul_model((2, 3, 4), (4, 5), scales=scales)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"fused-matmul": 1}
    assert fused_attrs(rewritten) == {"transA": 0, "transB": 0, "alpha": pytest.approx(0.75)}


def test_transpose_read_elsewhere_stays():
    model = matmul_model((2, 3, 4), (2, 4, 5), trans=(True, True), transpose_read_elsewhere=True)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"fused-matmul": 1}
    assert sorted(op_types(rewritten.graph)).count("Transpose") == 2
    fused = next(n for n in rewritten.graph.node if n.op_type == "FusedMatMul")
    assert list(fused.input) == ["a", "b"]


def test_product_read_elsewhere_keeps_the_scale():
    model = matmul_model(
        (3, 4),
        (4, 5),
        trans=(False, True),
        scales=[("Mul", 2.0, False)],
        product_read_elsewhere=True,
    )
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"fused-matmul": 1}
    assert fused_attrs(rewritten)["alpha"] == 1.0 and "Mul" in op_types(rewritten.graph)


MATMUL_NEAR_MISSES = {
    "target-lacks-fused-matmul": (
        lambda: matmul_model((3, 4), (4, 5), trans=(True, False)),
        ctx("FusedMatMul"),
    ),
    "perm-moves-batch-axes": (
        lambda: matmul_model((2, 3, 4), (4, 5), trans=(True, False), perms=([1, 0, 2], None)),
        ctx(),
    ),
    "perm-rotates": (
        lambda: matmul_model((2, 3, 4, 5), (5, 3), trans=(True, False), perms=([0, 2, 3, 1], None)),
        ctx(),
    ),
    "scale-not-scalar": (
        lambda: matmul_model((3, 4), (4, 5), scales=[("Mul", [1.0, 2.0, 3.0, 4.0, 5.0], False)]),
        ctx(),
    ),
    "scale-raises-rank": (
        lambda: matmul_model((3, 4), (4, 5), scales=[("Mul", [[[2.0]]], False)]),
        ctx(),
    ),
    "constant-divided-by-product": (
        lambda: matmul_model((3, 4), (4, 5), scales=[("Div", 2.0, True)]),
        ctx(),
    ),
    "scale-after-shared-product": (
        lambda: matmul_model(
            (3, 4), (4, 5), scales=[("Mul", 2.0, False)], product_read_elsewhere=True
        ),
        ctx(),
    ),
    "rank-1-operand": (
        lambda: make_model(
            [node("MatMul", ["a", "b"], ["m"]), node("Mul", ["m", "k"], ["y"])],
            [info("a", [4]), info("b", [4, 5])],
            [info("y", [5])],
            [const("k", 2.0)],
        ),
        ctx(),
    ),
    "int32": (
        lambda: matmul_model((3, 4), (4, 5), trans=(True, False), elem=onnx.TensorProto.INT32),
        ctx(),
    ),
}


@pytest.mark.parametrize("case", MATMUL_NEAR_MISSES.values(), ids=MATMUL_NEAR_MISSES.keys())
def test_matmul_near_misses_are_kept(case):
    make, context = case
    model = make()
    _, result = check_pass(FuseContribOps(), model, ctx=context, feeds=int_safe_feeds(model))
    assert not result.changed, fired(result.stats)


def int_safe_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {k: np.round(v).astype(v.dtype) for k, v in feeds_for(model).items()}


# -- bias-gelu / bias-fast-gelu -------------------------------------------------------------


def gelu_model(
    x_shape=("N", 4),
    bias=(0.5, -1.0, 0.25, 2.0),
    approximate="none",
    *,
    bias_first=False,
    extra_reader=False,
    opset=20,
    dtype=np.float32,
) -> onnx.ModelProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    bias = np.asarray(bias, dtype)
    out_shape = None  # the near misses broadcast x; shape inference knows
    add_inputs = ["b", "x"] if bias_first else ["x", "b"]
    attrs = {} if approximate == "none" else {"approximate": approximate}
    nodes = [node("Add", add_inputs, ["t"]), node("Gelu", ["t"], ["y"], **attrs)]
    outputs = [info("y", out_shape, elem)]
    if extra_reader:
        outputs.append(info("t", out_shape, elem))
    return make_model(
        nodes, [info("x", list(x_shape), elem)], outputs, [const("b", bias, dtype)], opset
    )


@pytest.mark.parametrize("x_shape", [(4,), ("N", 4), (2, "S", 4), (1, 2, 3, 4)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_fuses(x_shape, approximate):
    model = gelu_model(x_shape, approximate=approximate, bias_first=len(x_shape) % 2 == 0)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    rule = "bias-gelu" if approximate == "none" else "bias-fast-gelu"
    assert fired(result.stats) == {rule: 1}
    (fused,) = rewritten.graph.node
    assert (fused.op_type, list(fused.input)) == (EMITS[rule], ["x", "b"])


GELU_NEAR_MISSES = {
    "target-lacks-bias-gelu": (lambda: gelu_model(), ctx("BiasGelu")),
    "target-lacks-fast-gelu": (lambda: gelu_model(approximate="tanh"), ctx("FastGelu")),
    "sum-read-elsewhere": (lambda: gelu_model(extra_reader=True), ctx()),
    "bias-2d": (lambda: gelu_model(bias=[[0.5, -1.0, 0.25, 2.0]]), ctx()),
    "bias-broadcasts-x": (lambda: gelu_model(x_shape=("N", 1)), ctx()),
    "bias-of-one": (lambda: gelu_model(bias=[0.5]), ctx()),
    "bias-over-unknown-axis": (lambda: gelu_model(x_shape=("N", "H")), ctx()),
    "bias-not-constant": (
        lambda: make_model(
            [node("Add", ["x", "b"], ["t"]), node("Gelu", ["t"], ["y"])],
            [info("x", ["N", 4]), info("b", [4])],
            [info("y", ["N", 4])],
            opset=20,
        ),
        ctx(),
    ),
}


@pytest.mark.parametrize("case", GELU_NEAR_MISSES.values(), ids=GELU_NEAR_MISSES.keys())
def test_gelu_near_misses_are_kept(case):
    make, context = case
    model = make()
    _, result = check_pass(FuseContribOps(), model, ctx=context, feeds=feeds_for(model))
    assert not result.changed, fired(result.stats)


def test_gelu_double_is_kept():
    _, result = apply_pass(FuseContribOps(), gelu_model(dtype=np.float64), ctx())
    assert not result.changed


# -- quick-gelu -----------------------------------------------------------------------------


def quick_gelu_model(
    scale=None,
    op="Mul",
    *,
    x_shape=("N", 3),
    scale_first=False,
    gate_first=False,
    sigmoid_read_elsewhere=False,
    scaled_read_elsewhere=False,
    other_input=False,
    dtype=np.float32,
) -> onnx.ModelProto:
    """x * Sigmoid(x op scale) (scale None: x * Sigmoid(x))."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    argument = "x"
    if scale is not None:
        inits.append(const("k", scale, dtype))
        ins = ["k", "x"] if scale_first else ["x", "k"]
        nodes.append(node(op, ins, ["t"]))
        argument = "t"
    nodes.append(node("Sigmoid", [argument], ["s"]))
    outer = "w" if other_input else "x"
    nodes.append(node("Mul", ["s", outer] if gate_first else [outer, "s"], ["y"]))
    shape = list(x_shape)
    inputs = [info("x", shape, elem)] + ([info("w", shape, elem)] if other_input else [])
    outputs = [info("y", shape, elem)]
    if sigmoid_read_elsewhere:
        outputs.append(info("s", shape, elem))
    if scaled_read_elsewhere:
        outputs.append(info("t", shape, elem))
    return make_model(nodes, inputs, outputs, inits)


QUICK_GELU_FORMS = {
    "silu": (None, "Mul", {}, 1.0),
    "silu-gate-first": (None, "Mul", {"gate_first": True}, 1.0),
    "alpha-right": (1.702, "Mul", {}, 1.702),
    "alpha-left-gate-first": (1.702, "Mul", {"scale_first": True, "gate_first": True}, 1.702),
    "alpha-negative-1d": ([-0.5], "Mul", {}, -0.5),
    "alpha-rank-2-constant": ([[2.0]], "Mul", {}, 2.0),
    "div": (4.0, "Div", {}, 0.25),
}


@pytest.mark.parametrize("form", QUICK_GELU_FORMS)
def test_quick_gelu_fuses(form):
    scale, op, kwargs, alpha = QUICK_GELU_FORMS[form]
    model = quick_gelu_model(scale, op, **kwargs)
    rewritten, result = check_pass(
        FuseContribOps(), model, ctx=ctx(), feeds=feeds_for(model, scale=5)
    )
    assert fired(result.stats) == {"quick-gelu": 1}
    (fused,) = rewritten.graph.node
    assert (fused.op_type, list(fused.input), list(fused.output)) == ("QuickGelu", ["x"], ["y"])
    assert onnx.helper.get_attribute_value(fused.attribute[0]) == pytest.approx(alpha)


QUICK_GELU_NEAR_MISSES = {
    "target-lacks-quick-gelu": (lambda: quick_gelu_model(1.702), ctx("QuickGelu")),
    "sigmoid-read-elsewhere": (lambda: quick_gelu_model(sigmoid_read_elsewhere=True), ctx()),
    "scaled-read-elsewhere": (lambda: quick_gelu_model(2.0, scaled_read_elsewhere=True), ctx()),
    "alpha-not-scalar": (lambda: quick_gelu_model([1.0, 2.0, 3.0]), ctx()),
    "alpha-raises-rank": (lambda: quick_gelu_model([[[2.0]]]), ctx()),
    "constant-divided-by-x": (lambda: quick_gelu_model(2.0, "Div", scale_first=True), ctx()),
    "gate-of-another-tensor": (lambda: quick_gelu_model(other_input=True), ctx()),
    "double": (lambda: quick_gelu_model(1.702, dtype=np.float64), ctx()),
}


@pytest.mark.parametrize("case", QUICK_GELU_NEAR_MISSES.values(), ids=QUICK_GELU_NEAR_MISSES.keys())
def test_quick_gelu_near_misses_are_kept(case):
    make, context = case
    model = make()
    _, result = check_pass(FuseContribOps(), model, ctx=context, feeds=feeds_for(model))
    assert not result.changed, fired(result.stats)


# -- skip-layer-norm ------------------------------------------------------------------------


def layer_norm_model(
    a_shape=("B", "S", 4),
    b_shape=("B", "S", 4),
    *,
    bias=None,
    beta=True,
    axis=-1,
    epsilon=1e-5,
    sum_read_elsewhere=False,
    sum_is_output=False,
    inner_read_elsewhere=False,
    dtype=np.float32,
    declare_outputs=True,
) -> onnx.ModelProto:
    """LayerNormalization(a + b [+ bias]); `bias` in (None, "top", "inner")."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(2)
    hidden = a_shape[-1]
    norm_shape = [hidden] if axis in (-1, len(a_shape) - 1) else list(a_shape[axis:])
    inits = [
        const("gamma", rng.standard_normal(norm_shape), dtype),
        const("beta", rng.standard_normal(norm_shape), dtype),
        const("bias", rng.standard_normal(hidden), dtype),
    ]
    if bias == "top":
        nodes = [node("Add", ["a", "b"], ["t"]), node("Add", ["t", "bias"], ["s"])]
    elif bias == "inner":
        nodes = [node("Add", ["bias", "a"], ["t"]), node("Add", ["b", "t"], ["s"])]
    else:
        nodes = [node("Add", ["a", "b"], ["s"])]
    params = ["s", "gamma"] + (["beta"] if beta else [])
    nodes.append(node("LayerNormalization", params, ["y"], axis=axis, epsilon=epsilon))
    shape = list(a_shape) if declare_outputs else None
    outputs = [info("y", shape, elem)]
    if sum_read_elsewhere:
        nodes.append(node("Add", ["s", "y"], ["z"]))
        outputs.append(info("z", shape, elem))
    if sum_is_output:
        outputs.append(info("s", shape, elem))
    if inner_read_elsewhere:
        nodes.append(node("Neg", ["t"], ["u"]))
        outputs.append(info("u", shape, elem))
    inputs = [info("a", list(a_shape), elem), info("b", list(b_shape), elem)]
    return make_model(nodes, inputs, outputs, inits)


SKIP_FORMS = {  # kwargs, inputs of SkipLayerNormalization, outputs it writes
    "plain": ({}, 4, 1),
    "no-beta": ({"beta": False}, 3, 1),
    "bias-on-top": ({"bias": "top"}, 5, 1),
    "bias-inner": ({"bias": "inner"}, 5, 1),
    "axis-2-epsilon": ({"axis": 2, "epsilon": 1e-12}, 4, 1),
    "sum-read-elsewhere": ({"sum_read_elsewhere": True, "bias": "top"}, 5, 2),
    "sum-is-output": ({"sum_is_output": True}, 4, 2),
    "skip-1-s-h": ({"b_shape": (1, "S", 4)}, 4, 1),
    "static-shapes": ({"a_shape": (2, 3, 4), "b_shape": (2, 3, 4)}, 4, 1),
    "inner-bias-add-read-elsewhere": ({"bias": "inner", "inner_read_elsewhere": True}, 4, 1),
}


@pytest.mark.parametrize("form", SKIP_FORMS)
def test_skip_layer_norm_fuses(form):
    kwargs, n_inputs, n_outputs = SKIP_FORMS[form]
    model = layer_norm_model(**kwargs)
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"skip-layer-norm": 1}
    fused = next(n for n in rewritten.graph.node if n.op_type == "SkipLayerNormalization")
    assert len(fused.input) == n_inputs and len(fused.output) in (1, 4)
    assert [o for o in fused.output if o] == ["y", "s"][:n_outputs]
    assert "LayerNormalization" not in op_types(rewritten.graph)


def test_skip_layer_norm_puts_the_full_shape_first():
    model = layer_norm_model(a_shape=(1, "S", 4), b_shape=("B", "S", 4))
    model.graph.output[0].CopyFrom(info("y", ["B", "S", 4]))
    rewritten, result = check_pass(FuseContribOps(), model, ctx=ctx())
    assert fired(result.stats) == {"skip-layer-norm": 1}
    assert list(rewritten.graph.node[0].input[:2]) == ["b", "a"]


SKIP_NEAR_MISSES = {
    "target-lacks-skip-layer-norm": (lambda: layer_norm_model(), ctx("SkipLayerNormalization")),
    "rank-2": (lambda: layer_norm_model(("S", 4), ("S", 4)), ctx()),
    "rank-4": (lambda: layer_norm_model((2, "B", "S", 4), (2, "B", "S", 4)), ctx()),
    "axis-not-last": (lambda: layer_norm_model((2, 3, 4), (2, 3, 4), axis=1), ctx()),
    "skip-broadcasts-over-seq": (lambda: layer_norm_model(b_shape=("B", 1, 4)), ctx()),
    "skip-of-other-symbols": (lambda: layer_norm_model(b_shape=("B", "T", 4)), ctx()),
    "hidden-unknown": (lambda: hidden_unknown(layer_norm_model()), ctx()),
    "top-bias-over-shared-sum": (
        lambda: layer_norm_model(bias="top", inner_read_elsewhere=True),
        ctx(),
    ),
}


@pytest.mark.parametrize("case", SKIP_NEAR_MISSES.values(), ids=SKIP_NEAR_MISSES.keys())
def test_skip_layer_norm_near_misses_are_kept(case):
    make, context = case
    model = make()
    _, result = check_pass(FuseContribOps(), model, ctx=context, feeds=feeds_for(model))
    assert not result.changed, fired(result.stats)


def hidden_unknown(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the hidden size of its inputs and outputs declared as symbol H."""
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[-1].dim_param = "H"
    return model


def test_skip_layer_norm_double_is_kept():
    _, result = apply_pass(FuseContribOps(), layer_norm_model(dtype=np.float64), ctx())
    assert not result.changed


def test_explain_names_the_reasons():
    reasons = explain(
        Module.from_proto(layer_norm_model(("S", 4), ("S", 4))), FuseContribOps(), ctx()
    )
    assert any("rank 3" in r for r in reasons["skip-layer-norm"])
    reasons = explain(Module.from_proto(quick_gelu_model([1.0, 2.0, 3.0])), FuseContribOps(), ctx())
    assert any("Sigmoid(alpha * x)" in r for r in reasons["quick-gelu"])
    # without a target the rule does not run, and explain says which op it lacks
    (why,) = explain(Module.from_proto(conv_model()), FuseContribOps())["fused-conv"]
    assert "com.microsoft::FusedConv" in why


# -- properties -----------------------------------------------------------------------------
#
# Each strategy draws a graph holding one rule's pattern with random shapes, attributes and
# constants, or a random near miss of it, and says whether the rule must fire.


def assert_fires_as_expected(model: onnx.ModelProto, rule: str, expected: bool, context):
    rewritten, result = check_pass(FuseContribOps(), model, ctx=context, feeds=feeds_for(model))
    assert fired(result.stats) == ({rule: 1} if expected else {}), result.stats
    emitted = [n.op_type for n in rewritten.graph.node if n.domain == "com.microsoft"]
    assert emitted == ([EMITS[rule]] if expected else [])


def lacking(draw, op: str) -> tuple[PassContext, bool]:
    """A context that mostly declares `op` (and whether it does)."""
    declared = draw(st.integers(0, 5)) > 0
    return (ctx() if declared else ctx(op)), declared


SMALL = st.floats(-2.0, 2.0, width=32, allow_subnormal=False)
NONZERO = st.floats(0.25, 4.0, width=32).flatmap(lambda v: st.sampled_from([v, -v]))


@st.composite
def conv_cases(draw):
    dims = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2]))
    cin, cout = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 2)) for _ in range(dims)]
    attrs = {
        "group": group,
        "strides": [draw(st.integers(1, 2)) for _ in range(dims)],
        "dilations": [draw(st.integers(1, 2)) for _ in range(dims)],
        "pads": [draw(st.integers(0, 1)) for _ in range(2 * dims)],
    }
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    inits = [const("w", rng.standard_normal([cout, cin // group, *kernel]))]
    conv_inputs = ["x", "w"]
    if draw(st.booleans()):
        inits.append(const("b", rng.standard_normal(cout)))
        conv_inputs.append("b")
    act = draw(
        st.sampled_from(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip", "Elu"])
    )
    opset = draw(st.sampled_from([10, 13, 17]))
    act_attrs, act_inputs, inputs, expected = {}, ["c"], [], act != "Elu"
    if act == "LeakyRelu" and draw(st.booleans()):
        act_attrs["alpha"] = draw(SMALL)
    if act == "HardSigmoid":
        act_attrs = {"alpha": draw(st.floats(0.0625, 1.0, width=32)), "beta": draw(SMALL)}
    if act == "Clip":
        lo, hi = draw(st.one_of(st.none(), SMALL)), draw(st.one_of(st.none(), SMALL))
        if lo is not None and hi is not None and lo > hi:
            expected = False
        if opset < 11:
            act_attrs = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
        else:
            for i, bound in enumerate((lo, hi)):
                if bound is None:
                    act_inputs.append("")
                elif draw(st.integers(0, 4)) == 0:  # a bound computed at runtime
                    inputs.append(info(f"bound{i}", []))
                    act_inputs.append(f"bound{i}")
                    expected = False
                else:
                    inits.append(const(f"bound{i}", bound))
                    act_inputs.append(f"bound{i}")
            while act_inputs[-1] == "":
                act_inputs.pop()
    nodes = [node("Conv", conv_inputs, ["c"], **attrs), node(act, act_inputs, ["y"], **act_attrs)]
    outputs = [info("y", None)]
    variant = draw(st.sampled_from(["plain"] * 4 + ["read-elsewhere", "graph-output"]))
    if variant == "read-elsewhere":
        nodes.append(node("Neg", ["c"], ["z"]))
        outputs.append(info("z", None))
    elif variant == "graph-output":
        outputs.append(info("c", None))
    spatial = [draw(st.integers(3, 4)) for _ in range(dims)]
    inputs.insert(0, info("x", [draw(st.sampled_from([1, "N"])), cin, *spatial]))
    context, declared = lacking(draw, "FusedConv")
    model = make_model(nodes, inputs, outputs, inits, opset)
    return model, expected and variant == "plain" and declared, context


@given(case=conv_cases())
@PROPERTY
def test_property_fused_conv(case):
    model, expected, context = case
    assert_fires_as_expected(model, "fused-conv", expected, context)


@st.composite
def matmul_cases(draw):
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    m, k, n = (draw(st.integers(1, 3)) for _ in range(3))
    shapes, trans, perms, swapped = [], [], [], False
    for rows, cols in ((m, k), (k, n)):
        kept = batch[draw(st.integers(0, len(batch))) :]
        side = [d if draw(st.integers(0, 3)) else 1 for d in kept]
        shape = (*side, rows, cols)
        kind = draw(st.sampled_from(["none", "swap", "swap", "other"]))
        perm = None
        if kind == "other":
            perm = draw(st.permutations(range(len(shape))))
            kind = "swap" if list(perm) == swap_perm(len(shape)) else kind
            kind = "none" if list(perm) == list(range(len(shape))) else kind
        shapes.append(shape)
        trans.append(kind != "none")
        perms.append(list(perm) if perm is not None else None)
        swapped |= kind == "swap"
    out_rank = max(len(s) for s in shapes)
    scales, absorbed = [], True
    for _ in range(draw(st.integers(0, 2))):
        value = draw(NONZERO)
        form = draw(st.sampled_from(["scalar", "scalar", "ones", "vector", "raises-rank"]))
        if form == "ones":
            value = np.full([1] * draw(st.integers(1, out_rank)), value)
        elif form == "vector":
            value = np.full([n], value) * np.arange(1, n + 1)
            absorbed &= n == 1
        elif form == "raises-rank":
            value = np.full([1] * (out_rank + 1), value)
            absorbed = False
        op, left = draw(st.sampled_from(["Mul", "Div"])), draw(st.booleans())
        absorbed &= not (op == "Div" and left)
        scales.append((op, value, left))
    shared_product = bool(scales) and draw(st.integers(0, 5)) == 0
    absorbed = absorbed and bool(scales) and not shared_product
    model = matmul_model(
        shapes[0],
        shapes[1],
        trans=tuple(trans),
        perms=tuple(perms),
        scales=scales,
        transpose_read_elsewhere=draw(st.integers(0, 4)) == 0,
        product_read_elsewhere=shared_product,
    )
    context, declared = lacking(draw, "FusedMatMul")
    # a scale chain fires as far as its first steps are absorbable; only the first matters here
    first_ok = bool(scales) and not shared_product and _absorbable(scales[0], n, out_rank)
    return model, (swapped or first_ok) and declared, context


def _absorbable(step, n: int, out_rank: int) -> bool:
    op, value, left = step
    value = np.asarray(value)
    return value.size == 1 and value.ndim <= out_rank and not (op == "Div" and left)


@given(case=matmul_cases())
@PROPERTY
def test_property_fused_matmul(case):
    model, expected, context = case
    assert_fires_as_expected(model, "fused-matmul", expected, context)


@st.composite
def gelu_cases(draw):
    hidden = draw(st.integers(1, 4))
    x_shape = [draw(st.sampled_from([1, 2, "N"])) for _ in range(draw(st.integers(0, 2)))]
    approximate = draw(st.sampled_from(["none", "tanh"]))
    form = draw(st.sampled_from(["fits", "fits", "fits", "2-d", "one", "broadcasts-x"]))
    bias = np.linspace(-1.0, 1.0, hidden, dtype=np.float32) + draw(SMALL)
    if form == "2-d":
        bias = bias[None, :]
    elif form == "one":
        bias = bias[:1]
    elif form == "broadcasts-x":
        bias, hidden = np.resize(bias, hidden + 1), 1
    expected = bias.ndim == 1 and bias.shape[0] == hidden
    extra = draw(st.integers(0, 4)) == 0
    model = gelu_model(
        (*x_shape, hidden),
        bias,
        approximate,
        bias_first=draw(st.booleans()),
        extra_reader=extra,
        opset=draw(st.sampled_from([20, 21])),
    )
    rule = "bias-gelu" if approximate == "none" else "bias-fast-gelu"
    context, declared = lacking(draw, EMITS[rule])
    return model, rule, expected and not extra and declared, context


@given(case=gelu_cases())
@PROPERTY
def test_property_bias_gelu(case):
    model, rule, expected, context = case
    assert_fires_as_expected(model, rule, expected, context)


@st.composite
def quick_gelu_cases(draw):
    x_shape = [draw(st.sampled_from([1, 3, "N"])) for _ in range(draw(st.integers(1, 3)))]
    rank = len(x_shape)
    form = draw(st.sampled_from(["silu", "scalar", "ones", "vector", "raises-rank"]))
    scale, op, expected = None, "Mul", True
    if form != "silu":
        value = draw(NONZERO)
        op = draw(st.sampled_from(["Mul", "Div"]))
        if form == "scalar":
            scale = draw(st.sampled_from([value, [value]]))
        elif form == "ones":
            scale = np.full([1] * draw(st.integers(1, rank)), value)
        elif form == "raises-rank":
            scale, expected = np.full([1] * (rank + 1), value), False
        else:
            assume(x_shape[-1] != 1)
            scale, expected = np.full([3], value) * [1, 2, 3], False
            x_shape[-1] = 3
    scale_first = draw(st.booleans())
    expected &= not (op == "Div" and scale_first)
    variant = draw(st.sampled_from(["plain"] * 5 + ["sigmoid", "scaled", "other"]))
    if variant == "scaled" and scale is None:
        variant = "plain"
    model = quick_gelu_model(
        scale,
        op,
        x_shape=x_shape,
        scale_first=scale_first,
        gate_first=draw(st.booleans()),
        sigmoid_read_elsewhere=variant == "sigmoid",
        scaled_read_elsewhere=variant == "scaled",
        other_input=variant == "other",
    )
    context, declared = lacking(draw, "QuickGelu")
    return model, expected and variant == "plain" and declared, context


@given(case=quick_gelu_cases())
@PROPERTY
def test_property_quick_gelu(case):
    model, expected, context = case
    assert_fires_as_expected(model, "quick-gelu", expected, context)


@st.composite
def skip_layer_norm_cases(draw):
    hidden = draw(st.integers(1, 5))
    batch, seq = draw(st.sampled_from([1, 2, "B"])), draw(st.sampled_from([1, 3, "S"]))
    a_shape = (batch, seq, hidden)
    form = draw(st.sampled_from(["same", "same", "1-s-h", "b-1-h", "swapped", "rank-2"]))
    b_shape = {
        "same": a_shape,
        "1-s-h": (1, seq, hidden),
        "b-1-h": (batch, 1, hidden),
        "swapped": a_shape,
        "rank-2": (seq, hidden),
    }[form]
    if form == "swapped":  # the operand with the full shape comes second
        a_shape, b_shape = (1, seq, hidden), a_shape
    if form == "rank-2":
        a_shape = b_shape
    expected = len(a_shape) == 3 and (
        a_shape == b_shape or (1, *a_shape[1:]) == b_shape or (1, *b_shape[1:]) == a_shape
    )
    bias = draw(st.sampled_from([None, "top", "inner"]))
    inner_shared = bias is not None and draw(st.integers(0, 3)) == 0
    expected &= not (bias == "top" and inner_shared)
    model = layer_norm_model(
        a_shape,
        b_shape,
        bias=bias,
        beta=draw(st.booleans()),
        axis=draw(st.sampled_from([-1, len(a_shape) - 1])),
        epsilon=draw(st.sampled_from([1e-12, 1e-5, 1e-3])),
        sum_read_elsewhere=draw(st.booleans()),
        sum_is_output=draw(st.integers(0, 3)) == 0,
        inner_read_elsewhere=inner_shared,
        declare_outputs=False,
    )
    context, declared = lacking(draw, "SkipLayerNormalization")
    return model, expected and declared, context


@given(case=skip_layer_norm_cases())
@PROPERTY
def test_property_skip_layer_norm(case):
    model, expected, context = case
    assert_fires_as_expected(model, "skip-layer-norm", expected, context)
