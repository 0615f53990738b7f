"""CUDA targets (cuda, cuda-sm86/89/90, jetson): fp16 Tensor Core code, cubins, packaging.

No GPU is available where these tests run, so nothing here launches a kernel: the tests check
the generated CUDA C (and its PTX, when nvcc is installed), the cubin embedded in the library
and the manifest. `benchmarks/bench_cuda.py` runs the `cuda` target on a real GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import dsopt
from dsopt import hookimpl
from dsopt.backend import static_model
from dsopt.ir import Module
from dsopt.passes.convert_float16 import ConvertFloat16
from dsopt.plugin import PluginHost
from dsopt.testing import apply_pass
from tests.targets.test_x86 import conv_net, transformer_block

pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

NVCC = shutil.which("nvcc")
CUDA_TARGETS = ("cuda", "cuda-sm86", "cuda-sm89", "cuda-sm90", "jetson")
#: The CUDA ELF machine number (EM_CUDA) in a cubin's header.
EM_CUDA = 190


def _host() -> PluginHost:
    """A host that knows `convert-float16` (registered here until the built-ins list it)."""
    host = PluginHost()
    if "convert-float16" in host.passes:
        return host
    plugin = types.ModuleType("convert_float16_plugin")

    @hookimpl
    def dsopt_register_passes(registry):
        registry.add(ConvertFloat16)

    plugin.dsopt_register_passes = dsopt_register_passes  # type: ignore[attr-defined]
    return PluginHost(extra=[plugin])


def tensor_core_model() -> onnx.ModelProto:
    """A 1x128x256 @ 256x256 MatMul and a 128->128 1x1 Conv: every extent above 64."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((256, 256)) / 16).astype("f4"), "w")
    cw = numpy_helper.from_array((rng.standard_normal((128, 128, 1, 1)) / 11).astype("f4"), "cw")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="matmul"),
            helper.make_node("Relu", ["m"], ["y"]),
            helper.make_node("Conv", ["img", "cw"], ["z"], name="conv1x1"),
        ],
        "tensor_cores",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128, 256]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 128, 16, 16]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 256]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 128, 16, 16]),
        ],
        [w, cw],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _cuda_modules(library: Path) -> list[tuple[str, bytes]]:
    """(format, code) of each CUDA module packed into a library (.so bytes or a .tar member)."""
    from dsopt import _tvm

    data = library.read_bytes()
    kind = len(b"cuda").to_bytes(8, "little") + b"cuda"
    found, at = [], data.find(kind)
    while at >= 0:
        start = at + len(kind)
        size = int.from_bytes(data[start : start + 8], "little")
        payload = data[start + 8 : start + 8 + size]
        fmt_size = int.from_bytes(payload[:8], "little")
        if 0 < fmt_size < 16 and payload[8 : 8 + fmt_size] in (b"cuda", b"cubin", b"ptx"):
            fmt, _, code = _tvm._cuda_payload(payload)
            found.append((fmt, code))
        at = data.find(kind, at + 1)
    return found


@pytest.fixture(scope="module", params=["cuda", "jetson"])
def tensor_cores(request, tmp_path_factory):
    """The tensor-core model compiled for sm_80 (`cuda`) or sm_87 (`jetson`) by dsopt."""
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / "model.onnx"
    onnx.save(tensor_core_model(), path)
    result = dsopt.compile(path, target=request.param, outdir=folder / "out", host=_host())
    return request.param, result


def test_tensor_core_instructions_in_cuda_source_and_ptx(tensor_cores, tmp_path):
    """The fp16 MatMul and 1x1 Conv get WMMA Tensor Core kernels (CUDA C, and PTX via nvcc)."""
    from dsopt import _tvm

    name, result = tensor_cores
    target = _host().get_target(name)
    config = target.tvm_config()
    static = static_model(Module.load(result.outdir / "model.onnx"), None, name)
    assert {t.data_type for t in static.graph.initializer} == {TensorProto.FLOAT16}
    shapes = {"x": [1, 128, 256], "img": [1, 128, 16, 16]}
    mod = _tvm.import_onnx(static, shapes, dict.fromkeys(shapes, "float32"), target_name=name)
    source = _tvm.cuda_source(_tvm.build(mod, config, {"target_name": name}))
    kernels = [k for k in source.split('extern "C" __global__')[1:] if "wmma::mma_sync" in k]
    assert len(kernels) >= 2, "expected WMMA kernels for both the MatMul and the 1x1 Conv"
    if NVCC:
        cu = tmp_path / "kernels.cu"
        cu.write_text(source)
        arch = config["arch"]
        subprocess.run(
            [NVCC, "-ptx", f"-arch={arch}", "-o", str(tmp_path / "k.ptx"), str(cu)],
            check=True,
            capture_output=True,
        )
        assert "mma.sync" in (tmp_path / "k.ptx").read_text()


