from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes.fuse_activations import RULES, FuseActivations
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types, strategies
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fuse-activations")
SQRT2 = math.sqrt(2.0)
K = math.sqrt(2.0 / math.pi)

# Each form: (rule it fires, nodes (output, op, inputs, attrs)); a float input is a scalar
# constant, "x" the activation's input and "y" its result. Clip reads inputs (opset >= 11).
FORMS = {
    "gelu-erf-torch": (
        "gelu-erf",
        [
            ("d", "Div", ["x", SQRT2], {}),
            ("e", "Erf", ["d"], {}),
            ("a", "Add", ["e", 1.0], {}),
            ("m", "Mul", ["x", "a"], {}),
            ("y", "Mul", ["m", 0.5], {}),
        ],
    ),
    "gelu-erf-half-first": (
        "gelu-erf",
        [
            ("m", "Mul", ["x", 0.5], {}),
            ("d", "Div", ["x", 1.4142135381698608], {}),
            ("e", "Erf", ["d"], {}),
            ("a", "Add", [1.0, "e"], {}),
            ("y", "Mul", ["m", "a"], {}),
        ],
    ),
    "gelu-erf-tf": (
        "gelu-erf",
        [
            ("d", "Mul", ["x", 0.7071067690849304], {}),
            ("e", "Erf", ["d"], {}),
            ("a", "Add", ["e", 1.0], {}),
            ("h", "Mul", ["a", 0.5], {}),
            ("y", "Mul", ["x", "h"], {}),
        ],
    ),
    "gelu-erf-div-two": (
        "gelu-erf",
        [
            ("d", "Mul", [0.7071, "x"], {}),
            ("e", "Erf", ["d"], {}),
            ("a", "Add", [1.0, "e"], {}),
            ("m", "Mul", ["a", "x"], {}),
            ("y", "Div", ["m", 2.0], {}),
        ],
    ),
    "gelu-tanh-pow": (
        "gelu-tanh",
        [
            ("p", "Pow", ["x", 3.0], {}),
            ("q", "Mul", [0.044715, "p"], {}),
            ("r", "Add", ["x", "q"], {}),
            ("s", "Mul", ["r", 0.7978845608], {}),
            ("t", "Tanh", ["s"], {}),
            ("a", "Add", ["t", 1.0], {}),
            ("m", "Mul", ["x", 0.5], {}),
            ("y", "Mul", ["m", "a"], {}),
        ],
    ),
    "gelu-tanh-cube": (
        "gelu-tanh",
        [
            ("p1", "Mul", ["x", "x"], {}),
            ("p", "Mul", ["p1", "x"], {}),
            ("q", "Mul", ["p", 0.044715], {}),
            ("r", "Add", ["q", "x"], {}),
            ("s", "Mul", [K, "r"], {}),
            ("t", "Tanh", ["s"], {}),
            ("a", "Add", [1.0, "t"], {}),
            ("m", "Mul", ["a", "x"], {}),
            ("y", "Mul", ["m", 0.5], {}),
        ],
    ),
    "hard-sigmoid-clip": (
        "hard-sigmoid",
        [
            ("a", "Add", ["x", 3.0], {}),
            ("c", "Clip", ["a", 0.0, 6.0], {}),
            ("y", "Div", ["c", 6.0], {}),
        ],
    ),
    "hard-sigmoid-relu-min": (
        "hard-sigmoid",
        [
            ("a", "Add", ["x", 3.0], {}),
            ("r", "Relu", ["a"], {}),
            ("c", "Min", ["r", 6.0], {}),
            ("y", "Mul", ["c", 1.0 / 6.0], {}),
        ],
    ),
    "hard-sigmoid-max-min": (
        "hard-sigmoid",
        [
            ("a", "Add", [3.0, "x"], {}),
            ("c", "Max", ["a", 0.0], {}),
            ("m", "Min", [6.0, "c"], {}),
            ("y", "Div", ["m", 6.0], {}),
        ],
    ),
    "hard-swish-ppocr": (
        "hard-swish",
        [
            ("a", "Add", ["x", 3.0], {}),
            ("c", "Clip", ["a", 0.0, 6.0], {}),
            ("m", "Mul", ["x", "c"], {}),
            ("y", "Div", ["m", 6.0], {}),
        ],
    ),
    "hard-swish-inner-div": (
        "hard-swish",
        [
            ("a", "Add", ["x", 3.0], {}),
            ("c", "Clip", ["a", 0.0, 6.0], {}),
            ("d", "Div", ["c", 6.0], {}),
            ("y", "Mul", ["d", "x"], {}),
        ],
    ),
    "hard-swish-hard-sigmoid": (
        "hard-swish",
        [
            ("h", "HardSigmoid", ["x"], {"alpha": 1.0 / 6.0, "beta": 0.5}),
            ("y", "Mul", ["x", "h"], {}),
        ],
    ),
    "hard-swish-relu6": (
        "hard-swish",
        [
            ("a", "Add", [3.0, "x"], {}),
            ("r", "Relu", ["a"], {}),
            ("c", "Min", ["r", 6.0], {}),
            ("m", "Mul", ["c", "x"], {}),
            ("y", "Mul", ["m", 1.0 / 6.0], {}),
        ],
    ),
    "silu": ("silu", [("s", "Sigmoid", ["x"], {}), ("y", "Mul", ["x", "s"], {})]),
    "silu-sigmoid-first": ("silu", [("s", "Sigmoid", ["x"], {}), ("y", "Mul", ["s", "x"], {})]),
    "silu-quick-gelu": (
        "silu",
        [
            ("a", "Mul", [1.702, "x"], {}),
            ("s", "Sigmoid", ["a"], {}),
            ("y", "Mul", ["x", "s"], {}),
        ],
    ),
    "silu-div": (
        "silu",
        [
            ("a", "Div", ["x", 0.5], {}),
            ("s", "Sigmoid", ["a"], {}),
            ("y", "Mul", ["s", "x"], {}),
        ],
    ),
}
OPSET = {"gelu": 20, "hard-swish": 14, "hard-sigmoid": 13, "silu": 24}
#: What the hard-swish forms become before opset 14 (no HardSwish op there).
BELOW_14 = {
    "hard-swish-ppocr": "hard-swish-mul",
    "hard-swish-relu6": "hard-swish-mul",
    "hard-swish-inner-div": "hard-sigmoid",  # the Div is fused first; x * it stays
    "hard-swish-hard-sigmoid": None,  # already Mul(x, HardSigmoid(x))
}


