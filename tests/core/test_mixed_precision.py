from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from onnx import TensorProto, helper, numpy_helper

from dsopt.cli import main
from dsopt.driver import optimize
from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.mixed import (
    CANDIDATES,
    Budget,
    ErrorMeter,
    Prediction,
    SensitivityCache,
    assign,
    lower,
    measure,
    mixed_precision,
    parse_size_budget,
    uniform_assignment,
    weight_units,
)
from dsopt.pass_infra import PassContext
from dsopt.quant.calibration import CalibrationData
from dsopt.testing import strategies
from dsopt.testing.strategies import random_feeds

DIMS = (64, 128, 128, 64, 16)


def _mlp(outlier_layer: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """A MatMul/Relu MLP; `outlier_layer` (> 0) has heavy outliers: rows of +-100, one in
    every block of 32 along K, that read inputs the layer before always zeroes. The outputs do
    not see them, but they stretch every int4 block's and int8 channel's scale."""
    rng = np.random.default_rng(seed)
    weights = [
        (rng.standard_normal((DIMS[i], DIMS[i + 1])) * 0.1).astype(np.float32)
        for i in range(len(DIMS) - 1)
    ]
    if outlier_layer is not None:
        rows = np.arange(0, DIMS[outlier_layer], 32)
        weights[outlier_layer - 1][:, rows] = 0.0
        weights[outlier_layer][rows, :] = 100.0 * np.sign(
            rng.standard_normal((len(rows), DIMS[outlier_layer + 1]))
        )
    inits, nodes, prev = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        last = i == len(weights) - 1
        out = "y" if last else f"m{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"mm{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))  # unnamed on purpose
            prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, DIMS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, DIMS[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, DIMS[0])).astype(np.float32)} for _ in range(n)]


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Initializer payload bytes as stored (sub-byte types packed)."""
    total = 0
    for init in model.graph.initializer:
        if init.raw_data:
            total += len(init.raw_data)
        else:
            total += numpy_helper.to_array(init).nbytes
    return total


def test_parse_size_budget():
    assert parse_size_budget("0.25", 1000) == 250
    assert parse_size_budget(0.5, 1000) == 500
    assert parse_size_budget("12MB", 1) == 12_000_000
    assert parse_size_budget("500KB", 1) == 500_000
    assert parse_size_budget("1.5GB", 1) == 1_500_000_000
    assert parse_size_budget("2MiB", 1) == 2 << 20
    for bad in ("abc", "0", "1.5", "-1MB", "12XB", ""):
        with pytest.raises(UsageError, match="--size-budget"):
            parse_size_budget(bad, 1000)


def test_size_budget_is_met_on_an_mlp():
    model = _mlp(outlier_layer=1)
    result = optimize(model, precision="mixed", calibration=_feeds(), size_budget="0.2")
    mixed = result.mixed
    fp32 = sum(4 * np.prod(i.dims) for i in model.graph.initializer)
    assert mixed.budget.size == int(0.2 * fp32)
    assert mixed.total_bytes <= mixed.budget.size
    # The stored model agrees with the reported sizes (plus scales stored as initializers).
    assert _weight_bytes(result.model) <= mixed.budget.size
    assert set(mixed.assignment.values()) - {"fp32"}  # something was lowered
    entry = result.mixed_entry()["mixed"]
    assert [row["node"] for row in entry["nodes"]] == ["mm0", "mm1", "mm2", "mm3"]
    assert entry["bytes"] <= entry["budget"]["size"]
    assert {"int8", "int4"} <= set(entry["nodes"][1]["sensitivity"])
    assert any(p["label"] == "uniform-int4" for p in entry["pareto"])
    assert sum(p["label"] == "sweep" for p in entry["pareto"]) >= 2  # more of the front
    assert any(p["pareto"] for p in entry["pareto"])
    json.dumps(entry)


def test_mixed_beats_uniform_int4_where_one_layer_is_sensitive():
    model = _mlp(outlier_layer=1)
    module = Module.from_proto(model)
    feeds = _feeds()
    ctx = PassContext()
    uniform = mixed_precision(module, CalibrationData.from_feeds(feeds), Budget(), ctx,
                              size_budget="1.0")  # fmt: skip
    int4 = next(p for p in uniform.pareto if p["label"] == "uniform-int4")
    # At uniform int4's size (every weight at its smallest but int4-b128): never worse.
    same = mixed_precision(
        module, CalibrationData.from_feeds(feeds), Budget(), ctx, size_budget=f"{int4['bytes']}B"
    )
    assert same.total_bytes <= int4["bytes"]
    assert same.rel_l2 <= int4["rel_l2"] * (1 + 1e-6)
    # A little more room goes to the sensitive layer, and the error drops well below int4's.
    sensitive = next(u for u in uniform.units if u.name == "mm1")
    assert sensitive.candidates["int4"].rel_l2 > 2 * max(
        u.candidates["int4"].rel_l2 for u in uniform.units if u is not sensitive
    )
    room = sensitive.candidates["fp16"].bytes - sensitive.candidates["int4"].bytes
    more = mixed_precision(
        module,
        CalibrationData.from_feeds(feeds),
        Budget(),
        ctx,
        size_budget=f"{int4['bytes'] + room}B",
    )
    assert more.total_bytes <= int4["bytes"] + room
    assert more.assignment["mm1"] in ("fp16", "fp32")  # int8's channels are stretched too
    assert more.rel_l2 < 0.5 * int4["rel_l2"]


@pytest.mark.parametrize(("flag", "value"), [("max_error", 0.02), ("min_cosine", 0.9995)])
def test_error_budget_holds_on_the_calibration_samples(flag, value):
    model = _mlp(outlier_layer=1)
    feeds = _feeds()
    result = optimize(model, precision="mixed", calibration=feeds, **{flag: value})
    mixed = result.mixed
    assert set(mixed.assignment.values()) - {"fp32"}
    meter = ErrorMeter(model, feeds)  # measured independently of dsopt.mixed's own check
    rel, cos = meter.measure(result.model)
    assert rel == pytest.approx(mixed.rel_l2, rel=1e-6, abs=1e-9)
    if flag == "max_error":
        assert rel <= value
    else:
        assert cos >= value
    assert mixed.total_bytes < mixed.to_dict()["fp32_bytes"]


def test_target_limits_the_candidates():
    result = optimize(
        _mlp(), precision="mixed", calibration=_feeds(2), size_budget="0.5", target="rpi4"
    )
    assert set(result.mixed.assignment.values()) - {"fp32"}
    with pytest.raises(UsageError, match="--size-budget"):
        optimize(
            _mlp(), precision="mixed", calibration=_feeds(2), size_budget="0.3",
            target="onnxruntime",
        )  # fmt: skip  # float32 only: nothing can shrink


def test_cache_returns_identical_results_without_rerunning(tmp_path):
    model = _mlp(outlier_layer=1)
    path = tmp_path / "sens.json"
    ctx = PassContext()

    def run(cache):
        module = Module.from_proto(model)
        units = weight_units(module)
        meter = ErrorMeter(module.to_proto(), _feeds(2))
        measure(module, units, ("fp32", "fp16", "int8", "int4"), meter, ctx, cache=cache)
        return [(u.name, u.candidates) for u in units], meter.runs

    cache = SensitivityCache(path)
    first, runs = run(cache)
    assert runs == 4 * 3  # four units, three lowered precisions each
    again, reruns = run(cache)
    assert reruns == 0 and again == first
    from_disk, disk_runs = run(SensitivityCache(path))
    assert disk_runs == 0 and from_disk == first
    other, other_runs = run(SensitivityCache())  # a fresh cache measures again
    assert other_runs == 12 and other == first


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=strategies.models(max_ops=4, containing=("MatMul", "Gemm", "Conv"), dynamic=False),
    fraction=strategies.st.floats(0.0, 1.0),
)
def test_size_budget_is_met_on_random_graphs(model, fraction):
    module = Module.from_proto(model)
    units = weight_units(module)
    assume(units)
    feeds = [random_feeds(model, seed=i) for i in range(2)]
    meter = ErrorMeter(module.to_proto(), feeds)
    cache = SensitivityCache()
    ctx = PassContext()
    measure(module, units, ("fp32", "fp16", "int8", "int4"), meter, ctx, cache=cache)
    fp32 = sum(u.fp32_bytes for u in units)
    smallest = sum(min(c.bytes for c in u.candidates.values()) for u in units)
    budget = int(smallest + fraction * (fp32 - smallest))
    chosen = assign(units, Budget(size=budget))
    _, sizes = lower(module, units, chosen, ctx)
    assert sum(sizes.values()) <= budget
    result = mixed_precision(
        module, CalibrationData.from_feeds(feeds), Budget(), ctx, size_budget=f"{budget}B",
        cache=cache,
    )  # fmt: skip
    assert result.total_bytes <= budget
    if smallest > 0:
        with pytest.raises(UsageError, match="cannot be reached"):
            assign(units, Budget(size=smallest - 1))


def test_bad_budgets_are_usage_errors():
    feeds = _feeds(1)
    cases = [
        ({"size_budget": "lots"}, "--size-budget"),
        ({"size_budget": "2"}, "--size-budget"),
        ({"max_error": -0.1}, "--max-error"),
        ({"min_cosine": 1.5}, "--min-cosine"),
        ({}, "needs a budget"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UsageError, match=match):
            optimize(_mlp(), precision="mixed", calibration=feeds, **kwargs)
    with pytest.raises(UsageError, match="calibration"):
        optimize(_mlp(), precision="mixed", size_budget="0.5")
    with pytest.raises(UsageError, match="--size-budget applies to --precision mixed"):
        optimize(_mlp(), precision="int8", size_budget="0.5")


def test_cli_mixed_and_bad_budget(tmp_path, capsys):
    src, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save_model(_mlp(outlier_layer=1), src)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(2)]))
    argv = ["optimize", str(src), "-o", str(out), "--precision", "mixed", "--calib", str(calib)]
    assert main([*argv, "--size-budget", "0.3", "--report", str(report)]) == 0
    entry = json.loads(report.read_text())["mixed"]
    assert entry["bytes"] <= entry["budget"]["size"] == int(0.3 * entry["fp32_bytes"])
    capsys.readouterr()
    assert main([*argv, "--size-budget", "12XB"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[0].startswith("dsopt: error: --size-budget")
    assert "Traceback" not in "\n".join(lines)


def test_error_mode_at_uniform_int8_error_is_no_larger_than_int8():
    """Errors of several weights add as energies: at int8's measured error, greedy reaches
    int8's size or less (a sum of relative L2 errors would stop it far above)."""
    model = _mlp(seed=3)
    feeds, ctx = _feeds(), PassContext()
    module = Module.from_proto(model)
    units = weight_units(module)
    meter = ErrorMeter(model, feeds)
    measure(module, units, CANDIDATES, meter, ctx)
    int8 = uniform_assignment(units, "int8")
    lowered, sizes = lower(model, units, int8, ctx)
    measured = meter.measure(lowered.to_proto())[0]
    predicted = Prediction.of(units, int8).rel_l2
    linear = sum(u.candidates["int8"].rel_l2 for u in units)
    assert abs(predicted - measured) < abs(linear - measured)
    assert 0.5 < predicted / measured < 1.5
    result = mixed_precision(
        module, CalibrationData.from_feeds(feeds), Budget(max_error=measured), ctx
    )
    assert result.rel_l2 <= measured
    assert result.total_bytes <= sum(sizes.values())
    chosen = [p for p in result.pareto if p.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["bytes"] == result.total_bytes


def test_old_opset_is_upgraded_so_weights_can_be_quantized():
    model = _mlp()
    model.opset_import[0].version = 11  # per-channel DequantizeLinear needs 13
    result = optimize(model, precision="mixed", calibration=_feeds(2), size_budget="0.3")
    assert {"int8", "int4", "int4-b128"} & set(result.mixed.assignment.values())
    assert any("opset 11 ->" in note for note in result.mixed.notes)
    assert result.model.opset_import[0].version >= 13


def test_int4_with_larger_blocks_is_a_smaller_candidate():
    module = Module.from_proto(_mlp())
    units = weight_units(module)
    meter = ErrorMeter(module.to_proto(), _feeds(2))
    measure(module, units, CANDIDATES, meter, PassContext())
    mm1 = next(u for u in units if u.name == "mm1")  # K = 128
    assert mm1.candidates["int4-b128"].bytes < mm1.candidates["int4"].bytes
    # With --block-size 128 already, the variant would be no smaller: not offered.
    measure(module, units, CANDIDATES, meter, PassContext(), block_size=128)
    assert all("int4-b128" not in u.candidates for u in units)


def test_bf16_and_fp16_weights_are_half_size_candidates():
    module = Module.from_proto(_mlp())
    units = weight_units(module)
    ctx = PassContext()
    lowered, sizes = lower(module.to_proto(), units, {"mm0": "bf16", "mm1": "fp16-weights"}, ctx)
    assert sizes["mm0"] == 2 * units[0].elements and sizes["mm1"] == 2 * units[1].elements
    assert sizes["mm2"] == units[2].fp32_bytes
    proto = lowered.to_proto()
    stored = {t.name: t.data_type for t in proto.graph.initializer}
    assert stored["w0"] == TensorProto.BFLOAT16
    assert stored["w1_fp16"] == TensorProto.FLOAT16 and stored["w2"] == TensorProto.FLOAT
    cast = next(n for n in proto.graph.node if n.output[0] == "w1")  # compute stays float32
    assert cast.op_type == "Cast" and cast.input[0] == "w1_fp16"
    meter = ErrorMeter(module.to_proto(), _feeds(2))
    measure(module, units, ("fp32", "fp16", "bf16", "fp16-weights"), meter, ctx)
    for unit in units:
        half = {p: unit.candidates[p] for p in ("fp16", "bf16", "fp16-weights")}
        assert {c.bytes for c in half.values()} == {2 * unit.elements}
        # bf16 keeps 8 significant bits: more error than fp16 storage, which rounds weights only
        assert 0 < half["fp16-weights"].rel_l2 < half["bf16"].rel_l2 < 0.05


@pytest.mark.parametrize("precision", ["bf16", "fp16-weights"])
def test_mixed_assigns_and_reports_bf16_and_fp16_weights(precision):
    module = Module.from_proto(_mlp())
    result = mixed_precision(
        module,
        CalibrationData.from_feeds(_feeds(2)),
        Budget(),
        PassContext(),
        precisions=("fp32", precision),
        size_budget="0.5",
    )
    assert result.to_dict()["counts"] == {precision: 4}
    assert result.total_bytes == result.to_dict()["fp32_bytes"] // 2
    (bound,) = result.passes
    assert bound.name == "convert-float16"
    assert bound.tolerance == (1e-1 if precision == "bf16" else 1e-2)
    assert 0 < result.rel_l2 < 0.05
