"""Peak memory of optimizing a model past protobuf's 2 GB limit, dsopt vs the usual tools.

Builds the 2.15 GB external-data model of tests/core/test_large_models.py in a work folder,
then runs each tool in a fresh process and reads its peak resident memory (VmHWM):
`dsopt optimize` (fp32 and --precision int8-dynamic), onnxslim, and onnxruntime's
quantize_dynamic with external data. Ratios are peak / model size (goal: <= 2x).

    PYTHONPATH=. python -m benchmarks.bench_large_model --workdir /tmp/w/big
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_PEAK = """
import json, sys
{body}
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({{"peak_bytes": peak * 1024}}))
"""

_TOOLS = {
    "dsopt fp32": "from dsopt.cli import main\nassert main(['optimize', SRC, '-o', OUT]) == 0",
    "dsopt int8-dynamic": "from dsopt.cli import main\n"
    "assert main(['optimize', SRC, '--precision', 'int8-dynamic', '-o', OUT]) == 0",
    "onnxslim": "import onnxslim\nonnxslim.slim(SRC, OUT)",
    "onnxruntime quantize_dynamic": "from onnxruntime.quantization import QuantType\n"
    "from onnxruntime.quantization import quantize_dynamic\n"
    "quantize_dynamic(SRC, OUT, weight_type=QuantType.QInt8, use_external_data_format=True)",
}


def _run(name: str, source: Path, out: Path) -> dict[str, object]:
    body = f"SRC, OUT = {str(source)!r}, {str(out)!r}\n" + _TOOLS[name]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _PEAK.format(body=body)], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"tool": name, "ok": False, "error": tail[:200], "seconds": seconds}
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {"tool": name, "ok": True, "peak_bytes": peak, "seconds": seconds}


def main() -> None:
    """Builds the model once, measures every tool, prints a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dsopt-large"))
    parser.add_argument("--tools", nargs="*", default=list(_TOOLS), choices=list(_TOOLS))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = args.workdir / "big.onnx"
    if not source.exists():
        from tests.core.test_large_models import _big_model

        _big_model(source)
    size = sum(p.stat().st_size for p in args.workdir.glob("big.onnx*"))
    rows = []
    for index, name in enumerate(args.tools):
        out_dir = args.workdir / f"out{index}"
        out_dir.mkdir(exist_ok=True)
        rows.append(_run(name, source, out_dir / "out.onnx"))
    print(f"model: {size / 1e9:.2f} GB ({source})\n")
    print("| tool | peak RSS | peak / model size | seconds |")
    print("|---|---|---|---|")
    for row in rows:
        if row["ok"]:
            peak = int(row["peak_bytes"])
            print(
                f"| {row['tool']} | {peak / 1e9:.2f} GB | {peak / size:.2f}x "
                f"| {row['seconds']:.0f} |"
            )
        else:
            print(f"| {row['tool']} | failed: {row['error']} | | {row['seconds']:.0f} |")
    print("\n(each tool in a fresh process; VmHWM of that process)")


if __name__ == "__main__":
    main()
