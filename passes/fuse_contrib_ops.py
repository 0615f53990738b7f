"""Fuse common chains into onnxruntime's com.microsoft contrib ops, for targets that run them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from dsopt.ir import Module
from dsopt.pass_infra import PassContext, PassResult
from dsopt.pattern import topological_order
from dsopt.rewrite import Match, MatchResult, Op, Rule, RulePass, apply_rules

__all__ = ["RULES", "FuseContribOps"]

DOMAIN = "com.microsoft"

#: The only element type every onnxruntime CPU kernel of these ops registers.
_FLOAT32 = np.dtype(np.float32)
_F32_LOWEST = float(np.finfo(np.float32).min)
_F32_MAX = float(np.finfo(np.float32).max)
_DOMAINS = ("", "ai.onnx")

#: FusedConv's activations and their parameters (attribute name, default), in kernel order.
_CONV_ACTIVATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "LeakyRelu": (("alpha", 0.01),),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "Clip": (),  # min and max: attributes before opset 11, inputs from 11
}


def _not_float32(match: Match, *tensors: gs.Tensor) -> str | None:
    """Why the tensors are not all float32 (the reason for `match.fail`), else None."""
    for tensor in tensors:
        dtype = match.dtype(tensor)
        if dtype != _FLOAT32:
            return f"'{tensor.name}' is {dtype or 'of unknown type'}, not float32"
    return None


def _scalar(match: Match, tensor: gs.Tensor, rank: int | None) -> float | None:
    """The value of a one-element float32 constant that cannot raise a rank-`rank` operand."""
    value = match.constant(tensor)
    if value is None or value.size != 1 or value.dtype != _FLOAT32:
        return None
    if value.ndim and (rank is None or value.ndim > rank):
        return None
    number = float(value.reshape(-1)[0])
    return number if math.isfinite(number) else None


def _sole_reader(match: Match, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading `tensor` (once) when it may be absorbed, else None.

    Absorbable means the kit's guard rails hold: `tensor` is no graph output, its reader is
    in the default domain and in the match's graph, and reads it exactly once.
    """
    readers = list(tensor.outputs)
    if len(readers) != 1 or id(tensor) in match.facts.protected:
        return None
    (reader,) = readers
    if (reader.domain or "") not in _DOMAINS or sum(t is tensor for t in reader.inputs) != 1:
        return None
    return reader if any(n is reader for n in match.graph.nodes) else None


def _producer(match: Match, tensor: gs.Tensor, ops: Sequence[str]) -> gs.Node | None:
    """The node writing `tensor` when its op is in `ops` and it may be absorbed, else None.

    Besides `_sole_reader`'s conditions, the node writes no other output that is used.
    """
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op not in ops or not node.outputs or node.outputs[0] is not tensor:
        return None
    if any(t.outputs or id(t) in match.facts.protected for t in node.outputs[1:]):
        return None
    if (node.domain or "") not in _DOMAINS or _sole_reader(match, tensor) is None:
        return None
    return node if any(n is node for n in match.graph.nodes) else None


def _take_nodes(match: Match) -> None:
    """Makes the kit replace every absorbed node (`values["nodes"]`, the last one last).

    The kit's chains run downwards from the root; rules that also absorb nodes above the
    root, or a DAG, widen `match.nodes` in `rewrite` (the kit keeps the last node's output).
    """
    match.nodes = tuple(match.values["nodes"])


