"""Tests for dsopt.numerics: random and loaded inputs, running models, comparing outputs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsopt import numerics
from dsopt.errors import CheckFailed, ModelError, UsageError
from dsopt.numerics import (
    EquivalenceReport,
    OutputComparison,
    check_equivalence,
    compare_outputs,
    load_inputs,
    parse_shape_overrides,
    random_inputs,
    run_model,
)

ONNX_SIMPLE_TESTS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "simple"

Dims = Sequence[int | str | None]


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, int, Dims | None]],
    outputs: list[tuple[str, int, Dims | None]],
    *,
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    ir_version: int | None = None,
) -> onnx.ModelProto:
    """Builds a model from (name, elem_type, dims) tuples for its inputs and outputs."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, t, d) for n, t, d in inputs],
        [helper.make_tensor_value_info(n, t, d) for n, t, d in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def identity_model(dims: Dims = ("N", 4), elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [("x", elem_type, dims)],
        [("y", elem_type, dims)],
    )


def add_constant_model(value: float, dims: Dims = ("N", 4)) -> onnx.ModelProto:
    """y = x + value, with the constant as an initializer."""
    bias = numpy_helper.from_array(np.array(value, dtype=np.float32), "bias")
    return make_model(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        [("x", TensorProto.FLOAT, dims)],
        [("y", TensorProto.FLOAT, dims)],
        initializers=[bias],
    )


# ------------------------------------------------------------------------------------------------
# check_equivalence
# ------------------------------------------------------------------------------------------------


def test_identical_models_are_equivalent_with_zero_error() -> None:
    report = check_equivalence(identity_model(), identity_model(), samples=2)
    assert report.ok
    assert report.samples == 2
    assert report.failures() == []
    (output,) = report.outputs
    assert output.name == "y"
    assert output.max_abs_error == 0.0
    assert output.rel_l2_error == 0.0
    assert output.cosine == 1.0
    assert output.within_tolerance
    assert output.problem is None
    report.raise_for_failures()


def test_small_offset_fails_tight_atol_and_passes_loose_atol() -> None:
    original, candidate = add_constant_model(0.0), add_constant_model(1e-3)
    tight = check_equivalence(original, candidate, rtol=0.0, atol=1e-5)
    assert not tight.ok
    (failure,) = tight.failures()
    assert failure.name == "y"
    assert failure.max_abs_error == pytest.approx(1e-3, rel=1e-3)
    assert failure.mismatched == failure.elements == 4
    with pytest.raises(CheckFailed, match="y: 4/4 elements outside tolerance"):
        tight.raise_for_failures()

    assert check_equivalence(original, candidate, atol=1e-2).ok


def test_check_equivalence_reports_output_shape_mismatch() -> None:
    candidate = make_model(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=1)],
        [("x", TensorProto.FLOAT, ("N", 4))],
        [("y", TensorProto.FLOAT, ("N", 8))],
    )
    report = check_equivalence(identity_model(), candidate)
    assert not report.ok
    (output,) = report.outputs
    assert output.shape_ref == (1, 4)
    assert output.shape_cand == (1, 8)
    assert output.max_abs_error is None
    assert "shape" in (output.problem or "")


def test_check_equivalence_reports_renamed_output_as_missing() -> None:
    candidate = make_model(
        [helper.make_node("Identity", ["x"], ["z"])],
        [("x", TensorProto.FLOAT, ("N", 4))],
        [("z", TensorProto.FLOAT, ("N", 4))],
    )
    report = check_equivalence(identity_model(), candidate)
    problems = {o.name: o.problem for o in report.failures()}
    assert problems == {
        "y": "output missing from the candidate",
        "z": "output missing from the reference",
    }


def test_check_equivalence_aggregates_worst_over_samples() -> None:
    # Relu(x) - x differs from 0 only where x < 0, so some samples err more than others.
    original = make_model(
        [helper.make_node("Sub", ["x", "x"], ["y"])],
        [("x", TensorProto.FLOAT, [8])],
        [("y", TensorProto.FLOAT, [8])],
    )
    candidate = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sub", ["r", "x"], ["y"])],
        [("x", TensorProto.FLOAT, [8])],
        [("y", TensorProto.FLOAT, [8])],
    )
    per_sample = [
        check_equivalence(original, candidate, seed=k).outputs[0].max_abs_error for k in range(3)
    ]
    merged = check_equivalence(original, candidate, samples=3).outputs[0]
    assert merged.max_abs_error == max(e for e in per_sample if e is not None)
    assert merged.elements == 24


