"""Hostile input: corrupted or invalid models end in one line and exit 2, never a traceback."""

from __future__ import annotations

import random
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from dsopt.cli import main
from tests.core.models import tiny

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cnn.onnx"


def _run(tmp_path, data: bytes, capsys) -> tuple[int, str, Path]:
    source = tmp_path / "in.onnx"
    source.write_bytes(data)
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-o", str(out), "--check"])
    err = capsys.readouterr().err
    assert source.read_bytes() == data, "the input was modified"
    return code, err, out


@pytest.mark.parametrize("seed", range(60))
def test_mutated_bytes_never_crash(tmp_path, capsys, seed):
    rng = random.Random(seed)
    data = bytearray(EXAMPLE.read_bytes())
    kind = ("flip", "truncate", "splice")[seed % 3]
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    else:
        at, source = rng.randrange(len(data)), rng.randrange(len(data))
        data[at : at + 8] = data[source : source + 8]
    code, err, out = _run(tmp_path, bytes(data), capsys)
    assert "Traceback" not in err
    assert code in (0, 1, 2), err
    if code == 0:
        onnx.checker.check_model(onnx.load(out), full_check=True)
    else:
        assert not out.exists()
        assert err.startswith("dsopt: error: ") or "outputs differ" in err


def test_dangling_input_is_a_model_error(tmp_path, capsys):
    model = tiny()
    model.graph.node[1].input[0] = "nowhere"
    code, err, out = _run(tmp_path, model.SerializeToString(), capsys)
    assert code == 2 and not out.exists()
    first = err.splitlines()[0]
    assert "in.onnx: the input is not a valid ONNX model" in first and "nowhere" in first


def test_unsorted_nodes_are_sorted_not_refused(tmp_path, capsys):
    model = tiny()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    code, err, out = _run(tmp_path, model.SerializeToString(), capsys)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_unknown_opset_and_op(tmp_path, capsys):
    model = tiny(opset=999)
    code, err, out = _run(tmp_path, model.SerializeToString(), capsys)
    assert code == 2 and not out.exists() and "Traceback" not in err
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    unknown = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    code, err, out = _run(tmp_path, unknown.SerializeToString(), capsys)
    assert code == 2 and "NoSuchOp" in err.splitlines()[0]


def test_verify_off_skips_the_input_check(tmp_path, capsys):
    model = tiny()
    model.graph.node[1].input[0] = "nowhere"
    source = tmp_path / "in.onnx"
    onnx.save_model(model, source)
    code = main(
        [
            "optimize",
            str(source),
            "-o",
            str(tmp_path / "o.onnx"),
            "--verify",
            "off",
            "--passes",
            "eliminate-dead",
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_an_input_too_large_for_a_random_sample_is_one_line(tmp_path, capfd):
    big = [2**20, 2**20]  # valid, but 4 TiB of float32 as a random check sample
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, big)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, big)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source, out = tmp_path / "huge.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    code = main(["optimize", str(source), "-o", str(out), "--check"])
    err = capfd.readouterr().err  # file-descriptor level: onnxruntime's C++ log too
    assert code == 2 and not out.exists()
    assert err.startswith("dsopt: error: input ") and "too many for a random sample" in err
    assert len(err.strip().splitlines()) == 2 and "hint: give a smaller one with --shape" in err


def test_onnxruntime_load_failures_print_only_dsopts_line(tmp_path, capfd):
    model = tiny()
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("nowhere", TensorProto.FLOAT, [1]))
    source = tmp_path / "bad.onnx"
    source.write_bytes(model.SerializeToString())
    code = main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--check"])
    err = capfd.readouterr().err
    assert code == 2
    assert all(line.startswith(("dsopt: error:", "  hint:")) for line in err.strip().splitlines())


def test_declared_output_shape_that_the_graph_contradicts_is_exit_2(tmp_path, capsys):
    """Fuzz finding (zero-dim): Reshape(x, Shape(x)) hid that the output claims [1, 1, 1]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "first_two"], ["g"]),
        helper.make_node("Concat", ["g", "one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lying_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 0, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1])],
        [
            helper.make_tensor("first_two", TensorProto.INT64, [2], [0, 1]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    code, err, out = _run(tmp_path, model.SerializeToString(), capsys)
    assert code == 2, err
    assert "declared shapes contradict what it computes" in err.splitlines()[0]
    assert "Traceback" not in err and not out.exists()
