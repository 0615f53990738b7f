#!/usr/bin/env bash
# Builds an aarch64 Python 3.11 + TVM runtime under .cache/aarch64/ (gitignored), so that an
# aarch64 model.so runs on this x86 machine under qemu-user (the tests in
# tests/targets/test_arm.py do this; so can you, see README "Cross-compiling for ARM"):
#   sysroot/  arm64 libc + python3.11 from Debian packages (apt-get download + dpkg -x)
#   site/     apache-tvm, apache-tvm-ffi, numpy, ml_dtypes, typing_extensions aarch64 wheels
# Run:  TVM_USE_RUNTIME_LIB=1 PYTHONPATH=.cache/aarch64/site \
#         qemu-aarch64 -L .cache/aarch64/sysroot .cache/aarch64/sysroot/usr/bin/python3.11 \
#         scripts/aarch64_run.py OUTDIR in.npz out.npz
# Idempotent: exits at once when .cache/aarch64/READY names the same versions. Needs apt-get,
# dpkg-deb and network (Debian's archive and PyPI); apt runs on a private state
# folder, so the system's dpkg architectures and package lists are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep the TVM pair in step with pyproject.toml.
TVM=0.27.0.post1
TVM_FFI=0.1.14.post0
PY=3.11
DEBS=(libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libffi8 libbz2-1.0 liblzma5 libssl3
      libcrypt1 libuuid1 "python$PY-minimal" "libpython$PY-minimal" "libpython$PY-stdlib")
WHEELS=("apache-tvm==$TVM" "apache-tvm-ffi==$TVM_FFI" numpy ml_dtypes "typing_extensions>=4.13")

CACHE=.cache/aarch64
KEY="tvm=$TVM ffi=$TVM_FFI python=$PY"
if [ -f "$CACHE/READY" ] && [ "$(cat "$CACHE/READY")" = "$KEY" ]; then
    echo "setup-aarch64-runtime: $CACHE ready ($KEY)"
    exit 0
fi
for tool in apt-get dpkg-deb; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "setup-aarch64-runtime: needs $tool (Debian/Ubuntu) to fetch the arm64 Python" >&2
        exit 1
    fi
done

echo "setup-aarch64-runtime: building $CACHE ($KEY)"
rm -rf "$CACHE"
mkdir -p "$CACHE"
WORK="$(mktemp -d "$CACHE/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. arm64 Debian packages, with apt on a private state folder.
APT="$WORK/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$WORK/debs"
: > "$APT/status"
APT_OPTS=(-qq -o "Dir::State::Lists=$PWD/$APT/lists" -o "Dir::Cache=$PWD/$APT/cache"
          -o "Dir::State::status=$PWD/$APT/status" -o APT::Architecture=arm64
          -o "APT::Architectures::=arm64" -o APT::Sandbox::User=root)
apt-get "${APT_OPTS[@]}" update
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download "${DEBS[@]/%/:arm64}")
mkdir -p "$WORK/sysroot"
for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/sysroot"
done

# 2. aarch64 wheels, unpacked without TVM's compiler library and headers (runtime only).
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$PY" --implementation cp -d "$WORK/wheels" "${WHEELS[@]}"
python3 - "$WORK/wheels" "$WORK/site" <<'PYEOF'
import pathlib, sys, zipfile

skip = ("tvm/3rdparty/", "tvm/include/", "tvm/lib/libtvm_compiler", "tvm/lib/libtvm_runtime_cuda")
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(sys.argv[2], [n for n in z.namelist() if not n.startswith(skip)])
PYEOF

mv "$WORK/sysroot" "$CACHE/sysroot"
mv "$WORK/site" "$CACHE/site"
rm -rf "$WORK"
echo "$KEY" > "$CACHE/READY"
echo "setup-aarch64-runtime: ready: $(du -sh "$CACHE" | cut -f1) in $CACHE"
