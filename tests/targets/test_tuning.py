"""MetaSchedule tuning (`--tune-minutes`): a database reused across runs, RPC trials on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt.cli import main

pytest.importorskip("tvm")
pytest.importorskip("psutil")  # the test extra installs these
pytest.importorskip("cloudpickle")

pytestmark = [pytest.mark.tvm, pytest.mark.slow]

#: Trials per tuning run: enough to write records, few enough for a 2-core machine.
TRIALS = 3


def conv_relu(channels: int = 8, size: int = 12) -> onnx.ModelProto:
    """One Conv + bias + Relu: a single fused function to tune."""
    rng = np.random.default_rng(channels)
    weights = [
        numpy_helper.from_array(
            (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "w"
        ),
        numpy_helper.from_array((rng.standard_normal(channels) * 0.1).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dsopt: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _tuning(outdir: Path) -> dict:
    manifest = json.loads((outdir / "manifest.json").read_text())
    return manifest["tvm"]


def test_tuning_writes_a_database_that_the_next_run_reuses(tmp_path):
    model = _save(conv_relu(), tmp_path / "m.onnx")
    db = tmp_path / "db"
    first = dsopt.compile(
        model,
        target="x86",
        outdir=tmp_path / "a",
        tune={"minutes": 2, "db": str(db), "trials": TRIALS, "trials_per_iter": TRIALS},
    )
    tvm = first.manifest["tvm"]
    tuning = tvm["tuning"]
    assert tuning["budget_minutes"] == 2 and tuning["runner"] == "local"
    assert tuning["tasks"] == 1 and tuning["tasks_reused"] == 0 and tuning["tasks_tuned"] == 1
    assert tuning["trials"] == TRIALS and tuning["failed_trials"] == 0
    assert tuning["seconds"] < 120
    assert tuning["database"]["path"] == str(db.resolve())
    assert tuning["database"]["records"] >= 1
    assert (db / "database_workload.json").stat().st_size > 0
    assert len((db / "database_tuning_record.json").read_text().splitlines()) == TRIALS
    # The tuned schedule runs unless dsopt's default one measured faster (then that one stays).
    assert tvm["schedules"]["tuned"] + tvm["schedules"]["default_faster"] == 1
    assert tuning["defaults_measured"] == 1
    assert len(json.loads((db / "dsopt_default_seconds.json").read_text())) == 1
    assert first.report["library_check"]["ok"] is True
    assert first.manifest["library_verified"] is True

    # Same workload, same database (through the CLI): nothing is tuned again.
    before = (db / "database_tuning_record.json").read_bytes()
    code = main(
        ["compile", str(model), "--target", "x86", "-o", str(tmp_path / "b")]
        + ["--tune-minutes", "1", "--tune-db", str(db)]
    )
    assert code == 0
    again = _tuning(tmp_path / "b")
    assert again["tuning"]["tasks_reused"] == 1 and again["tuning"]["trials"] == 0
    assert again["tuning"]["database"]["sha256"] == tuning["database"]["sha256"]
    assert (db / "database_tuning_record.json").read_bytes() == before
    assert again["schedules"]["tuned"] == tvm["schedules"]["tuned"]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["library_check"]["ok"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers are stopped with it
    )


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture
def rpc_tracker(tmp_path):
    """A TVM RPC tracker and one device server (this machine) on free loopback ports."""
    pytest.importorskip("tornado")  # the tracker's event loop
    from tvm import rpc

    shim = tmp_path / "shim"
    shim.mkdir()
    # tvm_ffi imports torch eagerly; these processes never need it (8-12 s each here).
    (shim / "torch.py").write_text("raise ImportError('not needed by the RPC processes')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
    }
    port, key = _free_port(), "dsopt-test"
    procs = [
        _start(
            ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port)]
            + ["--port-end", str(port + 1)],
            env,
            tmp_path / "tracker.log",
        )
    ]
    try:
        server_port = _free_port()
        procs.append(
            _start(
                ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port)]
                + ["--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{port}"]
                + ["--key", key],
                env,
                tmp_path / "server.log",
            )
        )
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                summary = rpc.connect_tracker("127.0.0.1", port).summary()
                if any(q == key for q in summary.get("queue_info", {})):
                    break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                logs = [(tmp_path / n).read_text() for n in ("tracker.log", "server.log")]
                pytest.fail(f"the RPC tracker/server did not come up: {logs}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}:{key}"
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_tuning_runs_trials_on_an_rpc_server(tmp_path, rpc_tracker):
    model = _save(conv_relu(channels=4, size=10), tmp_path / "m.onnx")
    db = tmp_path / "db"
    result = dsopt.compile(
        model,
        target="x86",
        outdir=tmp_path / "o",
        tune={"minutes": 2, "db": str(db), "rpc": rpc_tracker, "trials": 2, "trials_per_iter": 2},
    )
    tuning = result.manifest["tvm"]["tuning"]
    host, port, key = rpc_tracker.split(":")
    assert tuning["runner"] == f"rpc {host}:{port} key {key}"
    assert tuning["trials"] == 2 and tuning["failed_trials"] == 0
    assert tuning["database"]["records"] >= 1
    assert len((db / "database_tuning_record.json").read_text().splitlines()) == 2
    schedules = result.manifest["tvm"]["schedules"]
    assert schedules["tuned"] + schedules["default_faster"] == 1
    assert result.report["library_check"]["ok"] is True


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--tune-minutes", "1", "--tune-rpc", "board"], "expected HOST:PORT:KEY"),
        (["--tune-minutes", "1", "--tune-rpc", "host:port:key"], "expected HOST:PORT:KEY"),
        (["--tune-minutes", "1", "--tune-rpc", "host:9190:"], "expected HOST:PORT:KEY"),
        (["--tune-minutes", "1", "--tune-rpc", "host:99999:key"], "outside 1..65535"),
        (["--tune-db", "somewhere"], "need --tune-minutes N"),
        (["--tune-minutes", "0"], "positive number of minutes"),
        (["--tune-minutes", "1", "--target", "onnxruntime"], "not compiled by TVM"),
        (["--tune-minutes", "1", "--target", "arm-neon"], "--tune-rpc HOST:PORT:KEY"),
    ],
)
def test_bad_tuning_options_are_one_line_usage_errors(tmp_path, capsys, extra, expected):
    model = _save(conv_relu(), tmp_path / "m.onnx")
    target = [] if "--target" in extra else ["--target", "x86"]
    code = main(["compile", str(model), *target, "-o", str(tmp_path / "o"), *extra])
    assert code == 2
    assert expected in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_arm_trials_are_cross_linked_for_the_board(tmp_path, monkeypatch):
    compiler = "aarch64-linux-gnu-g++"
    if not shutil.which(compiler):
        pytest.skip(f"{compiler} is not installed (scripts/setup-cross.sh)")
    from tvm import tirx
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from dsopt import _tvm

    seen = {}

    def fake_tune(mod, config, **kwargs):
        seen.update(kwargs)
        db = tmp_path / "db"
        db.mkdir()
        for name in ("database_workload.json", "database_tuning_record.json"):
            (db / name).write_text("")
        return {"database": {"path": str(db)}}

    monkeypatch.setattr(_tvm, "tune", fake_tune)
    model = _save(conv_relu(), tmp_path / "m.onnx")
    rpc = {"host": "127.0.0.1", "port": 9190, "key": "rpi4"}
    result = dsopt.compile(
        model, target="rpi4", outdir=tmp_path / "o", tune={"minutes": 1, "rpc": rpc}
    )
    assert seen["linker"] == compiler and seen["rpc"] == rpc
    assert result.manifest["tvm"]["tuning"]["database"]["path"] == str(tmp_path / "db")

    # What the builder's workers do with each trial: an AArch64 shared library for the board.
    config = result.manifest["tvm"]["target"]
    target = _tvm.make_target(config)
    fused = _tvm._fuse_for_tuning(
        _tvm.import_onnx(conv_relu(), {"x": [1, 3, 12, 12]}, {"x": "float32"}), target
    )
    func = next(f for _, f in fused.functions_items() if isinstance(f, tirx.PrimFunc))
    artifact = Path(
        _tvm._tune_export(_tvm._tune_build(_normalize_mod(func), target, None), linker=compiler)
    )
    header = artifact.read_bytes()[:20]
    assert (
        header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 0xB7
    )  # EM_AARCH64
    shutil.rmtree(artifact.parent)
