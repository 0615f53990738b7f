from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes.fuse_layer_norm import RULES, FuseLayerNorm
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fuse-layer-norm")
FLOAT = onnx.TensorProto.FLOAT

#: Intermediates inside the normalization core (a second reader blocks the whole fusion).
LN_CORE = ("mean", "d", "d2", "sq", "var", "ve", "std", "inv")
RMS_CORE = ("sq", "var", "ve", "std", "inv")


@dataclasses.dataclass
class Spec:
    """One spelled normalization; the defaults are torch's LayerNorm export over the last axis.

    Intermediates are named mean, d (d2 for the second Sub), sq, var, ve, std, inv, n, g
    and the result y.
    """

    shape: tuple[int | str, ...] = ("N", 4)
    k: int = 1
    opset: int = 17
    eps: float = 1e-5
    gamma: tuple[int, ...] | None = None  # shape of a constant gamma
    beta: tuple[int, ...] | None = None  # shape of a constant beta (LayerNorm only)
    square: str = "pow"  # pow | mul
    divide: str = "div"  # div | recip
    positive_axes: bool = False
    swap: bool = False  # the other operand order of every commutative node
    constant_nodes: bool = False  # eps, exponent and axes as Constant nodes
    mean_axes: tuple[int, ...] | None = None  # override of the mean's axes
    var_axes: tuple[int, ...] | None = None  # override of the variance's axes
    exponent: float = 2.0
    gamma_input: bool = False  # gamma is a graph input of shape `gamma`
    shared: str | None = None  # an intermediate also read by an Identity
    shared_output: str | None = None  # an intermediate that is also a graph output
    two_subs: bool = False
    rms: bool = False
    dtype: int = FLOAT
    seed: int = 0


def build(spec: Spec) -> onnx.ModelProto:
    rng = np.random.default_rng(spec.seed)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.dtype)
    rank = len(spec.shape)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs = [onnx.helper.make_tensor_value_info("x", spec.dtype, spec.shape)]

    def const(name: str, array: np.ndarray, node: bool = False) -> str:
        tensor = onnx.numpy_helper.from_array(array, name)
        if node:
            nodes.append(onnx.helper.make_node("Constant", [], [name], value=tensor))
        else:
            inits.append(tensor)
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(onnx.helper.make_node(op, ins, [out], name=f"{out}_node", **attrs))
        return out

    def reduce_mean(src: str, out: str, axes: tuple[int, ...]) -> str:
        if spec.opset < 18:
            return node("ReduceMean", [src], out, axes=list(axes))
        name = const(f"{out}_axes", np.array(axes, np.int64), spec.constant_nodes)
        return node("ReduceMean", [src, name], out)

    def pair(a: str, b: str) -> list[str]:
        return [b, a] if spec.swap else [a, b]

    trailing = tuple(range(-spec.k, 0))
    if spec.positive_axes:
        trailing = tuple(a + rank for a in trailing)
    if spec.rms:
        numerator = base = "x"
    else:
        reduce_mean("x", "mean", spec.mean_axes or trailing)
        numerator = base = node("Sub", ["x", "mean"], "d")
        if spec.two_subs:
            base = node("Sub", ["x", "mean"], "d2")
    if spec.square == "pow":
        two = const("two", np.array(spec.exponent, np_dtype), spec.constant_nodes)
        node("Pow", [base, two], "sq")
    else:
        node("Mul", [base, base], "sq")
    reduce_mean("sq", "var", spec.var_axes or trailing)
    eps = const("eps", np.array(spec.eps, np_dtype), spec.constant_nodes)
    node("Add", pair("var", eps), "ve")
    node("Sqrt", ["ve"], "std")
    if spec.divide == "div":
        last = node("Div", [numerator, "std"], "n")
    else:
        node("Reciprocal", ["std"], "inv")
        last = node("Mul", pair(numerator, "inv"), "n")
    if spec.gamma is not None:
        values = rng.uniform(0.5, 1.5, spec.gamma).astype(np_dtype)
        if spec.gamma_input:
            inputs.append(onnx.helper.make_tensor_value_info("gamma", spec.dtype, spec.gamma))
        else:
            const("gamma", values)
        last = node("Mul", pair(last, "gamma"), "g")
    if spec.beta is not None:
        const("beta", rng.uniform(-0.5, 0.5, spec.beta).astype(np_dtype))
        last = node("Add", pair("beta", last), "b")
    nodes[-1].output[0] = "y"
    outputs = [onnx.helper.make_tensor_value_info("y", spec.dtype, None)]
    if spec.shared is not None:
        node("Identity", [spec.shared], "z")
        outputs.append(onnx.helper.make_tensor_value_info("z", spec.dtype, None))
    if spec.shared_output is not None:
        outputs.append(onnx.helper.make_tensor_value_info(spec.shared_output, spec.dtype, None))
    graph = onnx.helper.make_graph(nodes, "norm", inputs, outputs, inits)
    return onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", spec.opset)],
        ir_version=11 if spec.opset >= 23 else 9,
    )


