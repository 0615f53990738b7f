"""The rule kit: chain matching, guard rails, fixed point, statistics and the tracer."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx.parser
import pytest

from dsopt.ir import Module
from dsopt.rewrite import Match, MatchResult, MatchTracer, Op, Rule, RulePass, explain
from dsopt.testing import apply_pass, check_pass, op_types

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + text)


class NegNeg(Rule):
    """Neg(Neg(x)) ==> Identity(x)."""

    name = "neg-neg"
    pattern = (Op("Neg"), Op("Neg"))

    def rewrite(self, match, graph):
        return [match.new_node("Identity", [match.root.inputs[0]])]


class SubOfRelu(Rule):
    """c - Relu(x) ==> c + Neg(Relu(x)) for a constant c fed by Relu at Sub's second input."""

    name = "sub-of-relu"
    pattern = (Op("Relu"), Op("Sub", slot=1))
    stats = ("skipped-non-constant",)
    calls: list[str] = []

    def check(self, match):
        self.calls.append("check")
        if match.constant(match.side_input(1)) is None:
            return match.fail("minuend is not constant", stat="skipped-non-constant")
        return match.ok()

    def rewrite(self, match, graph):
        import onnx_graphsurgeon as gs

        self.calls.append("rewrite")
        relu, sub = match.nodes
        negated = gs.Variable(match.facts.fresh("negated"), dtype=np.float32)
        return [
            gs.Node("Relu", inputs=list(relu.inputs), outputs=[relu.outputs[0]]),
            gs.Node("Neg", inputs=[relu.outputs[0]], outputs=[negated]),
            match.new_node("Add", [sub.inputs[0], negated]),
        ]


@dataclasses.dataclass(frozen=True)
class ToyPass(RulePass):
    """Test pass."""

    name = "toy"
    rules = (NegNeg(),)


@dataclasses.dataclass(frozen=True)
class SubPass(RulePass):
    """Test pass."""

    name = "toy-sub"
    rules = (SubOfRelu(),)


def test_match_result_is_a_value():
    assert MatchResult.success() and not MatchResult.fail("no")
    failure = MatchResult.fail("why", stat="skipped-x")
    assert (failure.reason, failure.stat) == ("why", "skipped-x")


def test_op_declares_types_and_slot():
    op = Op("Conv", "ConvTranspose", slot=None)
    assert op.types == ("Conv", "ConvTranspose") and op.slot is None
    assert str(op) == "Conv|ConvTranspose" and Op("Add").slot == 0


def test_chain_fires_to_a_fixed_point_and_counts():
    model = parse("""
    g (float[3] x) => (float[3] y) {
      a = Neg (x)
      b = Neg (a)
      c = Neg (b)
      y = Neg (c)
    }""")
    rewritten, result = check_pass(ToyPass(), model)
    assert result.stats == {"neg-neg": 2}
    assert op_types(rewritten.graph) == ["Identity", "Identity"]
    assert rewritten.graph.node[-1].output[0] == "y"  # the chain's result keeps its name


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            """g (float[3] x) => (float[3] y, float[3] z) {
              a = Neg (x)
              y = Neg (a)
              z = Relu (a)
            }""",
            "Neg: intermediate 'a' has 2 readers",
        ),
        (
            """g (float[3] x) => (float[3] y, float[3] a) {
              a = Neg (x)
              y = Neg (a)
            }""",
            "Neg: intermediate 'a' is a graph output",
        ),
        (
            """g (float[3] x, bool c) => (float[3] y) {
              a = Neg (x)
              y = If (c) <then_branch = t () => (float[3] p) { p = Neg (a) },
                          else_branch = e () => (float[3] q) { q = Relu (x) }>
            }""",
            "Neg: intermediate 'a' is read in another graph",
        ),
    ],
    ids=["shared", "graph-output", "read-in-subgraph"],
)
def test_guard_rails(text, reason):
    model = parse(text)
    feeds = {"x": np.ones(3, np.float32), "c": np.array(True)} if "bool c" in text else None
    _, result = check_pass(ToyPass(), model, feeds=feeds)
    assert not result.changed
    assert reason in explain(Module.from_proto(model), ToyPass())["neg-neg"]


def test_subgraph_output_of_an_outer_intermediate_is_protected():
    model = parse("""
    g (float[3] x, bool c) => (float[3] y, float[3] z) {
      a = Neg (x)
      y = Neg (a)
      z = If (c) <then_branch = t () => (float[3] a_out) { a_out = Identity (a) },
                  else_branch = e () => (float[3] a) {}>
    }""")
    _, result = apply_pass(ToyPass(), model)  # valid ONNX that onnxruntime refuses to load
    assert not result.changed
    assert "is a graph output" in explain(Module.from_proto(model), ToyPass())["neg-neg"][0]


