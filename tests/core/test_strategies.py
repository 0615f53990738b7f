"""Tests for the shared random-model strategy in dsopt.testing.strategies."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from dsopt.testing.strategies import OP_NAMES, models, random_feeds

# Nodes `models(ops=...)` may add outside `ops`: taming Mul, merging Add/ReduceMean, Identity
# around an input that would be an output, Cast of unused int/bool inputs.
HELPER_OPS = {"Add", "Mul", "ReduceMean", "Identity", "Cast"}
MAX_ELEMENTS = 65536


def op_types(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def expected_dims(info: onnx.ValueInfoProto, dim_value: int) -> list[int | None]:
    dims: list[int | None] = []
    for dim in info.type.tensor_type.shape.dim:
        kind = dim.WhichOneof("value")
        dims.append(dim.dim_value if kind == "dim_value" else dim_value if kind else None)
    return dims


def assert_valid(model: onnx.ModelProto) -> None:
    """Checker, strict shape inference, and finite onnxruntime outputs for several dim values."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    assert op_types(model) <= set(OP_NAMES)
    assert 1 <= len(model.graph.input) <= 3
    assert 1 <= len(model.graph.output) <= 3
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for dim_value in (2, 1, 3):
        results = session.run(None, random_feeds(model, dim_value=dim_value))
        for info, result in zip(model.graph.output, results, strict=True):
            expected = expected_dims(info, dim_value)
            assert len(expected) == result.ndim, info.name
            for want, got in zip(expected, result.shape, strict=True):
                assert want is None or want == got, (info.name, expected, result.shape)
            if dim_value == 2:
                assert result.size <= MAX_ELEMENTS
            if result.dtype.kind == "f":
                assert np.isfinite(result).all(), info.name


@settings(max_examples=300, deadline=None)
@given(models())
def test_models_are_valid_and_run_with_finite_outputs(model: onnx.ModelProto) -> None:
    assert_valid(model)


@pytest.mark.parametrize(
    "op",
    [
        "Reshape", "Shape", "Conv", "MatMul", "Gemm", "Cast", "Softmax", "LayerNormalization",
        "BatchNormalization", "Split", "Squeeze", "Where", "ConvTranspose", "Size",
    ],
)  # fmt: skip
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_containing_always_includes_the_op(op: str, data: st.DataObject) -> None:
    model = data.draw(models(containing=(op,)))
    assert op in op_types(model)
    assert_valid(model)


@settings(max_examples=20, deadline=None)
@given(models(containing=("Conv", "BatchNormalization", "Relu"), max_ops=4))
def test_containing_several_ops_includes_them_all(model: onnx.ModelProto) -> None:
    assert {"Conv", "BatchNormalization", "Relu"} <= op_types(model)
    assert_valid(model)


@settings(max_examples=30, deadline=None)
@given(models(ops=("Relu", "Sigmoid", "Add")))
def test_ops_restricts_the_kinds_drawn(model: onnx.ModelProto) -> None:
    assert op_types(model) <= {"Relu", "Sigmoid"} | HELPER_OPS
    assert op_types(model) & {"Relu", "Sigmoid", "Add"}
    assert_valid(model)


@settings(max_examples=40, deadline=None)
@given(models(dynamic=False))
def test_static_models_have_only_static_dims(model: onnx.ModelProto) -> None:
    for info in [*model.graph.input, *model.graph.output]:
        for dim in info.type.tensor_type.shape.dim:
            assert dim.WhichOneof("value") == "dim_value", info.name
    assert_valid(model)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_fixed_opset_is_used(opset: int, data: st.DataObject) -> None:
    model = data.draw(models(opset=opset))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    assert_valid(model)


def test_every_op_name_is_drawn_and_symbolic_dims_appear() -> None:
    counts: collections.Counter[str] = collections.Counter()
    symbolic = 0

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(models())
    def collect(model: onnx.ModelProto) -> None:
        nonlocal symbolic
        counts.update(op_types(model))
        dims = [d for i in model.graph.input for d in i.type.tensor_type.shape.dim]
        symbolic += any(d.dim_param for d in dims)

    collect()
    assert not set(OP_NAMES) - set(counts), sorted(set(OP_NAMES) - set(counts))
    assert symbolic > 30


def test_the_same_draws_give_byte_identical_models() -> None:
    def draw_all() -> list[bytes]:
        blobs: list[bytes] = []

        @settings(max_examples=40, deadline=None, derandomize=True, database=None)
        @given(models())
        def collect(model: onnx.ModelProto) -> None:
            blobs.append(model.SerializeToString())

        collect()
        return blobs

    first, second = draw_all(), draw_all()
    assert first == second
    assert len(set(first)) > 10


def test_names_are_deterministic_and_readable() -> None:
    @settings(max_examples=20, deadline=None, database=None)
    @given(models())
    def check(model: onnx.ModelProto) -> None:
        for index, node in enumerate(model.graph.node):
            assert node.name == f"n{index}_{node.op_type}"
        assert [i.name for i in model.graph.input] == [
            f"x{k}" for k in range(len(model.graph.input))
        ]

    check()


def test_random_feeds_fill_symbols_and_are_reproducible() -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["y"])],
        "feeds",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "S", 4]),
            helper.make_tensor_value_info("i", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.BOOL, [None, 2]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, [5]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])],
    )
    model = helper.make_model(graph)
    feeds = random_feeds(model, seed=3, dim_value=5)
    assert {k: v.shape for k, v in feeds.items()} == {
        "a": (5, 5, 4), "i": (5, 3), "b": (5, 2), "h": (5,),
    }  # fmt: skip
    assert {k: v.dtype for k, v in feeds.items()} == {
        "a": np.float32, "i": np.int64, "b": np.bool_, "h": np.float16,
    }  # fmt: skip
    assert feeds["i"].min() >= 0 and feeds["i"].max() < 3
    again = random_feeds(model, seed=3, dim_value=5)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)
    other = random_feeds(model, seed=4, dim_value=5)
    assert not np.array_equal(feeds["a"], other["a"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ops": ("NoSuchOp",)},
        {"containing": ("Relu", "Bogus")},
        {"min_ops": 5, "max_ops": 2},
        {"opset": 12},
        {"opset": 16, "containing": ("LayerNormalization",)},
        {"ops": ()},
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        models(**kwargs)  # type: ignore[arg-type]
