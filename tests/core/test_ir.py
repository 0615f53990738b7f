from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsopt import ModelError, Module
from dsopt.ir import load, save_model
from tests.core.models import tiny


def test_round_trip_keeps_model_facts():
    model = tiny()
    model.opset_import.append(helper.make_opsetid("com.example", 3))
    out = Module.from_proto(model).to_proto()
    assert {(i.domain, i.version) for i in out.opset_import} == {("", 17), ("com.example", 3)}
    assert out.ir_version == 8
    assert out.producer_name == "test"
    assert {p.key: p.value for p in out.metadata_props} == {"author": "dsopt-tests"}
    onnx.checker.check_model(out, full_check=True)


def test_round_trip_is_deterministic():
    first = Module.from_proto(tiny()).to_proto().SerializeToString(deterministic=True)
    second = Module.from_proto(tiny()).to_proto().SerializeToString(deterministic=True)
    assert first == second


def test_subgraphs_are_visited():
    then = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    module = Module.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert module.node_count() == 3
    assert sorted(g.name for g in module.graphs()) == ["else", "g", "then"]


def test_load_errors_are_one_line_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(ModelError, match="bad.onnx"):
        load(bad)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny().SerializeToString()[:40])
    with pytest.raises(ModelError):
        load(truncated)


def test_external_data_outside_model_folder_is_refused(tmp_path):
    model = tiny()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../../etc/passwd")
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path)
    with pytest.raises(ModelError, match="outside the model's folder"):
        load(path)


def test_external_data_loads(tmp_path):
    model = tiny()
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.data",
        size_threshold=0,
    )
    module = Module.load(path)
    values = [np.asarray(t.values) for t in module.graph.tensors().values() if t.name == "c"]
    assert np.array_equal(values[0], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_save_switches_to_external_data_past_threshold(tmp_path, monkeypatch):
    import dsopt.ir

    monkeypatch.setattr(dsopt.ir, "_EXTERNAL_DATA_THRESHOLD", 16)
    model = tiny()
    model.graph.initializer[0].CopyFrom(
        numpy_helper.from_array(np.ones((2, 3), np.float32) * np.arange(3, dtype=np.float32), "c")
    )
    big = numpy_helper.from_array(np.ones((64, 64), np.float32), "big")
    model.graph.initializer.append(big)
    path = save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    reloaded = load(path)
    assert numpy_helper.to_array(reloaded.graph.initializer[0]).shape == (2, 3)
    assert not list(tmp_path.glob(".*tmp"))


def test_old_ir_weights_listed_as_inputs_become_constants():
    model = tiny()
    model.ir_version = 3
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3]))
    out = Module.from_proto(model).to_proto()
    assert [i.name for i in out.graph.input] == ["x"]
    assert out.ir_version >= 4
    onnx.checker.check_model(out, full_check=True)
