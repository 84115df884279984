#!/usr/bin/env bash
# System tools the build needs: libjpeg-turbo (JPEG decoding in tensorbake-ingest)
# is compiled from the source vendored in the turbojpeg-sys crate, with cmake, and
# its SIMD code (most of its speed) with nasm. Installs whichever is missing
# (Debian/Ubuntu: apt-get; as root, or through sudo).
set -euo pipefail
missing=()
for tool in cmake nasm; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: ${missing[*]} not found; install them (e.g. brew/dnf install ${missing[*]}) and rerun" >&2
  exit 1
fi
SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "error: need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "installing ${missing[*]} (needed to build libjpeg-turbo)" >&2
$SUDO apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}"
}
