#!/usr/bin/env bash
# Benchmark for `lorastream convert` (issue 2): converts a ~2 GB checkpoint and reports its
# throughput as a ratio to `cp` of the same file, measured side by side in the same run, and
# lorastream's peak RSS. Not a test: the machine is shared, so read the ratios, not seconds.
#   bench/convert.sh [SIZE_GB] [hot|cold]   (default 2 hot) → appends to bench/RESULTS-convert.md
# cold: the page cache is dropped before every timed command (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
size_gb=${1:-2}
cache=${2:-hot}
work=$(mktemp -d "${TMPDIR:-/tmp}/lorastream-convert-bench.XXXX")
trap 'rm -rf "$work"' EXIT
cargo build --release -q
bin=target/release/lorastream
PY=$(scripts/python-env.sh)
src="$work/in.safetensors"
# A bf16 model-like file: 64 tensors of equal size, random bits (content does not matter).
"$PY" - "$src" "$size_gb" <<'PYEOF'
import json, sys, numpy as np
path, gb = sys.argv[1], float(sys.argv[2])
n_t = 64
per = int(gb * 1e9) // n_t // 2 // 4096 * 4096   # bf16 elements per tensor
hdr = {f"layers.{i}.weight": {"dtype": "BF16", "shape": [per // 4096, 4096],
       "data_offsets": [i * per * 2, (i + 1) * per * 2]} for i in range(n_t)}
h = json.dumps(hdr).encode(); h += b" " * (-len(h) % 8)
rng = np.random.default_rng(0); block = rng.integers(0, 2**16, per, dtype=np.uint16).tobytes()
with open(path, "wb") as f:
    f.write(len(h).to_bytes(8, "little")); f.write(h)
    for i in range(n_t): f.write(block)
PYEOF
bytes=$(stat -c %s "$src")
timeit() { # OUT CMD... -> prints wall seconds (CMD, then `sync OUT`), peak RSS KB
  local out=$1; shift
  sync
  if [ "$cache" = cold ]; then echo 3 > /proc/sys/vm/drop_caches; fi
  # Timed until the output is on disk: a writer that leaves it dirty in the page cache
  # (cp, dd) and one that writes around the cache (lorastream) then compare fairly.
  /usr/bin/time -f "%e %M" -o "$work/time" sh -c '"$@" && sync "$0"' "$out" "$@" >/dev/null 2>&1
  cat "$work/time"
}
sync
results=()
for round in 1 2 3; do
  # Each output is deleted right after its timing, so every command starts from the same
  # page-cache state (a command that runs after another's 2 GB output pays for reclaiming it).
  read -r cp_s _ < <(timeit "$work/copy" cp "$src" "$work/copy"); rm -f "$work/copy"
  read -r dd_s _ < <(timeit "$work/copy" dd if="$src" of="$work/copy" bs=16M status=none); rm -f "$work/copy"
  read -r pth_s pth_kb < <(timeit "$work/out.pth" "$bin" convert "$src" "$work/out.pth"); rm -f "$work/out.pth"
  read -r st_s st_kb < <(timeit "$work/out.safetensors" "$bin" convert "$src" "$work/out.safetensors"); rm -f "$work/out.safetensors"
  results+=("| $round | $cp_s | $dd_s | $pth_s | $(echo "scale=2; $cp_s / $pth_s" | bc) | $st_s | $(echo "scale=2; $cp_s / $st_s" | bc) | $((pth_kb / 1024)) / $((st_kb / 1024)) |")
done
{
  echo
  echo "## $(date -u +%Y-%m-%dT%H:%MZ) — convert, $(echo "scale=2; $bytes / 1000000000" | bc) GB bf16 safetensors"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB RAM, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); page cache $cache$([ "$cache" = cold ] && echo ' (dropped before every timed command)' || echo ' (the input was just written)'); every command is timed until its output is on disk (the command, then \`sync\` of the output)."
  echo
  echo "| round | cp s | dd bs=16M s | → .pth s | .pth throughput ÷ cp | → .safetensors s | .safetensors ÷ cp | peak RSS MB (.pth / .st) |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${results[@]}"
  echo
  echo "Target: ≥ 0.8× cp throughput for a same-dtype conversion; peak RSS < 200 MB. cp copies"
  echo "in the kernel (copy_file_range); dd is the plain read/write copy through user space."
} | tee -a bench/RESULTS-convert.md
