"""--max-memory and --timeout stop a run cleanly: one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dsopt.cli import main
from dsopt.errors import UsageError
from dsopt.limits import LimitExceeded, parse_size, resident_bytes, resource_limits

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"

#: A plugin whose passes never finish or keep allocating, loaded with `-p`.
_PLUGIN = '''
import dataclasses, time
import numpy as np
from dsopt import Pass, PassResult, hookimpl

@dataclasses.dataclass(frozen=True)
class SleepForever(Pass):
    """Sleeps."""
    name = "sleep-forever"
    summary = "sleeps"
    def run(self, module, ctx):
        while True:
            time.sleep(0.05)

@dataclasses.dataclass(frozen=True)
class HoardMemory(Pass):
    """Allocates 20 MB a step."""
    name = "hoard-memory"
    summary = "allocates"
    def run(self, module, ctx):
        hoard = []
        for _ in range(400):
            hoard.append(np.ones(5_000_000, np.float32))
            time.sleep(0.005)
        return PassResult(False, {})

@hookimpl
def dsopt_register_passes(registry):
    registry.add(SleepForever)
    registry.add(HoardMemory)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "limits_plugin.py").write_text(_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "limits_plugin"


def _optimize(tmp_path, plugin, capsys, *flags):
    source = tmp_path / "in.onnx"
    source.write_bytes(EXAMPLE.read_bytes())
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-o", str(out), "-p", plugin, *flags])
    assert source.read_bytes() == EXAMPLE.read_bytes(), "the input was modified"
    return code, capsys.readouterr().err, out


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 * 10**6), ("4GB", 4 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "4 parsecs", "0"])
def test_parse_size_rejects_what_is_not_a_size(text):
    with pytest.raises(UsageError, match="--max-memory .* is not a size"):
        parse_size(text)


def test_timeout_stops_a_pass_that_never_ends(tmp_path, plugin, capsys):
    started = time.monotonic()
    code, err, out = _optimize(
        tmp_path, plugin, capsys, "--passes", "sleep-forever", "--timeout", "0.5"
    )
    assert code == 2
    assert time.monotonic() - started < 5
    first = err.splitlines()[0]
    assert first.startswith("dsopt: error: dsopt optimize: stopped after 0.")
    assert "over --timeout 0.5s" in first and "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "limits_plugin.py"]


def test_max_memory_stops_a_pass_that_keeps_allocating(tmp_path, plugin, capsys):
    limit = resident_bytes() + 200 * 10**6
    code, err, out = _optimize(
        tmp_path, plugin, capsys, "--passes", "hoard-memory", "--max-memory", str(limit)
    )
    assert code == 2
    assert "resident memory, over --max-memory" in err.splitlines()[0]
    assert "Traceback" not in err and not out.exists()


def test_a_run_within_its_limits_is_untouched(tmp_path, plugin, capsys):
    code, err, out = _optimize(tmp_path, plugin, capsys, "--timeout", "600", "--max-memory", "64GB")
    assert code == 0, err
    assert out.exists()


def test_bad_limits_are_usage_errors(tmp_path, plugin, capsys):
    code, err, _ = _optimize(tmp_path, plugin, capsys, "--max-memory", "much")
    assert code == 2 and "--max-memory 'much' is not a size" in err
    code, err, _ = _optimize(tmp_path, plugin, capsys, "--timeout", "-3")
    assert code == 2 and "--timeout -3 must be positive" in err


def test_limit_exceeded_is_not_caught_by_except_exception():
    swallowed = False
    with pytest.raises(LimitExceeded, match="over --timeout"), resource_limits(timeout=0.2):
        try:
            time.sleep(5)
        except Exception:  # noqa: BLE001 - what a careless callee does
            swallowed = True
    assert not swallowed


def test_a_callee_that_swallows_everything_is_ended_after_the_grace_period(tmp_path):
    leftover = tmp_path / ".out.onnx.tmp"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        import dsopt.limits as limits
        limits.GRACE_SECONDS = 0.5
        Path({str(leftover)!r}).write_text("half")
        with limits.discard_on_abort({str(leftover)!r}), limits.resource_limits(timeout=0.2):
            while True:
                try:
                    time.sleep(0.05)
                except BaseException:
                    pass
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "over --timeout 0.2s" in done.stderr and "Traceback" not in done.stderr
    assert not leftover.exists()
