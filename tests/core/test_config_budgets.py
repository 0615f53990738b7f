"""`size_budget`, `max_error` and `min_cosine` as config keys (dsopt.toml, [tool.dsopt])."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsopt import UsageError, optimize
from dsopt.cli import main
from dsopt.pipeline import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny_cnn.onnx"


def _show(capsys, *argv: str) -> dict:
    assert main(["config", "--show", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_show_prints_budgets_and_flags_override(tmp_path, capsys):
    config = tmp_path / "dsopt.toml"
    config.write_text('precision = "mixed"\nsize_budget = "12KB"\nmax_error = 0.02\n')
    shown = _show(capsys, "--config", str(config))
    assert (shown["size_budget"], shown["max_error"], shown["min_cosine"]) == ("12KB", 0.02, None)
    shown = _show(capsys, "--config", str(config), "--max-error", "0.05", "--min-cosine", "0.99")
    assert (shown["size_budget"], shown["max_error"], shown["min_cosine"]) == ("12KB", 0.05, 0.99)
    assert main(["config", "--show", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert 'size_budget = "12KB"' in text and "max_error = 0.02" in text
    assert "min_cosine" not in text  # unset keys are not printed


def test_pyproject_tool_dsopt_budgets(tmp_path, capsys):
    project = tmp_path / "pyproject.toml"
    project.write_text('[project]\nname = "x"\n\n[tool.dsopt]\nmin_cosine = 0.995\n')
    assert load_config(project)["min_cosine"] == 0.995
    assert _show(capsys, "--config", str(project))["min_cosine"] == 0.995


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('size_budget = "lots"', "size_budget"),
        ("size_budget = 1.5", "size_budget"),
        ("size_budget = 0", "size_budget"),
        ("size_budget = true", "size_budget"),
        ("max_error = -0.1", "max_error"),
        ('max_error = "0.01"', "max_error"),
        ("max_error = inf", "max_error"),
        ("min_cosine = 1.5", "min_cosine"),
        ("min_cosine = false", "min_cosine"),
    ],
)
def test_bad_budget_is_a_one_line_usage_error_naming_the_key(tmp_path, capsys, line, key):
    config = tmp_path / "dsopt.toml"
    config.write_text(line + "\n")
    with pytest.raises(UsageError, match=rf"dsopt.toml: {key} = .* is not ") as info:
        load_config(config)
    assert "\n" not in info.value.message
    assert main(["config", "--show", "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dsopt: error: ") and key in err[0]
    assert err[1].startswith("  hint: ") and len(err) == 2


def test_bad_flag_override_names_the_flag(tmp_path, capsys):
    config = tmp_path / "dsopt.toml"
    config.write_text("size_budget = 0.5\n")
    assert main(["config", "--show", "--config", str(config), "--size-budget", "huge"]) == 2
    assert "--size-budget: size_budget = 'huge' is not" in capsys.readouterr().err


def test_mixed_run_takes_budgets_from_config_and_flags_win(tmp_path):
    config = {"precision": "mixed", "size_budget": 0.3, "min_cosine": 0.9}
    from_config = optimize(EXAMPLE, config=config, calibration="synthetic")
    budget = from_config.mixed.to_dict()["budget"]
    fp32 = from_config.mixed.to_dict()["fp32_bytes"]
    assert budget == {"size": int(0.3 * fp32), "max_error": None, "min_cosine": 0.9}
    flagged = optimize(EXAMPLE, config=config, calibration="synthetic", size_budget=0.5)
    assert flagged.mixed.to_dict()["budget"]["size"] == int(0.5 * fp32)
    assert flagged.mixed.to_dict()["budget"]["min_cosine"] == 0.9


def test_config_budgets_do_not_apply_to_other_precisions(tmp_path):
    config = {"precision": "mixed", "size_budget": 0.3}
    result = optimize(EXAMPLE, config=config, precision="fp16")
    assert result.mixed is None
    with pytest.raises(UsageError, match="--max-error applies to --precision mixed"):
        optimize(EXAMPLE, config=config, precision="fp16", max_error=0.01)


def test_cli_optimize_reads_budgets_from_the_config(tmp_path, monkeypatch):
    (tmp_path / "dsopt.toml").write_text('precision = "mixed"\nsize_budget = 0.4\n')
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "r.json"
    argv = ["optimize", str(EXAMPLE), "-o", str(tmp_path / "m.onnx"), "--calib", "synthetic"]
    assert main([*argv, "--report", str(report)]) == 0
    mixed = json.loads(report.read_text())["mixed"]
    assert mixed["budget"]["size"] == int(0.4 * mixed["fp32_bytes"])
