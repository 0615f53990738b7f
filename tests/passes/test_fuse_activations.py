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
}
OPSET = {"gelu": 20, "hard-swish": 14, "hard-sigmoid": 13}


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
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=9
    )


def feeds(scale: float = 4.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": (rng.standard_normal((8, 4)) * scale).astype(np.float32)}


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FuseActivations(), case)


def test_stats_names():
    _, result = apply_pass(FuseActivations(), form_model("hard-sigmoid-clip"))
    assert set(result.stats) == {"gelu-erf", "gelu-tanh", "hard-swish", "hard-sigmoid"}


EXPECTED_OP = {
    "gelu-erf": "Gelu",
    "gelu-tanh": "Gelu",
    "hard-sigmoid": "HardSigmoid",
    "hard-swish": "HardSwish",
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


def with_constant(form: str, old: float, new: float) -> onnx.ModelProto:
    model = form_model(form)
    for init in model.graph.initializer:
        if onnx.numpy_helper.to_array(init).item() == np.float32(old):
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(new, np.float32), init.name))
            return model
    raise AssertionError(f"no constant {old} in {form}")


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
    "hard-swish-opset-13": lambda: form_model("hard-swish-ppocr", opset=13),
}


@pytest.mark.parametrize("make", NEAR_MISSES.values(), ids=NEAR_MISSES.keys())
def test_near_misses_are_kept(make):
    _, result = check_pass(FuseActivations(), make(), feeds=feeds())
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
    assert [r.name for r in RULES] == ["gelu-erf", "gelu-tanh", "hard-swish", "hard-sigmoid"]


@st.composite
def models_with_activation(draw) -> onnx.ModelProto:
    """A random model with one activation spelling appended to one of its float outputs."""
    opset = draw(st.sampled_from((13, 14, 18, 20, 21)))  # half of them can take Gelu
    model = draw(strategies.models(max_ops=6, opset=opset))
    floats = [
        o for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ]
    if not floats:
        return model
    target = draw(st.sampled_from(floats))
    form = draw(st.sampled_from(sorted(FORMS)))
    nodes, inits = build_nodes(FORMS[form][1], target.name, "act_y", "act_")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    output = onnx.ValueInfoProto()
    output.CopyFrom(target)
    output.name = "act_y"
    model.graph.output.append(output)
    if draw(st.booleans()):  # the activation input stays an output, or not
        model.graph.output.remove(target)
    return model


@given(model=st.one_of(strategies.models(), models_with_activation()))
@settings(max_examples=PROPERTY_EXAMPLES)
def test_property(model):
    rewritten, result = check_pass(FuseActivations(), model)
    count = sum(result.stats[rule.name] for rule in RULES)
    assert len(rewritten.graph.node) <= len(model.graph.node) - count
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]
