"""convert-float16's calibrated block list: ranges measured on calibration feeds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from dsopt import numerics
from dsopt.errors import UsageError
from dsopt.pass_infra import PassContext, verify_model
from dsopt.passes.convert_float16 import ConvertFloat16
from dsopt.quant.calibration import CalibrationData
from dsopt.testing import apply_pass, fired, op_types, strategies
from dsopt.testing.strategies import random_feeds

TOL = ConvertFloat16.tolerance
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(HEADER + text)


def calib(model: onnx.ModelProto, count: int = 4) -> CalibrationData:
    return CalibrationData.from_feeds([random_feeds(model, seed=i) for i in range(count)])


def calibrated(model: onnx.ModelProto, data: CalibrationData, **options):
    return apply_pass(ConvertFloat16(**options), model, ctx=PassContext(calibration=data))


def finite(outputs: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in outputs.values())


def run16(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs under the reference evaluator, whose numpy kernels compute float16 in float16.

    onnxruntime's CPU provider runs float16 ops without a float16 kernel in float32 and drops
    the Cast pairs between them, so an overflowing intermediate never reaches +-inf there;
    fp16 hardware (and numpy) round each op's result to float16.
    """
    names = [o.name for o in model.graph.output]
    with np.errstate(all="ignore"):
        values = ReferenceEvaluator(model).run(None, feeds)
    return dict(zip(names, values, strict=True))


