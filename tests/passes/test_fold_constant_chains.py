from __future__ import annotations

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx.parser
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsopt.ir import Module
from dsopt.passes.fold_constant_chains import RULES, FoldConstantChains
from dsopt.rewrite import explain
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, check_pass, fired, op_types
from dsopt.testing.golden import golden_cases, run_golden

GOLDEN = golden_cases(__file__.rsplit("/tests/", 1)[0] + "/tests/golden/fold-constant-chains")
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER.replace("17", str(opset)) + text)


def as_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with float16 inputs, outputs and initializers (the parser reads no float16)."""
    for info in [*model.graph.input, *model.graph.output]:
        info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for init in model.graph.initializer:
        half = onnx.numpy_helper.to_array(init).astype(np.float16)
        init.CopyFrom(onnx.numpy_helper.from_array(half, init.name))
    return model


@pytest.mark.parametrize("case", GOLDEN, ids=lambda p: p.name.split(".")[0])
def test_golden(case):
    run_golden(FoldConstantChains(), case)


@pytest.mark.parametrize(
    ("case", "expected", "after"),
    [
        ("mul_chain_per_channel", {"mul-chain": 1}, ["Mul"]),
        ("div_chain_stays_div", {"mul-chain": 1}, ["Div"]),
        ("add_chain_sub", {"add-chain": 1}, ["Add"]),
        ("affine_chain_three", {"affine-chain": 1}, ["Mul", "Add"]),
        ("affine_pair_kept", {}, ["Add", "Mul"]),
        ("conv_scale_bias_kept", {}, ["Conv", "Mul", "Add"]),
        ("identity_readers_read_x", {"mul-chain": 1}, ["Relu"]),
        ("identity_output_keeps_name", {"affine-chain": 1}, ["Identity"]),
        ("neg_add_is_sub", {"affine-chain": 1}, ["Sub"]),
        ("shared_intermediate_splits", {"mul-chain": 1, "add-chain": 1}, ["Mul", "Relu", "Add"]),
        ("constant_grows_rank", {"mul-chain": 1}, ["Mul"]),
        ("identity_keeps_broadcast", {"mul-chain": 1}, ["Mul"]),  # by ones of shape [2,1,1]
        ("double_chain", {"affine-chain": 1}, ["Mul", "Add"]),
    ],
)
def test_golden_stats(case, expected, after):
    path = next(p for p in GOLDEN if p.name.startswith(case + "."))
    model = onnx.parser.parse_model(path.read_text())
    rewritten, result = apply_pass(FoldConstantChains(), model)
    assert fired(result.stats) == expected
    assert op_types(rewritten.graph) == after
    assert [o.name for o in rewritten.graph.output] == [o.name for o in model.graph.output]


def test_stats_names():
    _, result = apply_pass(
        FoldConstantChains(), parse("g (float[2] x) => (float[2] y) { y = Relu (x) }")
    )
    assert set(result.stats) == {"mul-chain", "add-chain", "affine-chain"}
    assert [r.name for r in RULES] == ["mul-chain", "add-chain", "affine-chain"]


def test_collapsed_constants():
    model = parse("""
        g (float[N, 4] x) => (float[N, 4] y) <float a = {3.0}, float b = {2.0}, float c = {-1.0}> {
          t = Sub (x, a)
          u = Mul (t, b)
          v = Neg (u)
          y = Add (v, c)
        }""")
    rewritten, result = check_pass(FoldConstantChains(), model)
    assert fired(result.stats) == {"affine-chain": 1}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    mul, add = rewritten.graph.node
    assert (mul.op_type, add.op_type) == ("Mul", "Add")
    # -((x - 3) * 2) - 1 = -2 x + 5
    assert inits[mul.input[1]] == -2.0 and inits[add.input[1]] == 5.0
    assert inits[mul.input[1]].shape == () and inits[mul.input[1]].dtype == np.float32


def test_constant_node_operands_and_their_nodes_go():
    model = parse("""
        g (float[N, 4] x) => (float[N, 4] y) {
          two = Constant <value = float {2.0}> ()
          three = Constant <value = float[1, 4] {1.0, 2.0, 3.0, 4.0}> ()
          a = Mul (x, two)
          y = Mul (a, three)
        }""")
    rewritten, result = check_pass(FoldConstantChains(), model)
    assert fired(result.stats) == {"mul-chain": 1}
    assert op_types(rewritten.graph) == ["Mul"]


def test_chain_in_a_subgraph_reading_an_outer_value():
    model = parse("""
        g (bool c, float[4] x) => (float[4] y) <float two = {2.0}> {
          y = If (c) <
            then_branch = t () => (float[4] r) {
              a = Mul (x, two)
              r = Mul (a, two)
            },
            else_branch = e () => (float[4] s) { s = Neg (x) }
          >
        }""")
    rewritten, result = check_pass(
        FoldConstantChains(), model, feeds={"c": np.array(True), "x": np.ones(4, np.float32)}
    )
    assert fired(result.stats) == {"mul-chain": 1}
    then = rewritten.graph.node[0].attribute[0].g
    assert op_types(then) == ["Mul"]


def test_explain_says_why():
    reasons = explain(
        Module.from_proto(parse(NEAR_MISSES["pair-is-minimal"])), FoldConstantChains()
    )
    assert any("already minimal" in r for r in reasons["affine-chain"])
    reasons = explain(
        Module.from_proto(parse(NEAR_MISSES["grows-the-constant"])), FoldConstantChains()
    )
    assert any("outgrows" in r for r in reasons["mul-chain"])


NEAR_MISSES = {
    "pair-is-minimal": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {3.0}, float[4] b = {1.0, 2.0, 3.0, 4.0}> {
          t = Mul (x, a)
          y = Add (t, b)
        }""",
    "shared-intermediate": """
        g (float[N, 4] x) => (float[N, 4] y, float[N, 4] z) <float a = {3.0}> {
          t = Mul (x, a)
          z = Relu (t)
          y = Mul (t, a)
        }""",
    "intermediate-is-output": """
        g (float[N, 4] x) => (float[N, 4] y, float[N, 4] t) <float a = {3.0}> {
          t = Add (x, a)
          y = Add (t, a)
        }""",
    "non-constant-operand": """
        g (float[N, 4] x, float[N, 4] w) => (float[N, 4] y) <float a = {3.0}> {
          t = Mul (x, w)
          y = Mul (t, a)
        }""",
    "constant-over-x": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {3.0}> {
          t = Div (a, x)
          y = Div (t, a)
        }""",
    "divisor-with-zero": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {3.0}, float[4] b = {1.0, 0.0, 2.0, 3.0}> {
          t = Mul (x, a)
          y = Div (t, b)
        }""",
    "infinite-constant": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {3.0}, float[4] b = {1.0, inf, 2.0, 3.0}> {
          t = Mul (x, a)
          y = Mul (t, b)
        }""",
    "integer-dtype": """
        g (int32[N, 4] x) => (int32[N, 4] y) <int32 a = {3}, int32 b = {2}> {
          t = Mul (x, a)
          y = Mul (t, b)
        }""",
    "grows-the-constant": """
        g (float[3, 4] x) => (float[3, 4] y)
          <float[3, 1] a = {1.0, 2.0, 3.0}, float[4] b = {1.0, 2.0, 3.0, 4.0}> {
          t = Mul (x, a)
          y = Mul (t, b)
        }""",
    "float16-overflow": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {300.0}> {
          t = Mul (x, a)
          y = Mul (t, a)
        }""",
    "float16-underflow": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {0.0001}> {
          t = Mul (x, a)
          y = Mul (t, a)
        }""",
    "other-domain": """
        g (float[N, 4] x) => (float[N, 4] y) <float a = {3.0}> {
          t = Mul (x, a)
          y = custom.Mul (t, a)
        }""",
}


def near_miss(name: str) -> onnx.ModelProto:
    model = parse(NEAR_MISSES[name])
    if name.startswith("float16"):
        model = as_float16(model)
    if name == "other-domain":
        model.opset_import.append(onnx.helper.make_opsetid("custom", 1))
    return model


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_are_kept(name):
    model = near_miss(name)
    if name == "other-domain":  # onnxruntime cannot run custom.Mul
        _, result = apply_pass(FoldConstantChains(), model)
    else:
        feeds = {"x": np.full((2, 4), 0.5, np.float16)} if "float16" in name else None
        if name == "grows-the-constant":
            feeds = {"x": np.ones((3, 4), np.float32)}
        _, result = check_pass(FoldConstantChains(), model, feeds=feeds)
    assert not result.changed, fired(result.stats)


def test_opset_6_is_left_alone():
    model = parse(
        """
        g (float[2, 4] x) => (float[2, 4] y) <float a = {3.0}> {
          t = Mul <broadcast = 1> (x, a)
          y = Mul <broadcast = 1> (t, a)
        }""",
        opset=6,
    )
    _, result = apply_pass(FoldConstantChains(), model)
    assert not result.changed


def test_longest_collapsible_part_when_the_whole_chain_grows():
    # a [3,1] by [1,4] product would hold 12 > 2 * 4 elements; the top two nodes collapse
    model = parse("""
        g (float[3, 4] x) => (float[3, 4] y)
          <float[3, 1] a = {1.0, 2.0, 3.0}, float[4] b = {1.0, 2.0, 3.0, 4.0}, float c = {2.0}> {
          t = Mul (x, a)
          u = Mul (t, b)
          y = Mul (u, c)
        }""")
    rewritten, result = check_pass(FoldConstantChains(), model)
    assert fired(result.stats) == {"mul-chain": 1}
    assert op_types(rewritten.graph) == ["Mul", "Mul"]


# ---- property test -----------------------------------------------------------------------

#: Step kinds and their ONNX spelling; "rsub" is Sub(c, x).
KINDS = ("mul", "div", "add", "sub", "rsub", "neg")
INVERSE = {"mul": "div", "div": "mul", "add": "sub", "sub": "add", "rsub": "rsub", "neg": "neg"}
#: float16 constants and inputs on a coarse dyadic grid: every op, collapsed or not, is exact.
HALF_SCALES = (0.25, 0.5, 2.0, 4.0, -0.5, -1.0, -2.0, 1.0)


def affine(kinds, values) -> tuple[np.ndarray, np.ndarray]:
    """y = s * x + t for a chain, in float64 (the oracle for the expected node count)."""
    s, t = np.ones(()), np.zeros(())
    for kind, value in zip(kinds, values, strict=True):
        c = None if value is None else value.astype(np.float64)
        if kind == "mul":
            s, t = s * c, t * c
        elif kind == "div":
            s, t = s / c, t / c
        elif kind == "add":
            t = t + c
        elif kind == "sub":
            t = t - c
        elif kind == "rsub":
            s, t = -s, c - t
        else:
            s, t = -s, -t
    return s, t


def minimum(kinds, values, dtype, is_output: bool, x_has_full_shape: bool) -> int | None:
    """The fewest nodes a chain collapses to (None: a size guard may keep more).

    When x may lack the constants' joint broadcast shape, the one constant left must carry
    it (an identity becomes a Mul by ones).
    """
    if len(kinds) < 2:
        return len(kinds)
    s, t = affine(kinds, values)
    s, t = s.astype(dtype), t.astype(dtype)
    constants = [v for v in values if v is not None]
    largest = max((v.size for v in constants), default=1)
    full = np.broadcast_shapes(*(v.shape for v in constants))
    ones, zeros, negative = np.all(s == 1), np.all(t == 0), np.all(s == -1)
    if ones and zeros:
        count, kept = (1 if is_output else 0), []
    elif negative:
        count, kept = 1, ([] if zeros else [t])  # Neg(x) or Sub(t, x)
    else:
        count, kept = (not ones) + (not zeros), ([] if ones else [s]) + ([] if zeros else [t])
    sizes = [a.size for a in kept]
    if not x_has_full_shape and len(kept) < 2 and full and (not kept or kept[0].shape != full):
        count, sizes = max(count, 1), [int(np.prod(full))]
    if any(size > 2 * largest for size in sizes):
        return None
    return min(count, len(kinds))


@st.composite
def chains(draw):
    """A chain of 2 to 5 constant ops over x, maybe cut by a second reader or an output."""
    dtype = draw(st.sampled_from((np.float32, np.float16)))
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.sampled_from((3, 2, 1)), min_size=rank, max_size=rank)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    count = int(rng.integers(2, 6))  # uniform: hypothesis favours short draws
    grow = draw(st.integers(0, 7)) == 0  # one constant adds a leading axis
    kinds, values = [], []
    for i in range(count):
        if i and draw(st.integers(0, 3)) == 0:  # undo the previous step: identity pieces
            kind, value = INVERSE[kinds[-1]], values[-1]
        else:
            kind = draw(st.sampled_from(KINDS))
            value = None
            if kind != "neg":
                layout = draw(st.sampled_from(("0-d", "[1]", "axis", "axis", "full")))
                if layout == "0-d":
                    dims = ()
                elif layout == "[1]":
                    dims = (1,)
                elif layout == "full":
                    dims = shape[draw(st.integers(0, rank - 1)) :]
                else:
                    axis = draw(st.integers(0, rank - 1))
                    dims = tuple(d if j == axis else 1 for j, d in enumerate(shape))[axis:]
                if grow:
                    dims, grow = (2, *shape), False
                if dtype is np.float16:
                    if kind in ("mul", "div"):
                        value = rng.choice(HALF_SCALES, size=dims)
                    else:
                        value = rng.integers(-8, 9, size=dims) / 4
                elif kind in ("mul", "div"):
                    value = rng.uniform(0.5, 2.0, dims) * rng.choice((-1.0, 1.0), dims)
                else:
                    value = rng.uniform(-2.0, 2.0, dims)
                if kind == "div":
                    value = np.where(value == 0, 1.0, value)
                value = np.asarray(value, dtype)
        kinds.append(kind)
        values.append(value)
    cut = draw(st.sampled_from(("none", "none", "reader", "output")))
    at = draw(st.integers(0, count - 2))
    symbolic = draw(st.booleans())  # x's dims are symbols: no proof it spans the constants
    return dtype, shape, kinds, values, cut, at, symbolic


def chain_model(dtype, shape, kinds, values, cut, at, symbolic) -> onnx.ModelProto:
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits, outputs = [], [], []
    current = "x"
    for i, (kind, value) in enumerate(zip(kinds, values, strict=True)):
        out = "y" if i == len(kinds) - 1 else f"t{i}"
        if value is not None:
            inits.append(onnx.numpy_helper.from_array(value, f"c{i}"))
        op = {"mul": "Mul", "div": "Div", "add": "Add", "sub": "Sub", "rsub": "Sub"}.get(kind)
        if kind == "neg":
            nodes.append(onnx.helper.make_node("Neg", [current], [out], name=f"n{i}"))
        else:
            inputs = [f"c{i}", current] if kind == "rsub" else [current, f"c{i}"]
            if kind in ("mul", "add") and i % 2:
                inputs.reverse()  # commutative ops read the constant first now and then
            nodes.append(onnx.helper.make_node(op, inputs, [out], name=f"n{i}"))
        current = out
    outputs.append(onnx.helper.make_tensor_value_info("y", elem, None))
    if cut == "reader":
        nodes.append(onnx.helper.make_node("Relu", [f"t{at}"], ["z"]))
        outputs.append(onnx.helper.make_tensor_value_info("z", elem, None))
    elif cut == "output":
        outputs.append(onnx.helper.make_tensor_value_info(f"t{at}", elem, None))
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [
            onnx.helper.make_tensor_value_info(
                "x", elem, [f"d{i}" for i in range(len(shape))] if symbolic else shape
            )
        ],
        outputs,
        inits,
    )
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8
    )


@given(case=chains())
@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True)
def test_property(case):
    dtype, shape, kinds, values, cut, at, symbolic = case
    model = chain_model(*case)
    rng = np.random.default_rng(0)
    if dtype is np.float16:
        x = (rng.integers(-16, 17, size=shape) / 4).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    rewritten, result = check_pass(FoldConstantChains(), model, feeds={"x": x})
    before, after = len(model.graph.node), len(rewritten.graph.node)
    assert after <= before
    assert (after < before) == result.changed
    parts = [(kinds, values, True)]
    if cut != "none":
        parts = [
            (kinds[: at + 1], values[: at + 1], cut == "output"),
            (kinds[at + 1 :], values[at + 1 :], True),
        ]
    spans = not symbolic and all(v is None or v.ndim <= len(shape) for v in values)
    expected = [minimum(k, v, dtype, is_output, spans) for k, v, is_output in parts]
    if None not in expected:
        assert after == sum(expected) + (cut == "reader"), (kinds, cut, at)
