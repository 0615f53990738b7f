"""Dense vs sparse-attention BERT encoder (6 layers, hidden 384, 6 heads) on onnxruntime CPU.

Exports a random-weight transformers BERT (eager attention; one static export per length, as
the head-split shapes of a dynamic-axis TorchScript export are unknown to the detector),
folds its shapes (fold-constants, simplify-shapes), rewrites it
with `sparse-attention{window=256,global_tokens=16}` (+ eliminate-dead), then for each sequence
length runs each model in a fresh subprocess (peak memory = that process's VmHWM), alternating
dense and sparse processes, and reports the median latency and the peak memory.

Besides the whole encoder (whose Q/K/V/output projections and FFN are O(n) and the same in
both), it measures the attention itself: layer 0's attention cut out of each model with
`onnx.utils.extract_model` (inputs: the Q, K, V projections and attention_mask; output: the
merged heads), so "attention memory" is that core's peak minus an empty session's.

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


def _save_core_feed(dense: Path, names: list[str], seq: int) -> None:
    """The real Q/K/V projections of layer 0 on the benchmark input (random ones would make
    the attention nearly uniform, so the window would drop most of its mass)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(dense))
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(names, _encoder_feed(seq))
    np.savez(dense.parent / f"core_feed{seq}.npz", **dict(zip(names, values, strict=True)))


def _encoder_feed(seq: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    mask = np.ones((1, seq), np.int64)
    mask[:, seq - seq // 8 :] = 0  # some padding, as real batches have
    return {"input_ids": rng.integers(0, 1000, (1, seq)).astype(np.int64), "attention_mask": mask}


def _cut_cores(dense: Path, sparse: Path, seq: int) -> tuple[Path, Path]:
    """Layer 0's attention of each model, from the Q/K/V projections and the mask."""
    import onnx.utils

    from dsopt.attention import find_attention
    from dsopt.ir import Module

    site = find_attention(Module.load(dense))[0]
    inputs = [site.q.name, site.k.name, site.v.name, "attention_mask"]
    _save_core_feed(dense, inputs[:3], seq)
    cores = []
    for path in (dense, sparse):
        core = path.with_name(path.stem + "_core.onnx")
        onnx.utils.extract_model(str(path), str(core), inputs, [site.output.name])
        cores.append(core)
    return cores[0], cores[1]


def _empty_model(path: Path) -> Path:
    """A one-Identity model: its process's peak is the baseline subtracted from a core's."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["attention_mask"], ["y"])],
        "empty",
        [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _child(path: str, seq: int, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = _encoder_feed(seq)
    names = [spec.name for spec in session.get_inputs()]
    if "input_ids" not in names:  # an attention core: layer 0's real Q/K/V
        feed.pop("input_ids")
        core_feed = np.load(Path(path).parent / f"core_feed{seq}.npz")
        feed.update({n: core_feed[n] for n in names if n != "attention_mask"})
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
    np.save(path + f".{seq}.npy", out.reshape(-1)[: 64 * 384])
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


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _num(x: float | None, f: str = "{:.0f}") -> str:
    return "n/a" if x is None else f.format(x)


def _table(rows: list[dict]) -> None:
    """Markdown tables: whole encoder, then layer 0's attention core, with growth per length."""
    print("\n| seq | dense ms | sparse ms | speedup | dense MB | sparse MB | cosine |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seq']} | {_num(r['dense_ms'])} | {_num(r['sparse_ms'])} | "
            f"{_ratio(r['dense_ms'], r['sparse_ms'])} | {_num(r['dense_mb'])} | "
            f"{_num(r['sparse_mb'])} | {_num(r.get('sparse_cos'), '{:.5f}')} |"
        )
    print(
        "\n| seq | attention dense ms | sparse ms | speedup | growth dense | growth sparse "
        "| attention MB dense | sparse | memory ratio | cosine |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    previous = None
    for r in rows:
        base = r["empty_mb"] or 0
        dense_mb = r["dense_core_mb"] - base if r["dense_core_mb"] else None
        sparse_mb = r["sparse_core_mb"] - base if r["sparse_core_mb"] else None
        grow = ("-", "-")
        if previous is not None:
            grow = tuple(_ratio(r[k], previous[k]) for k in ("dense_core_ms", "sparse_core_ms"))
        print(
            f"| {r['seq']} | {_num(r['dense_core_ms'], '{:.1f}')} | "
            f"{_num(r['sparse_core_ms'], '{:.1f}')} | "
            f"{_ratio(r['dense_core_ms'], r['sparse_core_ms'])} | {grow[0]} | {grow[1]} | "
            f"{_num(dense_mb)} | {_num(sparse_mb)} | {_ratio(dense_mb, sparse_mb)} | "
            f"{_num(r.get('sparse_core_cos'), '{:.5f}')} |"
        )
        previous = r


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
    empty = _empty_model(folder / "empty.onnx")
    rows = []
    for seq in args.lengths:
        dense, sparse = folder / f"dense{seq}.onnx", folder / f"sparse{seq}.onnx"
        _export(dense, max(args.lengths), seq)
        stats = _rewrite(dense, sparse, args.window, args.global_tokens)
        print(f"seq {seq}: sparse-attention stats: {stats}", flush=True)
        dense_core, sparse_core = _cut_cores(dense, sparse, seq)
        models = {"dense": dense, "sparse": sparse, "dense_core": dense_core}
        models.update(sparse_core=sparse_core, empty=empty)
        results: dict[str, list[dict]] = {label: [] for label in models}
        for _ in range(args.rounds):
            for label, path in models.items():
                got = _measure(path, seq, args.runs, args.timeout)
                if got is not None:
                    results[label].append(got)
        row: dict = {"seq": seq}
        for label, runs in results.items():
            row[label + "_ms"] = (
                statistics.median(t for r in runs for t in r["times"]) * 1e3 if runs else None
            )
            row[label + "_mb"] = max(r["peak_mb"] for r in runs) if runs else None
        for a, b in (("dense", "sparse"), ("dense_core", "sparse_core")):
            if row[a + "_ms"] and row[b + "_ms"]:
                x = np.load(str(models[a]) + f".{seq}.npy").astype(np.float64)
                y = np.load(str(models[b]) + f".{seq}.npy").astype(np.float64)
                row[b + "_cos"] = float((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y))
        rows.append(row)
        print(json.dumps(row), flush=True)
    _table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
