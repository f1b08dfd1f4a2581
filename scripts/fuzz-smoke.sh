#!/usr/bin/env bash
# Short fuzz runs of every target in fuzz/ (cargo-fuzz + libFuzzer, nightly Rust): first
# replays the saved crash inputs in fuzz/regressions/<target>/, then fuzzes each target for
# FUZZ_SECONDS (default 10) from its committed seeds (fuzz/seeds/<target>/). Fails on any
# crash, panic, timeout (> 10 s for one input) or allocation over 512 MB; the input that did
# it is left in fuzz/artifacts/<target>/. Skips, saying so, when nightly or cargo-fuzz is
# missing and cannot be installed (cargo-fuzz is installed once into ~/.cache/lorastream;
# nightly: rustup toolchain install nightly).
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh [target...]
# Long runs and findings: bench/FUZZ.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz smoke: SKIPPED (no nightly toolchain: rustup toolchain install nightly)" >&2
  exit 0
fi
# cargo-fuzz: the machine's, else one installed once into the cache (as the Python venvs
# are), so a fresh CI machine fuzzes too.
fuzz_root="${XDG_CACHE_HOME:-$HOME/.cache}/lorastream/cargo-fuzz"
export PATH="$fuzz_root/bin:$PATH"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz smoke: installing cargo-fuzz into $fuzz_root" >&2
  cargo install cargo-fuzz --locked --quiet --root "$fuzz_root" >&2 || true
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz smoke: SKIPPED (cargo-fuzz could not be installed: cargo install cargo-fuzz)" >&2
  exit 0
fi
secs=${FUZZ_SECONDS:-10}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors torch_zip torch_pickle pickle adapter_config index folder gguf)
fi
dict_of() {
  case "$1" in
    adapter_config | index) echo fuzz/dicts/json.dict ;;
    safetensors) echo fuzz/dicts/safetensors.dict ;;
    folder) echo fuzz/dicts/folder.dict ;;
  esac
}
# Limits that make a blowup a failure: one input may take 10 s and allocate 512 MB at once
# (inputs are at most 64 KiB; nothing legitimate needs more).
limits=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 -max_len=65536)
# The fuzz build's target folder lives in the cache too: a fresh checkout then rebuilds
# only lorastream and the targets, not every instrumented dependency.
fuzz_target="${LORASTREAM_FUZZ_TARGET:-${XDG_CACHE_HOME:-$HOME/.cache}/lorastream/fuzz-target}"
start=$SECONDS
cargo +nightly fuzz build -O --target-dir "$fuzz_target" >&2
echo "fuzz smoke: built in $((SECONDS - start)) s" >&2
work=$(mktemp -d)
# The targets' scratch folders (files built from each input), in memory when possible.
scratch=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
trap 'rm -rf "$work" "$scratch"' EXIT
export LORASTREAM_FUZZ_SCRATCH="$scratch"
failed=()
for t in "${targets[@]}"; do
  art="fuzz/artifacts/$t/"
  mkdir -p "$art" "$work/$t"
  dict=$(dict_of "$t")
  if [ -d "fuzz/regressions/$t" ] && [ -n "$(ls -A "fuzz/regressions/$t")" ]; then
    # -runs=0 with files: runs each one once.
    if ! cargo +nightly fuzz run -O --target-dir "$fuzz_target" "$t" fuzz/regressions/"$t"/* -- "${limits[@]}" \
      -artifact_prefix="$art" -runs=0 >"$work/$t.regress.log" 2>&1; then
      tail -40 "$work/$t.regress.log" >&2
      failed+=("$t (regression input)")
      continue
    fi
  fi
  if ! cargo +nightly fuzz run -O --target-dir "$fuzz_target" "$t" "$work/$t" "fuzz/seeds/$t" -- "${limits[@]}" \
    ${dict:+-dict="$dict"} -artifact_prefix="$art" -max_total_time="$secs" -print_final_stats=1 \
    >"$work/$t.log" 2>&1; then
    tail -40 "$work/$t.log" >&2
    failed+=("$t")
    continue
  fi
  echo "fuzz smoke: $t: $(grep -m1 stat::number_of_executed_units "$work/$t.log" | awk '{print $2}') runs in ${secs} s, ok" >&2
done
echo "fuzz smoke: $((SECONDS - start)) s in all" >&2
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz smoke: FAILED: ${failed[*]} (inputs in fuzz/artifacts/; see bench/FUZZ.md)" >&2
  exit 1
fi