class FusedConvRule(Rule):
    """Conv -> Relu | Sigmoid | Tanh | LeakyRelu | Clip | HardSigmoid  ==>  FusedConv.

    The Conv (1-D, 2-D or 3-D; the CPU kernel takes any) keeps its inputs and attributes;
    `activation` names the op and `activation_params` carries LeakyRelu's alpha, Clip's
    (min, max) (attributes before opset 11, constant inputs from 11; an absent bound is
    float32's lowest or max, as in Clip) or HardSigmoid's (alpha, beta). float32 only.
    """

    name = "fused-conv"
    pattern = (Op("Conv"), Op(*_CONV_ACTIVATIONS))
    requires = (f"{DOMAIN}::FusedConv",)

    def check(self, match: Match) -> MatchResult:
        """float32 Conv; Clip bounds constant scalars with min <= max."""
        conv, act = match.nodes
        reason = _not_float32(match, conv.inputs[0])
        if reason is not None:
            return match.fail(reason)
        if act.op == "Clip":
            bounds = self._clip_bounds(match, act)
            if bounds is None:
                return match.fail("Clip bounds are not constant float32 scalars")
            if not bounds[0] <= bounds[1]:
                return match.fail(f"Clip min {bounds[0]:g} exceeds max {bounds[1]:g}")
            match.values["params"] = list(bounds)
        else:
            spec = _CONV_ACTIVATIONS[act.op]
            match.values["params"] = [float(act.attrs.get(n, d)) for n, d in spec]
        return match.ok()

    @staticmethod
    def _clip_bounds(match: Match, clip: gs.Node) -> tuple[float, float] | None:
        if match.opset < 11:
            return (
                float(clip.attrs.get("min", _F32_LOWEST)),
                float(clip.attrs.get("max", _F32_MAX)),
            )
        bounds = [_F32_LOWEST, _F32_MAX]
        for i, tensor in enumerate(clip.inputs[1:3]):
            if tensor.name:
                value = _scalar(match, tensor, 0)
                if value is None:
                    return None
                bounds[i] = value
        return bounds[0], bounds[1]

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """FusedConv reading the Conv's inputs, with its attributes plus the activation."""
        conv, act = match.nodes
        attrs = {**conv.attrs, "activation": act.op}
        if match.values["params"]:
            attrs["activation_params"] = match.values["params"]
        return [match.new_node("FusedConv", conv.inputs, attrs, domain=DOMAIN)]


def _swapped_input(match: Match, tensor: gs.Tensor) -> gs.Tensor | None:
    """The input of the Transpose writing `tensor` when it swaps only the last two axes."""
    if not isinstance(tensor, gs.Variable) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.op != "Transpose" or (node.domain or "") not in _DOMAINS or not node.inputs:
        return None
    if not any(n is node for n in match.graph.nodes):
        return None
    perm = node.attrs.get("perm")
    if perm is None:  # reverses every axis: a swap of the last two only for matrices
        rank = match.rank(node.inputs[0])
        perm = None if rank is None else list(range(rank))[::-1]
    if perm is None or len(perm) < 2:
        return None
    rank = len(perm)
    if list(perm) != [*range(rank - 2), rank - 1, rank - 2]:
        return None
    return node.inputs[0]


class FusedMatMulRule(Rule):
    """MatMul of last-two-axes Transposes, times / by scalar constants  ==>  FusedMatMul.

    An operand written by Transpose(perm=[0, ..., r-3, r-1, r-2]) is read before the
    Transpose with transA / transB = 1 (the Transpose stays when it has other readers); Mul
    or Div of the product by one-element float32 constants (as many as follow, each the only
    reader of the value before it) becomes `alpha`. Either part alone suffices. Both
    operands must be float32 of known rank >= 2 (FusedMatMul broadcasts batch axes like
    MatMul; checked in onnxruntime for ranks 2-4).
    """

    name = "fused-matmul"
    pattern = (Op("MatMul"),)
    requires = (f"{DOMAIN}::FusedMatMul",)

    def check(self, match: Match) -> MatchResult:
        """Known ranks >= 2, float32, and a transposed operand or a scale to absorb."""
        matmul = match.root
        if len(matmul.inputs) != 2:
            return match.fail("MatMul does not have two inputs")
        reason = _not_float32(match, *matmul.inputs)
        if reason is not None:
            return match.fail(reason)
        ranks = [match.rank(t) for t in matmul.inputs]
        known = [r for r in ranks if r is not None and r >= 2]
        if len(known) != 2:
            return match.fail(f"operand ranks {ranks} are not both known and >= 2")
        operands, flags, above = [], [], []
        for tensor in matmul.inputs:
            source = _swapped_input(match, tensor)
            operands.append(tensor if source is None else source)
            flags.append(int(source is not None))
            producer = tensor.inputs[0] if source is not None else None
            if producer is not None and all(r is matmul for r in tensor.outputs):
                taken = any(n is producer for n in above)
                if id(tensor) not in match.facts.protected and not taken:
                    above.append(producer)
        alpha, below, value = 1.0, [], matmul.outputs[0]
        while (reader := _sole_reader(match, value)) is not None:
            if reader.op not in ("Mul", "Div") or len(reader.inputs) != 2:
                break
            if reader.op == "Div" and reader.inputs[0] is not value:
                break
            other = next(t for t in reader.inputs if t is not value)
            scale = _scalar(match, other, max(known))
            if scale is None or (reader.op == "Div" and scale == 0.0):
                break
            product = alpha * scale if reader.op == "Mul" else alpha / scale
            if not np.isfinite(np.float32(product)) or (product and not np.float32(product)):
                break  # the float32 attribute would overflow or underflow
            alpha = product
            below.append(reader)
            value = reader.outputs[0]
        if not any(flags) and not below:
            return match.fail("no operand is a last-two-axes Transpose and no scale follows")
        match.values.update(operands=operands, flags=flags, alpha=alpha)
        match.values["nodes"] = (*above, matmul, *below)
        return match.ok()

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """FusedMatMul(A', B', transA, transB, alpha) writing the last absorbed output."""
        name = match.root.name
        _take_nodes(match)
        flags = match.values["flags"]
        attrs = {"transA": flags[0], "transB": flags[1], "alpha": float(match.values["alpha"])}
        return [
            match.new_node("FusedMatMul", match.values["operands"], attrs, name=name, domain=DOMAIN)
        ]


