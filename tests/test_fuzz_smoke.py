"""The fuzz campaign script runs (briefly) so it never rots; long runs are documented."""

from __future__ import annotations

from fuzz import fuzz_inputs, fuzz_pipeline

#: Examples per CI run: 2,000 across the two fuzzers (long campaigns: FUZZING.md).
PIPELINE_EXAMPLES, INPUT_EXAMPLES = 800, 1200


def test_pipeline_fuzzer_smoke(capsys):
    assert fuzz_pipeline.main(["--examples", str(PIPELINE_EXAMPLES), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed=1\n")
    assert f"ok: {PIPELINE_EXAMPLES} examples" in out


def test_input_fuzzer_smoke(capsys):
    assert fuzz_inputs.main(["--examples", str(INPUT_EXAMPLES), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed=1\n") and f"ok: {INPUT_EXAMPLES} examples" in out
    refused = int(out.split("(")[1].split()[0])
    assert refused > INPUT_EXAMPLES // 2  # the mutations really break most models
