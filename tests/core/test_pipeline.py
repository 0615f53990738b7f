from __future__ import annotations

import pytest

from dsopt import UsageError, parse_pipeline
from dsopt.pipeline import default_pipeline, find_config, load_config


def test_parse_names_and_options():
    pipeline = parse_pipeline("fold-constants{max_size_mb=4, x=y},eliminate-dead")
    assert pipeline.names() == ["fold-constants", "eliminate-dead"]
    assert pipeline.entries[0].options == {"max_size_mb": "4", "x": "y"}
    assert str(pipeline) == "fold-constants{max_size_mb=4,x=y},eliminate-dead"


@pytest.mark.parametrize(
    "text, where",
    [
        ("a{b=1", "unclosed"),
        ("a{b}", "needs a value"),
        ("a b", "expected ','"),
        ("", "empty"),
        ("a,{x=1}", "expected a pass name"),
    ],
)
def test_parse_errors_name_the_problem(text, where):
    with pytest.raises(UsageError, match=where):
        parse_pipeline(text)


def test_insert_after_and_before():
    pipeline = parse_pipeline("a,b")
    pipeline.insert_after("a", "x{k=1}")
    pipeline.insert_before("a", "y")
    assert pipeline.names() == ["y", "a", "x", "b"]
    with pytest.raises(UsageError, match="no pass 'zzz'"):
        pipeline.insert_after("zzz", "q")


def test_with_options_text_wins():
    pipeline = parse_pipeline("a{k=1},b").with_options({"a": {"k": 2, "j": 3}, "b": {"m": 1}})
    assert pipeline.entries[0].options == {"k": "1", "j": "3"}
    assert pipeline.entries[1].options == {"m": "1"}


def test_default_pipeline_repeats():
    assert default_pipeline().rounds > 1
    assert "fold-constants" in default_pipeline().names()


def test_config_files(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.dsopt]\npasses = ["fold-constants", "eliminate-dead"]\nverify = "each"\n'
        "[tool.dsopt.options.fold-constants]\nmax_size_mb = 2\n"
    )
    found = find_config(tmp_path)
    assert found == tmp_path / "pyproject.toml"
    config = load_config(found)
    assert config["passes"] == "fold-constants,eliminate-dead"
    assert config["options"]["fold-constants"] == {"max_size_mb": 2}
    (tmp_path / "dsopt.toml").write_text('target = "onnxruntime"\nbogus = 1\n')
    with pytest.raises(UsageError, match="unknown dsopt setting 'bogus'"):
        load_config(find_config(tmp_path))
    (tmp_path / "dsopt.toml").write_text("target = [\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config(tmp_path / "dsopt.toml")


def test_default_names_the_default_pipeline_inside_pipeline_text():
    from dsopt.pipeline import DEFAULT_PIPELINE, parse_pipeline

    pipeline = parse_pipeline("legalize-quantized,default,eliminate-dead")
    assert pipeline.names() == [
        "legalize-quantized",
        *parse_pipeline(DEFAULT_PIPELINE).names(),
        "eliminate-dead",
    ]