class _BiasGelu(Rule):
    """Add(x, bias) -> Gelu(approximate)  ==>  `op`(x, bias), bias 1-D over x's last axis."""

    approximate = "none"
    op = ""
    pattern = (Op("Add"), Op("Gelu"))
    min_opset = 20

    def check(self, match: Match) -> MatchResult:
        """Gelu's approximation; a float32 1-D constant bias as long as x's last axis."""
        add, gelu = match.nodes
        if gelu.attrs.get("approximate", "none") != self.approximate:
            return match.fail(f"Gelu approximate is not '{self.approximate}'")
        if len(add.inputs) != 2:
            return match.fail("Add does not have two inputs")
        for x, bias in (add.inputs, add.inputs[::-1]):
            value = match.constant(bias)
            if value is None or match.constant(x) is not None:
                continue
            if value.ndim != 1 or value.dtype != _FLOAT32:
                return match.fail(f"bias is {value.dtype}{list(value.shape)}, not float32 1-D")
            reason = _not_float32(match, x)
            if reason is not None:
                return match.fail(reason)
            shape = match.shape(x)
            if not shape or shape[-1] != value.shape[0]:
                return match.fail(f"x's last axis {shape and shape[-1]} is not {value.shape[0]}")
            match.values["inputs"] = [x, bias]
            return match.ok()
        return match.fail("no Add operand is a constant bias of a non-constant x")

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """One contrib node reading x and the bias."""
        return [match.new_node(self.op, match.values["inputs"], domain=DOMAIN)]


class BiasGelu(_BiasGelu):
    """Add(x, bias) -> Gelu  ==>  BiasGelu(x, bias)."""

    name = "bias-gelu"
    op = "BiasGelu"
    requires = (f"{DOMAIN}::BiasGelu",)


class BiasFastGelu(_BiasGelu):
    """Add(x, bias) -> Gelu(approximate="tanh")  ==>  FastGelu(x, bias)."""

    name = "bias-fast-gelu"
    approximate = "tanh"
    op = "FastGelu"
    requires = (f"{DOMAIN}::FastGelu",)


class QuickGelu(Rule):
    """x * Sigmoid(alpha * x)  ==>  QuickGelu(x, alpha); x * Sigmoid(x) (SiLU) has alpha 1.

    alpha * x may be Mul(x, c), Mul(c, x) or Div(x, c) for a one-element float32 constant c
    that cannot raise x's rank; matched from the outer Mul, operands in either order.
    """

    name = "quick-gelu"
    pattern = (Op("Mul"),)
    requires = (f"{DOMAIN}::QuickGelu",)

    def check(self, match: Match) -> MatchResult:
        """The other Mul operand is the Sigmoid's x; float32."""
        outer = match.root
        if len(outer.inputs) != 2:
            return match.fail("Mul does not have two inputs")
        for x, gate in (outer.inputs, outer.inputs[::-1]):
            sigmoid = _producer(match, gate, ("Sigmoid",))
            if sigmoid is None or len(sigmoid.inputs) != 1:
                continue
            found = self._alpha(match, sigmoid.inputs[0], x)
            if found is None:
                continue
            reason = _not_float32(match, x)
            if reason is not None:
                return match.fail(reason)
            alpha, scale_nodes = found
            match.values.update(x=x, alpha=alpha, nodes=(*scale_nodes, sigmoid, outer))
            return match.ok()
        return match.fail("no operand is Sigmoid(alpha * x) of the other operand x")

    @staticmethod
    def _alpha(
        match: Match, argument: gs.Tensor, x: gs.Tensor
    ) -> tuple[float, list[gs.Node]] | None:
        if argument is x:
            return 1.0, []
        node = _producer(match, argument, ("Mul", "Div"))
        if node is None or len(node.inputs) != 2:
            return None
        pairs = [node.inputs] if node.op == "Div" else [node.inputs, node.inputs[::-1]]
        for inner, other in pairs:
            if inner is not x:
                continue
            scale = _scalar(match, other, match.rank(x))
            if scale is None or (node.op == "Div" and scale == 0.0):
                return None
            return (scale if node.op == "Mul" else 1.0 / scale), [node]
        return None

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """QuickGelu(x, alpha) writing the outer Mul's output."""
        name = match.root.name
        _take_nodes(match)
        attrs = {"alpha": float(match.values["alpha"])}
        return [match.new_node("QuickGelu", [match.values["x"]], attrs, name=name, domain=DOMAIN)]


