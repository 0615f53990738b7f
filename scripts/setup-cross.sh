#!/usr/bin/env bash
# Installs the AArch64 cross toolchain and qemu-user (Debian/Ubuntu, as root), so that the
# arm-neon/rpi4/jetson targets link model.so and the aarch64 test can run it:
#   aarch64-linux-gnu-g++ (link), aarch64-linux-gnu-objdump/readelf (inspect), qemu-aarch64 (run).
# Idempotent: does nothing when the tools are on PATH. Without apt-get or root it prints the
# command to run and exits 0 (dsopt then writes model.tar of objects for those targets).
set -euo pipefail

TOOLS=(aarch64-linux-gnu-g++ aarch64-linux-gnu-objdump aarch64-linux-gnu-readelf qemu-aarch64)
PACKAGES=(g++-aarch64-linux-gnu binutils-aarch64-linux-gnu qemu-user)

missing=()
for tool in "${TOOLS[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-cross: toolchain present (${TOOLS[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-cross: no apt-get; install an aarch64-linux-gnu g++ and qemu-user yourself" \
        "(missing: ${missing[*]})" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-cross: not root; run as root: apt-get install -y --no-install-recommends" \
        "${PACKAGES[*]} (missing: ${missing[*]})" >&2
    exit 0
fi

echo "setup-cross: installing ${PACKAGES[*]} (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