def expected_rule(form: str, opset: int) -> str | None:
    """The rule that fires on `form` at `opset` (None: nothing fires)."""
    rule = FORMS[form][0]
    if rule.startswith("gelu"):
        return rule if opset >= 20 else None
    if rule == "silu":
        return rule if opset == 24 else None
    if rule == "hard-swish" and opset < 14:
        return BELOW_14[form]
    return rule


def build_nodes(steps, x: str, y: str, prefix: str) -> tuple[list, list]:
    """NodeProtos and scalar initializers for a form, reading `x` and writing `y`."""
    names = {"x": x, "y": y}
    nodes, inits = [], []
    for out, op, inputs, attrs in steps:
        wired = []
        for item in inputs:
            if isinstance(item, float):
                name = f"{prefix}c{len(inits)}"
                inits.append(onnx.numpy_helper.from_array(np.array(item, np.float32), name))
                wired.append(name)
            else:
                wired.append(names.setdefault(item, f"{prefix}{item}"))
        names.setdefault(out, f"{prefix}{out}")
        nodes.append(onnx.helper.make_node(op, wired, [names[out]], name=f"{prefix}{out}", **attrs))
    return nodes, inits


def form_model(form: str, opset: int | None = None, extra_outputs=()) -> onnx.ModelProto:
    rule, steps = FORMS[form]
    opset = opset or OPSET[rule.rsplit("-", 1)[0] if rule.startswith("gelu") else rule]
    ir_version = 10 if opset >= 22 else 9
    nodes, inits = build_nodes(steps, "x", "y", "")
    shape = ["N", 4]
    outputs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)]
    outputs += [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in extra_outputs
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        outputs,
        inits,
    )
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=ir_version
    )