def test_library_embeds_a_cubin_and_the_manifest_says_so(tensor_cores):
    name, result = tensor_cores
    entry = next(a for a in result.manifest["artifacts"] if a["role"] == "library")
    arch = "sm_87" if name == "jetson" else "sm_80"
    assert entry["cuda"]["arch"] == arch
    assert result.manifest["pipeline"].endswith("convert-float16")
    modules = _cuda_modules(result.outdir / entry["path"])
    if name == "jetson" and entry["path"].endswith(".tar"):
        assert entry["cuda"]["code"] == ("cubin" if NVCC else "source-jit")
        return  # the cubin sits in devc.c inside the tar, as a C array
    assert modules, "no CUDA module packed into the library"
    if not NVCC:
        assert entry["cuda"]["code"] == "source-jit"
        assert all(fmt == "cuda" for fmt, _ in modules)
        return
    assert entry["cuda"] == {"arch": arch, "code": "cubin", "compiler": "nvcc"}
    for fmt, code in modules:
        assert fmt == "cubin"
        assert code[:4] == b"\x7fELF" and int.from_bytes(code[18:20], "little") == EM_CUDA


def test_fp16_library_model_matches_the_float32_model(tensor_cores):
    """The model.onnx a CUDA library computes is the fp16 one, within the pass's bound."""
    from dsopt import numerics

    _, result = tensor_cores
    assert result.manifest["equivalent"] is True
    fp16 = onnx.load(result.outdir / "model.onnx")
    rewritten, _ = apply_pass(ConvertFloat16(), tensor_core_model())
    assert {t.name for t in fp16.graph.initializer} == {t.name for t in rewritten.graph.initializer}
    report = numerics.check_equivalence(
        tensor_core_model(), fp16, rtol=ConvertFloat16.tolerance, atol=ConvertFloat16.tolerance
    )
    assert report.ok, report.to_dict()


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_conv_net_and_transformer_compile_for_every_cuda_target(target, tmp_path, monkeypatch):
    """Both models build for each architecture (kernels left as source: nvcc is tested above)."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvcc: source-jit keeps this test fast
    for name, model, shapes in (
        ("conv", conv_net(), {"x": [1, 3, 16, 16]}),
        ("transformer", transformer_block(), None),
    ):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        result = dsopt.compile(
            path, target=target, outdir=tmp_path / name, shapes=shapes, host=_host()
        )
        entry = next(a for a in result.manifest["artifacts"] if a["role"] == "library")
        assert entry["cuda"]["code"] == "source-jit"
        assert result.report["library_check"]["ok"] is None  # no GPU here


def _upsampling_head() -> onnx.ModelProto:
    """DB's detection head: Conv, BN, ReLU, ConvTranspose (kernel == stride) + bias, Sigmoid."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8).astype("f4"), "cw"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 2, 2)).astype("f4") / 4, "tw"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 2, 2)).astype("f4") / 4, "tw2"),
        numpy_helper.from_array(rng.standard_normal(1).astype("f4"), "tb2"),
    ]
    for name, value in (("s", 1.5), ("b", 0.1), ("m", 0.2), ("v", 2.0)):
        inits.append(numpy_helper.from_array(np.full(8, value, "f4"), name))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["r"]),
            helper.make_node("ConvTranspose", ["r", "tw"], ["u"], strides=[2, 2]),
            helper.make_node("Relu", ["u"], ["r2"]),
            helper.make_node("ConvTranspose", ["r2", "tw2", "tb2"], ["t"], strides=[2, 2]),
            helper.make_node("Sigmoid", ["t"], ["y"]),
        ],
        "db_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 40, 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 160, 160])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("target", ["cuda", "jetson"])
def test_upsampling_conv_transpose_builds_as_a_channel_contraction(target, tmp_path, monkeypatch):
    """fp16 ConvTranspose (kernel == stride) becomes dsopt's contraction kernel, not TOPI's.

    TOPI's CUDA conv2d_transpose computed an fp16 one in float32 and failed on PP-OCR det.
    """
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    path = tmp_path / "head.onnx"
    onnx.save(_upsampling_head(), path)
    result = dsopt.compile(path, target=target, outdir=tmp_path / "out", host=_host())
    assert result.manifest["tvm"]["schedules"]["upsample_conv2d_transpose"] == 2
    entry = next(a for a in result.manifest["artifacts"] if a["role"] == "library")
    (fmt, code), *_ = _cuda_modules(result.outdir / entry["path"])
    assert fmt == "cuda"
    source = code.decode()
    assert source.count("dsopt_upsample_conv2d_transpose") >= 2
    assert "half" in source  # the contraction runs in fp16