def expected_ops(spec: Spec, *, fires: bool, gamma: bool, beta: bool) -> list[str]:
    """The sorted op types after the pass: the fused op plus what it could not absorb."""
    if not fires:
        return sorted(op_types(build(spec).graph))
    ops = ["RMSNormalization" if spec.rms else "LayerNormalization"]
    if spec.gamma is not None and not gamma:
        ops.append("Mul")
    if spec.beta is not None and not beta:
        ops.append("Add")
    if spec.shared is not None:
        ops.append("Identity")
    return sorted(ops)


def run(spec: Spec, **expected) -> onnx.ModelProto:
    """check_pass on the spec's model, asserting which rule fired and what is left."""
    fires = expected.get("fires", True)
    rewritten, result = check_pass(FuseLayerNorm(), build(spec))
    rule = "rms-norm" if spec.rms else "layer-norm"
    assert fired(result.stats) == ({rule: 1} if fires else {}), result.stats
    gamma, beta = expected.get("gamma", fires), expected.get("beta", fires)
    assert sorted(op_types(rewritten.graph)) == expected_ops(
        spec, fires=fires, gamma=gamma, beta=beta
    )
    return rewritten


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FuseLayerNorm(), case)


def test_stats_names():
    _, result = apply_pass(FuseLayerNorm(), build(Spec()))
    assert set(result.stats) == {"layer-norm", "rms-norm", "skipped-dynamic-shape"}


def test_rule_names_and_opsets():
    assert [(r.name, r.min_opset) for r in RULES] == [("layer-norm", 17), ("rms-norm", 23)]


SPELLINGS = {
    "torch-affine": Spec(gamma=(4,), beta=(4,)),
    "no-affine": Spec(),
    "gamma-only": Spec(gamma=(4,)),
    "beta-only": Spec(beta=(4,)),
    "mul-square-reciprocal": Spec(square="mul", divide="recip", gamma=(4,), beta=(4,)),
    "swapped-operands": Spec(swap=True, divide="recip", gamma=(4,), beta=(4,)),
    "constant-nodes": Spec(constant_nodes=True, gamma=(4,), beta=(4,)),
    "two-axes": Spec(shape=("N", 3, 4), k=2, gamma=(3, 4), beta=(4,)),
    "positive-axes": Spec(shape=(2, 3, 4), k=2, positive_axes=True, gamma=(3, 4)),
    "opset-18-axes-input": Spec(opset=18, shape=("N", 3, 4), k=2, gamma=(1, 3, 4)),
    "opset-18-constant-nodes": Spec(opset=18, constant_nodes=True, gamma=(1, 4), beta=(1,)),
    "scalar-gamma": Spec(gamma=(), beta=(1, 1)),
    "two-subs": Spec(two_subs=True, gamma=(4,), beta=(4,)),
    "opset-23-stays-layer-norm": Spec(opset=23, gamma=(4,), beta=(4,)),
    "rms": Spec(rms=True, opset=23, gamma=(4,)),
    "rms-no-gamma-mul-recip": Spec(rms=True, opset=23, square="mul", divide="recip"),
    "rms-two-axes-swapped": Spec(rms=True, opset=23, shape=(2, 3, 4), k=2, swap=True, gamma=(4,)),
}


