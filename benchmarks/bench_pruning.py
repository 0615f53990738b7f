"""Channel pruning and 2:4 sparsity on the ResNet-style CNN: size, CPU latency and fidelity.

    python -m benchmarks.bench_pruning --runs 20 --out /tmp/w/pruning-bench.md

Variants: the original, `prune-channels{ratio=R}` (l1 criterion) for each `--ratios`, and
`sparsify-2to4{conv=true}`. Size is the serialized model's bytes (2:4 weights stay dense, so
its size does not shrink); latency is onnxruntime CPU (`--threads` intra-op threads, spinning
off, interleaved rounds over all variants, median); fidelity is the cosine of the logits
against the original over `--samples` uniform random images (untrained-for-sparsity weights:
no fine-tuning, so the cosine shows the raw damage).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from dsopt.pass_infra import Pass
from dsopt.passes import PruneChannels, Sparsify2to4
from dsopt.testing import apply_pass

MODEL = Path(__file__).parent / "models" / "resnet18_style.onnx"


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--runs", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--samples", type=int, default=8, help="images for the cosine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()

    original = onnx.load(str(args.model))
    variants: list[tuple[str, onnx.ModelProto, dict]] = [("original", original, {})]
    passes: list[Pass] = [PruneChannels(ratio=r) for r in args.ratios]
    passes.append(Sparsify2to4(conv=True))
    for pass_ in passes:
        rewritten, result = apply_pass(pass_, original)
        label = pass_.describe()
        if label == PruneChannels.name:
            label += "{ratio=0} (no-op)"
        variants.append((label, rewritten, dict(result.stats)))

    name = original.graph.input[0].name
    shape = [d.dim_value or 1 for d in original.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    feeds = [{name: rng.random(shape, np.float32)} for _ in range(args.samples)]
    sessions = [_session(model, args.threads) for _, model, _ in variants]
    reference = [sessions[0].run(None, feed)[0] for feed in feeds]
    cosines = [
        min(_cosine(s.run(None, f)[0], r) for f, r in zip(feeds, reference, strict=True))
        for s in sessions
    ]
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:  # warm-up
        session.run(None, feeds[0])
    for round_index in range(args.runs):
        feed = feeds[round_index % len(feeds)]
        for i, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - started)

    base_ms = statistics.median(times[0]) * 1e3
    base_bytes = original.ByteSize()
    lines = [
        "| variant | bytes | size vs orig | params | latency ms (median) | speedup | "
        "min cosine | pruned / masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (label, model, stats), cos, samples in zip(variants, cosines, times, strict=True):
        ms = statistics.median(samples) * 1e3
        size = model.ByteSize()
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        if "channels-removed" in stats:
            what = f"{stats['channels-removed']} ch in {stats['layers-pruned']} layers"
            what += f"; {stats['skipped-residual-group']} residual-group skips"
        elif "weights" in stats:
            what = f"{stats['weights']} weights, {stats['zeros-after']} zeros"
        else:
            what = "-"
        lines.append(
            f"| {label} | {size} | {size / base_bytes:.3f} | {params} | {ms:.2f} | "
            f"{base_ms / ms:.2f}x | {cos:.4f} | {what} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        command = (
            "python -m benchmarks.bench_pruning "
            f"--ratios {' '.join(str(r) for r in args.ratios)} --runs {args.runs} "
            f"--samples {args.samples} --threads {args.threads} --out {args.out}"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Pruning benchmark ({args.model.name})\n\nCommand (repo root):\n\n"
            f"    {command}\n\nonnxruntime {ort.__version__}, CPU, {args.threads} intra-op "
            "threads, spinning off, interleaved rounds.\n\n"
            f"{table}\n"
        )


if __name__ == "__main__":
    main()