def feeds(scale: float = 4.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": (rng.standard_normal((8, 4)) * scale).astype(np.float32)}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FuseActivations(), case)


def test_stats_names():
    _, result = apply_pass(FuseActivations(), form_model("hard-sigmoid-clip"))
    assert set(result.stats) == {r.name for r in RULES}


EXPECTED_OP = {
    "gelu-erf": "Gelu",
    "gelu-tanh": "Gelu",
    "hard-sigmoid": "HardSigmoid",
    "hard-swish": "HardSwish",
    "silu": "Swish",
}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_fuses_to_one_op(form):
    rule = FORMS[form][0]
    rewritten, result = check_pass(FuseActivations(), form_model(form), feeds=feeds())
    assert fired(result.stats) == {rule: 1}
    assert op_types(rewritten.graph) == [EXPECTED_OP[rule]]
    node = rewritten.graph.node[0]
    assert list(node.input) == ["x"] and list(node.output) == ["y"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if rule == "gelu-tanh":
        assert attrs == {"approximate": b"tanh"}
    if rule == "hard-sigmoid":
        assert attrs["alpha"] == pytest.approx(1 / 6) and attrs["beta"] == pytest.approx(0.5)
    if rule == "silu":
        alpha = {"silu-quick-gelu": 1.702, "silu-div": 2.0}.get(form)
        assert attrs == ({} if alpha is None else {"alpha": pytest.approx(alpha)})


def test_input_with_many_readers_still_fuses():
    model = form_model("gelu-erf-half-first")
    model.graph.node.append(onnx.helper.make_node("Relu", ["x"], ["z"]))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 4])
    )
    rewritten, result = check_pass(FuseActivations(), model, feeds=feeds())
    assert fired(result.stats) == {"gelu-erf": 1}
    assert sorted(op_types(rewritten.graph)) == ["Gelu", "Relu"]


def test_hard_sigmoid_clip_attributes_before_opset_11():
    rule, steps = FORMS["hard-sigmoid-clip"]
    steps = [s if s[1] != "Clip" else ("c", "Clip", ["a"], {"min": 0.0, "max": 6.0}) for s in steps]
    FORMS_10 = {"clip10": (rule, steps)}
    FORMS.update(FORMS_10)
    try:
        model = form_model("clip10", opset=10)
    finally:
        del FORMS["clip10"]
    rewritten, result = check_pass(FuseActivations(), model, feeds=feeds())
    assert fired(result.stats) == {"hard-sigmoid": 1}
    assert op_types(rewritten.graph) == ["HardSigmoid"]


def test_hard_swish_before_opset_14_keeps_the_multiply():
    # x * (Clip(x + 3, 0, 6) / 6): the inner part is still a HardSigmoid
    rewritten, result = check_pass(
        FuseActivations(), form_model("hard-swish-inner-div", opset=13), feeds=feeds()
    )
    assert fired(result.stats) == {"hard-sigmoid": 1}
    assert op_types(rewritten.graph) == ["HardSigmoid", "Mul"]


@pytest.mark.parametrize(
    ("form", "opset"),
    [("hard-swish-ppocr", 11), ("hard-swish-ppocr", 12), ("hard-swish-ppocr", 13)]
    + [("hard-swish-relu6", 8), ("hard-swish-relu6", 13)],
)
def test_hard_swish_mul_before_opset_14(form, opset):
    rewritten, result = check_pass(FuseActivations(), form_model(form, opset=opset), feeds=feeds())
    assert fired(result.stats) == {"hard-swish-mul": 1}
    assert op_types(rewritten.graph) == ["HardSigmoid", "Mul"]
    hard_sigmoid, mul = rewritten.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in hard_sigmoid.attribute}
    assert attrs == {"alpha": pytest.approx(1 / 6), "beta": pytest.approx(0.5)}
    assert list(hard_sigmoid.input) == ["x"]
    assert list(mul.input) == ["x", hard_sigmoid.output[0]] and list(mul.output) == ["y"]


def test_hard_swish_mul_at_opset_14_is_hard_swish():
    _, result = check_pass(FuseActivations(), form_model("hard-swish-ppocr", opset=14))
    assert fired(result.stats) == {"hard-swish": 1}


def test_silu_float16():
    model = form_model("silu-quick-gelu")
    for value_info in [*model.graph.input, *model.graph.output]:
        value_info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for init in model.graph.initializer:
        half = onnx.numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(onnx.numpy_helper.from_array(half, init.name))
    rewritten, result = apply_pass(FuseActivations(), model)
    assert fired(result.stats) == {"silu": 1}
    (node,) = rewritten.graph.node
    assert node.op_type == "Swish"
    assert node.attribute[0].f == float(np.float16(1.702))


