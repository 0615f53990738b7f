"""Peer suite: the models onnx ships for its backend tests must survive the default pipeline.

The cases are every model under `onnx/backend/test/data/` of the installed onnx wheel:

* `light/*.onnx`: ImageNet CNNs (AlexNet ... VGG19) whose weights are replaced by
  `ConstantOfShape` nodes, so the files are small but the weights appear at run time (VGG19 holds
  about 550 MB of float weights once materialized). They ship no input tensors; they are fed the
  way onnx's backend runner feeds them (`Runner.generate_dummy_data(x, random=False)`: declared
  shape, unknown dims as 1, values `arange(n) / n`), which are the inputs their shipped
  `light_*_output_0.pb` files were made from.
* `pytorch-converted/*`, `pytorch-operator/*`, `simple/*`: a folder with `model.onnx` and
  `test_data_set_0/input_*.pb`, read with `dsopt.numerics.load_inputs`.

"Onnxruntime can run a case" means: with the CPUExecutionProvider it loads the model and runs it on
those inputs at ORT_DISABLE_ALL (the level `dsopt.numerics` uses to compare models, so the level
at which the check below means something) AND at the default ORT_ENABLE_ALL. With onnxruntime 1.32
both levels give the same verdict for every case; `test_onnxruntime_verdicts` asserts that, so a
release where they diverge is noticed instead of silently changing the suite.

Every runnable case gets its own test (id = case name): `dsopt.optimize(path)` with the default
pipeline must succeed, leave the file untouched, and its result must agree with the original at
rtol 1e-3, atol 1e-4. A second test per case runs the `dsopt optimize` command on a copy and checks
that the input file is not written and the output passes `onnx.checker` (full check) whenever the
input does. The cases onnxruntime cannot run are listed, with the reason, in `ORT_CANNOT_RUN`;
`test_onnxruntime_verdicts` probes all cases and asserts that list and the runnable count exactly.
They are not skipped tests: dsopt has nothing to be compared against there.

Numerical caveat: the light models' weights are constants, so their softmax outputs are uniform
(0.001 everywhere) for any input; for them the check is mainly that dsopt does not crash, keeps
the interface and produces a model onnxruntime runs with the same output.
"""

from __future__ import annotations

import functools
import hashlib
import locale
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest

import dsopt
from dsopt import numerics
from dsopt.cli import main as dsopt_main
from dsopt.errors import DsoptError
from dsopt.testing.backend_suite import Case, discover

RTOL, ATOL = 1e-3, 1e-4

# Cases onnxruntime 1.32 (CPUExecutionProvider) cannot load, at any optimization level, with a
# fragment of its error. The opset-1/6 cases use ops whose old versions have no CPU kernel any
# more (`Add(6)` still had the `broadcast` attribute, `BatchNormalization(6)` `consumed_inputs`).
_NO_KERNEL = "Could not find an implementation for"
ORT_CANNOT_RUN: dict[str, str] = {
    **{
        name: f"{_NO_KERNEL} AveragePool(1)"
        for name in (
            "test_AvgPool1d",
            "test_AvgPool1d_stride",
            "test_AvgPool2d",
            "test_AvgPool2d_stride",
            "test_AvgPool3d",
            "test_AvgPool3d_stride",
            "test_AvgPool3d_stride1_pad0_gpu_input",
        )
    },
    **{
        name: f"{_NO_KERNEL} BatchNormalization(6)"
        for name in (
            "test_BatchNorm1d_3d_input_eval",
            "test_BatchNorm2d_eval",
            "test_BatchNorm2d_momentum_eval",
            "test_BatchNorm3d_eval",
            "test_BatchNorm3d_momentum_eval",
        )
    },
    **{
        name: f"{_NO_KERNEL} PRelu(6)"
        for name in (
            "test_PReLU_1d",
            "test_PReLU_1d_multiparam",
            "test_PReLU_2d",
            "test_PReLU_2d_multiparam",
            "test_PReLU_3d",
            "test_PReLU_3d_multiparam",
        )
    },
    **{
        name: f"{_NO_KERNEL} Mul(6)"
        for name in (
            "test_GLU",
            "test_GLU_dim",
            "test_PoissonNLLLLoss_no_reduce",
        )
    },
    **{
        name: f"{_NO_KERNEL} Gemm(6)"
        for name in (
            "test_Linear",
            "test_operator_addmm",
            "test_operator_mm",
        )
    },
    **{
        name: f"{_NO_KERNEL} Add(6)"
        for name in (
            "test_Softsign",
            "test_operator_add_broadcast",
            "test_operator_add_size1_broadcast",
            "test_operator_add_size1_right_broadcast",
            "test_operator_add_size1_singleton_broadcast",
            "test_operator_addconstant",
            "test_operator_basic",
            "test_operator_non_float_params",
            "test_operator_params",
        )
    },
    "test_operator_pow": f"{_NO_KERNEL} Pow(1)",
    # Training-only op in the ai.onnx.preview.training domain; inference builds lack it.
    "test_gradient_of_add": "ai.onnx.preview.training:Gradient(-1) is not a registered",
    "test_gradient_of_add_and_mul": "ai.onnx.preview.training:Gradient(-1) is not a registered",
}