def test_rules_run_inside_subgraphs():
    model = parse("""
    g (float[3] x, bool c) => (float[3] y) {
      y = If (c) <then_branch = t () => (float[3] p) { a = Neg (x)
                                                       p = Neg (a) },
                  else_branch = e () => (float[3] q) { q = Relu (x) }>
    }""")
    feeds = {"x": np.ones(3, np.float32), "c": np.array(True)}
    rewritten, result = check_pass(ToyPass(), model, feeds=feeds)
    assert result.stats == {"neg-neg": 1}
    assert op_types(rewritten.graph.node[0].attribute[0].g) == ["Identity"]


def test_slot_check_order_and_skip_stats():
    SubOfRelu.calls.clear()
    wrong_slot = parse("""
    g (float[3] x) => (float[3] y) <float[3] k = {1.0, 2.0, 3.0}> {
      r = Relu (x)
      y = Sub (r, k)
    }""")
    _, result = check_pass(SubPass(), wrong_slot)
    assert not result.changed and SubOfRelu.calls == []  # no match: check never ran
    non_constant = parse("""
    g (float[3] x, float[3] k) => (float[3] y) {
      r = Relu (x)
      y = Sub (k, r)
    }""")
    _, result = check_pass(SubPass(), non_constant)
    assert result.stats == {"sub-of-relu": 0, "skipped-non-constant": 1}  # once, not per sweep
    assert SubOfRelu.calls == ["check"] * 2  # check_pass runs the pass twice; no rewrite


def test_check_failure_leaves_bytes_identical():
    model = parse("""
    g (float[3] x, float[3] k) => (float[3] y) {
      r = Relu (x)
      y = Sub (k, r)
    }""")
    before = Module.from_proto(model).to_proto().SerializeToString(deterministic=True)
    rewritten, _ = apply_pass(SubPass(), model)
    assert rewritten.SerializeToString(deterministic=True) == before


def test_constants_still_read_and_unrelated_dead_nodes_are_kept():
    # (orphaned Constant nodes go: see test_fuse_batch_norm's Constant-node parameters)
    model = parse("""
    g (float[3] x) => (float[3] y, float[3] z) {
      k = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
      r = Relu (x)
      y = Sub (k, r)
      dead = Constant <value = float[1] {0.0}> ()
      z = Relu (x)
    }""")
    rewritten, result = check_pass(SubPass(), model)
    assert result.stats["sub-of-relu"] == 1
    assert op_types(rewritten.graph) == ["Constant", "Relu", "Neg", "Add", "Constant", "Relu"]


class Broken(Rule):
    name = "broken"
    pattern = (Op("Neg"), Op("Neg"))

    def rewrite(self, match, graph):
        import onnx_graphsurgeon as gs

        return [gs.Node("Identity", inputs=[match.root.inputs[0]], outputs=[gs.Variable("other")])]


def test_rewrite_must_write_the_chain_result():
    @dataclasses.dataclass(frozen=True)
    class BrokenPass(RulePass):
        """Test pass."""

        name = "broken"
        rules = (Broken(),)

    model = parse("g (float[3] x) => (float[3] y) { a = Neg (x)\n y = Neg (a) }")
    with pytest.raises(TypeError, match="Pass developer"):
        apply_pass(BrokenPass(), model)


def test_explain_leaves_the_module_alone_and_ranks_reasons():
    model = parse("""
    g (float[3] x) => (float[3] y, float[3] z, float[3] w) {
      a = Neg (x)
      y = Neg (a)
      z = Relu (a)
      w = Neg (x)
    }""")
    module = Module.from_proto(model)
    before = module.to_proto().SerializeToString(deterministic=True)
    reasons = explain(module, ToyPass())
    assert module.to_proto().SerializeToString(deterministic=True) == before
    # the shared intermediate got further than the Negs with no Neg reader
    assert reasons["neg-neg"][0] == "Neg: intermediate 'a' has 2 readers"
    assert any("feeds nothing" in r for r in reasons["neg-neg"][1:])


def test_tracer_report_lists_every_rule():
    tracer = MatchTracer()
    assert tracer.report([NegNeg(), SubOfRelu()]) == {"neg-neg": [], "sub-of-relu": []}


def test_match_helpers():
    import onnx_graphsurgeon as gs

    module = Module.from_proto(parse("g (float[2, 3] x) => (float[2, 3] y) { y = Relu (x) }"))
    from dsopt.analysis import AnalysisManager
    from dsopt.rewrite import _Facts

    facts = _Facts(module, AnalysisManager(module))
    node = module.graph.nodes[0]
    match = Match(NegNeg(), (node,), module.graph, facts)
    assert match.rank(node.inputs[0]) == 2 and match.shape(node.outputs[0]) == (2, 3)
    first = match.new_constant("x", np.zeros(2, np.float32))
    second = match.new_constant("x", np.zeros(2, np.float32))
    assert isinstance(first, gs.Constant) and first.name not in ("x", second.name)
    assert match.fail("r").depth == 2