def _same_dims(first: Sequence, second: Sequence) -> bool:
    """Whether two shapes are provably equal (same ints or same dim symbols)."""
    return len(first) == len(second) and all(
        a is not None and a == b for a, b in zip(first, second, strict=True)
    )


class SkipLayerNorm(Rule):
    """LayerNormalization(a + b [+ bias])  ==>  SkipLayerNormalization(a, b, gamma, beta, bias).

    Matched from the LayerNormalization (axis -1 over a rank-3 float32 input [B, S, H], 1-D
    scale and bias of size H) upwards: its input is Add(a, b) of two rank-3 tensors of equal
    shape (or b of shape [1, S, H]: it becomes the skip). A 1-D float32 constant [H] added
    on top (Add(Add(a, b), c)) or to one operand (Add(Add(m, c), b)) becomes `bias`; that
    inner Add must have no other reader. The residual sum a + b (+ c) may have other
    readers or be a graph output: SkipLayerNormalization then also writes it, as its 4th
    output `input_skip_bias_sum`.
    """

    name = "skip-layer-norm"
    pattern = (Op("LayerNormalization"),)
    requires = (f"{DOMAIN}::SkipLayerNormalization",)
    min_opset = 17

    def check(self, match: Match) -> MatchResult:
        """Shapes as the CPU kernel wants them: input 3-D, skip equal or [1, S, H]."""
        norm = match.root
        total = norm.inputs[0]
        shape = match.shape(total)
        if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
            return match.fail(f"input shape {shape} is not rank 3 with a known hidden size")
        hidden = shape[2]
        if int(norm.attrs.get("axis", -1)) not in (-1, 2):
            return match.fail(f"axis {norm.attrs.get('axis')} is not the last axis")
        if len(norm.inputs) < 2 or not norm.inputs[1].name:
            return match.fail("LayerNormalization has no scale")
        params = [t for t in norm.inputs[1:3] if t.name]
        for tensor in params:
            if match.shape(tensor) != (hidden,):
                return match.fail(
                    f"'{tensor.name}' has shape {match.shape(tensor)}, not [{hidden}]"
                )
        add = total.inputs[0] if len(total.inputs) == 1 else None
        if add is None or add.op != "Add" or (add.domain or "") not in _DOMAINS:
            return match.fail("the input is not written by an Add")
        if len(add.inputs) != 2 or not any(n is add for n in match.graph.nodes):
            return match.fail("the input's Add is not a binary Add of this graph")
        found = self._terms(match, add, hidden)
        if isinstance(found, MatchResult):
            return found
        a, b, bias, inner = found
        reason = _not_float32(match, a, b, *params, *([bias] if bias is not None else []))
        if reason is not None:
            return match.fail(reason)
        first, second = match.shape(a), match.shape(b)
        if first is None or second is None or len(first) != 3 or len(second) != 3:
            return match.fail(f"residual operands have shapes {first} and {second}, not rank 3")
        if _same_dims(second, shape) and not _same_dims(first, shape):
            a, b, first, second = b, a, second, first
        if not _same_dims(first, shape):
            return match.fail(f"no residual operand has the sum's shape {shape}")
        if not (_same_dims(second, shape) or _same_dims(second, (1, *shape[1:]))):
            return match.fail(f"skip shape {second} is neither {shape} nor [1, S, H]")
        beta = norm.inputs[2] if len(norm.inputs) > 2 and norm.inputs[2].name else None
        match.values.update(inputs=[a, b, norm.inputs[1], beta, bias], total=total)
        match.values["nodes"] = (*inner, add, norm)
        return match.ok()

    @staticmethod
    def _terms(
        match: Match, add: gs.Node, hidden: int
    ) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor | None, list[gs.Node]] | MatchResult:
        """(a, b, bias or None, inner Add nodes) of the residual sum `add` writes."""
        p, q = add.inputs
        for top, rest in ((p, q), (q, p)):
            if _is_bias(match, top, hidden):
                inner = _producer(match, rest, ("Add",))
                if inner is None or len(inner.inputs) != 2:
                    return match.fail("the bias is added to a value that is not an only-read Add")
                return inner.inputs[0], inner.inputs[1], top, [inner]
        for biased, other in ((p, q), (q, p)):
            inner = _producer(match, biased, ("Add",))
            if inner is None or len(inner.inputs) != 2:
                continue
            for m, c in (inner.inputs, inner.inputs[::-1]):
                if _is_bias(match, c, hidden) and not _is_bias(match, m, hidden):
                    return m, other, c, [inner]
        return p, q, None, []

    def rewrite(self, match: Match, graph: gs.Graph) -> Sequence[gs.Node]:
        """SkipLayerNormalization; it also writes the sum when anything else reads it."""
        norm = match.root
        _take_nodes(match)
        a, b, gamma, beta, bias = match.values["inputs"]
        inputs = [a, b, gamma, beta or gs.Variable.empty(), bias or gs.Variable.empty()]
        while not inputs[-1].name:
            inputs.pop()
        total = match.values["total"]
        outputs = [norm.outputs[0]]
        if [r for r in total.outputs if r is not norm] or id(total) in match.facts.protected:
            outputs += [gs.Variable.empty(), gs.Variable.empty(), total]
        epsilon = float(norm.attrs.get("epsilon", 1e-5))
        return [
            gs.Node(
                "SkipLayerNormalization",
                name=norm.name,
                attrs={"epsilon": epsilon},
                inputs=inputs,
                outputs=outputs,
                domain=DOMAIN,
            )
        ]