# StringNormalizer with a locale builds a C++ std::locale("en_US.UTF-8"). Where the OS has no such
# locale (minimal containers: `locale -a` lists only C, C.utf8, POSIX) these four cannot load;
# where it has one they run. The two strnorm cases that change no case never build the locale.
_LOCALE_CASES = (
    "test_strnorm_model_monday_casesensintive_lower",
    "test_strnorm_model_monday_casesensintive_upper",
    "test_strnorm_model_monday_empty_output",
    "test_strnorm_model_monday_insensintive_upper_twodim",
)


def _has_locale(name: str) -> bool:
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, name)
    except locale.Error:
        return False
    locale.setlocale(locale.LC_CTYPE, saved)
    return True


HAS_EN_US_LOCALE = _has_locale("en_US.UTF-8")
if not HAS_EN_US_LOCALE:
    ORT_CANNOT_RUN.update(
        {name: "Failed to construct locale with name:en_US.UTF-8" for name in _LOCALE_CASES}
    )

# 149 cases ship with onnx 1.23.2 (9 light + 82 pytorch-converted + 35 pytorch-operator + 23
# simple). onnxruntime 1.32 cannot run 36 of them anywhere, and the 4 locale cases where the OS
# lacks en_US.UTF-8: 109 runnable on such a machine (this one, and the count), 113 on a
# machine that has the locale.
TOTAL_CASES = 149
EXPECTED_RUNNABLE = 113 if HAS_EN_US_LOCALE else 109


