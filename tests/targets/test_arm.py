"""aarch64 targets: model.so is an AArch64 ELF with NEON code and runs under qemu-user.

The cross toolchain comes from scripts/setup-cross.sh; the aarch64 Python + TVM runtime that
runs the library under qemu from scripts/setup-aarch64-runtime.sh (built on first use into
.cache/aarch64/; .ci/run builds it and sets DSOPT_REQUIRE_AARCH64=1 so nothing is skipped).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsopt import numerics
from dsopt.cli import main
from dsopt.driver import optimize
from tests.targets.test_x86 import conv_net, transformer_block

pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[2]
CROSS = "aarch64-linux-gnu-g++"
OBJDUMP = "aarch64-linux-gnu-objdump"
QEMU = "qemu-aarch64"
RUNTIME = ROOT / ".cache" / "aarch64"
ARM_TARGETS = ("arm-neon", "rpi4")


def int4_mlp() -> onnx.ModelProto:
    """A 4-bit weight-only MLP (blocked DequantizeLinear): the library reads 1-byte weights."""
    from tests.targets.test_quantized_tvm import _batched_mlp

    return optimize(_batched_mlp(64, 96, 32), passes="quantize-weights{bits=4}").module.to_proto()


MODELS = {
    "conv": (conv_net, [1, 3, 16, 16]),
    "transformer": (transformer_block, [1, 8, 16]),
    "int4": (int4_mlp, [2, 3, 64]),
}
BUILDS = [(t, m) for t in ARM_TARGETS for m in MODELS]
#: A NEON float vector op on four lanes, e.g. `fmla v21.4s, v23.4s, v17.4s`.
NEON_FLOAT = re.compile(r"\b(fmla|fmul|fadd|fmax|fmaxnm)\s+v\d+\.4s")
EM_AARCH64 = 183


def _require(reason: str) -> None:
    """Skips, or fails where CI demands the aarch64 checks (DSOPT_REQUIRE_AARCH64=1)."""
    if os.environ.get("DSOPT_REQUIRE_AARCH64") == "1":
        pytest.fail(f"{reason} (DSOPT_REQUIRE_AARCH64=1)")
    pytest.skip(reason)


def _elf_header(data: bytes) -> dict[str, int]:
    """Class, byte order, type and machine of an ELF file's header."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    return {"class": data[4], "data": data[5], "type": e_type, "machine": e_machine}


@pytest.fixture(scope="module")
def arm_builds(tmp_path_factory):
    """Each model compiled with `dsopt compile` for each aarch64 target, plus seeded inputs."""
    if shutil.which(CROSS) is None:
        _require(f"{CROSS} is not on PATH: run scripts/setup-cross.sh (as root)")
    folder = tmp_path_factory.mktemp("arm")
    builds = {}
    for name, (make, shape) in MODELS.items():
        model = folder / f"{name}.onnx"
        onnx.save(make(), model)
        feeds = {"x": np.random.default_rng(11).standard_normal(shape).astype(np.float32)}
        np.savez(folder / f"{name}_in.npz", **feeds)
        for target in ARM_TARGETS:
            out = folder / f"{name}_{target}"
            dims = ",".join(map(str, shape))
            argv = ["compile", str(model), "--target", target, "-o", str(out), "--shape"]
            assert main([*argv, f"x={dims}"]) == 0
            builds[target, name] = (out, make, feeds, folder / f"{name}_in.npz")
    return builds


