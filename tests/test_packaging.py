"""The wheel installs exactly one top-level name, `dsopt`, with every built-in pass in it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_dsopt_and_all_passes(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dsopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"dsopt"}
    for module in (ROOT / "passes").glob("*.py"):
        assert f"dsopt/passes/{module.name}" in names
    for module in (ROOT / "targets").glob("*.py"):
        assert f"dsopt/targets/{module.name}" in names
    for module in (ROOT / "dsopt").rglob("*.py"):  # every subpackage (quant, mixed, ...) too
        assert f"dsopt/{module.relative_to(ROOT / 'dsopt').as_posix()}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dsopt = dsopt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_bare_passes_package_is_not_importable():
    result = subprocess.run(
        [sys.executable, "-c", "import passes"], capture_output=True, cwd="/", text=True
    )
    assert result.returncode != 0