ALL_CASES = discover()
RUNNABLE = [c for c in ALL_CASES if c.name not in ORT_CANNOT_RUN]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fingerprint(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return _sha256(path), stat.st_size, stat.st_mtime_ns


@functools.cache
def _checker_error(path: Path) -> str | None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001 - the checker raises several exception types
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _assert_equivalent(case: Case, optimized: onnx.ModelProto | Path) -> None:
    report = numerics.check_equivalence(
        case.model, optimized, inputs=case.inputs(), rtol=RTOL, atol=ATOL
    )
    assert report.ok, "\n".join(o.describe() for o in report.failures)


def _probe(case: Case, optimize: bool) -> str | None:
    """None if onnxruntime loads and runs the case, else its error's first line."""
    try:
        numerics.run_model(case.model, case.inputs()[0], optimize=optimize)
    except DsoptError as e:
        return e.message
    return None


# --------------------------------------------------------------------------------------------------


def test_case_inventory() -> None:
    names = [c.name for c in ALL_CASES]
    assert len(names) == len(set(names)), "case names must be unique: they are the test ids"
    assert len(ALL_CASES) == TOTAL_CASES, (
        f"onnx {onnx.__version__} ships {len(ALL_CASES)} backend-test models, expected "
        f"{TOTAL_CASES}: update TOTAL_CASES and ORT_CANNOT_RUN"
    )
    assert set(ORT_CANNOT_RUN) <= set(names)
    assert len(RUNNABLE) == EXPECTED_RUNNABLE


def test_onnxruntime_verdicts() -> None:
    """Probes every case in onnxruntime; the unrunnable ones must be exactly ORT_CANNOT_RUN."""
    cannot: dict[str, str] = {}
    disagree: list[str] = []
    for case in ALL_CASES:
        plain, default = _probe(case, optimize=False), _probe(case, optimize=True)
        if (plain is None) != (default is None):
            disagree.append(f"{case.name}: ORT_DISABLE_ALL {plain!r}, ORT_ENABLE_ALL {default!r}")
        if plain is not None or default is not None:
            cannot[case.name] = plain or default or ""
    assert not disagree, "optimization levels disagree:\n" + "\n".join(disagree)
    unexpected = sorted(set(cannot) - set(ORT_CANNOT_RUN))
    now_runnable = sorted(set(ORT_CANNOT_RUN) - set(cannot))
    listing = "\n".join(f"  {n}: {cannot[n]}" for n in sorted(cannot))
    assert not unexpected and not now_runnable, (
        f"onnxruntime {onnxruntime.__version__} cannot run {len(cannot)} cases:\n{listing}\n"
        f"not in ORT_CANNOT_RUN: {unexpected}; listed but runnable now: {now_runnable}"
    )
    wrong_reason = [n for n, why in ORT_CANNOT_RUN.items() if why not in cannot[n]]
    assert not wrong_reason, f"cannot run for another reason than listed: {wrong_reason}\n{listing}"
    assert len(ALL_CASES) - len(cannot) == EXPECTED_RUNNABLE


@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.name)
def test_optimize_preserves_outputs(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a failing pass writes its dsopt-crash-* reproducer here
    before = _fingerprint(case.model)
    result = dsopt.optimize(case.model)
    optimized = result.module.to_proto()
    assert _fingerprint(case.model) == before, "dsopt.optimize wrote its input file"
    _assert_equivalent(case, optimized)


@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.name)
def test_cli_keeps_input_and_writes_checked_model(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)  # no dsopt.toml or [tool.dsopt] around: the default pipeline
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    shutil.copyfile(case.model, source)
    before = _fingerprint(source)
    output = tmp_path / "out" / "optimized.onnx"
    output.parent.mkdir()

    code = dsopt_main(["optimize", str(source), "-o", str(output)])

    assert code == 0, capsys.readouterr().err
    assert _fingerprint(source) == before, "dsopt optimize wrote its input file"
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx"]
    assert output.is_file()
    if _checker_error(case.model) is None:
        onnx.checker.check_model(str(output), full_check=True)


def test_cli_refuses_to_overwrite_its_input(tmp_path: Path, capsys: Any) -> None:
    case = next(c for c in RUNNABLE if c.name == "test_Conv2d")
    source = tmp_path / "model.onnx"
    shutil.copyfile(case.model, source)
    before = _fingerprint(source)

    code = dsopt_main(["optimize", str(source), "-o", str(source)])

    assert code != 0
    assert "never overwrites its input" in capsys.readouterr().err
    assert _fingerprint(source) == before


def test_light_inputs_are_the_runners() -> None:
    """Our light-model feeds reproduce the shipped expected outputs, so they are the runner's."""
    for case in (c for c in RUNNABLE if c.kind == "light"):
        expected = onnx.numpy_helper.to_array(
            onnx.load_tensor(str(case.model.with_name(f"{case.name}_output_0.pb")))
        )
        (got,) = numerics.run_model(case.model, case.inputs()[0]).values()
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-7, err_msg=case.name)
