"""The `cuda` target on a real GPU: outputs and latency against onnxruntime-gpu (or PyTorch).

One command, on a machine with an NVIDIA GPU, TVM's CUDA runtime and nvcc:

    python benchmarks/bench_cuda.py [MODEL.onnx ...] [--target cuda] [--runs 50] [--shape x=1,3,8,8]

Without MODEL arguments it builds two models in memory: `tensor_cores` (a 1x128x256 @ 256x256
MatMul + Relu and a 128->128 1x1 Conv, every extent above 64, so dlight emits WMMA kernels)
and the transformer block of the x86 tests. Each model is compiled with `dsopt.compile(...,
target=...)` (lossless pipeline + convert-float16, kernels compiled to a cubin by nvcc), then:

* outputs: the library's outputs against onnxruntime CPU on the original float32 model (max
  abs error, and whether every element is within convert-float16's 1e-2 * (1 + |y|));
* latency: median of `--runs` timed runs after `--warmup` runs (device synchronized), for the
  TVM library and for onnxruntime's CUDAExecutionProvider on the float32 and the fp16
  `model.onnx`; without onnxruntime-gpu, PyTorch (CUDA) runs the built-in `tensor_cores` model.

Prints a markdown table for BENCHMARKS.md. Exits with status 2 and a message when no GPU is
found (nothing is compiled then).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-2


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None without a usable GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def builtin_models() -> dict[str, onnx.ModelProto]:
    sys.path.insert(0, str(ROOT))
    from tests.targets.test_cuda import tensor_core_model
    from tests.targets.test_x86 import transformer_block

    return {"tensor_cores": tensor_core_model(), "transformer": transformer_block()}


def timed(run: Callable[[], object], sync: Callable[[], None], warmup: int, runs: int) -> float:
    """Median milliseconds of `runs` calls of `run` (each followed by `sync`)."""
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_tensor_cores(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray]
) -> Callable[[], object]:
    """The built-in tensor_cores model in PyTorch fp16 on CUDA (the fallback reference)."""
    import torch

    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    w = torch.from_numpy(weights["w"]).half().cuda()
    cw = torch.from_numpy(weights["cw"]).half().cuda()
    x = torch.from_numpy(feeds["x"]).half().cuda()
    img = torch.from_numpy(feeds["img"]).half().cuda()

    def run() -> object:
        with torch.no_grad():
            return torch.relu(x @ w), torch.nn.functional.conv2d(img, cw)

    return run


def bench(name: str, model_path: Path, args: argparse.Namespace, work: Path) -> dict[str, object]:
    import onnxruntime as ort
    import tvm
    from tvm.runtime.vm import VirtualMachine

    import dsopt
    from dsopt import numerics

    started = time.perf_counter()
    result = dsopt.compile(
        model_path, target=args.target, outdir=work / name, shapes=args.shapes or None
    )
    compile_s = time.perf_counter() - started
    library = next(a for a in result.manifest["artifacts"] if a["role"] == "library")
    feeds = numerics.random_inputs(
        result.outdir / "model.onnx",
        shapes={s["name"]: s["shape"] for s in result.manifest["inputs"]},
    )
    reference = numerics.run_model(onnx.load(model_path), feeds, label="fp32")

    dev = tvm.cuda(0)
    vm = VirtualMachine(tvm.runtime.load_module(str(result.outdir / library["path"])), dev)
    names = [s["name"] for s in result.manifest["inputs"]]
    args_dev = [tvm.runtime.tensor(np.ascontiguousarray(feeds[n]), dev) for n in names]
    out = vm["main"](*args_dev)
    outs = [out] if isinstance(out, tvm.runtime.Tensor) else list(out)
    errors, within = [], True
    for spec, value in zip(result.manifest["outputs"], outs, strict=True):
        got, ref = value.numpy().astype(np.float64), np.asarray(reference[spec["name"]], np.float64)
        errors.append(float(np.max(np.abs(got - ref))))
        within &= bool(np.all(np.abs(got - ref) <= TOL * (1 + np.abs(ref))))
    row: dict[str, object] = {
        "model": name,
        "compile_s": compile_s,
        "code": library["cuda"]["code"],
        "max_abs_err": max(errors),
        "within": within,
        "tvm_ms": timed(lambda: vm["main"](*args_dev), dev.sync, args.warmup, args.runs),
    }
    if "CUDAExecutionProvider" in ort.get_available_providers():
        for label, path in (
            ("ort_fp32_ms", model_path),
            ("ort_fp16_ms", result.outdir / "model.onnx"),
        ):
            sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
            row[label] = timed(
                lambda s=sess: s.run(None, feeds), lambda: None, args.warmup, args.runs
            )
    elif name == "tensor_cores":
        import torch

        run = torch_tensor_cores(onnx.load(model_path), feeds)
        row["torch_fp16_ms"] = timed(run, torch.cuda.synchronize, args.warmup, args.runs)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="ONNX models (default: built-in)")
    parser.add_argument("--target", default="cuda", help="a CUDA target (default: cuda, sm_80)")
    parser.add_argument("--shape", action="append", default=[], help="NAME=D1,D2,... overrides")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    gpu = gpu_name()
    if gpu is None:
        sys.stderr.write(
            "bench_cuda: no NVIDIA GPU found (nvidia-smi missing or reports none); run this on a "
            "machine with a GPU, TVM's CUDA runtime and nvcc\n"
        )
        return 2
    from dsopt import numerics

    args.shapes = numerics.parse_shape_overrides(args.shape)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cuda.") as tmp:
        work = Path(tmp)
        models = {p.stem: p for p in args.models}
        if not models:
            for name, model in builtin_models().items():
                models[name] = work / f"{name}.onnx"
                onnx.save(model, models[name])
        for name, path in models.items():
            rows.append(bench(name, path, args, work))
    columns = [
        "model", "compile_s", "code", "max_abs_err", "within", "tvm_ms",
        "ort_fp32_ms", "ort_fp16_ms", "torch_fp16_ms",
    ]  # fmt: skip
    columns = [c for c in columns if any(c in r for r in rows)]
    print(f"### CUDA target `{args.target}` on {gpu}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [
            f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