def _blow_up(rows: int, width: int, scale: float, kind: str, tail: str) -> onnx.ModelProto:
    """x -> MatMul -> (Mul by `scale` -> MatMul | MatMul by a `scale`d weight) -> Mul 1/scale.

    The middle tensors exceed float16's range while input, first MatMul and tail fit.
    """
    rng = np.random.default_rng(width)
    w1 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype("f4")
    w2 = (3 * rng.standard_normal((width, width))).astype("f4")
    inits = [numpy_helper.from_array(w1, "w1")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="first")]
    if kind == "mul":
        inits += [
            numpy_helper.from_array(np.array([scale], "f4"), "s"),
            numpy_helper.from_array(w2, "w2"),
        ]
        nodes += [
            helper.make_node("Mul", ["a", "s"], ["b"], name="scale"),
            helper.make_node("MatMul", ["b", "w2"], ["c"], name="big"),
        ]
    else:
        inits.append(numpy_helper.from_array((w2 * scale).astype("f4"), "w2"))
        nodes.append(helper.make_node("MatMul", ["a", "w2"], ["c"], name="big"))
    inits.append(numpy_helper.from_array(np.array([1.0 / scale], "f4"), "r"))
    nodes.append(helper.make_node("Mul", ["c", "r"], ["d"], name="back"))
    nodes.append(helper.make_node(tail, ["d"], ["y"], name="tail"))
    graph = helper.make_graph(
        nodes,
        "blow_up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_mul_by_1e4_then_matmul_overflows_without_calibration_only():
    model = _blow_up(4, 8, 1e4, "mul", "Softsign")
    data = calib(model)
    feeds = random_feeds(model, seed=9)
    reference = numerics.run_model(model, feeds, label="fp32")
    assert finite(reference)
    static, _ = apply_pass(ConvertFloat16(), model)
    assert not finite(run16(static, feeds))  # the test can fail
    rewritten, result = calibrated(model, data)
    assert verify_model(rewritten) is None
    got = run16(rewritten, feeds)
    assert finite(got)
    np.testing.assert_allclose(got["y"], reference["y"], rtol=TOL, atol=TOL)
    stats = fired(result.stats)
    # first and tail run in fp16; the three nodes touching the 1e4..1e5 tensors stay float32.
    assert stats["nodes"] == 2 and stats["range-blocked"] == 3
    assert stats["calibration-samples"] == 4 and stats["range-limit"] == pytest.approx(4094)
    reasons = stats["range-blocked-nodes"]
    assert reasons.startswith("scale: output 'b' range 2.6")
    assert "back: input 'c' range" in reasons
    assert op_types(rewritten.graph).count("Cast") == 4  # x in, a up, d down, y out
    assert "big: output 'c' range" in reasons


@st.composite
def blow_up_models(draw):
    rows = draw(st.integers(1, 6))
    width = draw(st.sampled_from([4, 8, 16]))
    scale = 10 ** draw(st.floats(4.0, 6.0))
    kind = draw(st.sampled_from(["mul", "weight"]))
    tail = draw(st.sampled_from(["Identity", "Neg", "Abs", "Relu", "Softsign"]))
    return _blow_up(rows, width, scale, kind, tail)


@given(model=blow_up_models())
@settings(max_examples=12, deadline=None)
def test_property_calibrated_fp16_never_overflows_where_fp32_did_not(model):
    """Whatever the scale, shape and tail: finite, within 1e-2 * (1 + |y|); static overflows."""
    data = calib(model)
    feeds = random_feeds(model, seed=99)
    reference = numerics.run_model(model, feeds, label="fp32")
    assert finite(reference)
    static, _ = apply_pass(ConvertFloat16(), model)
    assume(not finite(run16(static, feeds)))
    rewritten, result = calibrated(model, data)
    assert verify_model(rewritten) is None
    got = run16(rewritten, feeds)
    assert finite(got), result.stats
    np.testing.assert_allclose(got["y"], reference["y"], rtol=TOL, atol=TOL)
    assert result.stats["range-blocked"] >= 2
    again, second = calibrated(rewritten, data)
    assert not second.changed, second.stats


CONTINUOUS_OPS = [
    op for op in strategies.OP_NAMES if op not in {"Round", "Greater", "Less", "Equal", "Where"}
]


@given(model=strategies.models(ops=CONTINUOUS_OPS, max_ops=8))
@settings(max_examples=15, deadline=None)
def test_property_calibration_keeps_random_graphs_valid_and_close(model):
    """On the shared random graphs calibrated blocking only adds float32: still within bound."""
    data = CalibrationData.from_feeds([random_feeds(model, seed=i) for i in range(2)])
    rewritten, result = calibrated(model, data)
    assert verify_model(rewritten) is None
    assert result.stats.get("calibration-samples") == 2 or not result.stats["nodes"]
    report = numerics.check_equivalence(
        model, rewritten, inputs=[random_feeds(model, seed=0)], rtol=TOL, atol=TOL
    )
    assert report.ok, report.to_dict()


def _chain(middle: str, constant: str) -> onnx.ModelProto:
    return parse(f"""
    g (float[2, 4] x) => (float[2, 4] y) <float[1] k = {{{constant}}}> {{
      t = Tanh (x)
      m = {middle} (t, k)
      y = Sigmoid (m)
    }}""")


@pytest.mark.parametrize(
    ("middle", "constant", "why"),
    [("Div", "1e5", "input 'k' range 1e+05 > 4094"), ("Add", "1e-9", "flushes to 0")],
)
def test_one_blocked_node_in_a_chain_gets_exactly_two_casts(middle, constant, why):
    model = _chain(middle, constant)
    rewritten, result = calibrated(model, calib(model), keep_io_types=False)
    assert op_types(rewritten.graph) == ["Tanh", "Cast", middle, "Cast", "Sigmoid"]
    assert fired(result.stats)["range-blocked"] == 1 and why in result.stats["range-blocked-nodes"]
    (k,) = rewritten.graph.initializer
    assert k.data_type == TensorProto.FLOAT  # read only by the float32 node: not converted
    feeds = {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)}
    reference = numerics.run_model(model, feeds, label="fp32")["y"]
    got = run16(rewritten, {"x": feeds["x"].astype(np.float16)})["y"]
    np.testing.assert_allclose(got, reference, rtol=TOL, atol=TOL)