@pytest.mark.parametrize("spec", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_spellings_fuse(spec):
    rewritten = run(spec)
    (node,) = [n for n in rewritten.graph.node if n.op_type.endswith("Normalization")]
    assert list(node.input)[0] == "x" and list(node.output) == ["y"]
    assert len(node.input) == (3 if spec.beta is not None else 2)
    assert attributes(node)["axis"] == -spec.k
    assert attributes(node)["epsilon"] == pytest.approx(spec.eps)
    scale = next(i for i in rewritten.graph.initializer if i.name == node.input[1])
    assert tuple(scale.dims) == tuple(spec.shape[-spec.k :])


def test_initializer_of_the_normalized_shape_is_reused():
    rewritten = run(Spec(gamma=(4,), beta=(4,)))
    assert list(rewritten.graph.node[0].input) == ["x", "gamma", "beta"]


@pytest.mark.parametrize("dtype", [onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16])
def test_other_float_types(dtype):
    spec = Spec(shape=(3, 8), dtype=dtype, gamma=(8,), beta=(8,), eps=1e-3)
    model = build(spec)
    rewritten, result = apply_pass(FuseLayerNorm(), model)
    assert fired(result.stats) == {"layer-norm": 1}
    assert op_types(rewritten.graph) == ["LayerNormalization"]
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np_dtype)
    outs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        for m in (model, rewritten)
    ]
    tol = 1e-2 if dtype == onnx.TensorProto.FLOAT16 else 1e-5  # float16 spelled in float16
    np.testing.assert_allclose(outs[1].astype(np.float64), outs[0].astype(np.float64), atol=tol)


def test_bfloat16_is_kept():
    # LayerNormalization-17 takes bfloat16, but the rule keeps to float16/32/64
    model = build(Spec(shape=(2, 4), dtype=onnx.TensorProto.BFLOAT16, gamma=(4,)))
    rewritten, result = apply_pass(FuseLayerNorm(), model)
    assert not result.changed
    assert "LayerNormalization" not in op_types(rewritten.graph)


NEAR_MISSES = {
    "opset-16": Spec(opset=16, gamma=(4,), beta=(4,)),
    "rms-opset-22": Spec(rms=True, opset=22, gamma=(4,)),
    "pow-3": Spec(exponent=3.0, gamma=(4,)),
    "rms-pow-3": Spec(rms=True, opset=23, exponent=3.0),
    "mean-over-leading-axis": Spec(shape=(2, 3, 4), mean_axes=(-2,), gamma=(4,)),
    "mean-over-two-axes-var-over-one": Spec(shape=(2, 3, 4), mean_axes=(-2, -1)),
    "both-over-non-trailing-axis": Spec(shape=(3, 4), mean_axes=(0,), var_axes=(0,)),
    "rms-non-trailing-axis": Spec(rms=True, opset=23, shape=(3, 4), var_axes=(0,)),
    "positive-axes-unknown-rank": Spec(shape=(2, 4), positive_axes=True),  # rank dropped below
    "dynamic-normalized-dim": Spec(shape=(2, "D"), gamma=(1,)),
    **{
        f"shared-{name}": Spec(shared=name, two_subs=name == "d2", divide="recip")
        for name in LN_CORE
    },
    **{f"output-{name}": Spec(shared_output=name, divide="recip") for name in ("mean", "ve")},
    "rms-shared-sq": Spec(rms=True, opset=23, shared="sq"),
}


