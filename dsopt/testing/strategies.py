"""The shared Hypothesis strategy that draws small, valid, runnable random ONNX models."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, TypeVar

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OP_NAMES", "models", "random_feeds"]

_T = TypeVar("_T")

_Dim = int | str
"""A dimension: a static size, or a monomial of symbols such as ``"N"`` or ``"2*N*S"``."""

_Shape = tuple[_Dim, ...]

_FLOAT = TensorProto.FLOAT
_MIN_OPSET, _MAX_OPSET = 13, 21
_MAX_NUMEL = 16384  # per tensor, counting every symbol as 2 (the default `random_feeds` value)
_MAX_RANK = 5
_INT64_MAX = 2**63 - 1
_BASE_SYMBOLS = ("N", "S")
_SYMBOL_ESTIMATE = 2
_SCALE_CAP = 1e30
_TAME_LIMIT = 1e3

_UNARY_OPS = (
    "Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Exp", "Sqrt", "Log", "Erf", "LeakyRelu", "Clip",
    "HardSigmoid", "Softplus", "Round",
)  # fmt: skip
_BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Pow")
_COMPARE_OPS = ("Greater", "Less", "Equal")
_REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceMax")
_OTHER_OPS = (
    "MatMul", "Gemm", "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool",
    "BatchNormalization", "LayerNormalization", "Softmax", "Reshape", "Transpose", "Concat",
    "Split", "Slice", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Pad", "Tile", "Gather", "Cast",
    "Where", "Constant", "ConstantOfShape", "Shape", "Size", "Identity", "Dropout",
)  # fmt: skip

OP_NAMES: tuple[str, ...] = _UNARY_OPS + _BINARY_OPS + _COMPARE_OPS + _REDUCE_OPS + _OTHER_OPS
"""Every op type `models` can emit; each is valid in `models(ops=...)` and `containing=...`."""

_OP_MIN_OPSET = {"LayerNormalization": 17}
_IMAGE_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool"})
_DEAD_OPS = ("Relu", "Neg", "Abs", "Sigmoid", "Tanh", "Identity", "Transpose")
# How often a random step picks each op kind, relative to the default of 2: the structural ops
# that passes rewrite, and the ones needing an uncommon operand, come up more often.
_WEIGHTS = {
    **dict.fromkeys(("Conv", "MatMul", "Gemm", "BatchNormalization", "LayerNormalization"), 5),
    **dict.fromkeys(("Reshape", "Transpose", "Shape", "Concat", "Softmax", "Squeeze"), 3),
    **dict.fromkeys(("ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool"), 3),
}


# ---------------------------------------------------------------------------------------------
# Dimensions: ints, or monomials of symbols written canonically ("N", "S", "3*N", "N*S").


def _split_dim(dim: _Dim) -> tuple[int, tuple[str, ...]]:
    if isinstance(dim, int):
        return dim, ()
    coefficient, symbols = 1, list[str]()
    for part in dim.split("*"):
        if part.isdigit():
            coefficient *= int(part)
        else:
            symbols.append(part)
    return coefficient, tuple(symbols)


def _join_dim(coefficient: int, symbols: Sequence[str]) -> _Dim:
    if not symbols:
        return coefficient
    prefix = [str(coefficient)] if coefficient != 1 else []
    return "*".join(prefix + sorted(symbols))


def _product(dims: Sequence[_Dim]) -> _Dim:
    coefficient, symbols = 1, list[str]()
    for dim in dims:
        factor, names = _split_dim(dim)
        coefficient *= factor
        symbols.extend(names)
    return _join_dim(coefficient, symbols)


def _estimate(dim: _Dim) -> int:
    coefficient, symbols = _split_dim(dim)
    return coefficient * int(_SYMBOL_ESTIMATE ** len(symbols))


def _numel(shape: Sequence[_Dim]) -> int:
    return math.prod((_estimate(dim) for dim in shape), start=1)


def _is_static(dim: _Dim) -> TypeGuard[int]:
    return isinstance(dim, int)


def _static(dims: Sequence[_Dim]) -> tuple[int, ...]:
    """The dims as ints, for places where the builder made sure they are all static."""
    assert all(isinstance(dim, int) for dim in dims), dims
    return tuple(int(dim) for dim in dims)


def _broadcast(*shapes: Sequence[_Dim]) -> _Shape | None:
    """Numpy-style broadcast of shapes, or None when some dims cannot be proven compatible."""
    rank = max(len(shape) for shape in shapes)
    result: list[_Dim] = []
    for position in range(rank):
        dims = {s[len(s) - rank + position] for s in shapes if len(s) - rank + position >= 0}
        dims.discard(1)
        if len(dims) > 1:
            return None
        result.append(dims.pop() if dims else 1)
    return tuple(result)


def _fits(*shapes: Sequence[_Dim]) -> _Shape:
    """The broadcast of shapes the builder chose to be compatible."""
    result = _broadcast(*shapes)
    assert result is not None, shapes
    return result


def _combined(op: str, first: float, second: float) -> float:
    """A magnitude bound for `first op second` from bounds of the operands."""
    if op == "Mul":
        return first * second
    return first + second if op in ("Add", "Sub") else max(first, second)


def _combined_bound(op: str, first: float | None, second: float | None) -> float | None:
    return None if first is None or second is None else _combined(op, first, second)


def _divisors(number: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return sorted(set(small + [number // d for d in small]))


@functools.cache
def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


@functools.cache
def _subsets(size: int, low: int, high: int) -> st.SearchStrategy[list[int]]:
    return st.lists(_integers(0, size - 1), min_size=low, max_size=high, unique=True)


def _f32(value: object) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _cap(scale: float) -> float:
    return min(scale, _SCALE_CAP)


def _output_dim(dim: _Dim) -> int | str | None:
    if isinstance(dim, int) or dim in _BASE_SYMBOLS:
        return dim
    return None


@dataclasses.dataclass
class _Value:
    """What the builder knows about one tensor."""

    dtype: int
    shape: _Shape
    scale: float = 1.0  # a rough estimate of max |x|, used to keep values tame
    bound: float | None = None  # a proven bound on |x| (Exp only takes bounded inputs)
    uses: int = 0  # live consumers


_Requirement = Callable[[_Value], bool]

_REQUIREMENTS: dict[str, _Requirement] = {
    "any": lambda v: True,
    "unsqueezable": lambda v: len(v.shape) <= _MAX_RANK - 1,
    "rank2": lambda v: len(v.shape) >= 2,
    "rank3": lambda v: len(v.shape) >= 3,
    "matrix": lambda v: len(v.shape) == 2 and _is_static(v.shape[1]),
    "image": lambda v: len(v.shape) == 4 and all(_is_static(d) for d in v.shape[1:]),
    "channels": lambda v: len(v.shape) >= 2 and _is_static(v.shape[1]),
    "static_last": lambda v: _is_static(v.shape[-1]),
    "splittable": lambda v: any(_is_static(d) and d >= 2 for d in v.shape),
    "has_one": lambda v: len(v.shape) >= 2 and any(d == 1 for d in v.shape),
    "has_static": lambda v: any(_is_static(d) for d in v.shape),
}


class _Builder:
    """Grows one random graph while tracking every tensor's dtype, shape and magnitude."""

    def __init__(self, draw: st.DrawFn, opset: int, allowed: frozenset[str], dynamic: bool) -> None:
        self._draw = draw
        self.opset = opset
        self.allowed = allowed
        self.dynamic = dynamic
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.graph_inputs: list[onnx.ValueInfoProto] = []
        self.input_names: list[str] = []
        self.values: dict[str, _Value] = {}
        self.pool: list[str] = []  # float activations that later ops may consume
        self.tensor_count = 0

    # -- drawing ---------------------------------------------------------------------------

    def chance(self, percent: int) -> bool:
        """True with roughly `percent` % probability; shrinks towards False."""
        return self.integer(0, 99) >= 100 - percent

    def integer(self, low: int, high: int) -> int:
        return int(self._draw(_integers(low, high)))

    def choice(self, options: Sequence[_T]) -> _T:
        """One of `options`; shrinks towards the first."""
        return options[self.integer(0, len(options) - 1)]

    def subset(self, size: int, low: int = 1, high: int | None = None) -> list[int]:
        """A sorted subset of range(size) with between `low` and `high` members."""
        return sorted(self._draw(_subsets(size, low, high or size)))

    def may(self, op: str) -> bool:
        return op in self.allowed

    # -- graph growth ----------------------------------------------------------------------

    def fresh(self) -> str:
        name = f"t{self.tensor_count}"
        self.tensor_count += 1
        return name

    def emit(
        self, op: str, inputs: Sequence[str], n_outputs: int = 1, live: bool = True, **attrs: Any
    ) -> list[str]:
        outputs = [self.fresh() for _ in range(n_outputs)]
        name = f"n{len(self.nodes)}_{op}"
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        if live:
            for source in inputs:
                if source in self.values:
                    self.values[source].uses += 1
        return outputs

    def register(
        self,
        name: str,
        shape: Sequence[_Dim],
        *,
        scale: float = 1.0,
        bound: float | None = None,
        dtype: int = _FLOAT,
        pool: bool = True,
    ) -> str:
        self.values[name] = _Value(dtype, tuple(shape), _cap(scale), bound)
        if pool and dtype == _FLOAT:
            self.pool.append(name)
        return name

    def apply(
        self,
        op: str,
        inputs: Sequence[str],
        shape: Sequence[_Dim],
        *,
        scale: float = 1.0,
        bound: float | None = None,
        dtype: int = _FLOAT,
        pool: bool = True,
        live: bool = True,
        **attrs: Any,
    ) -> str:
        """Emit a one-output node and register its result."""
        (output,) = self.emit(op, inputs, live=live, **attrs)
        return self.register(output, shape, scale=scale, bound=bound, dtype=dtype, pool=pool)

    def same(self, op: str, inputs: Sequence[str], like: str, **attrs: Any) -> str:
        """Emit a node whose result has the shape and magnitude of `like`."""
        value = self.values[like]
        return self.apply(op, inputs, value.shape, scale=value.scale, bound=value.bound, **attrs)

    # -- constants -------------------------------------------------------------------------

    def initializer(self, array: np.ndarray) -> str:
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values: Sequence[int] | int) -> str:
        """An int64 constant (1-D for a list, 0-D for an int)."""
        array = np.asarray(values, dtype=np.int64)
        if self.may("Constant") and self.chance(10):
            return self.emit("Constant", [], value=numpy_helper.from_array(array))[0]
        return self.initializer(array)

    def constant(self, array: np.ndarray, *, fold: bool = True) -> str:
        """A float constant: an initializer, a Constant node, or a small foldable subgraph."""
        array = _f32(array)
        if self.may("Constant") and self.chance(12):
            return self.emit("Constant", [], value=numpy_helper.from_array(array))[0]
        if fold and self.chance(12):
            folded = self._folded_constant(array)
            if folded is not None:
                return folded
        return self.initializer(array)

    def _folded_constant(self, array: np.ndarray) -> str | None:
        kinds = [op for op in ("Add", "Mul", "Neg") if self.may(op)]
        if array.ndim >= 2 and self.may("Transpose"):
            kinds.append("Transpose")
        if array.ndim >= 1 and self.may("Reshape"):
            kinds.append("Reshape")
        if not kinds:
            return None
        kind = self.choice(kinds)
        # every variant reproduces `array` exactly, so exponents and bounds stay as drawn
        if kind == "Add":
            inputs = [self.initializer(_f32(array * 0.5)), self.initializer(_f32(array * 0.5))]
        elif kind == "Mul":
            inputs = [self.initializer(_f32(array * 2)), self.initializer(_f32(0.5))]
        elif kind == "Neg":
            inputs = [self.initializer(_f32(-array))]
        elif kind == "Transpose":
            inputs = [self.initializer(np.ascontiguousarray(array.T))]
        else:
            inputs = [self.initializer(array.reshape(-1)), self.ints(list(array.shape))]
        return self.emit(kind, inputs)[0]

    def weight(self, shape: Sequence[int], fan_in: int) -> str:
        array = self.rng.standard_normal(tuple(shape)) / math.sqrt(max(fan_in, 1))
        return self.constant(_f32(array))

    def broadcastable_shape(self, shape: _Shape) -> tuple[int, ...]:
        """A static shape that broadcasts against `shape` without changing it."""
        rank = self.integer(0, len(shape))
        dims = shape[len(shape) - rank :]
        return tuple(d if _is_static(d) and self.chance(60) else 1 for d in dims)

    # -- choosing operands -----------------------------------------------------------------

    def pick_where(self, test: _Requirement, *, tame: bool = True) -> str | None:
        """A pool value passing `test`, usually the most recent unused one."""
        candidates = [name for name in reversed(self.pool) if test(self.values[name])]
        if not candidates:
            return None
        unused = [name for name in candidates if self.values[name].uses == 0]
        if unused and self.chance(75):
            name = unused[0]
        else:
            name = candidates[self.integer(0, len(candidates) - 1)]
        return self.tame(name) if tame else name

    def pick(self, requirement: str = "any") -> str:
        """A pool value meeting `requirement`, reshaping one into shape when none does."""
        name = self.pick_where(_REQUIREMENTS[requirement])
        if name is None:
            name = self.adapt(requirement)
        assert _REQUIREMENTS[requirement](self.values[name]), (requirement, self.values[name])
        return name

    def partner(self, shape: _Shape) -> str | None:
        """A pool value that broadcasts with `shape` into a small enough result."""

        def fits(value: _Value) -> bool:
            result = _broadcast(shape, value.shape)
            return result is not None and _numel(result) <= _MAX_NUMEL

        return self.pick_where(fits)

    def tame(self, name: str, limit: float = _TAME_LIMIT) -> str:
        """Scale a large activation down by an exact power of two."""
        value = self.values[name]
        if value.scale <= limit:
            return name
        exponent = math.ceil(math.log2(value.scale))
        factor = 2.0**-exponent
        bound = None if value.bound is None else value.bound * factor
        scaled = self.initializer(_f32(factor))
        return self.apply(
            "Mul", [name, scaled], value.shape, scale=value.scale * factor, bound=bound
        )

    # -- adapting a value to a requirement -------------------------------------------------

    def adapt(self, requirement: str) -> str:
        """Turn some pool value into one meeting `requirement` with reshaping helper nodes."""
        test = _REQUIREMENTS[requirement]
        name = self.pick("any")
        if len(self.values[name].shape) >= _MAX_RANK:
            name = self.flatten(name, 1)
        if requirement in ("image", "matrix", "channels", "static_last"):
            name = self.desymbolize(name)
        shape = self.values[name].shape
        if test(self.values[name]):
            return name
        if requirement == "image":
            total = math.prod(_static(shape[1:]))
            channels = self.choice([d for d in _divisors(total) if d <= 16])
            height = self.choice(_divisors(total // channels))
            target = (channels, height, total // channels // height)
            name = self.reshape(name, [0, *target], (shape[0], *target))
        elif requirement in ("matrix", "unsqueezable"):
            name = self.flatten(name, 1)
        elif requirement == "has_one":
            name = self.unsqueeze(name, [self.integer(0, len(shape))])
        elif requirement == "splittable":
            if not _REQUIREMENTS["has_static"](self.values[name]):
                name = self.unsqueeze(name, [len(shape)])
            value = self.values[name]
            axis = self.choice([i for i, d in enumerate(value.shape) if _is_static(d)])
            doubled = [_product([2, d]) if i == axis else d for i, d in enumerate(value.shape)]
            name = self.apply(
                "Concat", [name, name], doubled, scale=value.scale, bound=value.bound, axis=axis
            )
        while not test(self.values[name]):  # rank2, rank3, channels, static_last, has_static
            name = self.unsqueeze(name, [len(self.values[name].shape)])
        return name

    def desymbolize(self, name: str) -> str:
        """Average away every symbolic axis but the first, leaving static sizes of 1."""
        shape = self.values[name].shape
        axes = [i for i, d in enumerate(shape) if i > 0 and not _is_static(d)]
        if not axes:
            return name
        value = self.values[name]
        return self.reduce("ReduceMean", name, axes, True, scale=value.scale, bound=value.bound)

    def flatten(self, name: str, axis: int) -> str:
        shape = self.values[name].shape
        out = (_product(shape[:axis]), _product(shape[axis:]))
        value = self.values[name]
        return self.apply("Flatten", [name], out, scale=value.scale, bound=value.bound, axis=axis)

    def unsqueeze(self, name: str, axes: list[int], *, negative: bool = False) -> str:
        value = self.values[name]
        rank = len(value.shape) + len(axes)
        dims = iter(value.shape)
        out = [1 if i in axes else next(dims) for i in range(rank)]
        encoded = self.ints([a - rank for a in axes] if negative else axes)
        return self.apply("Unsqueeze", [name, encoded], out, scale=value.scale, bound=value.bound)

    def reshape(self, name: str, target: list[int], out: Sequence[_Dim]) -> str:
        value = self.values[name]
        return self.apply(
            "Reshape", [name, self.ints(target)], out, scale=value.scale, bound=value.bound
        )

    def reduce(
        self,
        op: str,
        name: str,
        axes: list[int] | None,
        keepdims: bool,
        *,
        scale: float,
        bound: float | None,
        pool: bool = True,
    ) -> str:
        """Emit a Reduce* with axes as attribute or input, whichever the opset wants."""
        shape = self.values[name].shape
        inputs, attrs = [name], dict[str, Any]()
        if axes is not None:
            if op == "ReduceSum" or self.opset >= 18:
                inputs.append(self.ints(axes))
            else:
                attrs["axes"] = axes
        if not keepdims or self.chance(30):
            attrs["keepdims"] = int(keepdims)
        reduced = {a % len(shape) for a in axes} if axes is not None else set(range(len(shape)))
        out = [
            1 if i in reduced else d for i, d in enumerate(shape) if keepdims or i not in reduced
        ]
        return self.apply(op, inputs, out, scale=scale, bound=bound, pool=pool, **attrs)

    # -- inputs ----------------------------------------------------------------------------

    def add_input(self, dtype: int, shape: _Shape) -> str:
        name = f"x{len(self.input_names)}"
        self.graph_inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        self.input_names.append(name)
        scale = 4.0 if dtype == _FLOAT else 2.0
        return self.register(name, shape, scale=scale, dtype=dtype)

    def make_inputs(self, want_image: bool) -> None:
        batch: _Dim = "N" if self.dynamic and self.chance(60) else self.integer(1, 3)
        sequence: _Dim = "S" if self.dynamic and self.chance(50) else self.integer(1, 8)

        def family_shape(family: str) -> _Shape:
            if family == "image":
                return (batch, self.integer(1, 8), self.integer(1, 12), self.integer(1, 12))
            if family == "sequence":
                return (batch, sequence, self.integer(1, 32))
            return (batch, self.integer(1, 32))

        families = ("image", "sequence", "matrix")
        main = family_shape("image" if want_image or self.chance(15) else self.choice(families))
        self.add_input(_FLOAT, main)
        for _ in range(self.integer(1, 3) - 1):
            kind = self.integer(0, 9)
            if kind == 0:
                width = self.integer(1, 4)
                self.add_input(TensorProto.INT64, (batch, width) if self.chance(50) else (width,))
            elif kind == 1:
                suffix = main[self.integer(0, len(main) - 1) :]
                self.add_input(TensorProto.BOOL, tuple(d if self.chance(70) else 1 for d in suffix))
            else:
                variant = self.choice(("same", "suffix", "other"))
                if variant == "same":
                    shape = main
                elif variant == "suffix":
                    suffix = main[self.integer(1, len(main) - 1) :]
                    shape = tuple(d if self.chance(70) else 1 for d in suffix)
                else:
                    shape = family_shape(self.choice(families))
                self.add_input(_FLOAT, shape)

    # -- steps -----------------------------------------------------------------------------

    def random_step(self, kinds: Sequence[str]) -> None:
        """Run the recipe of a random op kind (`kinds` repeats each kind by its weight)."""
        kind = self.choice(kinds)
        values = [self.values[name] for name in self.pool]
        met = {req for req, test in _REQUIREMENTS.items() if any(test(v) for v in values)}
        ready = [op for op in kinds if _RECIPES[op][0] in met]
        if ready and kind not in ready and not self.chance(35):
            kind = self.choice(ready)  # otherwise adapt an operand to fit
        self.recipe(kind)

    def recipe(self, op: str) -> None:
        requirement, method = _RECIPES[op]
        method(self, op, self.pick(requirement))

    def inject_patterns(self) -> None:
        """Sometimes add a no-op, a duplicated node (for CSE) or a dead node."""
        if self.chance(10):
            self.noop(self.pick("any"))
        if self.chance(8):
            self.duplicate_last()
        if self.chance(6):
            self.dead_branch()

    def noop(self, x: str) -> None:
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        kinds = [
            kind
            for kind, op in (
                ("Identity", "Identity"),
                ("Dropout", "Dropout"),
                ("Cast", "Cast"),
                ("Transpose", "Transpose"),
                ("Reshape", "Reshape"),
                ("Pad", "Pad"),
                ("Mul1", "Mul"),
                ("Add0", "Add"),
                ("Sub0", "Sub"),
                ("Div1", "Div"),
                ("Expand", "Expand"),
                ("Slice", "Slice"),
            )  # fmt: skip
            if self.may(op)
        ]
        if not kinds:
            return
        kind = self.choice(kinds)
        if kind in ("Identity", "Dropout"):
            self.same(kind, [x], x)
        elif kind == "Cast":
            self.same("Cast", [x], x, to=_FLOAT)
        elif kind == "Transpose":
            self.same("Transpose", [x], x, perm=list(range(rank)))
        elif kind == "Reshape":
            target = [d if _is_static(d) and self.chance(50) else 0 for d in shape]
            self.same("Reshape", [x, self.ints(target)], x)
        elif kind == "Pad":
            self.same("Pad", [x, self.ints([0] * (2 * rank))], x)
        elif kind == "Expand":
            target = [d if _is_static(d) and self.chance(50) else 1 for d in shape]
            self.same("Expand", [x, self.ints(target)], x)
        elif kind == "Slice":
            axis = self.integer(0, rank - 1)
            ends = self.ints([_INT64_MAX])
            self.same("Slice", [x, self.ints([0]), ends, self.ints([axis])], x)
        else:
            op, fill = {"Mul1": ("Mul", 1.0), "Add0": ("Add", 0.0), "Sub0": ("Sub", 0.0)}.get(
                kind, ("Div", 1.0)
            )
            array = np.full(self.broadcastable_shape(shape), fill, dtype=np.float32)
            self.same(op, [x, self.constant(array, fold=False)], x)

    def duplicate_last(self) -> None:
        """Re-emit the latest pooled node verbatim, for common-subexpression elimination."""
        for node in reversed(self.nodes):
            if len(node.output) == 1 and node.output[0] in self.pool:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                output = self.fresh()
                copy.name = f"n{len(self.nodes)}_{node.op_type}"
                copy.output[0] = output
                self.nodes.append(copy)
                for source in node.input:
                    if source in self.values:
                        self.values[source].uses += 1
                original = self.values[node.output[0]]
                self.register(output, original.shape, scale=original.scale, bound=original.bound)
                return

    def dead_branch(self) -> None:
        """Compute something nobody uses."""
        ops = [op for op in _DEAD_OPS if self.may(op)]
        if not ops:
            return
        x = self.pick_where(_REQUIREMENTS["any"], tame=False)
        assert x is not None
        for _ in range(self.integer(1, 2)):
            op = self.choice(ops)
            shape = self.values[x].shape
            if op == "Transpose":
                x = self.apply(op, [x], shape[::-1], pool=False, live=False)
            else:
                x = self.apply(op, [x], shape, pool=False, live=False)

    # -- finishing -------------------------------------------------------------------------

    def finish(self, n_outputs: int) -> list[str]:
        """Merge loose ends into 1-3 outputs so that every non-dead node is live."""
        for name in self.input_names:
            value = self.values[name]
            if value.dtype != _FLOAT and value.uses == 0:
                self.apply("Cast", [name], value.shape, scale=value.scale, to=_FLOAT)
        leaves = [name for name in self.pool if self.values[name].uses == 0]
        leaves = leaves or [self.pool[-1]]
        while len(leaves) > n_outputs:
            other = leaves.pop(0)
            leaves.append(self.merge(leaves.pop(), other))
        outputs = []
        for leaf in leaves:
            if leaf in self.input_names:
                leaf = self.same("Identity", [leaf], leaf)
            outputs.append(leaf)
        extras = [
            name
            for name in self.pool
            if name not in outputs and name not in self.input_names and self.values[name].uses
        ]
        wanted = min(3, n_outputs + self.chance(10))  # sometimes an intermediate is an output too
        while len(outputs) < wanted and extras:
            outputs.append(extras.pop(self.integer(0, len(extras) - 1)))
        if len(outputs) < 3 and self.may("Identity") and self.chance(10):
            if self.chance(50):
                source = self.choice(self.input_names)
            else:
                source = self.initializer(_f32(self.rng.standard_normal((2, 3))))
                self.register(source, (2, 3), pool=False)
            value = self.values[source]
            output = self.apply("Identity", [source], value.shape, dtype=value.dtype, pool=False)
            outputs.append(output)
        return outputs

    def merge(self, target: str, other: str) -> str:
        kept, extra = self.values[target], self.values[other]
        shape = _broadcast(kept.shape, extra.shape)
        if shape is None or _numel(shape) > _MAX_NUMEL:
            other = self.reduce(
                "ReduceMean", other, None, False, scale=extra.scale, bound=None, pool=False
            )
            shape = kept.shape
        return self.apply("Add", [target, other], shape, scale=kept.scale + extra.scale)

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        infos = []
        for name in outputs:
            value = self.values[name]
            dims = [_output_dim(d) for d in value.shape]
            infos.append(helper.make_tensor_value_info(name, value.dtype, dims))
        graph = helper.make_graph(
            self.nodes, "dsopt_random", self.graph_inputs, infos, self.initializers
        )
        opset_id = helper.make_opsetid("", self.opset)
        ir_version = max(8, helper.find_min_ir_version_for([opset_id]))
        return helper.make_model(
            graph, opset_imports=[opset_id], ir_version=ir_version, producer_name="dsopt.testing"
        )

    # =====================================================================================
    # Recipes: each emits at least one node of its op type, consuming `x`.

    def r_unary(self, op: str, x: str) -> None:
        value = self.values[x]
        shape, scale, bound = value.shape, value.scale, value.bound
        attrs: dict[str, Any] = {}
        inputs = [x]
        if op == "Exp":
            if bound is None or bound > 4:
                squash = self.choice(("Tanh", "Sigmoid"))
                inputs = [self.apply(squash, [x], shape, bound=1.0, pool=False)]
                bound = 1.0
            scale = bound = math.exp(bound)
        elif op in ("Sqrt", "Log"):
            offset = self.choice((0.5, 1.0, 2.0))
            magnitude = self.apply("Abs", [x], shape, scale=scale, bound=bound, pool=False)
            positive = self.apply(
                "Add", [magnitude, self.constant(_f32(offset))], shape, scale=scale, pool=False
            )
            inputs = [positive]
            if op == "Sqrt":
                scale = math.sqrt(scale + offset)
                bound = None if bound is None else math.sqrt(bound + offset)
            else:
                scale = math.log(scale + offset) + 1
                bound = None if bound is None else max(-math.log(offset), math.log(bound + offset))
        elif op in ("Sigmoid", "Tanh", "Erf", "HardSigmoid"):
            scale = bound = 1.0
            if op == "HardSigmoid" and self.chance(50):
                attrs = {"alpha": self.choice((0.1, 0.2, 0.5)), "beta": self.choice((0.3, 0.5))}
        elif op == "LeakyRelu" and self.chance(60):
            attrs["alpha"] = self.choice((0.01, 0.1, 0.2))
        elif op == "Clip":
            low, high = self.choice((-1.0, -0.5, 0.0)), self.choice((0.5, 1.0, 6.0))
            form = self.choice(("both", "min", "max"))
            if form == "both":
                inputs += [self.constant(_f32(low)), self.constant(_f32(high))]
                scale = bound = max(-low, high)
            elif form == "min":
                inputs += [self.constant(_f32(low))]
                bound = None if bound is None else max(bound, -low)
            else:
                inputs += ["", self.constant(_f32(high))]
                bound = None if bound is None else max(bound, high)
        elif op in ("Softplus", "Round"):
            extra = 1.0 if op == "Softplus" else 0.5
            scale += extra
            bound = None if bound is None else bound + extra
        self.apply(op, inputs, shape, scale=scale, bound=bound, **attrs)

    def r_binary(self, op: str, x: str) -> None:
        if op == "Pow":
            self._pow(x)
            return
        value = self.values[x]
        if op == "Div":
            other, other_shape, smallest = self._denominator(value.shape)
            out = _fits(value.shape, other_shape)
            bound = None if value.bound is None else value.bound / smallest
            self.apply("Div", [x, other], out, scale=value.scale / smallest, bound=bound)
            return
        other, other_shape, scale, bound = self._operand(value.shape)
        inputs = [x, other] if self.chance(70) else [other, x]
        self.apply(
            op,
            inputs,
            _fits(value.shape, other_shape),
            scale=_combined(op, value.scale, scale),
            bound=_combined_bound(op, value.bound, bound),
        )

    def _operand(
        self, shape: _Shape, *, constant_node: bool = False
    ) -> tuple[str, _Shape, float, float | None]:
        """A second operand broadcastable with `shape`: an activation or a constant."""
        if not constant_node and self.chance(45):
            other = self.partner(shape)
            if other is not None:
                value = self.values[other]
                return other, value.shape, value.scale, value.bound
        const_shape = self.broadcastable_shape(shape)
        array = _f32(self.rng.standard_normal(const_shape) * 0.5)
        largest = float(np.abs(array).max(initial=0.0))
        if constant_node:
            name = self.emit("Constant", [], value=numpy_helper.from_array(array))[0]
        else:
            name = self.constant(array)
        return name, const_shape, largest, largest

    def _denominator(self, shape: _Shape) -> tuple[str, _Shape, float]:
        """A denominator bounded away from zero: |y| + 1, or a constant with |c| >= 0.5."""
        if self.chance(50):
            other = self.partner(shape)
            if other is not None:
                value = self.values[other]
                magnitude = self.apply(
                    "Abs", [other], value.shape, scale=value.scale, bound=value.bound, pool=False
                )
                one = self.constant(_f32(1.0))
                return (
                    self.apply("Add", [magnitude, one], value.shape, pool=False),
                    value.shape,
                    1.0,
                )
        const_shape = self.broadcastable_shape(shape)
        magnitudes = self.rng.uniform(0.5, 2.0, const_shape)
        signs = np.where(self.rng.random(const_shape) < 0.5, -1.0, 1.0)
        return self.constant(_f32(magnitudes * signs)), const_shape, 0.5

    def _pow(self, x: str) -> None:
        x = self.tame(x, limit=8.0)
        value = self.values[x]
        shape = value.shape
        exponent_shape = self.broadcastable_shape(shape) if self.chance(30) else ()
        if self.chance(30):
            exponent = self.choice((0.5, 1.5))
            magnitude = self.apply("Abs", [x], shape, scale=value.scale, pool=False)
            base = self.apply(
                "Add", [magnitude, self.constant(_f32(0.5))], shape, scale=value.scale, pool=False
            )
            array = np.full(exponent_shape, exponent, dtype=np.float32)
        else:
            base = x
            array = _f32(self.rng.choice(np.array([2.0, 3.0]), size=exponent_shape))
            exponent = float(array.max(initial=2.0))
        out = _fits(shape, exponent_shape)
        scale = (value.scale + 0.5) ** exponent
        bound = None if value.bound is None else (value.bound + 0.5) ** exponent
        self.apply("Pow", [base, self.constant(array)], out, scale=scale, bound=bound)

    def r_where(self, op: str, x: str) -> None:
        value = self.values[x]
        shape = value.shape
        condition: str | None = None
        condition_shape: _Shape = ()
        if op == "Where":
            for name in self.input_names:
                candidate = self.values[name]
                if candidate.dtype == TensorProto.BOOL and candidate.uses == 0:
                    if _broadcast(shape, candidate.shape) is not None:
                        condition, condition_shape = name, candidate.shape
                        break
        if condition is None:
            compare = op
            if op == "Where":
                compare = self.choice([c for c in _COMPARE_OPS if self.may(c)] or _COMPARE_OPS)
            other_shape: _Shape
            if compare == "Equal":
                rounded = self.apply("Round", [x], shape, scale=value.scale, pool=False)
                other_shape = self.broadcastable_shape(shape)
                levels = self.rng.integers(-1, 2, size=other_shape)
                inputs = [rounded, self.constant(_f32(levels))]
            else:
                other, other_shape, _, _ = self._operand(shape)
                inputs = [x, other] if self.chance(70) else [other, x]
            condition_shape = _fits(shape, other_shape)
            condition = self.apply(
                compare, inputs, condition_shape, dtype=TensorProto.BOOL, pool=False
            )
        if op != "Where" and not self.may("Where") and self.chance(50):
            self.apply("Cast", [condition], condition_shape, bound=1.0, to=_FLOAT)
            return
        base = _fits(shape, condition_shape)
        other, other_shape, other_scale, other_bound = self._operand(base)
        branches = [x, other] if self.chance(60) else [other, x]
        self.apply(
            "Where",
            [condition, *branches],
            _fits(base, other_shape),
            scale=max(value.scale, other_scale),
            bound=_combined_bound("Max", value.bound, other_bound),
        )

    def r_matmul(self, op: str, x: str) -> None:
        if not _is_static(self.values[x].shape[-1]):
            shape = self.values[x].shape
            if _numel((*shape[:-1], shape[-2])) > _MAX_NUMEL:  # x @ x^T too big: need a weight
                x = self.desymbolize(x)
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        transposed = (*shape[:-2], shape[-1], shape[-2])

        def pairs(candidate: _Value) -> bool:
            other = candidate.shape
            if len(other) < 2 or other[-2] != shape[-1]:
                return False
            batch = _broadcast(shape[:-2], other[:-2])
            return batch is not None and _numel((*batch, shape[-2], other[-1])) <= _MAX_NUMEL

        kinds = ["self"] if _numel((*shape[:-1], shape[-2])) <= _MAX_NUMEL else []
        if _is_static(shape[-1]):
            kinds += ["weight", "weight"] + (["batched"] if rank == 3 else [])
        if any(pairs(self.values[name]) for name in self.pool):
            kinds.append("pair")
        kind = self.choice(kinds)
        if kind == "self":
            if self.chance(50):
                factor = _f32(1.0 / math.sqrt(_estimate(shape[-1])))
                x = self.apply("Mul", [x, self.constant(factor)], shape, scale=value.scale)
            perm = [*range(rank - 2), rank - 1, rank - 2]
            other = self.apply(
                "Transpose", [x], transposed, scale=value.scale, pool=False, perm=perm
            )
            out: _Shape = (*shape[:-1], shape[-2])
            scale = value.scale**2 * _estimate(shape[-1])
        elif kind == "pair":
            partner = self.pick_where(pairs)
            assert partner is not None
            other, other_value = partner, self.values[partner]
            batch = _fits(shape[:-2], other_value.shape[:-2])
            out = (*batch, shape[-2], other_value.shape[-1])
            scale = value.scale * other_value.scale * _estimate(shape[-1])
        else:
            (inner,) = _static(shape[-1:])
            columns = self.integer(1, 32)
            while columns > 1 and _numel((*shape[:-1], columns)) > _MAX_NUMEL:
                columns //= 2
            stack = shape[0] if _is_static(shape[0]) and self.chance(50) else 1
            weight_shape = (stack, inner, columns) if kind == "batched" else (inner, columns)
            other = self.weight(weight_shape, inner)
            out = (*shape[:-1], columns)
            scale = value.scale * 2
        self.apply("MatMul", [x, other], out, scale=scale)

    def r_gemm(self, op: str, x: str) -> None:
        value = self.values[x]
        rows, inner = value.shape[0], _static(value.shape[1:])[0]
        columns = self.integer(1, 32)
        attrs: dict[str, Any] = {}
        a = x
        if self.chance(25):
            a = self.apply("Transpose", [x], (inner, rows), scale=value.scale, pool=False)
            attrs["transA"] = 1
        transpose_b = self.chance(50)
        if transpose_b or self.chance(20):
            attrs["transB"] = int(transpose_b)
        b_shape = (columns, inner) if transpose_b else (inner, columns)
        inputs = [a, self.weight(b_shape, inner)]
        alpha, beta = self.choice((1.0, 0.5, 2.0)), self.choice((1.0, 0.5))
        if alpha != 1.0 or self.chance(20):
            attrs["alpha"] = alpha
        c_shapes: list[tuple[int, ...] | None] = [None, (columns,), (1, columns), ()]
        if isinstance(rows, int):
            c_shapes.append((rows, columns))
        c_shape = self.choice(c_shapes)
        if c_shape is not None:
            inputs.append(self.constant(_f32(self.rng.standard_normal(c_shape) * 0.5)))
            if beta != 1.0 or self.chance(20):
                attrs["beta"] = beta
        self.apply("Gemm", inputs, (rows, columns), scale=alpha * value.scale * 2 + 2, **attrs)

    def _window(
        self, sizes: Sequence[int], *, dilate: bool
    ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """Kernel, strides, dilations and begin/end pads that fit `sizes`; pads < kernel."""
        kernels, strides, dilations, begins, ends = [], [], [], [], []
        for size in sizes:
            kernel, stride = self.integer(1, 3), self.integer(1, 2)
            dilation = self.integer(1, 2) if dilate else 1
            begin, end = self.integer(0, kernel - 1), self.integer(0, kernel - 1)
            while (kernel - 1) * dilation + 1 > size + begin + end:
                if dilation > 1:
                    dilation = 1
                else:
                    kernel -= 1
                    begin, end = min(begin, kernel - 1), min(end, kernel - 1)
            kernels.append(kernel)
            strides.append(stride)
            dilations.append(dilation)
            begins.append(begin)
            ends.append(end)
        return kernels, strides, dilations, begins, ends

    @staticmethod
    def _window_out(
        sizes: Sequence[int], window: tuple[list[int], list[int], list[int], list[int], list[int]]
    ) -> list[int]:
        kernels, strides, dilations, begins, ends = window
        return [
            (size + b + e - (k - 1) * d - 1) // s + 1
            for size, k, s, d, b, e in zip(
                sizes, kernels, strides, dilations, begins, ends, strict=False
            )
        ]

    def _window_attrs(
        self, window: tuple[list[int], list[int], list[int], list[int], list[int]], dilate: bool
    ) -> dict[str, Any]:
        kernels, strides, dilations, begins, ends = window
        attrs: dict[str, Any] = {}
        if any(s != 1 for s in strides) or self.chance(30):
            attrs["strides"] = strides
        if any(begins + ends) or self.chance(30):
            attrs["pads"] = begins + ends
        if dilate and (any(d != 1 for d in dilations) or self.chance(20)):
            attrs["dilations"] = dilations
        return attrs

    def r_conv(self, op: str, x: str) -> None:
        value = self.values[x]
        batch, channels, height, width = value.shape
        assert isinstance(channels, int) and isinstance(height, int) and isinstance(width, int)
        group = self.choice(sorted({1, channels, *(g for g in _divisors(channels) if g <= 4)}))
        out_channels = group * self.integer(1, max(1, 16 // group))
        window = self._window((height, width), dilate=True)
        out_hw = self._window_out((height, width), window)
        if _numel((batch, out_channels, *out_hw)) > _MAX_NUMEL:
            out_channels = group
        kernels = window[0]
        fan_in = channels // group * kernels[0] * kernels[1]
        inputs = [x, self.weight((out_channels, channels // group, *kernels), fan_in)]
        if self.chance(60):
            inputs.append(self.constant(_f32(self.rng.standard_normal(out_channels) * 0.1)))
        attrs = self._window_attrs(window, dilate=True)
        if self.chance(70):
            attrs["kernel_shape"] = kernels
        if group != 1 or self.chance(20):
            attrs["group"] = group
        out = (batch, out_channels, *out_hw)
        self.apply("Conv", inputs, out, scale=value.scale * 2 + 1, **attrs)

    def r_conv_transpose(self, op: str, x: str) -> None:
        value = self.values[x]
        batch, channels, height, width = value.shape
        assert isinstance(channels, int) and isinstance(height, int) and isinstance(width, int)
        out_channels = self.integer(1, 8)
        kernels, strides, dilations, begins, ends, extras = [], [], [], [], [], []
        for _ in range(2):
            kernel, stride = self.integer(1, 3), self.integer(1, 2)
            dilation = self.integer(1, 2) if self.chance(20) else 1
            reach = (kernel - 1) * dilation + 1
            kernels.append(kernel)
            strides.append(stride)
            dilations.append(dilation)
            begins.append(self.integer(0, (reach - 1) // 2))
            ends.append(self.integer(0, (reach - 1) // 2))
            extras.append(self.integer(0, stride - 1) if self.chance(30) else 0)

        def out_hw() -> list[int]:
            return [
                s * (size - 1) + extra + (k - 1) * d + 1 - b - e
                for size, k, s, d, b, e, extra in zip(
                    (height, width), kernels, strides, dilations, begins, ends, extras, strict=False
                )
            ]

        if _numel((batch, out_channels, *out_hw())) > _MAX_NUMEL:
            out_channels, strides, extras = 1, [1, 1], [0, 0]
        fan_in = channels * kernels[0] * kernels[1]
        inputs = [x, self.weight((channels, out_channels, *kernels), fan_in)]
        if self.chance(50):
            inputs.append(self.constant(_f32(self.rng.standard_normal(out_channels) * 0.1)))
        attrs: dict[str, Any] = {"kernel_shape": kernels} if self.chance(60) else {}
        attrs.update(self._window_attrs((kernels, strides, dilations, begins, ends), dilate=True))
        if any(extras):
            attrs["output_padding"] = extras
        out = (batch, out_channels, *out_hw())
        self.apply("ConvTranspose", inputs, out, scale=value.scale * 3 + 1, **attrs)

    def r_pool(self, op: str, x: str) -> None:
        value = self.values[x]
        batch, channels, height, width = value.shape
        assert isinstance(height, int) and isinstance(width, int)
        dilate = op == "MaxPool"
        window = self._window((height, width), dilate=dilate)
        if any(window[3] + window[4]):
            # with padding, a dilated window could miss the input entirely
            window = (window[0], window[1], [1, 1], window[3], window[4])
        attrs = self._window_attrs(window, dilate=dilate)
        attrs["kernel_shape"] = window[0]
        if op == "AveragePool" and self.chance(50):
            attrs["count_include_pad"] = self.integer(0, 1)
        out = (batch, channels, *self._window_out((height, width), window))
        self.apply(op, [x], out, scale=value.scale, bound=value.bound, **attrs)

    def r_global_pool(self, op: str, x: str) -> None:
        value = self.values[x]
        out = (*value.shape[:2], *[1] * (len(value.shape) - 2))
        self.apply(op, [x], out, scale=value.scale, bound=value.bound)

    def r_batch_norm(self, op: str, x: str) -> None:
        value = self.values[x]
        channels = value.shape[1]
        assert isinstance(channels, int)
        scale = 1.0 + 0.2 * self.rng.standard_normal(channels)
        bias = 0.1 * self.rng.standard_normal(channels)
        mean = 0.5 * self.rng.standard_normal(channels)
        variance = self.rng.uniform(0.5, 1.5, channels)
        inputs = [x] + [self.constant(_f32(a)) for a in (scale, bias, mean, variance)]
        attrs: dict[str, Any] = {"epsilon": self.choice((1e-5, 1e-3))} if self.chance(30) else {}
        self.apply(op, inputs, value.shape, scale=value.scale * 3 + 2, **attrs)

    def r_layer_norm(self, op: str, x: str) -> None:
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        first = rank - 1
        while first > 0 and _is_static(shape[first - 1]) and _numel(shape[first - 1 :]) <= 4096:
            first -= 1
        axis = self.integer(first, rank - 1)
        normalized = _static(shape[axis:])
        attrs: dict[str, Any] = {}
        if axis != rank - 1 or self.chance(30):
            attrs["axis"] = axis if self.chance(50) else axis - rank
        if self.chance(30):
            attrs["epsilon"] = self.choice((1e-5, 1e-3))
        scale = 1.0 + 0.2 * self.rng.standard_normal(normalized)
        inputs = [x, self.constant(_f32(scale))]
        if self.chance(60):
            inputs.append(self.constant(_f32(0.1 * self.rng.standard_normal(normalized))))
        estimate = 1.5 * math.sqrt(_numel(normalized)) + 1
        self.apply(op, inputs, shape, scale=estimate, **attrs)

    def r_softmax(self, op: str, x: str) -> None:
        rank = len(self.values[x].shape)
        attrs: dict[str, Any] = {"axis": self.integer(-rank, rank - 1)} if self.chance(60) else {}
        self.apply(op, [x], self.values[x].shape, scale=1.0, bound=1.0, **attrs)

    def r_reduce(self, op: str, x: str) -> None:
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        if self.chance(10):
            axes, keepdims = None, True
            reduced = _numel(shape)
        else:
            axes = self.subset(rank)
            keepdims = self.chance(60) or len(axes) == rank
            reduced = _numel([shape[a] for a in axes])
            axes = [a - rank if self.chance(30) else a for a in axes]
        scale, bound = value.scale, value.bound
        if op == "ReduceSum":
            scale *= reduced
            bound = None if bound is None else bound * reduced
        if axes is None and op != "ReduceSum" and self.opset < 18 and self.chance(50):
            axes = list(range(rank))
        self.reduce(op, x, axes, keepdims, scale=scale, bound=bound)

    def _moved(
        self, op: str, inputs: Sequence[str], out: Sequence[_Dim], x: str, **attrs: Any
    ) -> str:
        """Emit a data-movement op: values keep their magnitude."""
        value = self.values[x]
        return self.apply(op, inputs, out, scale=value.scale, bound=value.bound, **attrs)

    def _factors(self, number: int, max_parts: int) -> list[int]:
        parts = self.integer(1, max(1, max_parts))
        factors = []
        for _ in range(parts - 1):
            factor = self.choice(_divisors(number))
            factors.append(factor)
            number //= factor
        return [*factors, number]

    def r_reshape(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        rank = len(shape)
        kept = self.integer(0, min(rank, _MAX_RANK - 1))
        head = [0 if not _is_static(d) or self.chance(60) else d for d in shape[:kept]]
        total = _product(shape[kept:])
        if _is_static(total):
            tail = self._factors(total, min(3, _MAX_RANK - kept))
            out_tail: list[_Dim] = list(tail)
            target = [*head, *tail]
            if self.chance(40):
                target[kept + self.integer(0, len(tail) - 1)] = -1
        else:
            coefficient, symbols = _split_dim(total)
            factor = self.choice(_divisors(coefficient))
            rest = _join_dim(coefficient // factor, symbols)
            if factor == 1 or kept == _MAX_RANK - 1:
                target, out_tail = [*head, -1], [total]
            elif self.chance(50):
                target, out_tail = [*head, factor, -1], [factor, rest]
            else:
                target, out_tail = [*head, -1, factor], [rest, factor]
        self._moved("Reshape", [x, self.ints(target)], (*shape[:kept], *out_tail), x)

    def r_transpose(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        if self.chance(15):
            self._moved("Transpose", [x], shape[::-1], x)
            return
        perm = list(self._draw(st.permutations(range(len(shape)))))
        self._moved("Transpose", [x], [shape[p] for p in perm], x, perm=perm)

    def r_concat(self, op: str, x: str) -> None:
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        axis = self.integer(0, rank - 1)
        dim = shape[axis]

        def matches(candidate: _Value) -> bool:
            other = candidate.shape
            if len(other) != rank:
                return False
            if any(o != s for i, (o, s) in enumerate(zip(other, shape, strict=False)) if i != axis):
                return False
            return other[axis] == dim or (_is_static(dim) and _is_static(other[axis]))

        def joined(sizes: list[_Dim]) -> _Dim:
            if all(size == dim for size in sizes):
                return _product([len(sizes), dim])
            return sum(_static(sizes))

        others_static = all(_is_static(d) for i, d in enumerate(shape) if i != axis)
        parts, sizes = [x], [dim]
        scale, bound = value.scale, value.bound
        size: _Dim
        other_bound: float | None
        for _ in range(self.integer(1, 2)):
            kinds = ["self"]
            if any(matches(self.values[name]) for name in self.pool):
                kinds.append("partner")
            if others_static and _is_static(dim):
                kinds.append("constant")
            kind = self.choice(kinds)
            if kind == "constant":
                size = self.integer(1, 3)
                const_shape = _static([size if i == axis else d for i, d in enumerate(shape)])
                array = _f32(self.rng.standard_normal(const_shape) * 0.5)
                other = self.constant(array)
                other_scale = other_bound = float(np.abs(array).max(initial=0.0))
            else:
                partner = x if kind == "self" else self.pick_where(matches)
                assert partner is not None
                other, other_value = partner, self.values[partner]
                size, other_scale, other_bound = (
                    other_value.shape[axis], other_value.scale, other_value.bound
                )  # fmt: skip
            if _numel((*shape[:axis], joined([*sizes, size]), *shape[axis + 1 :])) > _MAX_NUMEL:
                break
            parts.append(other)
            sizes.append(size)
            scale = max(scale, other_scale)
            bound = _combined_bound("Max", bound, other_bound)
        out = (*shape[:axis], joined(sizes), *shape[axis + 1 :])
        encoded = axis if self.chance(60) else axis - rank
        self.apply("Concat", parts, out, scale=scale, bound=bound, axis=encoded)

    def r_split(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        rank = len(shape)
        axis = self.choice([i for i, d in enumerate(shape) if _is_static(d) and d >= 2])
        dim = shape[axis]
        assert isinstance(dim, int)
        count = self.integer(2, min(3, dim))
        attrs: dict[str, Any] = {}
        if axis != 0 or self.chance(30):
            attrs["axis"] = axis if self.chance(60) else axis - rank
        inputs = [x]
        even = dim % count == 0 and self.chance(40)
        if even:
            sizes = [dim // count] * count
            if self.opset >= 18:
                attrs["num_outputs"] = count
        else:
            cuts = self.subset(dim - 1, count - 1, count - 1)
            edges = [0, *[c + 1 for c in cuts], dim]
            sizes = [b - a for a, b in zip(edges, edges[1:], strict=False)]
            inputs.append(self.ints(sizes))
        outputs = self.emit("Split", inputs, n_outputs=count, **attrs)
        value = self.values[x]
        for output, size in zip(outputs, sizes, strict=False):
            out = (*shape[:axis], size, *shape[axis + 1 :])
            self.register(output, out, scale=value.scale, bound=value.bound)

    def r_slice(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        rank = len(shape)
        axes = self.subset(rank, 1, min(2, rank))
        starts, ends, steps = [], [], []
        out = list(shape)
        for axis in axes:
            dim = shape[axis]
            if not isinstance(dim, int):
                kind = self.choice(("all", "first", "last"))
                start, stop = {"all": (0, _INT64_MAX), "first": (0, 1), "last": (-1, _INT64_MAX)}[
                    kind
                ]
                starts.append(start)
                ends.append(stop)
                steps.append(1)
                out[axis] = dim if kind == "all" else 1
                continue
            kind = self.choice(("range", "range", "stride", "reverse"))
            start = self.integer(0, dim - 1)
            if kind == "reverse":
                stop = self.integer(-1, start - 1)
                length, step = start - stop, -1
                encoded_stop = (
                    -_INT64_MAX if stop < 0 else (stop if self.chance(50) else stop - dim)
                )
            else:
                stop = self.integer(start + 1, dim)
                step = self.integer(1, 2) if kind == "stride" else 1
                length = -(-(stop - start) // step)
                encoded_stop = _INT64_MAX if stop == dim and self.chance(40) else stop
            starts.append(start if self.chance(60) else start - dim)
            ends.append(encoded_stop)
            steps.append(step)
            out[axis] = length
        encoded_axes = [a - rank if self.chance(30) else a for a in axes]
        inputs = [x, self.ints(starts), self.ints(ends), self.ints(encoded_axes)]
        if any(s != 1 for s in steps) or self.chance(30):
            inputs.append(self.ints(steps))
        self._moved("Slice", inputs, out, x)

    def r_squeeze(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        rank = len(shape)
        ones = [i for i, d in enumerate(shape) if d == 1]
        if len(ones) < rank and all(_is_static(d) for d in shape) and self.chance(20):
            self._moved("Squeeze", [x], [d for d in shape if d != 1], x)
            return
        chosen = [ones[i] for i in self.subset(len(ones), 1, min(len(ones), rank - 1))]
        encoded = [a - rank if self.chance(30) else a for a in chosen]
        out = [d for i, d in enumerate(shape) if i not in chosen]
        self._moved("Squeeze", [x, self.ints(encoded)], out, x)

    def r_unsqueeze(self, op: str, x: str) -> None:
        rank = len(self.values[x].shape)
        new_rank = rank + self.integer(1, min(2, _MAX_RANK - rank))
        axes = self.subset(new_rank, new_rank - rank, new_rank - rank)
        self.unsqueeze(x, axes, negative=self.chance(30))

    def r_flatten(self, op: str, x: str) -> None:
        rank = len(self.values[x].shape)
        axis = self.integer(0, rank)
        shape = self.values[x].shape
        out = (_product(shape[:axis]), _product(shape[axis:]))
        encoded = axis - rank if 0 < axis < rank and self.chance(30) else axis
        attrs: dict[str, Any] = {"axis": encoded} if encoded != 1 or self.chance(50) else {}
        self._moved("Flatten", [x], out, x, **attrs)

    def r_expand(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        lead = self.integer(0, min(2, _MAX_RANK - len(shape))) if self.chance(30) else 0
        target = [self.integer(1, 3) for _ in range(lead)]
        for dim in shape:
            if dim == 1:
                target.append(self.integer(1, 3))
            else:
                target.append(dim if _is_static(dim) and self.chance(50) else 1)
        out = _fits(shape, target)
        if _numel(out) > _MAX_NUMEL:
            target = [1 if i < lead or shape[i - lead] == 1 else t for i, t in enumerate(target)]
            out = _fits(shape, target)
        self._moved("Expand", [x, self.ints(target)], out, x)

    def r_pad(self, op: str, x: str) -> None:
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        mode = self.choice(("constant", "constant", "edge", "reflect"))
        limit = [
            0 if not isinstance(d, int) else (min(2, d - 1) if mode == "reflect" else 2)
            for d in shape
        ]
        begins = [self.integer(0, m) for m in limit]
        ends = [self.integer(0, m) for m in limit]
        out = [
            d + b + e if isinstance(d, int) else d
            for d, b, e in zip(shape, begins, ends, strict=False)
        ]
        if _numel(out) > _MAX_NUMEL:
            begins, ends, out = [0] * rank, [0] * rank, list(shape)
        axes = list(range(rank))
        if self.opset >= 18 and self.chance(30):
            axes = [a for a in axes if begins[a] or ends[a]] or [0]
        pads = [begins[a] for a in axes] + [ends[a] for a in axes]
        inputs = [x, self.ints(pads)]
        scale, bound = value.scale, value.bound
        if mode == "constant" and self.chance(50):
            fill = self.choice((0.0, 0.5, -1.0))
            inputs.append(self.constant(_f32(fill), fold=False))
            scale = max(scale, abs(fill))
            bound = None if bound is None else max(bound, abs(fill))
        if axes != list(range(rank)):
            if len(inputs) == 2:
                inputs.append("")
            inputs.append(self.ints([a - rank if self.chance(30) else a for a in axes]))
        attrs: dict[str, Any] = {"mode": mode} if mode != "constant" or self.chance(30) else {}
        self.apply("Pad", inputs, out, scale=scale, bound=bound, **attrs)

    def r_tile(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        repeats = [self.integer(1, 3) if self.chance(40) else 1 for _ in shape]
        out = [_product([d, r]) for d, r in zip(shape, repeats, strict=False)]
        if _numel(out) > _MAX_NUMEL:
            repeats, out = [1] * len(shape), list(shape)
        self._moved("Tile", [x, self.ints(repeats)], out, x)

    def r_gather(self, op: str, x: str) -> None:
        shape = self.values[x].shape
        rank = len(shape)
        static_axes = [i for i, d in enumerate(shape) if _is_static(d)]
        for name in self.input_names:
            source = self.values[name]
            if source.dtype == TensorProto.INT64 and source.uses == 0 and self.chance(80):
                # random_feeds draws ints from [0, 3)
                usable = [a for a in static_axes if _static(shape[a : a + 1])[0] >= 3]
                if usable and rank - 1 + len(source.shape) <= _MAX_RANK:
                    axis = self.choice(usable)
                    out = (*shape[:axis], *source.shape, *shape[axis + 1 :])
                    if _numel(out) <= _MAX_NUMEL:
                        self._moved("Gather", [x, name], out, x, axis=axis)
                        return
        axis = self.choice(static_axes)
        dim = shape[axis]
        assert isinstance(dim, int)
        index_shapes: list[tuple[int, ...]] = [(self.integer(1, 4),)]
        if rank >= 2:
            index_shapes.append(())
        if rank <= _MAX_RANK - 1:
            index_shapes.append((2, self.integer(1, 3)))
        index_shape = self.choice(index_shapes)
        out = (*shape[:axis], *index_shape, *shape[axis + 1 :])
        if _numel(out) > _MAX_NUMEL:
            index_shape, out = (1,), (*shape[:axis], 1, *shape[axis + 1 :])
        indices = self.rng.integers(-dim, dim, size=index_shape)
        attrs: dict[str, Any] = {}
        if axis or self.chance(30):
            attrs["axis"] = axis if self.chance(70) else axis - rank
        self._moved("Gather", [x, self.ints(indices.tolist())], out, x, **attrs)

    def r_cast(self, op: str, x: str) -> None:
        kind = self.choice(("half", "double", "int", "same"))
        value = self.values[x]
        if kind == "same":
            self._moved("Cast", [x], value.shape, x, to=_FLOAT)
            return
        source = x
        if kind == "int":  # exact round trip: the cast only sees integral values
            source = self.apply("Round", [x], value.shape, scale=value.scale + 0.5, pool=False)
        middle = {"half": TensorProto.FLOAT16, "double": TensorProto.DOUBLE}.get(
            kind, TensorProto.INT64
        )
        narrowed = self.apply("Cast", [source], value.shape, dtype=middle, pool=False, to=middle)
        self._moved("Cast", [narrowed], value.shape, x, to=_FLOAT)

    def r_constant(self, op: str, x: str) -> None:
        value = self.values[x]
        binary = self.choice(
            [b for b in ("Add", "Sub", "Mul", "Max", "Min") if self.may(b)] or ["Add"]
        )
        other, other_shape, scale, bound = self._operand(value.shape, constant_node=True)
        self.apply(
            binary,
            [x, other],
            _fits(value.shape, other_shape),
            scale=_combined(binary, value.scale, scale),
            bound=_combined_bound(binary, value.bound, bound),
        )

    def _fill(self, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array([value], dtype=np.float32))

    def r_constant_of_shape(self, op: str, x: str) -> None:
        value = self.values[x]
        fill = self.choice((0.0, 1.0, 0.5, -1.0))
        if self.chance(50):
            static_shape = self.broadcastable_shape(value.shape) or (1,)
            const_shape: _Shape = static_shape
            shape_input = self.ints(list(static_shape))
        else:
            const_shape = value.shape
            shape_input = self.apply(
                "Shape", [x], (len(const_shape),), dtype=TensorProto.INT64, pool=False
            )
        filled = self.apply(op, [shape_input], const_shape, pool=False, value=self._fill(fill))
        binary = "Mul" if fill == 1.0 else self.choice(("Add", "Mul"))
        out = _fits(value.shape, const_shape)
        scale = value.scale + (abs(fill) if binary == "Add" else 0.0)
        self.apply(binary, [x, filled], out, scale=scale)

    def r_shape(self, op: str, x: str) -> None:
        value = self.values[x]
        shape, rank = value.shape, len(value.shape)
        kinds = ["reshape", "expand", "fill"] + (["merge"] if rank >= 2 else [])
        kind = self.choice(kinds)
        int64 = TensorProto.INT64
        if kind == "reshape":
            kept = self.integer(1, min(rank, _MAX_RANK - 1))
            if self.opset >= 15 and self.chance(40):
                end = kept if self.chance(50) or kept == rank else kept - rank
                prefix = self.apply(op, [x], (kept,), dtype=int64, pool=False, end=end)
            else:
                full = self.apply(op, [x], (rank,), dtype=int64, pool=False)
                if self.chance(50):
                    prefix = self.apply(
                        "Slice", [full, self.ints([0]), self.ints([kept])], (kept,),
                        dtype=int64, pool=False,
                    )  # fmt: skip
                else:
                    prefix = self.apply(
                        "Gather", [full, self.ints(list(range(kept)))], (kept,),
                        dtype=int64, pool=False,
                    )  # fmt: skip
            total = _product(shape[kept:])
            if _is_static(total):
                tail: list[int] = self._factors(total, min(2, _MAX_RANK - kept))
                out_tail: list[_Dim] = list(tail)
            else:
                tail, out_tail = [-1], [total]
            target = self.apply(
                "Concat", [prefix, self.ints(tail)], (kept + len(tail),), dtype=int64,
                pool=False, axis=0,
            )  # fmt: skip
            self._moved("Reshape", [x, target], (*shape[:kept], *out_tail), x)
        elif kind == "merge":
            full = self.apply(op, [x], (rank,), dtype=int64, pool=False)
            first = self.apply("Gather", [full, self.ints(0)], (), dtype=int64, pool=False)
            second = self.apply("Gather", [full, self.ints(1)], (), dtype=int64, pool=False)
            merged = self.apply("Mul", [first, second], (), dtype=int64, pool=False)
            parts = [
                self.apply("Unsqueeze", [merged, self.ints([0])], (1,), dtype=int64, pool=False)
            ]
            if rank > 2:
                rest = [full, self.ints([2]), self.ints([_INT64_MAX])]
                parts.append(self.apply("Slice", rest, (rank - 2,), dtype=int64, pool=False))
            target = self.apply("Concat", parts, (rank - 1,), dtype=int64, pool=False, axis=0)
            out = (_product(shape[:2]), *shape[2:])
            self._moved("Reshape", [x, target], out, x)
        elif kind == "expand":
            if self.chance(50):
                axes = self.subset(rank)
                small = self.reduce(
                    "ReduceMean", x, axes, True, scale=value.scale, bound=value.bound, pool=False
                )
            else:
                small_shape = self.broadcastable_shape(shape)
                small = self.constant(_f32(self.rng.standard_normal(small_shape) * 0.5))
            full = self.apply(op, [x], (rank,), dtype=int64, pool=False)
            expanded = self._moved("Expand", [small, full], shape, x)
            if self.chance(50):
                self.apply("Sub", [x, expanded], shape, scale=value.scale * 2)
        else:
            full = self.apply(op, [x], (rank,), dtype=int64, pool=False)
            fill = self.choice((0.0, 1.0))
            filled = self.apply(
                "ConstantOfShape", [full], shape, pool=False, value=self._fill(fill)
            )
            self._moved("Mul" if fill else "Add", [x, filled], shape, x)

    def r_size(self, op: str, x: str) -> None:
        value = self.values[x]
        size = self.apply(op, [x], (), dtype=TensorProto.INT64, pool=False)
        as_float = self.apply("Cast", [size], (), pool=False, to=_FLOAT)
        self._moved("Div", [x, as_float], value.shape, x)

    def r_identity(self, op: str, x: str) -> None:
        if op == "Identity":
            self._moved(op, [x], self.values[x].shape, x)
            return
        inputs = [x]
        if self.chance(50):
            inputs.append(self.constant(_f32(self.choice((0.1, 0.5))), fold=False))
            if self.chance(40):
                inputs.append(self.initializer(np.array(False)))
        outputs = self.emit(op, inputs, n_outputs=2 if self.chance(15) else 1)
        value = self.values[x]
        self.register(outputs[0], value.shape, scale=value.scale, bound=value.bound)


_RECIPES: dict[str, tuple[str, Callable[[_Builder, str, str], None]]] = {
    **{op: ("any", _Builder.r_unary) for op in _UNARY_OPS},
    **{op: ("any", _Builder.r_binary) for op in _BINARY_OPS},
    **{op: ("any", _Builder.r_where) for op in (*_COMPARE_OPS, "Where")},
    **{op: ("any", _Builder.r_reduce) for op in _REDUCE_OPS},
    "MatMul": ("rank2", _Builder.r_matmul),
    "Gemm": ("matrix", _Builder.r_gemm),
    "Conv": ("image", _Builder.r_conv),
    "ConvTranspose": ("image", _Builder.r_conv_transpose),
    "MaxPool": ("image", _Builder.r_pool),
    "AveragePool": ("image", _Builder.r_pool),
    "GlobalAveragePool": ("rank3", _Builder.r_global_pool),
    "BatchNormalization": ("channels", _Builder.r_batch_norm),
    "LayerNormalization": ("static_last", _Builder.r_layer_norm),
    "Softmax": ("any", _Builder.r_softmax),
    "Reshape": ("any", _Builder.r_reshape),
    "Transpose": ("rank2", _Builder.r_transpose),
    "Concat": ("any", _Builder.r_concat),
    "Split": ("splittable", _Builder.r_split),
    "Slice": ("any", _Builder.r_slice),
    "Squeeze": ("has_one", _Builder.r_squeeze),
    "Unsqueeze": ("unsqueezable", _Builder.r_unsqueeze),
    "Flatten": ("any", _Builder.r_flatten),
    "Expand": ("any", _Builder.r_expand),
    "Pad": ("any", _Builder.r_pad),
    "Tile": ("any", _Builder.r_tile),
    "Gather": ("has_static", _Builder.r_gather),
    "Cast": ("any", _Builder.r_cast),
    "Constant": ("any", _Builder.r_constant),
    "ConstantOfShape": ("any", _Builder.r_constant_of_shape),
    "Shape": ("any", _Builder.r_shape),
    "Size": ("any", _Builder.r_size),
    "Identity": ("any", _Builder.r_identity),
    "Dropout": ("any", _Builder.r_identity),
}
assert set(_RECIPES) == set(OP_NAMES), set(OP_NAMES) ^ set(_RECIPES)


@st.composite
def _draw_model(
    draw: st.DrawFn,
    min_ops: int,
    max_ops: int,
    ops: tuple[str, ...] | None,
    containing: tuple[str, ...],
    opset: int | None,
    dynamic: bool,
) -> onnx.ModelProto:
    lowest = max([_MIN_OPSET, *(_OP_MIN_OPSET.get(op, _MIN_OPSET) for op in containing)])
    if ops:  # some op in `ops` must exist at the drawn opset
        lowest = max(lowest, min(_OP_MIN_OPSET.get(op, _MIN_OPSET) for op in ops))
    chosen_opset = opset if opset is not None else draw(st.integers(lowest, _MAX_OPSET))
    wanted = set(OP_NAMES if ops is None else ops) | set(containing)
    allowed = frozenset(op for op in wanted if _OP_MIN_OPSET.get(op, _MIN_OPSET) <= chosen_opset)
    builder = _Builder(draw, chosen_opset, allowed, dynamic)
    kinds = [op for op in OP_NAMES if op in allowed for _ in range(_WEIGHTS.get(op, 2))]
    image_ops = _IMAGE_OPS & allowed
    want_image = bool(_IMAGE_OPS & set(containing)) or (image_ops == allowed)
    builder.make_inputs(want_image)
    steps = max(draw(st.integers(min_ops, max_ops)), len(containing))
    if containing and builder.chance(60):  # back to back, so each tends to feed the next
        first = builder.integer(0, steps - len(containing))
        slots = list(range(first, first + len(containing)))
    else:
        slots = builder.subset(steps, len(containing), len(containing)) if containing else []
    forced = dict(zip(slots, containing, strict=True))
    for step in range(steps):
        if step in forced:
            builder.recipe(forced[step])
        else:
            builder.random_step(kinds)
        builder.inject_patterns()
    outputs = builder.finish(draw(st.integers(1, 3)))
    return builder.model(outputs)


def models(
    *,
    min_ops: int = 1,
    max_ops: int = 12,
    ops: Sequence[str] | None = None,
    containing: Sequence[str] = (),
    opset: int | None = None,
    dynamic: bool = True,
) -> st.SearchStrategy[onnx.ModelProto]:
    """Draw small random ONNX models that are valid and run in onnxruntime by construction.

    Every model passes `onnx.checker.check_model(m, full_check=True)`, strict shape inference
    with data propagation, and runs on onnxruntime's CPU provider with `random_feeds(m)` (with
    any `dim_value` >= 1) to finite outputs. Names are deterministic (`x0` inputs, `t0` tensors,
    `c0` initializers, `n0_Relu` nodes), so one draw always serializes to the same bytes.
    The graphs deliberately contain work for an optimizer: no-ops, duplicated nodes, foldable
    constant subgraphs, dead nodes, intermediates that are also outputs, and shape subgraphs.

    Args:
        min_ops: The fewest recipe steps. A step emits one node of its op kind plus the helper
            nodes that keep it valid (for example `Abs` and `Add` before `Log`).
        max_ops: The most recipe steps (`containing` may add more).
        ops: The op kinds random steps draw from (default: all of `OP_NAMES`). Helper nodes,
            adaptors that reshape a tensor for an op and the final merging `Add`/`ReduceMean`
            may still use other kinds.
        containing: Op kinds that every model contains at least once, emitted in this order;
            they are often emitted back to back, each consuming the previous result (so
            `("Conv", "BatchNormalization")` usually yields a Conv feeding a BatchNormalization).
        opset: The default-domain opset, 13 to 21; None draws one (at least 17 when
            `containing` names LayerNormalization).
        dynamic: Whether inputs may use the symbolic dims "N" (batch) and "S" (sequence).

    Returns:
        A strategy of `onnx.ModelProto`.

    Raises:
        ValueError: For unknown op names, an impossible opset, or bad step bounds.
    """
    unknown = sorted((set(ops or ()) | set(containing)) - set(OP_NAMES))
    if unknown:
        raise ValueError(
            f"unknown op kinds {unknown}; choose from dsopt.testing.strategies.OP_NAMES"
        )
    if ops is not None and not ops and not containing:
        raise ValueError("ops=() leaves nothing to draw")
    if not 0 <= min_ops <= max_ops:
        raise ValueError(f"need 0 <= min_ops <= max_ops, got {min_ops} and {max_ops}")
    if opset is not None:
        if not _MIN_OPSET <= opset <= _MAX_OPSET:
            raise ValueError(f"opset {opset} is outside {_MIN_OPSET}..{_MAX_OPSET}")
        too_new = [op for op in containing if _OP_MIN_OPSET.get(op, _MIN_OPSET) > opset]
        if too_new:
            raise ValueError(f"{too_new} need a newer opset than {opset}")
        if ops and not containing and all(_OP_MIN_OPSET.get(op, 0) > opset for op in ops):
            raise ValueError(f"none of {sorted(ops)} exists at opset {opset}")
    return _draw_model(
        min_ops, max_ops, None if ops is None else tuple(ops), tuple(containing), opset, dynamic
    )


def random_feeds(
    model: onnx.ModelProto, seed: int = 0, dim_value: int = 2
) -> dict[str, np.ndarray]:
    """Random inputs for every graph input of `model`, reproducible from `seed`.

    Every symbolic or unknown dim becomes `dim_value`. Floats are standard normal, integers are
    drawn from [0, 3) (valid gather indices for the models `models` draws) and booleans are fair
    coin flips.

    Args:
        model: The model whose graph inputs to feed.
        seed: Seed of the numpy generator.
        dim_value: The size given to every dim without a static value.

    Returns:
        A feed dict for `onnxruntime.InferenceSession.run`.

    Raises:
        ValueError: If an input is not a tensor of a numeric or boolean type.
    """
    rng = np.random.default_rng(seed)
    initializers = {tensor.name for tensor in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        if graph_input.type.WhichOneof("value") != "tensor_type":
            raise ValueError(f"input {graph_input.name!r} is not a tensor")
        tensor_type = graph_input.type.tensor_type
        shape = [
            dim.dim_value if dim.WhichOneof("value") == "dim_value" else dim_value
            for dim in tensor_type.shape.dim
        ]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype == np.bool_:
            array = np.asarray(rng.random(shape) < 0.5)
        elif np.issubdtype(dtype, np.floating):
            array = np.asarray(rng.standard_normal(shape)).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            array = np.asarray(rng.integers(0, 3, size=shape)).astype(dtype)
        else:
            raise ValueError(f"input {graph_input.name!r} has unsupported type {dtype}")
        feeds[graph_input.name] = array
    return feeds


# ---------------------------------------------------------------------------------------------
# QDQ models: `models` draws with QuantizeLinear -> DequantizeLinear pairs inserted.

#: Ops whose output holds only values of their data inputs, so equal QDQ parameters fit both.
_QDQ_LAYOUT_OPS = frozenset(
    ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Slice", "Concat")
    + ("Gather", "Identity")
)
#: Ops `qdq_models` sometimes quantizes whole (float operands and result), as a static
#: quantizer writes a QDQ island.
_QDQ_ISLAND_OPS = frozenset(("Conv", "MatMul", "Gemm", "Add", "Mul"))
_QDQ_WEIGHT_OPS = frozenset(("Conv", "MatMul", "Gemm"))
_QDQ_MIN_SCALE = 1e-8
_QDQ_KINDS = ("uint8", "int8-symmetric", "int8")
#: int8 weights use 7 bits (onnxruntime's `reduce_range`), so that the u8s8 kernels of CPUs
#: without VNNI cannot saturate their 16-bit pair sums.
_QDQ_WEIGHT_LIMIT = 63


@dataclasses.dataclass(frozen=True)
class _QdqParams:
    """The parameters of one quantized tensor: per tensor (`axis` None) or along `axis`."""

    dtype: type[np.integer[Any]]
    scale: np.ndarray  # float32, 0-D or 1-D
    zero_point: np.ndarray  # of `dtype`, shaped like `scale`
    axis: int | None = None


def _qdq_broadcast(array: np.ndarray, params: _QdqParams, rank: int) -> np.ndarray:
    if params.axis is None:
        return array
    shape = [1] * rank
    shape[params.axis] = -1
    return array.reshape(shape)


def _qdq_quantize(values: np.ndarray, params: _QdqParams) -> np.ndarray:
    """`QuantizeLinear` as onnxruntime computes it: x / scale in float32, half to even, clip."""
    scale = _qdq_broadcast(params.scale, params, values.ndim)
    zero = _qdq_broadcast(params.zero_point.astype(np.float64), params, values.ndim)
    info = np.iinfo(params.dtype)
    quotient = np.rint(np.asarray(values, np.float32) / scale).astype(np.float64)
    return np.clip(quotient + zero, info.min, info.max).astype(params.dtype)


def _qdq_range(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor (1-element) or per-slice-along-`axis` bounds, widened to include 0."""
    if axis is None:
        rows = values.reshape(1, -1)
    else:
        rows = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    low = np.minimum(rows.min(axis=1).astype(np.float64), 0.0)
    high = np.maximum(rows.max(axis=1).astype(np.float64), 0.0)
    return low, high


def _qdq_params(
    low: np.ndarray, high: np.ndarray, kind: str, axis: int | None, limit: int = 127
) -> _QdqParams:
    """`uint8`/`int8` asymmetric or `int8-symmetric` (|q| <= limit) parameters for a range."""
    if kind == "int8-symmetric":
        largest = np.maximum(-low, high)
        scale = np.where(largest > 0, largest, 1.0) / limit
        zero = np.zeros(scale.shape)
    else:
        span = high - low
        scale = np.where(span > 0, span, 1.0) / 255
        zero = np.rint(-low / scale) + (0 if kind == "uint8" else -128)
    dtype = np.uint8 if kind == "uint8" else np.int8
    info = np.iinfo(dtype)
    scale = np.maximum(scale, _QDQ_MIN_SCALE).astype(np.float32)
    zero = np.clip(zero, info.min, info.max).astype(dtype)
    if axis is None:
        return _QdqParams(dtype, scale.reshape(()), zero.reshape(()))
    return _QdqParams(dtype, scale, zero, axis)


def _qdq_observe(model: onnx.ModelProto, float_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values of `float_names` (and the float feeds) on `random_feeds(model)`."""
    import onnxruntime as ort

    feeds = random_feeds(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    exposed = {o.name for o in probe.graph.output} | set(feeds)
    for name in float_names:
        if name not in exposed:
            probe.graph.output.append(helper.make_tensor_value_info(name, _FLOAT, None))
            exposed.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds), strict=True))
    values.update((name, value) for name, value in feeds.items() if value.dtype == np.float32)
    return values


class _QdqDrawer:
    """Inserts Q -> DQ pairs into one drawn model, with parameters from its observed ranges."""

    def __init__(
        self, draw: st.DrawFn, model: onnx.ModelProto, per_axis: bool, max_abs: float | None
    ) -> None:
        self._draw = draw
        self.model = model
        self.graph = model.graph
        self.per_axis = per_axis
        self.max_abs = max_abs
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        self.dims: dict[str, list[int | None]] = {}
        floats: list[str] = []
        for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tensor_type = info.type.tensor_type
            self.dims[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            ]
            if tensor_type.elem_type == _FLOAT:
                floats.append(info.name)
        self.initializers = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.values = _qdq_observe(model, [n for n in floats if n not in self.initializers])
        self.params: dict[str, _QdqParams] = {}
        self.weights: dict[str, tuple[_QdqParams, bool]] = {}  # name: params, stored as int
        self.biases: dict[str, _QdqParams] = {}
        self.redundant: set[str] = set()
        self.initializer_protos: list[onnx.TensorProto] = []
        self.kind = self.choice(_QDQ_KINDS)  # most activations share one scheme, as in exports

    # -- drawing ---------------------------------------------------------------------------
    def chance(self, percent: int) -> bool:
        return int(self._draw(_integers(0, 99))) >= 100 - percent

    def choice(self, options: Sequence[_T]) -> _T:
        return options[int(self._draw(_integers(0, len(options) - 1)))]

    # -- choosing --------------------------------------------------------------------------
    def is_activation(self, name: str) -> bool:
        """A float32 tensor computed at run time (or fed) with finite observed values."""
        value = self.values.get(name)
        if value is None or name in self.initializers or value.dtype != np.float32:
            return False
        if not value.size or not np.isfinite(value).all():
            return False
        return self.max_abs is None or float(np.abs(value).max()) <= self.max_abs

    def activation_params(self, values: np.ndarray, name: str | None = None) -> _QdqParams:
        """Parameters covering `values`: per tensor, or (for tensor `name`) sometimes per axis."""
        axis = None
        if name is not None and self.per_axis and self.chance(20):
            dims = self.dims.get(name, [])
            axes = [i for i, d in enumerate(dims) if d is not None and 2 <= d <= 64]
            if len(dims) >= 2 and axes:
                axis = self.choice(axes)
        low, high = _qdq_range(values, axis)
        headroom = self.choice((1.0, 1.1, 1.5))
        kind = self.kind if self.chance(75) else self.choice(_QDQ_KINDS)
        return _qdq_params(low * headroom, high * headroom, kind, axis)

    def plan(self) -> None:
        """Chooses which tensors get Q -> DQ pairs, and their parameters."""
        nodes = list(self.graph.node)
        for node in nodes:  # equal parameters on both sides of layout ops
            if node.op_type in _QDQ_LAYOUT_OPS and node.output and self.chance(50):
                self._plan_layout(node)
        for node in nodes:  # whole islands around compute ops
            if node.op_type in _QDQ_ISLAND_OPS and self.chance(50):
                self._plan_island(node)
        for node in nodes:  # single tensors, and float weights alone (the QAT export pattern)
            for name in node.output:
                if name not in self.params and self.is_activation(name) and self.chance(20):
                    self.params[name] = self.activation_params(self.values[name], name)
            if node.op_type in _QDQ_WEIGHT_OPS and self.chance(25):
                self._plan_weight(node)
        for graph_input in self.graph.input:
            name = graph_input.name
            if name not in self.params and self.is_activation(name) and self.chance(20):
                self.params[name] = self.activation_params(self.values[name], name)
        self.redundant = {name for name in self.params if self.chance(15)}

    def _plan_layout(self, node: onnx.NodeProto) -> None:
        data = list(node.input) if node.op_type == "Concat" else list(node.input[:1])
        tensors = [*data, node.output[0]]
        if not all(self.is_activation(name) for name in tensors):
            return
        chosen = {id(self.params[n]): self.params[n] for n in tensors if n in self.params}
        if len(chosen) > 1:
            return
        if chosen:
            (params,) = chosen.values()
            if params.axis is not None:
                return
        else:
            joined = np.concatenate([self.values[name].reshape(-1) for name in tensors])
            params = self.activation_params(joined)
        for name in tensors:
            self.params.setdefault(name, params)

    def _plan_island(self, node: onnx.NodeProto) -> None:
        operands = list(node.input[:2])
        if not all(self.is_activation(n) or n in self.initializers for n in operands):
            return
        if not self.is_activation(node.output[0]):
            return
        outputs = [node.output[0]]
        if node.op_type in _QDQ_WEIGHT_OPS and self.chance(25):
            outputs = []  # a float result, as weight-and-input-only quantization leaves it
        for name in [*operands, *outputs]:
            if self.is_activation(name) and name not in self.params:
                self.params[name] = self.activation_params(self.values[name])
        if node.op_type in _QDQ_WEIGHT_OPS:
            self._plan_weight(node)
        else:  # a constant operand of Add/Mul, quantized like an activation
            for name in operands:
                constant = self.initializers.get(name)
                if constant is not None and constant.dtype == np.float32 and constant.size:
                    if name not in self.weights and np.isfinite(constant).all():
                        kind = self.kind if self.chance(75) else self.choice(_QDQ_KINDS)
                        params = _qdq_params(*_qdq_range(constant, None), kind, None)
                        self.weights[name] = (params, self.chance(50))
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[0] in self.params:
            self._plan_bias(node)

    def _plan_weight(self, node: onnx.NodeProto) -> None:
        name = node.input[1]
        weight = self.initializers.get(name)
        if weight is None or weight.dtype != np.float32 or name in self.weights:
            return
        if weight.ndim < 2 or not np.isfinite(weight).all():
            return
        axis = None
        if self.per_axis and self.chance(50):
            if node.op_type == "Conv":
                axis = 0
            elif node.op_type == "Gemm":
                axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
            elif weight.ndim == 2:
                axis = 1
        low, high = _qdq_range(weight, axis)
        if axis is not None or self.chance(70):  # per channel: symmetric, as exporters do
            params = _qdq_params(low, high, "int8-symmetric", axis, _QDQ_WEIGHT_LIMIT)
        else:
            params = _qdq_params(low, high, "uint8", axis)
        self.weights[name] = (params, self.chance(50))

    def _plan_bias(self, node: onnx.NodeProto) -> None:
        bias_name, weight_name = node.input[2], node.input[1]
        bias = self.initializers.get(bias_name)
        activation = self.params[node.input[0]]
        if bias is None or weight_name not in self.weights or activation.axis is not None:
            return
        if bias_name in self.biases or bias.ndim != 1 or not self.chance(60):
            return
        weight, _ = self.weights[weight_name]
        scale = (np.float32(activation.scale) * weight.scale).astype(np.float32)
        axis = 0 if scale.ndim else None
        self.biases[bias_name] = _QdqParams(np.int32, scale, np.zeros(scale.shape, np.int32), axis)

    # -- building --------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        """The model with the planned pairs, weights and biases inserted."""
        self.initializer_protos = list(self.graph.initializer)
        head: list[onnx.NodeProto] = []
        renamed: dict[str, str] = {}
        for graph_input in self.graph.input:
            name = graph_input.name
            if name in self.params:
                params = self.params[name]
                redundant = name in self.redundant
                renamed[name] = self._pair(head, name, f"{name}_dq", params, redundant)
        for name, (params, stored) in self.weights.items():
            if stored:  # a static-quantization export: the integer weight behind a DQ
                quantized = self._initializer(
                    f"{name}_quantized", _qdq_quantize(self.initializers[name], params)
                )
                renamed[name] = self._dequantize(head, quantized, f"{name}_dq", params)
            else:
                renamed[name] = self._pair(head, name, f"{name}_dq", params, False)
        for name, params in self.biases.items():
            info = np.iinfo(np.int32)
            bias = self.initializers[name].astype(np.float64) / params.scale.astype(np.float64)
            quantized = np.clip(np.rint(bias), info.min, info.max).astype(np.int32)
            stored_name = self._initializer(f"{name}_quantized", quantized)
            renamed[name] = self._dequantize(head, stored_name, f"{name}_dq", params)
        body: list[onnx.NodeProto] = []
        for node in self.graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for i, name in enumerate(copy.input):
                copy.input[i] = renamed.get(name, name)
            tail: list[onnx.NodeProto] = []
            for i, name in enumerate(copy.output):
                if name in self.params:
                    copy.output[i] = f"{name}_float"
                    params, redundant = self.params[name], name in self.redundant
                    self._pair(tail, f"{name}_float", name, params, redundant)
            body += [copy, *tail]
        nodes = head + body
        used = {name for node in nodes for name in node.input}
        graph = helper.make_graph(
            nodes,
            self.graph.name,
            list(self.graph.input),
            list(self.graph.output),
            [t for t in self.initializer_protos if t.name in used],
        )
        return helper.make_model(
            graph,
            opset_imports=list(self.model.opset_import),
            ir_version=self.model.ir_version,
            producer_name=self.model.producer_name,
        )

    def _initializer(self, name: str, array: np.ndarray) -> str:
        self.initializer_protos.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def _parameters(self, sink: list[onnx.NodeProto], base: str, params: _QdqParams) -> list[str]:
        """Scale and zero-point tensors (the zero point of uint8 zeros sometimes left out)."""
        arrays = [("scale", params.scale), ("zero_point", params.zero_point)]
        if params.dtype in (np.uint8, np.int32) and not params.zero_point.any() and self.chance(30):
            arrays.pop()
        names = []
        for suffix, array in arrays:
            name = f"{base}_{suffix}"
            if self.chance(10):
                value = numpy_helper.from_array(np.asarray(array))
                sink.append(helper.make_node("Constant", [], [name], name=f"{name}_c", value=value))
            else:
                self._initializer(name, array)
            names.append(name)
        return names

    def _node(
        self, sink: list[onnx.NodeProto], op: str, inputs: list[str], out: str, params: _QdqParams
    ) -> str:
        attrs = {} if params.axis is None else {"axis": params.axis}
        sink.append(helper.make_node(op, inputs, [out], name=f"{out}_{op}", **attrs))
        return out

    def _dequantize(
        self, sink: list[onnx.NodeProto], source: str, out: str, params: _QdqParams
    ) -> str:
        inputs = [source, *self._parameters(sink, out, params)]
        return self._node(sink, "DequantizeLinear", inputs, out, params)

    def _pair(
        self,
        sink: list[onnx.NodeProto],
        source: str,
        out: str,
        params: _QdqParams,
        redundant: bool,
    ) -> str:
        """Writes `source -> Q -> DQ -> out` into `sink`; returns `out`.

        With `redundant`, a DQ -> Q of the same parameters sits in between. The last DQ reads
        the Q's own scale and zero-point tensors, or (sometimes) equal copies.
        """
        shared = self._parameters(sink, f"{out}_q", params)
        quantized = self._node(sink, "QuantizeLinear", [source, *shared], f"{out}_q", params)
        if redundant:
            middle = self._node(sink, "DequantizeLinear", [quantized, *shared], f"{out}_r", params)
            again = [middle, *self._parameters(sink, f"{out}_r_q", params)]
            quantized = self._node(sink, "QuantizeLinear", again, f"{out}_r_q", params)
        inputs = shared if self.chance(60) else self._parameters(sink, out, params)
        return self._node(sink, "DequantizeLinear", [quantized, *inputs], out, params)


@st.composite
def _draw_qdq_model(
    draw: st.DrawFn,
    base: st.SearchStrategy[onnx.ModelProto],
    per_axis: bool,
    max_abs: float | None,
) -> onnx.ModelProto:
    drawer = _QdqDrawer(draw, draw(base), per_axis, max_abs)
    drawer.plan()
    return drawer.build()


def qdq_models(
    *, per_axis: bool = True, max_abs: float | None = None, **model_options: Any
) -> st.SearchStrategy[onnx.ModelProto]:
    """Draw `models(...)` graphs with QuantizeLinear -> DequantizeLinear pairs inserted.

    A model is drawn from `models(**model_options)` (opset 13 or newer, so Q and DQ have
    `axis`), run once in onnxruntime on `random_feeds(model)`, and Q -> DQ pairs are placed
    with parameters from the observed ranges (widened to include 0, sometimes with 10% or
    50% headroom), so the values on those feeds are not saturated:

    - around layout ops (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, MaxPool, Slice,
      Concat, Gather, Identity): the data inputs and the output get equal per-tensor
      parameters;
    - around compute ops (Conv, MatMul, Gemm, Add, Mul), as a static quantizer writes an
      island: every float operand and the result (a Conv/MatMul/Gemm result sometimes left
      float, as weight-and-input-only quantization does); the constant weight as below, and
      a Conv's float bias sometimes as an int32 constant behind a DQ of scale
      `x_scale * w_scale`;
    - on a random subset of the other float32 activations (node outputs and graph inputs);
    - on constant float weights of Conv/MatMul/Gemm: either `Q -> DQ` on the float
      initializer (the QAT export pattern) or the integer initializer behind a DQ (a static
      export). Weights are int8 symmetric in 7 bits (onnxruntime's `reduce_range`, so that
      u8s8 kernels cannot saturate on CPUs without VNNI) or uint8 asymmetric per tensor;
      per axis (output channel, or column) they are int8 symmetric.

    Activations are uint8 asymmetric, int8 symmetric or int8 asymmetric (most of one model's
    activations share one of these, as an exporter's do); per tensor, or per axis along a
    static dim of 2 to 64 (when `per_axis`). Sometimes a pair carries a redundant
    DQ -> Q with identical parameters in between (DQ -> Q -> DQ chains), a DQ reads its Q's
    own scale and zero-point tensors (else equal copies), a parameter is a `Constant` node,
    or a uint8/int32 zero point of 0 is left out. A quantized node output keeps its name (the
    producer writes `<name>_float`), so graph outputs keep their names and float32 type.

    Every model passes `onnx.checker.check_model(m, full_check=True)` and strict shape
    inference, and runs in onnxruntime's CPU provider with `random_feeds(m)` (graph
    optimizations off: onnxruntime 1.32's optimizer rejects a few valid opset-21 int8 graphs,
    onnxruntime#25526). Names are deterministic, so one draw always serializes to the same
    bytes.

    Args:
        per_axis: Whether per-axis activation and weight parameters may be drawn.
        max_abs: Quantize only activations whose observed magnitude stays within this (None:
            any finite range); bounds the size of one quantization step.
        **model_options: Passed to `models` (`min_ops`, `max_ops`, `ops`, `containing`,
            `opset`, `dynamic`).

    Returns:
        A strategy of `onnx.ModelProto`.

    Raises:
        ValueError: For options `models` rejects, or a negative `max_abs`.
    """
    if max_abs is not None and not max_abs >= 0:
        raise ValueError(f"max_abs must be a non-negative number or None, got {max_abs}")
    return _draw_qdq_model(models(**model_options), per_axis, max_abs)


__all__ += ["qdq_models"]
