#!/usr/bin/env bash
# The aarch64 (NEON) build, run: cross-compiles the library's unit tests and the merge
# tests that need no Python (tests/cpu_paths.rs, fixtures_merge.rs, tuners_deft.rs) for
# aarch64-unknown-linux-gnu and runs them under qemu-aarch64 (user-mode emulation: rates
# mean nothing there, bytes do). cpu_paths.rs forces the scalar and NEON paths and checks
# every fixture merge against the sha256 committed from x86 (fixtures/merge_digests.json),
# so the two machines are held to the same bytes.
# Installs what it needs when it can: the aarch64 rust-std (rustup) and qemu-user with the
# aarch64 gcc and libc (Debian packages, as root). Skips, saying so, when they cannot be
# had; LORASTREAM_REQUIRE_AARCH64=1 makes that a failure.
#   scripts/test-aarch64.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
skip() {
  if [ "${LORASTREAM_REQUIRE_AARCH64:-0}" = 1 ]; then
    echo "aarch64 tests: FAILED ($1)" >&2
    exit 1
  fi
  echo "aarch64 tests: SKIPPED ($1)" >&2
  exit 0
}
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  rustup target add "$target" >&2 || skip "rustup could not add $target"
fi
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross) >&2 ||
      skip "apt-get could not install qemu-user and gcc-aarch64-linux-gnu"
  else
    skip "qemu-aarch64 or aarch64-linux-gnu-gcc missing (Debian: qemu-user gcc-aarch64-linux-gnu)"
  fi
fi
sysroot=/usr/aarch64-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
# The CLI the tests start is an aarch64 binary too.
export LORASTREAM_TEST_RUNNER="qemu-aarch64 -L $sysroot"
# Its own target folder in the cache: a fresh checkout rebuilds only lorastream for
# aarch64, not every dependency.
export CARGO_TARGET_DIR="${LORASTREAM_AARCH64_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/lorastream/target-aarch64}"
start=$SECONDS
cargo test --release --target "$target" --lib --test cpu_paths --test fixtures_merge \
  --test tuners_deft "$@"
echo "aarch64 tests: passed under qemu in $((SECONDS - start)) s" >&2
