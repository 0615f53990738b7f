"""Dense vs sparse-attention BERT encoder (6 layers, hidden 384, 6 heads) on onnxruntime CPU.

Exports a random-weight transformers BERT (eager attention; one static export per length, as
the head-split shapes of a dynamic-axis TorchScript export are unknown to the detector),
folds its shapes (fold-constants, simplify-shapes), rewrites it
with `sparse-attention{window=256,global_tokens=16}` (+ eliminate-dead), then for each sequence
length runs each model in a fresh subprocess (peak memory = that process's VmHWM), alternating
dense and sparse processes, and reports the median latency and the peak memory.

    python benchmarks/bench_sparse_attention.py --lengths 1024 2048 4096 --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _export(path: Path, max_len: int, seq: int) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=max_len,
        attn_implementation="eager",
    )
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=True
            ).last_hidden_state

    args = (torch.randint(0, 1000, (1, seq)), torch.ones(1, seq, dtype=torch.int64))
    with torch.no_grad():
        torch.onnx.export(
            Encoder().eval(),
            args,
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            opset_version=17,
            dynamo=False,
        )


def _rewrite(dense: Path, sparse: Path, window: int, global_tokens: int) -> dict:
    import onnx

    from dsopt.passes.eliminate_dead import EliminateDead
    from dsopt.passes.fold_constants import FoldConstants
    from dsopt.passes.simplify_shapes import SimplifyShapes
    from dsopt.passes.sparse_attention import SparseAttention
    from dsopt.testing import apply_pass

    # Both models get the same shape cleanup, so the comparison isolates the attention.
    model = onnx.load(str(dense))
    for pass_ in (FoldConstants(), SimplifyShapes(), FoldConstants(), EliminateDead()):
        model, _ = apply_pass(pass_, model)
    onnx.save(model, str(dense))
    model, result = apply_pass(SparseAttention(window=window, global_tokens=global_tokens), model)
    model, _ = apply_pass(EliminateDead(), model)
    onnx.save(model, str(sparse))
    return dict(result.stats)


def _child(path: str, seq: int, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(0, 1000, (1, seq)).astype(np.int64),
        "attention_mask": np.ones((1, seq), np.int64),
    }
    feed["attention_mask"][:, seq - seq // 8 :] = 0  # some padding, as real batches have
    session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = session.run(None, feed)[0]
        times.append(time.perf_counter() - start)
    peak = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) // 1024
    np.save(path + f".{seq}.npy", out[0, :64])
    print(json.dumps({"times": times, "peak_mb": peak}))


def _measure(path: Path, seq: int, runs: int, timeout: float) -> dict | None:
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(path), str(seq), str(runs)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError) as e:
        print(f"  {path.name} at {seq}: failed ({type(e).__name__})", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=2, help="alternating processes per model")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--global-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per process")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0
    import numpy as np

    folder = Path(tempfile.mkdtemp(prefix="dsopt-sparse-"))
    rows = []
    for seq in args.lengths:
        dense, sparse = folder / f"dense{seq}.onnx", folder / f"sparse{seq}.onnx"
        _export(dense, max(args.lengths), seq)
        stats = _rewrite(dense, sparse, args.window, args.global_tokens)
        print(f"seq {seq}: sparse-attention stats: {stats}", flush=True)
        results: dict[str, list[dict]] = {"dense": [], "sparse": []}
        for _ in range(args.rounds):
            for label, path in (("dense", dense), ("sparse", sparse)):
                got = _measure(path, seq, args.runs, args.timeout)
                if got is not None:
                    results[label].append(got)
        row = {"seq": seq}
        for label in results:
            runs = results[label]
            row[label + "_ms"] = (
                statistics.median(t for r in runs for t in r["times"]) * 1e3 if runs else None
            )
            row[label + "_mb"] = max(r["peak_mb"] for r in runs) if runs else None
        if row["dense_ms"] and row["sparse_ms"]:
            a = np.load(str(dense) + f".{seq}.npy")
            b = np.load(str(sparse) + f".{seq}.npy")
            row["cos"] = float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| seq | dense ms | sparse ms | speedup | dense MB | sparse MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = r["dense_ms"] / r["sparse_ms"] if r["dense_ms"] and r["sparse_ms"] else None
        mem = r["dense_mb"] / r["sparse_mb"] if r["dense_mb"] and r["sparse_mb"] else None

        def fmt(x: float | None, f: str = "{:.0f}") -> str:
            return "n/a" if x is None else f.format(x)

        print(
            f"| {r['seq']} | {fmt(r['dense_ms'])} | {fmt(r['sparse_ms'])} | "
            f"{fmt(speed, '{:.2f}x')} | {fmt(r['dense_mb'])} | {fmt(r['sparse_mb'])} | "
            f"{fmt(mem, '{:.2f}x')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
