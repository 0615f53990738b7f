"""Tests for dsopt.summary: counts, op histogram, parameters, FLOPs and rendering."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from dsopt import summary

LIGHT_MODELS_DIR = pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = sorted(LIGHT_MODELS_DIR.glob("*.onnx"))


def _weight(name: str, *shape: int, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opsets: dict[str, int] | None = None,
    **graph_fields: object,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **graph_fields)
    opset_imports = [helper.make_opsetid(d, v) for d, v in (opsets or {"": 17}).items()]
    return helper.make_model(graph, opset_imports=opset_imports)


def _float(name: str, shape: list[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ops(result: summary.ModelSummary) -> dict[str, summary.OpStats]:
    return {stats.op_type: stats for stats in result.ops}


def _conv_gemm_matmul_model() -> onnx.ModelProto:
    nodes = [
        # [1,4,8,8] * W[6, 4/2, 3, 3], group 2, same padding -> [1,6,8,8]
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"]),  # [1, 384]
        helper.make_node("Gemm", ["f", "gemm_w", "gemm_b"], ["y"], transB=1),  # [1, 10]
        # batch dims [2,1] and [4] broadcast to [2,4]: [2,4,3,5] @ [4,5,7] -> [2,4,3,7]
        helper.make_node("MatMul", ["a", "mm_b"], ["z"]),
    ]
    initializers = [
        _weight("conv_w", 6, 2, 3, 3),
        _weight("conv_b", 6),
        _weight("gemm_w", 10, 384),
        _weight("gemm_b", 10),
        _weight("mm_b", 4, 5, 7),
    ]
    inputs = [_float("x", [1, 4, 8, 8]), _float("a", [2, 1, 3, 5])]
    return _model(nodes, inputs, [_float("y", None), _float("z", None)], initializers)


def test_macs_of_conv_with_group_gemm_and_batched_matmul() -> None:
    result = summary.summarize(_conv_gemm_matmul_model())

    conv_macs = (1 * 6 * 8 * 8) * (4 // 2) * 3 * 3  # output elements x (C/group * kh * kw)
    gemm_macs = 1 * 384 * 10
    matmul_macs = (2 * 4) * 3 * 5 * 7
    ops = _ops(result)
    assert ops["Conv"].macs == conv_macs == 6912
    assert ops["Gemm"].macs == gemm_macs
    assert ops["MatMul"].macs == matmul_macs
    assert ops["Conv"].flops == 2 * conv_macs
    assert result.macs == conv_macs + gemm_macs + matmul_macs
    assert result.flops == 2 * result.macs  # Flatten has no FLOP model
    assert not ops["Flatten"].modeled
    assert result.unknown_flops_nodes == {}
    assert result.shape_inference_error is None

    parameters = 6 * 2 * 3 * 3 + 6 + 10 * 384 + 10 + 4 * 5 * 7
    assert result.counts == summary.Counts(
        nodes=4, initializers=5, parameters=parameters, bytes=4 * parameters
    )
    assert summary.count(_conv_gemm_matmul_model()) == result.counts
    assert result.params_by_dtype == [summary.DtypeTotals("float", 5, parameters, 4 * parameters)]
    assert [t.name for t in result.largest_tensors[:2]] == ["gemm_w", "mm_b"]
    assert result.largest_tensors[0].shape == (10, 384)


def test_conv_transpose_and_elementwise_flops() -> None:
    nodes = [
        # every input element scatters into (M/group) * kh * kw = 3 * 3 * 3 outputs
        helper.make_node("ConvTranspose", ["x", "w"], ["t"]),  # [1,4,5,5] -> [1,3,7,7]
        helper.make_node("BatchNormalization", ["t", "s", "b", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2]),  # 3x3
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),  # [1,3,1,1]
        helper.make_node("Add", ["g", "g"], ["sum"]),
        helper.make_node("Sum", ["sum", "sum", "sum"], ["sum3"]),
        helper.make_node("Flatten", ["sum3"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["y"]),
        helper.make_node("LayerNormalization", ["p", "ln_scale"], ["ln"], axis=-1),
        helper.make_node("ReduceSum", ["ln"], ["red"], keepdims=0),
    ]
    initializers = [_weight("w", 4, 3, 3, 3), _weight("ln_scale", 3)]
    initializers += [_weight(name, 3) for name in ("s", "b", "m", "v")]
    result = summary.summarize(
        _model(
            nodes,
            [_float("x", [1, 4, 5, 5])],
            [_float("y", None), _float("red", None)],
            initializers,
        )
    )

    ops = _ops(result)
    assert ops["ConvTranspose"].macs == 1 * 4 * 5 * 5 * 3 * 3 * 3
    assert ops["BatchNormalization"].flops == 2 * 3 * 7 * 7
    assert ops["Relu"].flops == 3 * 7 * 7
    assert ops["MaxPool"].flops == 9 * 3 * 3 * 3
    assert ops["GlobalAveragePool"].flops == 3 * 3 * 3
    assert ops["Add"].flops == 3
    assert ops["Sum"].flops == 2 * 3
    assert ops["Softmax"].flops == 3 * 3
    assert ops["LayerNormalization"].flops == 5 * 3 * 3 * 3
    assert ops["ReduceSum"].flops == 3 * 3 * 3
    assert result.unknown_flops_nodes == {}


def test_dynamic_batch_makes_dependent_flops_unknown() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),  # ["N", 4]: depends on the batch
        helper.make_node("Relu", ["h"], ["y"]),
        helper.make_node("MatMul", ["p", "q"], ["pq"]),  # constants only: static
        helper.make_node("Add", ["other", "other"], ["o"]),
    ]
    initializers = [_weight("w", 8, 4), _weight("p", 3, 4), _weight("q", 4, 5)]
    inputs = [_float("x", ["N", 8]), _float("other", [2, None])]
    outputs = [_float("y", None), _float("pq", None), _float("o", None)]
    result = summary.summarize(_model(nodes, inputs, outputs, initializers))

    assert result.inputs == [
        summary.ValueSummary("x", "float", ("N", 8)),
        summary.ValueSummary("other", "float", (2, "?")),
    ]
    assert result.unknown_flops_nodes == {"MatMul": 1, "Relu": 1, "Add": 1}
    assert result.macs == 3 * 4 * 5
    ops = _ops(result)
    assert ops["MatMul"].count == 2
    assert ops["MatMul"].unknown == 1
    assert ops["Relu"].flops == 0


def test_custom_domain_op_is_qualified_with_its_domain() -> None:
    nodes = [
        helper.make_node("Frobnicate", ["x"], ["f"], domain="com.example"),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    model = _model(
        nodes, [_float("x", [2, 3])], [_float("y", None)], opsets={"": 17, "com.example": 2}
    )
    result = summary.summarize(model)

    assert result.opset_imports == {"ai.onnx": 17, "com.example": 2}
    ops = _ops(result)
    assert ops["com.example.Frobnicate"].count == 1
    assert not ops["com.example.Frobnicate"].modeled
    assert "Frobnicate" not in ops


def test_if_subgraph_nodes_are_counted() -> None:
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0]),
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Mul", ["r", "k"], ["t"]),
        ],
        "then",
        [],
        [_float("t", None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [_float("e", None)]
    )
    nodes = [
        helper.make_node("Relu", ["x0"], ["x"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    inputs = [_float("x0", [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    model = _model(nodes, inputs, [_float("y", None)])
    result = summary.summarize(model)

    assert result.counts.nodes == 2 + 3 + 1
    assert result.counts.parameters == 3
    assert result.counts.bytes == 12
    assert result.subgraphs == 2
    ops = _ops(result)
    assert ops["Relu"].count == 2
    assert ops["Relu"].flops == 6 + 6  # the branch sees the outer x's shape
    assert ops["Neg"].count == 1
    assert ops["Constant"].count == 1
    assert ops["If"].count == 1
    assert result.largest_tensors[0] == summary.TensorSummary(
        "k", "constant", "float", (3,), 3, 12, False
    )


def test_external_data_is_sized_from_dims_without_loading(tmp_path: pathlib.Path) -> None:
    nodes = [
        helper.make_node("Reshape", ["x0", "shape"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    initializers = [
        _weight("w", 64, 32),
        numpy_helper.from_array(np.array([2, -1], dtype=np.int64), "shape"),
        _weight("h", 10, dtype=np.float16),
    ]
    model = _model(nodes, [_float("x0", [4, 32])], [_float("y", None)], initializers)
    path = tmp_path / "model.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        size_threshold=0,
        location="weights.bin",
    )
    loaded = onnx.load(str(path), load_external_data=False)
    before = loaded.SerializeToString()

    result = summary.summarize(loaded, base_dir=tmp_path)

    assert loaded.SerializeToString() == before
    assert all(not tensor.raw_data for tensor in loaded.graph.initializer)
    expected_bytes = 64 * 32 * 4 + 2 * 8 + 10 * 2
    assert result.counts.bytes == expected_bytes
    assert summary.count(loaded).bytes == expected_bytes
    assert {row.dtype: row.bytes for row in result.params_by_dtype} == {
        "float": 64 * 32 * 4,
        "int64": 16,
        "float16": 20,
    }
    assert result.largest_tensors[0].name == "w"
    assert result.largest_tensors[0].external
    [data_file] = result.external_data
    assert data_file.location == "weights.bin"
    assert data_file.referenced_bytes == expected_bytes
    assert data_file.file_bytes == (tmp_path / "weights.bin").stat().st_size
    # The tiny external shape constant is read for data propagation, so the MatMul is static.
    assert result.macs == 2 * 64 * 32

    without_base_dir = summary.summarize(loaded)
    assert without_base_dir.external_data[0].file_bytes is None
    assert without_base_dir.unknown_flops_nodes == {"MatMul": 1}


def test_models_over_the_protobuf_limit_are_inferred_on_a_stub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(summary, "_PROTOBUF_LIMIT", 1000)
    model = _conv_gemm_matmul_model()
    before = model.SerializeToString()

    result = summary.summarize(model)

    assert model.SerializeToString() == before
    assert result.macs == 6912 + 3840 + 840
    assert result.counts.bytes == 4 * (108 + 6 + 3840 + 10 + 140)


def test_sparse_initializer_constant_attributes_and_old_ir_inputs() -> None:
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(3, dtype=np.float32), "sp"),
        numpy_helper.from_array(np.array([0, 5, 9], dtype=np.int64), "sp_indices"),
        [10, 10],
    )
    nodes = [
        helper.make_node("Constant", [], ["ints"], value_ints=[1, 2, 3, 4]),
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Add", ["x", "w"], ["y"]),
    ]
    inputs = [_float("x", [2]), _float("w", [2])]
    model = _model(
        nodes, inputs, [_float("y", None)], [_weight("w", 2)], sparse_initializer=[sparse]
    )
    model.ir_version = 3

    result = summary.summarize(model)

    assert [value.name for value in result.inputs] == ["x"]
    assert result.initializer_inputs == 1
    assert result.counts == summary.Counts(
        nodes=3, initializers=2, parameters=2 + 3 + 4 + 1, bytes=8 + (12 + 24) + 32 + 4
    )
    sparse_summary = next(t for t in result.largest_tensors if t.name == "sp")
    assert sparse_summary.kind == "sparse_initializer"
    assert sparse_summary.shape == (10, 10)
    assert {row.dtype: row.tensors for row in result.params_by_dtype} == {"float": 3, "int64": 1}


def test_to_dict_is_json_serializable_with_stable_key_order() -> None:
    result = summary.summarize(_conv_gemm_matmul_model())
    data = result.to_dict()

    text = json.dumps(data)
    assert json.loads(text) == data
    assert list(data) == [field.name for field in dataclasses.fields(summary.ModelSummary)]
    assert json.dumps(summary.summarize(_conv_gemm_matmul_model()).to_dict()) == text
    assert data["ops"][0] == {
        "op_type": "Conv",
        "count": 1,
        "macs": 6912,
        "flops": 13824,
        "modeled": True,
        "unknown": 0,
    }


def test_render_prints_tables_with_op_names() -> None:
    result = summary.summarize(_conv_gemm_matmul_model())
    console = Console(file=io.StringIO(), width=120)

    summary.render(result, console)

    text = console.file.getvalue()  # type: ignore[attr-defined]
    for expected in ("Conv", "Gemm", "MatMul", "Flatten", "gemm_w", "15.0 KiB", "float"):
        assert expected in text


def test_human_units() -> None:
    assert summary.human_bytes(512) == "512 B"
    assert summary.human_bytes(1536) == "1.5 KiB"
    assert summary.human_bytes(3 * 1024**3) == "3.0 GiB"
    assert summary.human_count(999) == "999"
    assert summary.human_count(4_090_000_000) == "4.09 G"


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda path: path.stem)
def test_light_models_summarize(path: pathlib.Path) -> None:
    model = onnx.load(str(path))

    result = summary.summarize(model, base_dir=path.parent)

    json.dumps(result.to_dict())
    summary.render(result, Console(file=io.StringIO()))
    assert result.counts.nodes == len(model.graph.node)
    assert result.macs > 0
    if path.stem == "light_resnet50":
        assert result.macs > 3_000_000_000
        assert result.unknown_flops_nodes == {}
