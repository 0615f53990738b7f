"""Runs a dsopt OUTDIR's library with TVM's runtime alone: the deploy-side snippet as a script.

Usage: python aarch64_run.py OUTDIR IN.npz OUT.npz [OUTDIR IN.npz OUT.npz ...]

Meant for the device, or for an aarch64 Python under qemu-user (see
scripts/setup-aarch64-runtime.sh); needs only numpy and the apache-tvm wheel, with
`TVM_USE_RUNTIME_LIB=1` so that TVM loads its runtime library without the compiler.
Inputs are taken from IN.npz by the manifest's input names; outputs are written under the
manifest's output names.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def run(outdir: str, inputs: str, outputs: str) -> None:
    """Loads OUTDIR/manifest.json and its library, runs its entry once, writes OUT.npz."""
    import tvm
    import tvm_ffi
    from tvm.runtime.vm import VirtualMachine

    with open(os.path.join(outdir, "manifest.json")) as f:
        manifest = json.load(f)
    library = next(a for a in manifest["artifacts"] if a["role"] == "library")
    device = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(os.path.join(outdir, library["path"])), device)
    feeds = np.load(inputs)
    args = [
        tvm.runtime.tensor(np.ascontiguousarray(feeds[spec["name"]], spec["dtype"]), device)
        for spec in manifest["inputs"]
    ]
    result = vm[library.get("entry", "main")](*args)
    single = isinstance(result, (tvm.runtime.Tensor, tvm_ffi.Shape))
    values = [result] if single else list(result)
    arrays = [
        v.numpy() if isinstance(v, tvm.runtime.Tensor) else np.asarray([int(d) for d in v])
        for v in values
    ]
    names = [spec["name"] for spec in manifest["outputs"]]
    np.savez(outputs, **dict(zip(names, arrays, strict=True)))


def main(argv: list[str]) -> int:
    """Runs each OUTDIR IN.npz OUT.npz triple (one process: Python and TVM load once)."""
    if not argv or len(argv) % 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    for i in range(0, len(argv), 3):
        run(*argv[i : i + 3])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