@pytest.mark.parametrize("spec", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(spec):
    model = build(spec)
    if spec.positive_axes:
        model.graph.input[0].type.tensor_type.ClearField("shape")
    rewritten, result = check_pass(FuseLayerNorm(), model)
    assert not result.changed, fired(result.stats)


def test_dynamic_normalized_dim_is_counted():
    _, result = apply_pass(FuseLayerNorm(), build(NEAR_MISSES["dynamic-normalized-dim"]))
    assert result.stats["skipped-dynamic-shape"] == 1


def test_two_subs_with_different_inputs_are_kept():
    model = build(Spec(two_subs=True))
    model.graph.input.append(onnx.helper.make_tensor_value_info("x2", FLOAT, ["N", 4]))
    next(n for n in model.graph.node if n.output[0] == "d2").input[0] = "x2"
    _, result = check_pass(FuseLayerNorm(), model)
    assert not result.changed


def test_keepdims_zero_is_kept():
    # a [4] variance divides the columns of a [4, 4] input, not its rows
    model = build(Spec(shape=(4, 4)))
    var = next(n for n in model.graph.node if n.output[0] == "var")
    var.attribute.append(onnx.helper.make_attribute("keepdims", 0))
    _, result = check_pass(FuseLayerNorm(), model)
    assert not result.changed


def test_epsilon_that_grows_the_rank_is_kept():
    model = build(Spec(shape=(2, 4)))
    eps = next(i for i in model.graph.initializer if i.name == "eps")
    eps.CopyFrom(onnx.numpy_helper.from_array(np.full((1, 1, 1), 1e-5, np.float32), "eps"))
    _, result = check_pass(FuseLayerNorm(), model)
    assert not result.changed


def test_non_constant_epsilon_is_kept():
    model = build(Spec(shape=(2, 4)))
    model.graph.initializer.remove(next(i for i in model.graph.initializer if i.name == "eps"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("eps", FLOAT, []))
    _, result = check_pass(FuseLayerNorm(), model)
    assert not result.changed


PARTIAL = {
    # the core fuses; the affine tail that cannot be absorbed stays as it was
    "non-constant-gamma": (Spec(gamma=(4,), gamma_input=True, beta=(4,)), False, False),
    "gamma-over-batch-axis": (Spec(shape=(3, 4), gamma=(3, 1), beta=(4,)), False, False),
    "gamma-grows-rank": (Spec(gamma=(1, 1, 4)), False, False),
    "beta-over-batch-axis": (Spec(shape=(3, 4), gamma=(4,), beta=(3, 1)), True, False),
    "n-read-elsewhere": (Spec(gamma=(4,), beta=(4,), shared="n"), False, False),
    "g-read-elsewhere": (Spec(gamma=(4,), beta=(4,), shared="g"), True, False),
    "rms-gamma-over-batch-axis": (
        Spec(rms=True, opset=23, shape=(3, 4), gamma=(3, 4)),
        False,
        False,
    ),
    "rms-gamma-input": (Spec(rms=True, opset=23, gamma=(4,), gamma_input=True), False, False),
}


@pytest.mark.parametrize("case", PARTIAL.values(), ids=PARTIAL.keys())
def test_affine_tail_absorbed_only_when_it_fits(case):
    spec, gamma, beta = case
    run(spec, gamma=gamma, beta=beta)


def test_rms_absorbs_full_shaped_gamma_only_over_normalized_axes():
    # gamma [3, 4] over x [3, 4] with k = 1 scales per row: not absorbable, but k = 2 is
    run(Spec(rms=True, opset=23, shape=(3, 4), k=2, gamma=(3, 4)))
    run(Spec(rms=True, opset=23, shape=(3, 4), k=1, gamma=(3, 4)), gamma=False)


def test_layer_norm_with_non_trailing_mean_at_opset_23_leaves_an_rms_norm():
    # mean over axis 0, variance over the last axis: no LayerNorm, but d / rms(d) is RMSNorm
    spec = Spec(opset=23, shape=(3, 4), mean_axes=(0,))
    rewritten, result = check_pass(FuseLayerNorm(), build(spec))
    assert fired(result.stats) == {"rms-norm": 1}
    assert op_types(rewritten.graph) == ["ReduceMean", "Sub", "RMSNormalization"]


def test_explain_names_the_reason():
    reasons = explain(Module.from_proto(build(NEAR_MISSES["pow-3"])), FuseLayerNorm())
    assert any("exponent is not a constant 2" in r for r in reasons["layer-norm"])
    reasons = explain(Module.from_proto(build(NEAR_MISSES["shared-mean"])), FuseLayerNorm())
    assert any("ReduceMean of x read only there" in r for r in reasons["layer-norm"])
    reasons = explain(Module.from_proto(build(NEAR_MISSES["opset-16"])), FuseLayerNorm())
    assert any("needs opset 17" in r for r in reasons["layer-norm"])


# -- property test ------------------------------------------------------------------------------
NEAR_MISS_KINDS = (
    "none", "none", "opset", "exponent", "mean-axes", "var-axes", "shared",
    "shared-output", "gamma-axis", "gamma-input", "tail-shared",
)  # fmt: skip


@st.composite
def specs(draw) -> tuple[Spec, bool, bool, bool]:
    """A random spelled LayerNorm/RMSNorm, maybe a near miss; plus what should be absorbed."""
    rms = draw(st.integers(0, 2)) == 0
    rank = draw(st.integers(2, 4))
    dims = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    shape: tuple[int | str, ...] = tuple(dims)
    if draw(st.booleans()):
        shape = ("N", *dims[1:])
    k = draw(st.integers(1, rank - 1))
    normalized = tuple(dims[-k:])
    miss = draw(st.sampled_from(NEAR_MISS_KINDS))
    opset = draw(st.sampled_from((23,) if rms else (17, 18)))
    if miss == "opset":
        opset = 22 if rms else 16

    def affine_shape() -> tuple[int, ...]:
        size = draw(st.integers(0, rank))
        tail = normalized[max(0, k - size) :]
        tail = tuple(d if draw(st.booleans()) else 1 for d in tail)
        return (1,) * max(0, size - k) + tail

    has_gamma = draw(st.integers(0, 3)) > 0
    has_beta = not rms and draw(st.integers(0, 3)) > 0
    spec = Spec(
        shape=shape,
        k=k,
        opset=opset,
        eps=draw(st.floats(1e-12, 1e-3)),
        gamma=affine_shape() if has_gamma else None,
        beta=affine_shape() if has_beta else None,
        square=draw(st.sampled_from(("pow", "mul"))),
        divide=draw(st.sampled_from(("div", "recip"))),
        positive_axes=draw(st.booleans()),
        swap=draw(st.booleans()),
        constant_nodes=draw(st.booleans()),
        two_subs=not rms and draw(st.integers(0, 5)) == 0,
        rms=rms,
        seed=draw(st.integers(0, 2**16)),
    )
    fires, gamma, beta = True, has_gamma, has_beta
    core = RMS_CORE if rms else (*LN_CORE[:2], *(("d2",) if spec.two_subs else ()), *LN_CORE[3:])
    core = tuple(n for n in core if n != "inv" or spec.divide == "recip")
    if miss == "opset":
        fires = False
    elif miss == "exponent" and spec.square == "pow":
        spec.exponent, fires = 3.0, False
    elif miss in ("mean-axes", "var-axes"):
        wrong = tuple(sorted(draw(st.sets(st.integers(-rank, -1), min_size=1))))
        # RMSNorm has one ReduceMean: only axes that are not trailing at all are wrong
        if wrong != tuple(range(-(len(wrong) if rms else k), 0)):
            fires = False
            if miss == "mean-axes" and not rms:
                spec.mean_axes = wrong
            else:
                spec.var_axes = wrong
    elif miss in ("shared", "shared-output"):
        name = draw(st.sampled_from(core))
        if miss == "shared":
            spec.shared = name
        else:
            spec.shared_output = name
        fires = False
    elif miss == "gamma-axis" and has_gamma:
        batch = [i for i, d in enumerate(shape[:-k]) if isinstance(d, int) and d > 1]
        if batch:  # a gamma that scales along a non-normalized axis
            spec.gamma = (*dims[batch[0] : rank - k], *normalized)
            gamma = beta = False
        else:  # or one that grows the rank
            spec.gamma = (1,) * (rank + 1 - k) + normalized
            gamma = beta = False
    elif miss == "gamma-input" and has_gamma:
        spec.gamma_input = True
        gamma = beta = False
    elif miss == "tail-shared" and (has_gamma or has_beta):
        spec.shared = draw(st.sampled_from(["n", *(["g"] if has_gamma and has_beta else [])]))
        gamma = has_gamma and spec.shared == "g"
        beta = False
    return spec, fires, gamma, beta


@given(case=specs())
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True)
def test_property(case):
    spec, fires, gamma, beta = case
    event("rms" if spec.rms else "layer-norm")
    event("fires" if fires else "kept")
    event(f"gamma absorbed: {gamma}, beta absorbed: {beta}")
    run(spec, fires=fires, gamma=gamma, beta=beta)
