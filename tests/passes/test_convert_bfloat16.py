from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import given, settings
from onnx import TensorProto, helper, numpy_helper

from dsopt import numerics
from dsopt.bfloat16 import emulate, needs_emulation
from dsopt.cli import main
from dsopt.errors import UsageError
from dsopt.mixed.sensitivity import _OnlyFloat16
from dsopt.pass_infra import verify_model
from dsopt.passes.convert_float16 import BF16_BLOCK_OPS, DEFAULT_BLOCK_OPS, ConvertFloat16
from dsopt.precision import precision_passes
from dsopt.testing import PROPERTY_EXAMPLES, apply_pass, op_types, strategies
from dsopt.testing.strategies import random_feeds

BF16 = ConvertFloat16(dtype="bfloat16")
TOL = BF16.tolerance
#: As in test_convert_float16: no bound holds through ops that jump at a threshold.
CONTINUOUS_OPS = [
    op for op in strategies.OP_NAMES if op not in {"Round", "Greater", "Less", "Equal", "Where"}
]


def parse(text: str, opset: int = 17) -> onnx.ModelProto:
    return onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even at bfloat16, back in float32."""
    return np.asarray(values, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_bfloat16_declares_its_own_bound_and_block_list():
    assert ConvertFloat16.tolerance == 1e-2  # the class keeps float16's metadata
    assert ConvertFloat16().tolerance == 1e-2
    assert 1e-2 < TOL <= 1e-1
    assert {"ReduceSum", "ReduceMean", "GlobalAveragePool", "InstanceNormalization"} <= set(
        BF16_BLOCK_OPS
    )
    assert not {"Exp", "Pow", "Softplus", "Mish"} & set(BF16_BLOCK_OPS)  # float32's range
    assert {"Exp", "Pow"} <= set(DEFAULT_BLOCK_OPS)
    assert BF16.range_limit == float("inf")
    with pytest.raises(UsageError, match="dtype"):
        apply_pass(
            ConvertFloat16(dtype="float8"), parse("g (float[2] x) => (float[2] y) {y = Relu (x)}")
        )


def test_exponents_run_in_bf16_reductions_and_old_conv_stay_float32():
    text = """
    g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 1, 1, 1] s)
      <float[2, 2, 1, 1] w = {1.0, 0.5, -0.5, 2.0}> {
      c = Conv (x, w)
      e = Exp (c)
      y = Relu (e)
      s = ReduceSum (y)
    }"""
    old, stats = apply_pass(BF16, parse(text, 17))
    inferred = onnx.shape_inference.infer_shapes(old).graph.value_info
    types = {v.name: v.type.tensor_type.elem_type for v in inferred}
    assert initializer_types(old) == {"w": TensorProto.FLOAT}  # Conv-11 has no bfloat16
    assert types.get("e") == TensorProto.BFLOAT16
    reduce = next(n for n in old.graph.node if n.op_type == "ReduceSum")
    assert types.get(reduce.input[0], TensorProto.FLOAT) == TensorProto.FLOAT
    assert stats.stats["blocked"] == 1
    for pass_ in (BF16, ConvertFloat16(dtype="bfloat16", weights_only=True)):
        _, below = apply_pass(pass_, parse(text, 12))  # Cast-6 has no bfloat16
        assert not below.changed and below.stats["opset-too-old"] == 1
    new, _ = apply_pass(BF16, parse(text, 22))
    assert initializer_types(new) == {"w": TensorProto.BFLOAT16}  # Conv-22 admits it
    assert verify_model(new) is None


def _matmul_add(x_scale: float = 8.0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x -> bf16 -> MatMul(w) -> Add(b) -> float; values on a grid products and sums hit
    exactly in float32 but not at 8 bits, so every rounding shows."""
    rng = np.random.default_rng(0)
    w = (rng.integers(-64, 64, (8, 5)) / 16).astype(ml_dtypes.bfloat16)
    b = (rng.integers(-64, 64, (5,)) / 32).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
            helper.make_node("MatMul", ["xb", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["yb"]),
            helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, w.astype(np.float32), b.astype(np.float32)


def test_emulate_rounds_after_each_op_bit_for_bit():
    model, w, b = _matmul_add()
    x = (np.random.default_rng(1).integers(-64, 64, (4, 8)) / 8).astype(np.float32)
    assert needs_emulation(model)
    twin = emulate(model)
    onnx.checker.check_model(twin, full_check=True)
    assert not needs_emulation(twin)
    product = bf16(x) @ w
    assert np.any(bf16(product) != product)  # the rounding is visible
    expected = bf16(bf16(product) + b)
    got = numerics.run_model(model, {"x": x}, label="candidate")["y"]
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    # optimize=True still keeps the rounding Casts
    again = numerics.run_model(model, {"x": x}, label="candidate", optimize=True)["y"]
    np.testing.assert_array_equal(again.view(np.uint32), expected.view(np.uint32))
    with numerics._Session(model, label="candidate") as session:
        assert session.label == "candidate model (bf16 emulated)"


def test_emulate_keeps_declared_bf16_interface():
    model = parse("""
    g (bfloat16[3] x) => (bfloat16[3] y) {
      t = Mul (x, x)
      y = Add (t, x)
    }""")
    twin = emulate(model)
    onnx.checker.check_model(twin, full_check=True)
    assert [i.type.tensor_type.elem_type for i in twin.graph.input] == [TensorProto.BFLOAT16]
    assert [o.type.tensor_type.elem_type for o in twin.graph.output] == [TensorProto.BFLOAT16]
    assert op_types(twin.graph)[0] == "Cast" and op_types(twin.graph)[-1] == "Cast"


def test_float_models_and_cast_round_trips_need_no_emulation():
    assert not needs_emulation(parse("g (float[2] x) => (float[2] y) {y = Relu (x)}"))
    round_trip = parse("""
    g (float[2] x) => (float[2] y) {
      h = Cast <to = 16> (x)
      y = Cast <to = 1> (h)
    }""")
    assert not needs_emulation(round_trip)


@given(model=strategies.models(ops=CONTINUOUS_OPS))
@settings(max_examples=max(PROPERTY_EXAMPLES // 4, 10))
def test_property(model):
    """Valid, idempotent, float32 interface kept, within 1e-1 * (1 + |y|) through the
    emulation, and no inf/NaN where float32 has none."""
    rewritten, _ = apply_pass(BF16, model)
    assert verify_model(rewritten) is None
    _, again = apply_pass(BF16, rewritten)
    assert not again.changed, again.stats
    feeds = random_feeds(model)
    report = numerics.check_equivalence(model, rewritten, inputs=[feeds], rtol=TOL, atol=TOL)
    assert report.ok, report.to_dict()
    reference = numerics.run_model(model, feeds, label="fp32")
    got = numerics.run_model(rewritten, feeds, label="bf16")
    for name, value in reference.items():
        if np.asarray(value).dtype.kind == "f":
            finite = np.isfinite(value)
            assert np.isfinite(np.asarray(got[name])[finite]).all(), name


def _weights_model() -> onnx.ModelProto:
    """MatMul, Gemm (with bias), Conv and Gather weights, a shared bias, a scalar."""
    rng = np.random.default_rng(3)

    def init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="gather"),  # [2, 16]
        helper.make_node("MatMul", ["e", "w0"], ["m"], name="mm0"),  # [2, 32]
        helper.make_node("Gemm", ["m", "w1", "b1"], ["g"], name="gemm"),  # [2, 16]
        helper.make_node("Mul", ["g", "scale"], ["s"], name="mul"),
        helper.make_node("Reshape", ["s", "shape"], ["r"], name="reshape"),  # [2, 1, 4, 4]
        helper.make_node("Conv", ["r", "k"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [
        init("table", (10, 16)), init("w0", (16, 32)), init("w1", (32, 16)), init("b1", (16,)),
        init("k", (3, 1, 3, 3)), numpy_helper.from_array(np.float32(0.5), "scale"),
        numpy_helper.from_array(np.array([2, 1, 4, 4], np.int64), "shape"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "weights",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _rounded(model: onnx.ModelProto, names: set[str], dtype: type) -> onnx.ModelProto:
    """`model` with the named initializers rounded to `dtype` (kept float32)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if tensor.name in names:
            values = numpy_helper.to_array(tensor).astype(dtype).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return copy


def _float_bytes(model: onnx.ModelProto) -> int:
    kinds = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_type in kinds)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_weights_only_is_the_rounding_of_the_weights(dtype):
    model = _weights_model()
    rewritten, result = apply_pass(ConvertFloat16(dtype=dtype, weights_only=True), model)
    assert verify_model(rewritten) is None
    low = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16
    stored = {t.name.rsplit("_", 1)[0] for t in rewritten.graph.initializer if t.data_type == low}
    assert stored == {"table", "w0", "w1", "b1", "k"}  # the scalar stays float32
    assert op_types(rewritten.graph).count("Cast") == 5
    assert result.stats["bytes-after"] * 2 == result.stats["bytes-before"]
    assert _float_bytes(rewritten) == _float_bytes(model) - result.stats["bytes-after"]
    compute = {n.op_type for n in rewritten.graph.node} - {"Cast"}
    assert all(
        v.type.tensor_type.elem_type != low for v in rewritten.graph.value_info
    ) and compute == {"Gather", "MatMul", "Gemm", "Mul", "Reshape", "Conv"}
    numpy_type = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    reference = _rounded(model, stored, numpy_type)
    feeds = {"ids": np.array([3, 7], np.int64)}
    want = numerics.run_model(reference, feeds, label="rounded")["y"]
    got = numerics.run_model(rewritten, feeds, label="weights-only")["y"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    plain = numerics.run_model(model, feeds, label="fp32")["y"]
    assert not np.array_equal(plain, got)  # the rounding is there
    _, again = apply_pass(ConvertFloat16(dtype=dtype, weights_only=True), rewritten)
    assert not again.changed


@given(model=strategies.models(ops=CONTINUOUS_OPS))
@settings(max_examples=max(PROPERTY_EXAMPLES // 8, 10))
def test_weights_only_property(model):
    """On random graphs: exactly float32 compute on fp16-rounded initializers."""
    rewritten, result = apply_pass(ConvertFloat16(weights_only=True), model)
    assert verify_model(rewritten) is None
    stored = {
        t.name.rsplit("_", 1)[0]
        for t in rewritten.graph.initializer
        if t.data_type == TensorProto.FLOAT16
    }
    assert len(stored) == int(result.stats["weights"])
    feeds = random_feeds(model)
    report = numerics.check_equivalence(
        _rounded(model, stored, np.float16), rewritten, inputs=[feeds], rtol=1e-5, atol=1e-6
    )
    assert report.ok, report.to_dict()


def test_weights_only_respects_only_and_fp16_range():
    model = _weights_model()
    rewritten, _ = apply_pass(_OnlyFloat16(only="mm0", weights_only=True), model)
    assert {t.name for t in rewritten.graph.initializer if t.data_type != TensorProto.FLOAT} == {
        "w0_fp16",
        "shape",
    }
    big = onnx.ModelProto()
    big.CopyFrom(model)
    w0 = next(t for t in big.graph.initializer if t.name == "w0")
    w0.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w0) * 1e5, "w0"))
    _, result = apply_pass(ConvertFloat16(weights_only=True), big)
    assert result.stats["out-of-range"] == 1 and result.stats["weights"] == 4
    _, result = apply_pass(ConvertFloat16(dtype="bfloat16", weights_only=True), big)
    assert result.stats["weights"] == 5  # float32's range


def test_cli_precision_bf16_round_trip(tmp_path):
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    model = parse("""
    g (float[4, 16] x) => (float[4, 8] y) {
      h = MatMul (x, w0)
      r = Relu (h)
      z = MatMul (r, w1)
      y = Softmax <axis = -1> (z)
    }""")
    rng = np.random.default_rng(0)
    for name, shape in (("w0", (16, 32)), ("w1", (32, 8))):
        values = (rng.standard_normal(shape) * 0.3).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(values, name))
    onnx.save(model, source)
    assert precision_passes("bf16", calibrated=False) == "convert-float16{dtype=bfloat16}"
    assert main(["optimize", str(source), "--precision", "bf16", "-o", str(out), "--check"]) == 0
    result = onnx.load(out)
    assert set(initializer_types(result).values()) == {TensorProto.BFLOAT16}
    assert needs_emulation(result)
    feeds = random_feeds(model)
    report = numerics.check_equivalence(model, result, inputs=[feeds], rtol=TOL, atol=TOL)
    assert report.ok and report.outputs[0].max_abs_error > 0
