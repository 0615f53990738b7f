"""The fuzz campaign script runs (briefly) so it never rots; long runs are documented."""

from __future__ import annotations

from fuzz import fuzz_pipeline


def test_pipeline_fuzzer_smoke(capsys):
    assert fuzz_pipeline.main(["--examples", "25", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed=1\n")
    assert "ok: 25 examples" in out