def _is_bias(match: Match, tensor: gs.Tensor, hidden: int) -> bool:
    """Whether `tensor` is a float32 1-D constant of `hidden` values."""
    value = match.constant(tensor)
    return value is not None and value.dtype == _FLOAT32 and value.shape == (hidden,)


#: The rules of `fuse-contrib-ops`, tried in this order at each root node.
RULES: tuple[Rule, ...] = (
    FusedConvRule(),
    FusedMatMulRule(),
    BiasGelu(),
    BiasFastGelu(),
    QuickGelu(),
    SkipLayerNorm(),
)


@dataclasses.dataclass(frozen=True)
class FuseContribOps(RulePass):
    """Common chains  ==>  onnxruntime `com.microsoft` contrib ops (float32 only).

    Each rule runs only for targets declaring its op in `fused_ops` (the onnxruntime
    target's `CONTRIB_OPS`); without a target nothing fires. Rules (`RULES`, one statistic
    each):
      1. `fused-conv`: Conv -> Relu | Sigmoid | Tanh | LeakyRelu | Clip (constant bounds) |
         HardSigmoid  ==>  FusedConv(X, W, B, activation, activation_params).
      2. `fused-matmul`: MatMul whose operand is a Transpose of only the last two axes
         and/or whose product is multiplied or divided by scalar constants  ==>
         FusedMatMul(A, B, transA, transB, alpha); the Transpose stays if read elsewhere.
      3. `bias-gelu`: Add(x, bias) -> Gelu  ==>  BiasGelu(x, bias), bias a 1-D constant as
         long as x's last axis.
      4. `bias-fast-gelu`: the same with Gelu(approximate="tanh")  ==>  FastGelu(x, bias).
      5. `quick-gelu`: x * Sigmoid(alpha * x), alpha a scalar constant (1 for SiLU)  ==>
         QuickGelu(x, alpha).
      6. `skip-layer-norm`: LayerNormalization(a + b [+ bias]) over the last axis of rank-3
         [B, S, H] (b may be [1, S, H])  ==>  SkipLayerNormalization(a, b, gamma, beta,
         bias); a residual sum read elsewhere is written as its `input_skip_bias_sum`.

    Intermediates the fusion removes have exactly one reader and are no graph output (the
    residual sum of rule 6 excepted). Exact up to float re-association (the fused kernels
    accumulate and approximate in their own order).
    """

    name = "fuse-contrib-ops"
    summary = "fuse Conv+activation, MatMul+transpose/scale, bias+Gelu, QuickGelu, Add+LayerNorm"
    stage = "fuse"
    exactness = "reassoc"
    rules = RULES

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Applies the rules, then restores topological order.

        SkipLayerNormalization takes the LayerNormalization's place but may also write the
        residual sum, which other nodes before that place read.
        """
        result = apply_rules(self.rules, module, ctx)
        if result.changed:
            for graph in module.graphs():
                graph.nodes = topological_order(graph)
        return result