def test_check_equivalence_accepts_paths_and_given_inputs(tmp_path: Path) -> None:
    original, candidate = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(identity_model(), original)
    onnx.save(add_constant_model(0.5), candidate)
    feeds = [{"x": np.zeros((2, 4), np.float32)}, {"x": np.ones((3, 4), np.float32)}]
    report = check_equivalence(original, candidate, inputs=feeds, atol=0.6, rtol=0.0)
    assert report.ok
    assert report.samples == 2
    assert report.outputs[0].max_abs_error == pytest.approx(0.5)


def test_check_equivalence_rejects_different_input_names() -> None:
    candidate = make_model(
        [helper.make_node("Identity", ["x2"], ["y"])],
        [("x2", TensorProto.FLOAT, ("N", 4))],
        [("y", TensorProto.FLOAT, ("N", 4))],
    )
    with pytest.raises(UsageError, match="only the original has 'x'; only the candidate has 'x2'"):
        check_equivalence(identity_model(), candidate)


def test_check_equivalence_rejects_bad_options() -> None:
    model = identity_model()
    with pytest.raises(UsageError, match="samples"):
        check_equivalence(model, model, samples=0)
    with pytest.raises(UsageError, match="non-negative"):
        check_equivalence(model, model, atol=-1.0)
    with pytest.raises(UsageError, match="shapes cannot be overridden"):
        check_equivalence(
            model, model, inputs=[{"x": np.zeros((1, 4), np.float32)}], shapes={"x": [1, 4]}
        )
    with pytest.raises(UsageError, match="sample 1 has no value for input 'x'"):
        check_equivalence(model, model, inputs=[{"x": np.zeros((1, 4), np.float32)}, {}])


def test_check_equivalence_saves_models_too_large_to_serialize(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved: list[str] = []
    save_large = numerics._Session._save_large

    def spy(session: numerics._Session, proto: onnx.ModelProto) -> str:
        saved.append(save_large(session, proto))
        return saved[-1]

    monkeypatch.setattr(numerics, "_PROTO_LIMIT_BYTES", 10)
    monkeypatch.setattr(numerics._Session, "_save_large", spy)
    original = add_constant_model(0.25)
    before = original.SerializeToString()
    assert check_equivalence(original, add_constant_model(0.25)).ok
    assert len(saved) == 2
    assert not any(os.path.exists(p) for p in saved)  # temporary copies are removed
    assert original.SerializeToString() == before  # the caller's proto is left alone


def test_check_equivalence_runs_bfloat16_models() -> None:
    model = identity_model(dims=[2, 3], elem_type=TensorProto.BFLOAT16)
    report = check_equivalence(model, model)
    assert report.ok
    assert report.outputs[0].dtype == "bfloat16"


def test_report_to_dict_is_json_with_plain_types() -> None:
    report = check_equivalence(add_constant_model(0.0), add_constant_model(1e-3), atol=1e-5)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["ok"] is False
    assert data["samples"] == 1
    (output,) = data["outputs"]
    assert output["name"] == "y"
    assert output["shape_ref"] == [1, 4]
    assert isinstance(output["max_abs_error"], float)
    assert output["within_tolerance"] is False

    nan_report = EquivalenceReport(
        outputs=compare_outputs(
            {"y": np.array([1.0])}, {"y": np.array([np.inf])}, rtol=0.0, atol=0.0
        ),
        samples=1,
        rtol=0.0,
        atol=0.0,
    )
    json.dumps(nan_report.to_dict(), allow_nan=False)


# ------------------------------------------------------------------------------------------------
# compare_outputs
# ------------------------------------------------------------------------------------------------


def compare_one(
    ref: np.ndarray, cand: np.ndarray, rtol: float = 0.0, atol: float = 0.0
) -> OutputComparison:
    (result,) = compare_outputs({"y": ref}, {"y": cand}, rtol=rtol, atol=atol)
    return result


def test_compare_matching_nans_and_infs_pass() -> None:
    values = np.array([1.0, np.nan, np.inf, -np.inf], np.float32)
    result = compare_one(values, values.copy())
    assert result.within_tolerance
    assert result.nan_mismatch == result.inf_mismatch == 0
    assert result.max_abs_error == 0.0


def test_compare_counts_nan_and_inf_mismatches() -> None:
    ref = np.array([1.0, np.nan, np.inf, 2.0, 5.0], np.float32)
    cand = np.array([np.nan, 1.0, -np.inf, np.inf, 5.0], np.float32)
    result = compare_one(ref, cand, atol=10.0)
    assert not result.within_tolerance
    assert result.nan_mismatch == 2
    assert result.inf_mismatch == 2
    assert result.mismatched == 4
    assert "NaN" in (result.problem or "")
    assert result.max_abs_error == 0.0  # metrics cover elements finite in both


def test_compare_tolerance_is_atol_plus_rtol_times_reference() -> None:
    ref = np.array([100.0, 1.0], np.float32)
    cand = np.array([100.5, 1.0], np.float32)
    assert compare_one(ref, cand, rtol=0.01).within_tolerance  # 0.5 <= 0.01 * 100
    assert not compare_one(ref, cand, rtol=0.001).within_tolerance
    assert compare_one(ref, cand, atol=0.5).within_tolerance


def test_compare_integers_and_bools_must_be_equal() -> None:
    ints = compare_one(np.array([1, 2, 3]), np.array([1, 2, 4]), atol=10.0)
    assert not ints.within_tolerance
    assert ints.mismatched == 1
    assert ints.max_abs_error == 1.0
    assert compare_one(np.array([True, False]), np.array([True, False])).within_tolerance
    assert not compare_one(np.array([True, False]), np.array([True, True])).within_tolerance


def test_compare_dtype_mismatch_fails_but_keeps_metrics() -> None:
    ref = np.ones(3, np.float32)
    result = compare_one(ref, ref.astype(np.float16), atol=1.0)
    assert not result.within_tolerance
    assert result.dtype == "float32"
    assert result.dtype_cand == "float16"
    assert result.max_abs_error == 0.0
    assert "dtype" in (result.problem or "")


def test_compare_metrics() -> None:
    ref = np.array([3.0, 4.0])
    result = compare_one(ref, np.array([3.0, 4.5]))
    assert result.max_abs_error == pytest.approx(0.5)
    assert result.rel_l2_error == pytest.approx(0.5 / 5.0)
    assert result.cosine == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))
    assert compare_one(np.zeros(3), np.zeros(3)).cosine == 1.0
    assert compare_one(np.zeros(3), np.ones(3)).cosine == 0.0
    assert compare_one(np.array([-1.0]), np.array([1.0])).cosine == pytest.approx(-1.0)
    huge = compare_one(np.array([1e300, 1e300]), np.array([1e300, 1e300]))
    assert huge.cosine == pytest.approx(1.0) and huge.rel_l2_error == 0.0


