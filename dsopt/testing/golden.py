"""Golden tests: `<case>.before.onnxtxt` run through a pass must print as `<case>.after.onnxtxt`."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx.parser
import onnx.printer

from dsopt.pass_infra import Pass, PassContext, PassResult
from dsopt.testing import check_pass

__all__ = ["UPDATE_ENV", "golden_cases", "run_golden"]

#: Set (by `pytest --update-golden`) to rewrite the expected files instead of comparing.
UPDATE_ENV = "DSOPT_UPDATE_GOLDEN"


def golden_cases(folder: str | os.PathLike[str]) -> list[Path]:
    """The `*.before.onnxtxt` files of a golden folder, sorted."""
    return sorted(Path(folder).glob("*.before.onnxtxt"))


def canonical_text(model: onnx.ModelProto) -> str:
    """The model in ONNX text syntax, the form golden files are compared in."""
    return onnx.printer.to_text(model).strip() + "\n"


def run_golden(
    pass_: Pass, before: str | os.PathLike[str], ctx: PassContext | None = None
) -> PassResult:
    """Runs `pass_` on a golden case (checked with `check_pass`) and compares the text."""
    before = Path(before)
    model = onnx.parser.parse_model(before.read_text())
    rewritten, result = check_pass(pass_, model, ctx=ctx)
    expected_path = before.with_name(before.name.replace(".before.", ".after."))
    actual = canonical_text(rewritten)
    if os.environ.get(UPDATE_ENV) or not expected_path.exists():
        expected_path.write_text(actual)
    expected = expected_path.read_text()
    assert actual == expected, (
        f"golden mismatch for {before.name}; rerun with --update-golden and review the diff\n"
        f"--- expected\n{expected}\n--- actual\n{actual}"
    )
    return result