@pytest.mark.parametrize(("target", "model"), BUILDS)
def test_arm_library_is_an_aarch64_elf_with_neon_code(target, model, arm_builds):
    outdir = arm_builds[target, model][0]
    manifest = (outdir / "manifest.json").read_text()
    library = outdir / "model.so"
    assert library.is_file() and f'"linker": "{CROSS}"' in manifest
    header = _elf_header(library.read_bytes()[:64])
    # ELFCLASS64, little-endian, ET_DYN (shared object), EM_AARCH64.
    assert header == {"class": 2, "data": 1, "type": 3, "machine": EM_AARCH64}
    if shutil.which(OBJDUMP) is None:
        _require(f"{OBJDUMP} is not on PATH: run scripts/setup-cross.sh (as root)")
    asm = subprocess.run(
        [OBJDUMP, "-d", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert NEON_FLOAT.search(asm), f"no NEON float vector instruction in {target}'s {model}"
    assert re.search(r"\bld1r?\s+\{v\d+\.", asm), "no NEON vector load (ld1/ld1r)"
    if target == "rpi4":
        assert not re.search(r"\b[su]dot\s", asm), "Cortex-A72 has no dot-product instructions"


def test_missing_cross_compiler_gives_objects_and_a_manifest_note(tmp_path, monkeypatch):
    import dsopt

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == CROSS else which(cmd))
    onnx.save(conv_net(), tmp_path / "m.onnx")
    result = dsopt.compile(
        tmp_path / "m.onnx", target="rpi4", outdir=tmp_path / "o", shapes={"x": [1, 3, 16, 16]}
    )
    entry = next(a for a in result.manifest["artifacts"] if a["role"] == "library")
    assert entry["path"] == "model.tar" and entry["linked"] is False and entry["linker"] is None
    assert CROSS in entry["note"] and "scripts/setup-cross.sh" in entry["note"]
    with tarfile.open(tmp_path / "o" / "model.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert members
        for member in members:
            header = _elf_header(tar.extractfile(member).read(64))
            assert header["type"] == 1 and header["machine"] == EM_AARCH64  # ET_REL objects


@pytest.fixture(scope="module")
def aarch64_python():
    """The qemu-user command line of an aarch64 Python with TVM's runtime (built if missing)."""
    if shutil.which(QEMU) is None:
        _require(f"{QEMU} is not on PATH: run scripts/setup-cross.sh (as root)")
    setup = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup-aarch64-runtime.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if setup.returncode != 0:
        last = (setup.stderr.strip().splitlines() or ["?"])[-1]
        _require(f"cannot build the aarch64 runtime (scripts/setup-aarch64-runtime.sh): {last}")
    sysroot = RUNTIME / "sysroot"
    return [QEMU, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11")]


@pytest.mark.slow
def test_aarch64_libraries_run_under_qemu_and_match_onnxruntime(arm_builds, aarch64_python):
    argv = []
    for (target, model), (outdir, _, _, inputs) in arm_builds.items():
        argv += [str(outdir), str(inputs), str(outdir.parent / f"{model}_{target}_out.npz")]
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(RUNTIME / "site")}
    # One process runs every library: Python + TVM start in ~10 s under qemu.
    run = subprocess.run(
        [*aarch64_python, str(ROOT / "scripts" / "aarch64_run.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for (target, model), (outdir, make, feeds, _) in arm_builds.items():
        got = np.load(outdir.parent / f"{model}_{target}_out.npz")
        want = numerics.run_model(make(), feeds)
        assert list(got) == list(want)
        for name, value in want.items():
            error = float(np.max(np.abs(got[name] - value)))
            print(f"{target} {model} {name}: max abs error {error:.2e}", file=sys.stderr)
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_dsopt_run_emulate_runs_the_aarch64_library_under_qemu(
    arm_builds, aarch64_python, tmp_path
):
    """`dsopt run OUTDIR --emulate` on this x86 machine: the arm-neon library's outputs."""
    outdir, make, feeds, inputs = arm_builds["arm-neon", "conv"]
    out = tmp_path / "out.npz"
    assert main(["run", str(outdir), "--inputs", str(inputs), "-o", str(out), "--emulate"]) == 0
    got = np.load(out)
    for name, value in numerics.run_model(make(), feeds).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5)
    # Without --emulate the same folder is refused with a pointer to it.
    assert main(["run", str(outdir), "--inputs", str(inputs), "-o", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()