def test_compare_empty_tensors() -> None:
    result = compare_one(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32))
    assert result.within_tolerance
    assert (result.max_abs_error, result.rel_l2_error, result.cosine) == (0.0, 0.0, 1.0)


def test_compare_strings() -> None:
    assert compare_one(np.array(["a", "b"]), np.array(["a", "b"])).within_tolerance
    different = compare_one(np.array(["a", "b"]), np.array(["a", "c"]))
    assert not different.within_tolerance
    assert different.mismatched == 1
    assert different.max_abs_error is None


# ------------------------------------------------------------------------------------------------
# random_inputs and parse_shape_overrides
# ------------------------------------------------------------------------------------------------


def two_input_model() -> onnx.ModelProto:
    """a: [N, 3], b: [N, M, ?] -> a unused output per input (Identity)."""
    return make_model(
        [helper.make_node("Identity", ["a"], ["ya"]), helper.make_node("Identity", ["b"], ["yb"])],
        [("a", TensorProto.FLOAT, ("N", 3)), ("b", TensorProto.INT64, ("N", "M", None))],
        [("ya", TensorProto.FLOAT, None), ("yb", TensorProto.INT64, None)],
    )


def test_random_inputs_resolve_each_dim_param_once() -> None:
    feeds = random_inputs(two_input_model(), default_dim=2)
    assert feeds["a"].shape == (2, 3)
    assert feeds["b"].shape == (2, 2, 2)

    overridden = random_inputs(two_input_model(), shapes={"a": [5, 3]})
    assert overridden["a"].shape == (5, 3)
    assert overridden["b"].shape == (5, 1, 1)  # N follows the override, M the default


