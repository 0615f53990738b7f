"""Meta-tests: passes, hooks and the public API stay documented, tested and consistent."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import dsopt
from dsopt import hookspecs
from dsopt.plugin import PluginHost

ROOT = Path(__file__).resolve().parents[1]


def _builtin_passes():
    host = PluginHost(autoload=False)
    return [p for p in host.passes if host.passes.providers[p.name] == "dsopt.passes"]


def test_every_builtin_pass_has_tests_golden_files_and_matching_names():
    for pass_class in _builtin_passes():
        stem = pass_class.name.replace("-", "_")
        module_file = Path(inspect.getfile(pass_class))
        assert module_file.stem == stem, f"{pass_class.name} lives in {module_file.name}"
        camel = "".join(word.capitalize() for word in pass_class.name.split("-"))
        assert pass_class.__name__ == camel, f"class {pass_class.__name__} != {camel}"
        assert (ROOT / "tests" / "passes" / f"test_{stem}.py").is_file(), stem
        golden = ROOT / "tests" / "golden" / pass_class.name
        assert list(golden.glob("*.before.onnxtxt")), f"no golden cases for {pass_class.name}"
        assert pass_class.__doc__ and pass_class.summary


def test_every_builtin_pass_has_a_property_test():
    for pass_class in _builtin_passes():
        text = (
            ROOT / "tests" / "passes" / f"test_{pass_class.name.replace('-', '_')}.py"
        ).read_text()
        assert "@given(" in text and "check_pass(" in text, pass_class.name


def _hook_names():
    return sorted(name for name in dir(hookspecs) if name.startswith("dsopt_"))


def test_every_hook_is_documented_with_its_signature():
    docs = (ROOT / "docs" / "hooks.md").read_text()
    for name in _hook_names():
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"## {name}({params})" in docs, f"{name}({params}) missing from docs/hooks.md"


def test_every_hook_has_a_test():
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for name in _hook_names():
        assert re.search(rf"\btest_hook_{name}\b", tests), f"no test_hook_{name}"


def test_public_api_is_pinned():
    assert sorted(dsopt.__all__) == sorted(
        [
            "Analysis",
            "AnalysisManager",
            "Artifact",
            "CheckFailed",
            "CompileResult",
            "DsoptError",
            "GraphView",
            "LoweringError",
            "ModelError",
            "Module",
            "OptimizeResult",
            "Pass",
            "PassContext",
            "PassError",
            "PassManager",
            "PassResult",
            "Pipeline",
            "PluginError",
            "PluginHost",
            "Shapes",
            "Target",
            "TensorType",
            "TopologicalOrder",
            "UsageError",
            "VerificationError",
            "__version__",
            "compile",
            "hookimpl",
            "optimize",
            "parse_pipeline",
        ]
    )
    for name in dsopt.__all__:
        assert hasattr(dsopt, name)


def test_no_tvm_import_outside_the_tvm_module():
    offenders = []
    for path in [
        *ROOT.glob("dsopt/**/*.py"),
        *ROOT.glob("passes/*.py"),
        *ROOT.glob("targets/*.py"),
    ]:
        if path.name == "_tvm.py":
            continue
        if re.search(r"^\s*(import tvm|from tvm)", path.read_text(), re.M):
            offenders.append(str(path))
    assert not offenders


def test_no_bare_passes_or_targets_imports():
    pattern = re.compile(r"^\s*(from|import) (passes|targets)\b", re.M)
    offenders = [
        str(p)
        for p in ROOT.rglob("*.py")
        if ".git" not in p.parts and pattern.search(p.read_text())
    ]
    assert not offenders