def test_a_float32_island_of_two_nodes_still_needs_only_two_casts():
    model = parse("""
    g (float[2, 4] x) => (float[2, 4] y) <float[1] s = {1e5}, float[1] r = {1e-5}> {
      t = Tanh (x)
      b = Mul (t, s)
      m = Mul (b, r)
      y = Sigmoid (m)
    }""")
    rewritten, result = calibrated(model, calib(model), keep_io_types=False)
    assert op_types(rewritten.graph) == ["Tanh", "Cast", "Mul", "Mul", "Cast", "Sigmoid"]
    assert result.stats["range-blocked"] == 2


def test_tiny_values_that_fp16_flushes_keep_their_nodes_float32():
    """Mul by 1e-9 then by 1e9: fp16 makes the constant 0 and the output 0.5 everywhere."""
    model = parse("""
    g (float[2, 4] x) => (float[2, 4] y) <float[1] e = {1e-9}, float[1] g = {1e9}> {
      t = Tanh (x)
      m = Mul (t, e)
      b = Mul (m, g)
      y = Sigmoid (b)
    }""")
    feeds = {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)}
    reference = numerics.run_model(model, feeds, label="fp32")["y"]
    static, _ = apply_pass(ConvertFloat16(), model)  # e becomes 0, g 65504
    flushed = run16(static, feeds)["y"]
    assert np.abs(flushed - reference).max() > 0.1
    rewritten, result = calibrated(model, calib(model))
    got = run16(rewritten, feeds)["y"]
    np.testing.assert_allclose(got, reference, rtol=TOL, atol=TOL)
    assert result.stats["range-blocked"] == 2


def _reduction(op: str, scale: float, width: int = 64) -> onnx.ModelProto:
    # opset 17: ReduceSum takes its axes as an input, the other reductions as an attribute.
    axes = ("", ", a") if op == "ReduceSum" else (", axes = [1]", "")
    return parse(f"""
    g (float[2, {width}] x) => (float[2, 1] y) <float[1] s = {{{scale}}}, int64[1] a = {{1}}> {{
      t = Tanh (x)
      v = Mul (t, s)
      r = {op} <keepdims = 1{axes[0]}> (v{axes[1]})
      y = Sigmoid (r)
    }}""")


def test_calibrated_unblock_frees_a_small_reduction_only_when_asked():
    model = _reduction("ReduceMean", 9.0)  # 64 elements, |x| < 9: sum < 576
    data = calib(model)
    kept, result = calibrated(model, data)
    assert result.stats["blocked"] == 1 and result.stats["unblocked"] == 0
    freed, result = calibrated(model, data, calibrated_unblock=True)
    assert fired(result.stats)["unblocked"] == 1 and result.stats["blocked"] == 0
    assert result.stats["unblocked-nodes"] == "r"
    assert op_types(freed.graph) == ["Cast", "Tanh", "Mul", "ReduceMean", "Sigmoid", "Cast"]
    assert op_types(kept.graph).count("Cast") == 4
    feeds = random_feeds(model, seed=7)
    reference = numerics.run_model(model, feeds, label="fp32")["y"]
    got = run16(freed, feeds)["y"]
    np.testing.assert_allclose(got, reference, rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (_reduction("ReduceSum", 100.0), "64 x 100 > 4094"),
        (_reduction("ReduceSum", 1.0, width=512), "512 elements > 256"),
        (_reduction("ReduceSumSquare", 10.0), "64 x 10**2 > 4094"),
    ],
)
def test_calibrated_unblock_keeps_large_reductions_blocked(model, why):
    _, result = calibrated(model, calib(model), calibrated_unblock=True)
    assert result.stats["unblocked"] == 0 and result.stats["blocked"] == 1, why