def test_random_inputs_dtypes_and_ranges() -> None:
    feeds = random_inputs(two_input_model(), shapes={"b": [4, 50, 50]})
    assert feeds["a"].dtype == np.float32
    assert feeds["b"].dtype == np.int64
    assert set(np.unique(feeds["b"])) == {0, 1, 2, 3}
    model = make_model(
        [helper.make_node("Not", ["m"], ["y"]), helper.make_node("Identity", ["h"], ["z"])],
        [("m", TensorProto.BOOL, [64]), ("h", TensorProto.FLOAT16, [2])],
        [("y", TensorProto.BOOL, [64]), ("z", TensorProto.FLOAT16, [2])],
    )
    feeds = random_inputs(model)
    assert feeds["m"].dtype == np.bool_ and feeds["m"].any() and not feeds["m"].all()
    assert feeds["h"].dtype == np.float16


def test_random_inputs_are_deterministic_per_seed() -> None:
    model = two_input_model()
    first, again, other = (random_inputs(model, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["a"], other["a"])


def test_random_inputs_skip_initializers_listed_as_inputs() -> None:
    weight = numpy_helper.from_array(np.ones(4, np.float32), "w")
    model = make_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [("x", TensorProto.FLOAT, [4]), ("w", TensorProto.FLOAT, [4])],
        [("y", TensorProto.FLOAT, [4])],
        initializers=[weight],
        ir_version=3,
    )
    assert list(random_inputs(model)) == ["x"]


def test_random_inputs_reject_bad_overrides() -> None:
    model = two_input_model()
    with pytest.raises(UsageError, match=r"'c', which is not an input .*inputs: a, b"):
        random_inputs(model, shapes={"c": [1]})
    with pytest.raises(UsageError, match="rank 3"):
        random_inputs(model, shapes={"a": [1, 3, 1]})
    with pytest.raises(UsageError, match="fixes it to 3"):
        random_inputs(model, shapes={"a": [1, 4]})


def test_random_inputs_refuse_strings() -> None:
    model = make_model(
        [helper.make_node("Identity", ["s"], ["y"])],
        [("s", TensorProto.STRING, [2])],
        [("y", TensorProto.STRING, [2])],
    )
    with pytest.raises(UsageError, match="'s' is a string tensor") as info:
        random_inputs(model)
    assert "--inputs" in (info.value.hint or "")


def test_parse_shape_overrides() -> None:
    assert parse_shape_overrides(["x=1,3,224,224", " ids = 1, 128 ", "scalar="]) == {
        "x": [1, 3, 224, 224],
        "ids": [1, 128],
        "scalar": [],
    }
    for bad in ("x", "=1,2", "x=1,a", "x=1,-2", "x=1,,2"):
        with pytest.raises(UsageError, match="bad shape override"):
            parse_shape_overrides([bad])
    with pytest.raises(UsageError, match="given twice"):
        parse_shape_overrides(["x=1", "x=2"])


# ------------------------------------------------------------------------------------------------
# load_inputs
# ------------------------------------------------------------------------------------------------


def test_load_inputs_from_npz(tmp_path: Path) -> None:
    path = tmp_path / "in.npz"
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 1, 4), np.int64)
    np.savez(path, a=a, b=b)
    (sample,) = load_inputs(path, two_input_model())
    assert np.array_equal(sample["a"], a) and np.array_equal(sample["b"], b)

    np.savez(tmp_path / "positional.npz", a, b)
    (sample,) = load_inputs(tmp_path / "positional.npz", two_input_model())
    assert set(sample) == {"a", "b"}


def test_load_inputs_npz_errors_name_file_and_input(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    np.savez(missing, a=np.ones((2, 3), np.float32))
    with pytest.raises(UsageError, match=r"missing\.npz.*no value for input 'b'"):
        load_inputs(missing, two_input_model())

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.ones((2, 3), np.float64), b=np.zeros((2, 1, 1), np.int64))
    with pytest.raises(UsageError, match=r"wrong\.npz.*input 'a' is float64 .* expects float"):
        load_inputs(wrong, two_input_model())

    extra = tmp_path / "extra.npz"
    np.savez(extra, a=np.ones((2, 3), np.float32), b=np.zeros((2, 1, 1), np.int64), c=np.ones(1))
    with pytest.raises(UsageError, match=r"extra\.npz.*'c' is not an input"):
        load_inputs(extra, two_input_model())

    with pytest.raises(UsageError, match="does not exist"):
        load_inputs(tmp_path / "nope.npz")


