"""plugins/template/: the copyable plugin loads, declares its position, and its tests pass."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dsopt.driver import build_pipeline
from dsopt.plugin import PluginHost

TEMPLATE = Path(__file__).resolve().parents[2] / "plugins" / "template"


@pytest.fixture
def template_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TEMPLATE))
    yield
    for name in [m for m in sys.modules if m.startswith("dsopt_myplugin")]:
        del sys.modules[name]


def test_template_entry_point_names_its_package():
    project = tomllib.loads((TEMPLATE / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["dsopt"] == {"myplugin": "dsopt_myplugin"}
    assert (TEMPLATE / "dsopt_myplugin" / "__init__.py").is_file()


def test_template_pass_runs_at_its_declared_slot(template_on_path):
    host = PluginHost(extra=["dsopt_myplugin"], autoload=False)
    assert host.passes.providers["my-remove-transpose-pairs"] == "dsopt_myplugin"
    pipeline, _ = build_pipeline(host, passes=None, target=None)
    names = pipeline.names()
    i = names.index("my-remove-transpose-pairs")
    stages = [host.get_pass(n).stage for n in names]
    assert stages[i - 1] == "canonicalize" and "canonicalize" not in stages[i + 1 :]


def test_template_own_tests_pass():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEMPLATE / "tests")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(TEMPLATE)},
        cwd=TEMPLATE,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