def test_exp_of_inputs_past_11_stays_blocked_and_small_ones_may_run_fp16():
    def exp_model(scale: float) -> onnx.ModelProto:
        return parse(f"""
        g (float[2, 4] x) => (float[2, 4] y) <float[1] s = {{{scale}}}> {{
          t = Tanh (x)
          v = Mul (t, s)
          y = Exp (v)
        }}""")

    big = exp_model(12.0)
    _, result = calibrated(big, calib(big), calibrated_unblock=True)
    assert result.stats["unblocked"] == 0 and result.stats["blocked"] == 1
    small = exp_model(2.0)
    _, result = calibrated(small, calib(small), calibrated_unblock=True)
    assert result.stats["unblocked"] == 1


def test_measurements_are_reused_for_the_same_model_and_data(monkeypatch):
    """dsopt.mixed lowers one node at a time with the same data: one probe, not one each."""
    import dsopt.quant.calibration as calibration

    model = _chain("Div", "1e5")
    data = calib(model)
    calibrated(model, data)
    probes = []
    original = calibration.Probe
    monkeypatch.setattr(calibration, "Probe", lambda *a, **k: probes.append(1) or original(*a, **k))
    _, result = calibrated(model, data)
    assert not probes and result.stats["range-blocked"] == 1
    calibrated(model, calib(model))  # other data: measured again
    assert probes == [1]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"headroom": "0.5"}, "headroom must be >= 1"), ({"samples": "-1"}, "samples must be >= 0")],
)
def test_bad_options_are_usage_errors(options, message):
    model = _chain("Div", "1e5")
    with pytest.raises(UsageError, match=message):
        apply_pass(ConvertFloat16.from_options(options), model)


def test_headroom_1_allows_the_whole_fp16_range():
    model = _chain("Div", "1e4")
    _, result = calibrated(model, calib(model), headroom=1.0)
    assert result.stats["range-blocked"] == 0 and result.stats["range-limit"] == 65504.0


def test_cli_precision_fp16_with_calib_reaches_the_pass(tmp_path):
    from dsopt.cli import main

    model = _blow_up(4, 8, 1e4, "mul", "Softsign")
    path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save_model(model, path)
    samples = [random_feeds(model, seed=i)["x"] for i in range(4)]
    np.savez(tmp_path / "c.npz", x=np.stack(samples))
    args = ["optimize", str(path), "--precision", "fp16", "-o", str(out), "--report", str(report)]
    assert main([*args, "--calib", str(tmp_path / "c.npz")]) == 0
    (record,) = [
        p for p in json.loads(report.read_text())["passes"] if p["name"] == "convert-float16"
    ]
    assert record["stats"]["range-blocked"] == 3 and record["stats"]["calibration-samples"] == 4
    feeds = random_feeds(model, seed=9)
    reference = numerics.run_model(model, feeds, label="fp32")["y"]
    got = run16(onnx.load(out), feeds)["y"]
    np.testing.assert_allclose(got, reference, rtol=TOL, atol=TOL)
    assert main(args) == 0  # without --calib: the static list only
    (record,) = [
        p for p in json.loads(report.read_text())["passes"] if p["name"] == "convert-float16"
    ]
    assert record["stats"]["range-blocked"] == 0 and "calibration-samples" not in record["stats"]
    assert not finite(run16(onnx.load(out), feeds))


def test_a_model_onnxruntime_cannot_run_keeps_the_static_list(caplog):
    """The conversion needs no onnxruntime: calibration failing to run warns and is skipped."""
    model = _chain("Div", "1e5")
    custom = helper.make_node("Unknown", ["y"], ["z"], domain="example.custom")
    model.graph.node.append(custom)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4]))
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    data = CalibrationData.from_feeds([{"x": np.ones((2, 4), np.float32)}])
    rewritten, result = calibrated(model, data)
    assert result.stats["calibration"].startswith("skipped: onnxruntime cannot load")
    assert result.stats["nodes"] == 3 and result.stats["range-blocked"] == 0
    assert "no calibrated block list" in caplog.text
