"""Models past protobuf's 2 GB limit round-trip through external data (marked `large`).

Deselected by default (several GB of memory and disk, about a minute): run with
`python -m pytest -m large tests/core/test_large_models.py`.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsopt.cli import main

pytestmark = pytest.mark.large

#: Two [K, N] float32 weights of 1.07 GB each: 2.15 GB in all, past protobuf's 2 GiB limit
#: (one tensor of that size could not even be built as a TensorProto).
K, N = 4096, 65_600


def _big_model(path):
    rng = np.random.default_rng(0)
    tile = rng.standard_normal((K, 1024), dtype=np.float32) * 0.02
    weights = [np.roll(np.tile(tile, (1, N // 1024 + 1))[:, :N], i, axis=0) for i in range(2)]
    bias = rng.standard_normal(2 * N, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["x1"]),
            helper.make_node("MatMul", ["x1", "w0"], ["mm0"]),
            helper.make_node("MatMul", ["x1", "w1"], ["mm1"]),
            helper.make_node("Concat", ["mm0", "mm1"], ["mm"], axis=1),
            helper.make_node("Add", ["mm", "b"], ["biased"]),
            helper.make_node("Relu", ["biased"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2 * N])],
    )
    for i, weight in enumerate(weights):
        graph.initializer.append(numpy_helper.from_array(weight, f"w{i}"))
    graph.initializer.append(numpy_helper.from_array(bias, "b"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, path, save_as_external_data=True, location="big.onnx.data")


def _run(path, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    path = folder / "big.onnx"
    _big_model(path)
    assert os.path.getsize(folder / "big.onnx.data") > 2**31
    return path


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_over_2gb_round_trips(big, tmp_path, precision, capsys):
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in big.parent.iterdir()}
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(big), "--precision", precision, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in big.parent.iterdir()}
    assert after == before  # the input is never touched
    model = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in model.graph.node if n.op_type == "Identity"] == []
    stored = sum(p.stat().st_size for p in tmp_path.iterdir())
    if precision == "fp32":
        assert any(
            t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer
        )  # past 2 GB the weights must live outside the protobuf
        assert stored > 2**31
    else:
        assert stored < 2**31 * 0.3  # int8 weights: a quarter of the size
    feed = {"x": np.random.default_rng(1).standard_normal((1, K), dtype=np.float32)}
    want, got = _run(big, feed), _run(out, feed)
    if precision == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:
        cosine = float(want.ravel() @ got.ravel()) / (np.linalg.norm(want) * np.linalg.norm(got))
        assert cosine > 0.99


def test_peak_memory_stays_under_twice_the_model(big, tmp_path):
    """fp32 optimize of the 2.15 GB model in a fresh process: VmHWM <= 2x the model's bytes."""
    import subprocess
    import sys

    size = sum(p.stat().st_size for p in big.parent.iterdir())
    script = (
        "from dsopt.cli import main\n"
        f"assert main(['optimize', {str(big)!r}, '-o', {str(tmp_path / 'out.onnx')!r}]) == 0\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1]) * 1024
    assert peak <= 2 * size, f"peak {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB model"
