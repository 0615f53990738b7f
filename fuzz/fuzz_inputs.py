"""Input fuzzing: hostile model files through the loader, the default pipeline and the CLI.

Each example draws a valid model from the shared strategy and damages it one way (`MUTATIONS`:
bit flips, truncation, splices, duplicate or dangling names, missing initializers, dims that
lie about their data, opset 1 / 999, unknown ops and domains, huge and zero dims, external
data that escapes the model's folder or points nowhere, no nodes, no outputs, cycles), then
runs `dsopt optimize IN -o OUT --check` in-process. The contract checked on every example:

* exit 0 (the model was valid: OUT exists and onnxruntime agreed with the original), or exit 2
  with one `dsopt: error:` line (plus at most one `hint:` line) and no OUT;
* never a traceback, an internal error (exit 3), a check failure (exit 1) or a hang
  (`--timeout` seconds per example); the input file is never modified.

A failure is saved as `fuzz/crashers/inputs-<seed>-<n>.onnx` with the command that breaks.

    python -m fuzz.fuzz_inputs --examples 50000 [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto

from dsopt.cli import main as dsopt_main
from dsopt.testing import strategies
from fuzz import campaign_settings

CRASHERS = Path(__file__).with_name("crashers")

Mutation = Callable[[onnx.ModelProto, random.Random, Path], bytes]


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _flip(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    data = bytearray(_bytes(model))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _truncate(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    data = _bytes(model)
    return data[: rng.randrange(len(data))]


def _splice(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    data = bytearray(_bytes(model))
    at, source, size = rng.randrange(len(data)), rng.randrange(len(data)), rng.randint(1, 16)
    data[at : at + size] = data[source : source + size]
    return bytes(data)


def _duplicate_name(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    nodes = model.graph.node
    if len(nodes) >= 2:
        first, second = rng.sample(range(len(nodes)), 2)
        nodes[second].output[0] = nodes[first].output[0]
    else:
        model.graph.input.append(model.graph.input[0])
    return _bytes(model)


def _readers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if len(n.input)]


def _dangling(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    readers = _readers(model)
    if not readers:
        return _no_outputs(model, rng, folder)
    node = rng.choice(readers)
    node.input[rng.randrange(len(node.input))] = "no_such_tensor"
    return _bytes(model)


def _drop_initializer(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    if model.graph.initializer:
        del model.graph.initializer[rng.randrange(len(model.graph.initializer))]
    return _dangling(model, rng, folder) if not model.graph.initializer else _bytes(model)


def _lying_dims(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    inits = [t for t in model.graph.initializer if t.dims]
    if not inits:
        return _huge_dim(model, rng, folder)
    tensor = rng.choice(inits)
    tensor.dims[rng.randrange(len(tensor.dims))] += rng.choice((1, 7, 1000))
    return _bytes(model)


def _opset(version: int) -> Mutation:
    def mutate(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = version
        return _bytes(model)

    return mutate


def _unknown_op(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    rng.choice(model.graph.node).op_type = "NoSuchOp"
    return _bytes(model)


def _unknown_domain(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    rng.choice(model.graph.node).domain = "com.example.nowhere"
    return _bytes(model)


def _input_dims(model: onnx.ModelProto, rng: random.Random, value: int) -> bytes:
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        if len(dims):
            dims[rng.randrange(len(dims))].dim_value = value
            break
    return _bytes(model)


def _huge_dim(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    return _input_dims(model, rng, rng.choice((2**31, 2**40, 10**12)))


def _zero_dim(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    return _input_dims(model, rng, 0)


def _external(location: str) -> Mutation:
    def mutate(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
        inits = list(model.graph.initializer)
        if not inits:
            return _dangling(model, rng, folder)
        tensor = rng.choice(inits)
        size = len(tensor.raw_data) or 4
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
            tensor.external_data.add(key=key, value=value)
        return _bytes(model)

    return mutate


def _no_nodes(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    del model.graph.node[:]
    return _bytes(model)


def _no_outputs(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    del model.graph.output[:]
    return _bytes(model)


def _cycle(model: onnx.ModelProto, rng: random.Random, folder: Path) -> bytes:
    readers = _readers(model)
    if not readers:
        return _no_outputs(model, rng, folder)
    first, last = readers[0], model.graph.node[-1]
    first.input[0] = last.output[0]  # the first reader now reads the last node's output
    return _bytes(model)


#: name -> mutation. Every one yields a file that is invalid or at least suspicious.
MUTATIONS: dict[str, Mutation] = {
    "bit-flip": _flip,
    "truncate": _truncate,
    "splice": _splice,
    "duplicate-name": _duplicate_name,
    "dangling-input": _dangling,
    "missing-initializer": _drop_initializer,
    "lying-dims": _lying_dims,
    "opset-1": _opset(1),
    "opset-999": _opset(999),
    "unknown-op": _unknown_op,
    "unknown-domain": _unknown_domain,
    "huge-dim": _huge_dim,
    "zero-dim": _zero_dim,
    "external-escape": _external("../../../../etc/passwd"),
    "external-missing": _external("missing.bin"),
    "no-nodes": _no_nodes,
    "no-outputs": _no_outputs,
    "cycle": _cycle,
}


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def run_one(data: bytes, folder: Path, timeout: int) -> tuple[int, str]:
    """Runs the CLI on `data` in `folder`; returns (exit code, stderr) after the contract checks.

    Raises:
        AssertionError: The contract is broken (message says how).
    """
    source, out = folder / "in.onnx", folder / "out.onnx"
    source.write_bytes(data)
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = dsopt_main(["optimize", str(source), "-o", str(out), "--check"])
    except _Timeout:
        raise AssertionError(f"no result after {timeout} s (hang)") from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    text = err.getvalue()
    assert source.read_bytes() == data, "the input file was modified"
    assert "Traceback" not in text, f"traceback:\n{text}"
    assert code in (0, 2), f"exit {code}: {text.strip()}"
    if code == 0:
        assert out.is_file(), "exit 0 without an output file"
    else:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("dsopt: error:")]
        assert len(errors) == 1, f"expected one error line:\n{text}"
        assert len(lines) <= 2 and all(
            line.startswith(("dsopt: error:", "  hint:")) for line in lines
        ), f"more than an error and a hint:\n{text}"
        assert not out.exists(), "a failed run left an output file"
        assert not any(p.name.startswith("out.onnx") for p in folder.iterdir()), "partial output"
    return code, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=60, help="seconds per example")
    args = parser.parse_args(argv)
    run_seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed={run_seed}", flush=True)
    counter: Counter[str] = Counter()
    started = time.time()

    @campaign_settings(args.examples, run_seed)
    @given(
        model=strategies.models(),
        kind=st.sampled_from(sorted(MUTATIONS)),
        salt=st.integers(0, 2**32 - 1),
    )
    def campaign(model: onnx.ModelProto, kind: str, salt: int) -> None:
        counter["examples"] += 1
        folder = Path(tempfile.mkdtemp(prefix="dsopt-fuzz-"))
        try:
            data = MUTATIONS[kind](model, random.Random(salt), folder)
            try:
                code, _ = run_one(data, folder, args.timeout)
            except AssertionError:
                CRASHERS.mkdir(exist_ok=True)
                stem = CRASHERS / f"inputs-{run_seed}-{counter['examples']}"
                Path(f"{stem}.onnx").write_bytes(data)
                Path(f"{stem}.txt").write_text(
                    f"{kind}: dsopt optimize {stem}.onnx -o /tmp/o.onnx --check\n"
                )
                raise
            counter["valid" if code == 0 else "refused"] += 1
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    campaign()
    elapsed = time.time() - started
    print(
        f"ok: {counter['examples']} examples ({counter['refused']} refused with one line, "
        f"{counter['valid']} valid and optimized) in {elapsed:.0f}s, seed={run_seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