def scaled_hard_sigmoid(opset: int) -> onnx.ModelProto:
    """0.5 * x * HardSigmoid(x, 1/3, 1): saturates at 0.5, so it is no HardSwish."""
    return onnx.parser.parse_model(f"""
        <ir_version: 7, opset_import: ["" : {opset}]>
        g (float[N, 4] x) => (float[N, 4] y) <float half = {{0.5}}> {{
          h = HardSigmoid <alpha = 0.33333334, beta = 1.0> (x)
          m = Mul (x, h)
          y = Mul (m, half)
        }}""")


def with_constant(form: str, old: float, new: float, opset: int | None = None) -> onnx.ModelProto:
    model = form_model(form, opset)
    for init in model.graph.initializer:
        if onnx.numpy_helper.to_array(init).item() == np.float32(old):
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(new, np.float32), init.name))
            return model
    raise AssertionError(f"no constant {old} in {form}")


def with_node(form: str, output: str, op: str) -> onnx.ModelProto:
    """`form` with the node writing `output` changed to `op`."""
    model = form_model(form)
    next(n for n in model.graph.node if n.output[0] == output).op_type = op
    return model


def silu_of_another_tensor() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 24]>
        g (float[N, 4] x, float[N, 4] z) => (float[N, 4] y) {
          s = Sigmoid (z)
          y = Mul (x, s)
        }""")


def silu_vector_alpha() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 24]>
        g (float[N, 4] x) => (float[N, 4] y) <float[4] k = {1.0, 2.0, 3.0, 4.0}> {
          a = Mul (x, k)
          s = Sigmoid (a)
          y = Mul (x, s)
        }""")


NEAR_MISSES = {
    "gelu-half-is-0.6": lambda: with_constant("gelu-erf-torch", 0.5, 0.6),
    "gelu-sqrt2-is-1.5": lambda: with_constant("gelu-erf-torch", SQRT2, 1.5),
    "gelu-tanh-cubic-is-0.05": lambda: with_constant("gelu-tanh-pow", 0.044715, 0.05),
    "gelu-tanh-sqrt-2-pi-off": lambda: with_constant("gelu-tanh-pow", 0.7978845608, 0.8),
    "hard-sigmoid-clip-max-5": lambda: with_constant("hard-sigmoid-clip", 6.0, 5.0),
    "hard-swish-offset-2": lambda: with_constant("hard-swish-ppocr", 3.0, 2.0),
    "gelu-shared-erf": lambda: form_model("gelu-erf-torch", extra_outputs=("e",)),
    "gelu-intermediate-is-output": lambda: form_model("gelu-erf-half-first", extra_outputs=("a",)),
    "hard-sigmoid-shared-clip": lambda: form_model("hard-sigmoid-clip", extra_outputs=("c",)),
    "gelu-opset-19": lambda: form_model("gelu-erf-torch", opset=19),
    "gelu-tanh-opset-18": lambda: form_model("gelu-tanh-cube", opset=18),
    "hard-swish-hard-sigmoid-opset-13": lambda: form_model("hard-swish-hard-sigmoid", opset=13),
    "hard-swish-mul-offset-2": lambda: with_constant("hard-swish-ppocr", 3.0, 2.0, opset=13),
    "hard-swish-mul-shared-clip": lambda: form_model("hard-swish-ppocr", 13, ("c",)),
    "hard-swish-mul-product-is-output": lambda: form_model("hard-swish-ppocr", 12, ("m",)),
    "hard-swish-scaled-hard-sigmoid": lambda: scaled_hard_sigmoid(14),
    "hard-swish-mul-scaled-hard-sigmoid": lambda: scaled_hard_sigmoid(13),
    "silu-opset-23": lambda: form_model("silu", opset=23),
    "silu-opset-25": lambda: form_model("silu", opset=25),
    "silu-shared-sigmoid": lambda: form_model("silu", extra_outputs=("s",)),
    "silu-shared-scale": lambda: form_model("silu-quick-gelu", extra_outputs=("a",)),
    "silu-sigmoid-of-x-plus-1": lambda: with_node("silu-quick-gelu", "a", "Add"),
    "silu-sigmoid-of-another-tensor": silu_of_another_tensor,
    "silu-vector-alpha": silu_vector_alpha,
}


