#!/usr/bin/env bash
# Long fuzz runs (bench/FUZZ.md): each target in turn for FUZZ_SECONDS (default 1800) with
# FUZZ_JOBS libFuzzer workers (default 1; CPU time = FUZZ_SECONDS x FUZZ_JOBS), growing
# fuzz/corpus/<target>/ from fuzz/seeds/<target>/. Crashes, timeouts and OOMs do not stop a
# run: each is saved in fuzz/artifacts/long/<target>/ (move real findings to
# fuzz/regressions/<target>/). Logs: fuzz/artifacts/long/<target>.log.
#   FUZZ_SECONDS=1800 FUZZ_JOBS=2 scripts/fuzz-long.sh [target...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-1800}
jobs=${FUZZ_JOBS:-1}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors torch_zip torch_pickle pickle adapter_config index folder)
fi
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
  case "$t" in
    adapter_config | index) dict=(-dict=fuzz/dicts/json.dict) ;;
    safetensors) dict=(-dict=fuzz/dicts/safetensors.dict) ;;
    folder) dict=(-dict=fuzz/dicts/folder.dict) ;;
    *) dict=() ;;
  esac
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/long/$t"
  echo "fuzz long: $t for $secs s x $jobs job(s)" >&2
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 -max_len=65536 "${dict[@]}" \
    -artifact_prefix="fuzz/artifacts/long/$t/" -max_total_time="$secs" -print_final_stats=1 \
    -fork="$jobs" -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 \
    >"fuzz/artifacts/long/$t.log" 2>&1 || true
  grep -E '^#[0-9]+' "fuzz/artifacts/long/$t.log" | tail -1 >&2
done