def test_load_inputs_from_directory_of_npz(tmp_path: Path) -> None:
    for k in (10, 2, 1):
        np.savez(tmp_path / f"sample_{k}.npz", x=np.full((1, 4), k, np.float32))
    samples = load_inputs(tmp_path, identity_model())
    assert [float(s["x"][0, 0]) for s in samples] == [1.0, 2.0, 10.0]


def test_load_inputs_from_onnx_backend_test_data_set() -> None:
    test_dir = ONNX_SIMPLE_TESTS / "test_expand_shape_model1"
    model = onnx.load(test_dir / "model.onnx")
    (sample,) = load_inputs(test_dir / "test_data_set_0", model)
    assert list(sample) == ["X", "shape"]
    assert sample["X"].dtype == np.float32 and sample["shape"].dtype == np.int64

    # The test folder itself holds test_data_set_N folders: one sample each.
    all_sets = load_inputs(test_dir, model)
    assert len(all_sets) == len(list(test_dir.glob("test_data_set_*")))

    expected = onnx.load_tensor(test_dir / "test_data_set_0" / "output_0.pb")
    outputs = run_model(test_dir / "model.onnx", sample)
    np.testing.assert_allclose(outputs["Y"], numpy_helper.to_array(expected))


def test_load_inputs_unnamed_pb_files_map_by_position(tmp_path: Path) -> None:
    model = two_input_model()
    for k, array in enumerate([np.ones((1, 3), np.float32), np.zeros((1, 2, 2), np.int64)]):
        onnx.save_tensor(numpy_helper.from_array(array), tmp_path / f"input_{k}.pb")
    (sample,) = load_inputs(tmp_path, model)
    assert sample["b"].shape == (1, 2, 2)
    with pytest.raises(UsageError, match="unnamed tensor"):
        load_inputs(tmp_path)

    onnx.save_tensor(
        numpy_helper.from_array(np.zeros((1, 2, 2), np.int32)), tmp_path / "input_1.pb"
    )
    with pytest.raises(UsageError, match=r"input_1\.pb.*input 'b' is int32"):
        load_inputs(tmp_path, model)


# ------------------------------------------------------------------------------------------------
# run_model
# ------------------------------------------------------------------------------------------------


def test_run_model_returns_outputs_by_name() -> None:
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    outputs = run_model(add_constant_model(1.0), {"x": x}, threads=1)
    assert list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], x + 1)
    np.testing.assert_array_equal(
        run_model(add_constant_model(1.0), {"x": x}, optimize=True)["y"], x + 1
    )


def broken_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        [("x", TensorProto.FLOAT, [1])],
        [("y", TensorProto.FLOAT, [1])],
    )


def test_run_model_errors_name_the_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"cannot load candidate model: .*NoSuchOp"):
        check_equivalence(identity_model([1]), broken_model())

    path = tmp_path / "broken.onnx"
    onnx.save(broken_model(), path)
    with pytest.raises(ModelError, match=r"cannot load model 'broken\.onnx'") as info:
        run_model(path, {"x": np.zeros(1, np.float32)})
    assert "\n" not in info.value.message

    with pytest.raises(ModelError, match="failed to run model"):
        run_model(identity_model([2]), {"x": np.zeros(3, np.float32)})

    with pytest.raises(ModelError, match=r"cannot read original model '.*absent\.onnx'"):
        check_equivalence(tmp_path / "absent.onnx", identity_model())


def test_run_model_refuses_in_memory_model_with_external_data(tmp_path: Path) -> None:
    model = add_constant_model(2.0)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    unloaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(ModelError, match="external data") as info:
        run_model(unloaded, {"x": np.zeros((1, 4), np.float32)})
    assert "path" in (info.value.hint or "")
    # Through its path the external data resolves.
    outputs = run_model(os.fspath(tmp_path / "m.onnx"), {"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(outputs["y"], np.full((1, 4), 2.0, np.float32))


def test_random_integer_inputs_stay_inside_the_table_they_index():
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[1, 64] ids, int64[1, 64] attention_mask) => (float[1, 64, 3] y)
          <float[2, 3] table = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, int64[1] axes = {2}> {
          c = Cast <to = 7> (ids)
          e = Gather (table, c)
          m = Cast <to = 1> (attention_mask)
          u = Unsqueeze (m, axes)
          y = Mul (e, u)
        }"""
    )
    feeds = numerics.random_inputs(model, seed=3)
    assert set(np.unique(feeds["ids"])) == {0, 1}
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1}
    numerics.run_model(model, feeds)
