"""dsopt's default CPU schedules: convs and matmuls of awkward shapes equal onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt import _tvm

pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

#: (name, input NCHW, out channels, kernel, strides, pads, dilations, group): each conv is a
#: branch of one graph (one TVM compile); odd sizes miss the 8/16-wide tiles on purpose.
CONVS = [
    ("plain3x3", (1, 3, 11, 13), 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ("stride2", (1, 4, 15, 17), 6, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
    ("asym_pad", (1, 3, 9, 19), 7, (3, 2), (1, 2), (0, 1, 2, 0), (1, 1), 1),
    ("grouped", (1, 6, 10, 10), 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
    ("depthwise", (1, 8, 13, 21), 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8),
    ("depthwise_s2", (1, 6, 14, 14), 6, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), 6),
    ("dilated", (1, 3, 16, 18), 4, (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    ("pointwise", (1, 13, 7, 37), 11, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    ("wide_prime", (1, 2, 3, 131), 3, (1, 3), (1, 1), (0, 1, 0, 1), (1, 1), 1),
    ("parallel", (1, 16, 34, 34), 32, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1),
]
#: (name, input NCHW, out channels, kernel, strides, pads): ConvTranspose branches; kernel ==
#: strides (no pads) takes dsopt's upsampling kernel, the last one TOPI's.
CONV_TRANSPOSES = [
    ("up2", (1, 6, 7, 9), 5, (2, 2), (2, 2), (0, 0, 0, 0)),
    ("up_rect", (1, 3, 5, 11), 17, (2, 3), (2, 3), (0, 0, 0, 0)),
    ("up_overlap", (1, 4, 6, 6), 3, (3, 3), (2, 2), (1, 1, 1, 1)),
]
#: (name, A shape, B shape, B is a constant): MatMul branches, odd sizes, batched and GEMV.
MATMULS = [
    ("mm_odd", (3, 37), (37, 19), True),
    ("gemv", (1, 45), (45, 67), True),
    ("batched", (2, 5, 13), (2, 13, 21), False),
    ("bcast", (2, 3, 7, 9), (9, 33), True),
]


def _graph() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    inputs, outputs, nodes, inits, feeds = [], [], [], [], {}

    def add_input(name, shape):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        feeds[name] = rng.standard_normal(shape).astype(np.float32)

    def const(name, array):
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))

    for name, shape, cout, kernel, strides, pads, dilations, group in CONVS:
        add_input(f"{name}_x", shape)
        const(f"{name}_w", rng.standard_normal((cout, shape[1] // group, *kernel)) * 0.3)
        const(f"{name}_b", rng.standard_normal(cout))
        attrs = dict(strides=strides, pads=pads, dilations=dilations, group=group)
        conv_in = [f"{name}_x", f"{name}_w", f"{name}_b"]
        nodes.append(helper.make_node("Conv", conv_in, [f"{name}_c"], **attrs))
        # Epilogues: Relu, HardSwish-style, a residual, or none.
        if name in ("plain3x3", "depthwise", "parallel"):
            nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_y"]))
        elif name in ("grouped", "dilated"):
            nodes.append(helper.make_node("HardSigmoid", [f"{name}_c"], [f"{name}_h"]))
            nodes.append(helper.make_node("Mul", [f"{name}_c", f"{name}_h"], [f"{name}_y"]))
        else:
            nodes.append(helper.make_node("Identity", [f"{name}_c"], [f"{name}_y"]))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None))
    for name, shape, cout, kernel, strides, pads in CONV_TRANSPOSES:
        add_input(f"{name}_x", shape)
        const(f"{name}_w", rng.standard_normal((shape[1], cout, *kernel)) * 0.3)
        const(f"{name}_b", rng.standard_normal(cout))
        nodes.append(
            helper.make_node(
                "ConvTranspose",
                [f"{name}_x", f"{name}_w", f"{name}_b"],
                [f"{name}_c"],
                kernel_shape=list(kernel),
                strides=list(strides),
                pads=list(pads),
            )  # fmt: skip
        )
        nodes.append(helper.make_node("Sigmoid", [f"{name}_c"], [f"{name}_y"]))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None))
    add_input("pool_x", (1, 3, 13, 19))
    nodes.append(
        helper.make_node(
            "MaxPool", ["pool_x"], ["pool_y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4
        )
    )
    outputs.append(helper.make_tensor_value_info("pool_y", TensorProto.FLOAT, None))
    for name, a_shape, b_shape, b_const in MATMULS:
        add_input(f"{name}_a", a_shape)
        if b_const:
            const(f"{name}_b", rng.standard_normal(b_shape))
        else:
            add_input(f"{name}_b", b_shape)
        nodes.append(helper.make_node("MatMul", [f"{name}_a", f"{name}_b"], [f"{name}_y"]))
        outputs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "sched", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model), feeds


@pytest.fixture(scope="module")
def model_and_feeds():
    return _graph()


def test_scheduled_convs_and_matmuls_match_onnxruntime(model_and_feeds, tmp_path):
    model, feeds = model_and_feeds
    names = [vi.name for vi in model.graph.input]
    shapes = {n: feeds[n].shape for n in names}
    mod = _tvm.import_onnx(model, shapes, dict.fromkeys(names, "float32"))
    stats: dict[str, int] = {}
    config = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
    executable = _tvm.build(mod, config, {"schedules": "dsopt"}, stats=stats)
    assert stats["fallback"] == 0, stats
    assert stats["scheduled"] >= len(CONVS) + len(MATMULS) + 1, stats
    assert stats["upsample_conv2d_transpose"] == 2, stats
    if "avx2" not in _tvm.host_cpu_features()["features"]:
        pytest.skip("this CPU lacks AVX2: the haswell library cannot run here")
    library = _tvm.export(executable, tmp_path / "model.so")
    got = _tvm.load_and_run(library, [feeds[n] for n in names])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)
    for vi, g, w in zip(model.graph.output, got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=vi.name)


def test_compile_records_schedule_counts_and_none_stays_selectable(tmp_path):
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 9, 10])],
        [w],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    for schedules, scheduled in (("dsopt", 1), ("none", None)):
        out = tmp_path / schedules
        dsopt.compile(path, target="x86", outdir=out, options={"schedules": schedules})
        manifest = json.loads((out / "manifest.json").read_text())
        counts = manifest["tvm"]["schedules"]
        assert counts["rules"] == schedules
        assert counts.get("scheduled") == scheduled
        assert counts.get("fallback", 0) == 0