@pytest.mark.parametrize("make", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(make):
    model = make()
    only_x = [i.name for i in model.graph.input] == ["x"]
    _, result = check_pass(FuseActivations(), model, feeds=feeds() if only_x else None)
    assert not result.changed, fired(result.stats)


def test_shared_intermediate_is_a_real_reader():
    # the Erf output also feeds a Relu: still no fusion
    model = form_model("gelu-erf-torch")
    model.graph.node.append(onnx.helper.make_node("Relu", ["e"], ["z"]))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 4])
    )
    _, result = check_pass(FuseActivations(), model, feeds=feeds())
    assert not result.changed


def test_constant_that_grows_the_rank_is_kept():
    model = form_model("hard-sigmoid-clip")
    six = next(i for i in model.graph.initializer if i.name == model.graph.node[-1].input[1])
    six.CopyFrom(onnx.numpy_helper.from_array(np.full((1, 1, 1), 6.0, np.float32), six.name))
    model.graph.output[0].type.tensor_type.shape.ClearField("dim")
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 4
    _, result = check_pass(FuseActivations(), model, feeds=feeds())
    assert not result.changed


def test_explain_names_the_opset():
    reasons = explain(Module.from_proto(form_model("gelu-erf-torch", opset=19)), FuseActivations())
    assert any("needs opset 20" in r for r in reasons["gelu-erf"])
    reasons = explain(
        Module.from_proto(with_constant("gelu-erf-torch", 0.5, 0.6)), FuseActivations()
    )
    assert any("constants" in r for r in reasons["gelu-erf"])


def test_rule_names():
    assert [r.name for r in RULES] == [
        "gelu-erf",
        "gelu-tanh",
        "hard-swish",
        "hard-swish-mul",
        "hard-sigmoid",
        "silu",
    ]


#: Intermediates that the expected rule's match needs (default: all but y); `hard-sigmoid`
#: may take its first Add's output as x.
INTERIOR = {("hard-swish-inner-div", "hard-sigmoid"): ("c",)}


@st.composite
def models_with_activation(draw) -> tuple[onnx.ModelProto, str | None, bool]:
    """A random model with one activation spelling appended to one of its float outputs.

    Returns the model, the rule expected to fire on the spelling (None: none can) and
    whether the spelling is a near miss (an intermediate of the match is a graph output or
    has a second reader), which keeps that rule from firing.
    """
    opset = draw(st.sampled_from((13, 14, 18, 20, 21, 24)))
    model = draw(strategies.models(max_ops=6, opset=min(opset, 21)))
    if opset > 21:  # the drawn ops are unchanged up to opset 24
        model.opset_import[0].version = opset
        model.ir_version = 10
    floats = [
        o for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ]
    if not floats:
        return model, None, False
    target = draw(st.sampled_from(floats))
    form = draw(st.sampled_from(sorted(FORMS)))
    rule = expected_rule(form, opset)
    steps = FORMS[form][1]
    nodes, inits = build_nodes(steps, target.name, "act_y", "act_")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)

    def add_output(name: str) -> None:
        output = onnx.ValueInfoProto()
        output.CopyFrom(target)
        output.name = name
        model.graph.output.append(output)

    add_output("act_y")
    interior = [out for out, *_ in steps[1 if rule == "hard-sigmoid" else 0 : -1]]
    interior = INTERIOR.get((form, rule), interior)
    miss = draw(st.sampled_from(("none", "none", "output", "reader"))) if interior else "none"
    if miss != "none":
        inner = "act_" + draw(st.sampled_from(interior))
        if miss == "reader":
            model.graph.node.append(onnx.helper.make_node("Neg", [inner], ["act_extra"]))
            inner = "act_extra"
        add_output(inner)
    if draw(st.booleans()):  # the activation input stays an output, or not
        model.graph.output.remove(target)
    return model, rule, miss != "none"


@given(
    case=st.one_of(
        strategies.models().map(lambda model: (model, None, False)), models_with_activation()
    )
)
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True)
def test_property(case):
    model, rule, near_miss = case
    rewritten, result = check_pass(FuseActivations(), model)
    count = sum(result.stats[rule.name] for rule in RULES)
    assert len(rewritten.graph.node) <= len(model.graph.node) - count
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
    if rule is not None:
        assert bool(result.stats[rule]) != near_miss, (rule, near_miss, fired(result.stats))
