"""The Python API's spellings: `dsopt.optimize(model, passes=..., target=..., calib=...)`."""

from __future__ import annotations

import numpy as np
import pytest

import dsopt
from dsopt import UsageError, parse_pipeline
from tests.core.models import tiny


def _ran(result) -> list[str]:
    return [record.name for record in result.report.passes]


def test_passes_as_text_list_or_pipeline_run_the_same():
    text = dsopt.optimize(tiny(), passes="eliminate-noops,eliminate-dead")
    listed = dsopt.optimize(tiny(), passes=["eliminate-noops", "eliminate-dead"])
    pipeline = parse_pipeline("eliminate-noops")
    pipeline.append("eliminate-dead")
    built = dsopt.optimize(tiny(), passes=pipeline)
    assert _ran(text) == _ran(listed) == _ran(built) == ["eliminate-noops", "eliminate-dead"]
    assert text.model.SerializeToString() == built.model.SerializeToString()


def test_calib_is_the_calibration_keyword():
    model = tiny()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(2)]
    result = dsopt.optimize(model, precision="int8", calib=feeds)
    assert (result.calibration["from"], result.calibration["samples"]) == ("user", 2)
    with pytest.raises(UsageError, match="calib"):
        dsopt.optimize(model, precision="int8", calib=feeds, calibration=feeds)
