#!/usr/bin/env bash
# Partitioned-output benchmark (`merge --part K/N` + `stitch`): the InternLM2-shaped merge
# (r=16 LoRA) written by N = 1, 2, 4 parts run at once as processes on this machine, then
# stitched; beside it the device I/O floor (read only, write only with O_DIRECT, cp) of the
# same bytes and a plain single `--out DIR/` run, whose folder every stitched one must equal
# byte for byte. Writes bench/RESULTS-parts.md with the raw numbers and, from the measured
# per-part throughput and peak RSS, an estimate of a 405B merge on 16 and 64 nodes.
#
#   bench/parts.sh                      # 4 layers (~3.3 GB), ~3-5 min with generation
#   bench/parts.sh --layers 32          # the full 7B shape (~15.5 GB in and out, ~50 GB disk)
#
# Options:
#   --layers L       decoder layers of the InternLM2-7B shape (default 4)
#   --r R            LoRA rank (default 16)
#   --shard-size S   output shard size (default 500MB: 8+ shards at 4 layers, so 4 parts
#                    get about equal bytes; the embeddings are one 758 MB tensor)
#   --out DIR        generated models and outputs (default bench/out, git-ignored; the
#                    inputs are the ones bench/run.sh makes, and reused when present)
#   --results FILE   report (default bench/RESULTS-parts.md)
#   --calm SECONDS   before each step, wait up to SECONDS for the CPU pressure (PSI some
#                    avg10) to fall under 20% (default 30; the wait is recorded)
#   --no-build       use the built binary as it is    --clean   delete the outputs at the end
#
# Every command is timed with /usr/bin/time (wall, user, sys, max RSS). Each step records
# what else used the CPUs meanwhile ("other load": busy CPU time from /proc/stat minus the
# step's own processes', over wall x cores), CPU pressure (PSI some) and the load average,
# since this machine is shared. Runs are cold: `sync; echo 3 > /proc/sys/vm/drop_caches`
# before each (needs root; noted if not permitted). lorastream fsyncs its outputs; cp and dd
# are followed by `sync` inside the timing.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
layers=4 r=16 shard=500MB out="$repo/bench/out" results="$repo/bench/RESULTS-parts.md" build=1 clean=0 calm=30
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --r) r=$2; shift ;;
    --shard-size) shard=$2; shift ;;
    --out) out=$2; shift ;;
    --results) results=$2; shift ;;
    --no-build) build=0 ;;
    --clean) clean=1 ;;
    --calm) calm=$2; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
res="$out/results-parts"
rm -rf "$res"; mkdir -p "$res"
log() { echo "[$(date +%T)] $*" >&2; }
BIN="${CARGO_TARGET_DIR:-$repo/target}/release/lorastream"
if [ $build = 1 ]; then
  log "cargo build --release"
  (cd "$repo" && cargo build --release 2>&1 | tail -2) >&2 || { echo "build failed" >&2; exit 1; }
fi
[ -x "$BIN" ] || { echo "no binary at $BIN" >&2; exit 1; }
PY=$("$repo/scripts/python-env.sh")
can_drop=0
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then can_drop=1; fi
drop() { sync; [ $can_drop = 1 ] && echo 3 > /proc/sys/vm/drop_caches; return 0; }

{
  echo "date=$(date -Is)"
  echo "layers=$layers"
  echo "r=$r"
  echo "shard_size=$shard"
  echo "host_kernel=$(uname -sr)"
  echo "cores=$(nproc)"
  echo "mem_total=$(awk '/MemTotal/{printf "%.0f", $2*1024}' /proc/meminfo)"
  echo "cpu_model=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
  echo "disk=$(df -h "$out" | awk 'NR==2{print $1" "$2" size, "$4" free"}')"
  echo "can_drop_caches=$can_drop"
  echo "lorastream_rev=$(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo '+dirty')"
  echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$res/machine.txt"

# ---------------------------------------------------------------- step accounting
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }  # user nice system irq softirq steal
psi_total() { awk '/^some/{for(i=1;i<=NF;i++) if($i ~ /^total=/){sub("total=","",$i); print $i}}' /proc/pressure/cpu 2>/dev/null || echo 0; }
# step_begin NAME / step_end NAME: the step's wall clock and the machine around it; the
# step's processes leave NAME*.time files (/usr/bin/time JSON) in $res.
psi_avg10() { awk '/^some/{sub("avg10=","",$2); print $2}' /proc/pressure/cpu 2>/dev/null || echo 0; }
step_begin() {
  local waited=0
  while [ "$waited" -lt "$calm" ] && awk -v p="$(psi_avg10)" 'BEGIN{exit !(p >= 20)}'; do
    sleep 5; waited=$((waited + 5))
  done
  echo "$waited" > "$res/$1.waited"
  echo "{\"loadavg1\":$(cut -d' ' -f1 /proc/loadavg),\"psi\":$(psi_total),\"busy\":$(busy_ticks),\"t\":$(date +%s.%N)}" > "$res/$1.begin"
}
step_end() {
  echo "{\"psi\":$(psi_total),\"busy\":$(busy_ticks),\"t\":$(date +%s.%N)}" > "$res/$1.end"
}
TIMEFMT='{"wall":%e,"user":%U,"sys":%S,"maxrss_kb":%M,"rc":%x}'
timed() { # NAME CMD... : one process under /usr/bin/time, stdout/stderr kept
  local name=$1; shift
  /usr/bin/time -f "$TIMEFMT" -o "$res/$name.time" "$@" > "$res/$name.stdout" 2> "$res/$name.stderr"
}

# ---------------------------------------------------------------- inputs (as bench/run.sh)
base="$out/base-L$layers" lora="$out/lora-L$layers-r$r"
log "inputs under $out (reused when present)"
t0=$(date +%s)
"$PY" "$here/synth_model.py" --base "$base" --pool "$out/pool" --layers "$layers" --json > "$res/gen-base.json" || exit 1
if [ ! -f "$lora/.done" ]; then
  rm -rf "$lora"
  "$PY" "$here/synth_model.py" --adapter "$lora" --layers "$layers" --r "$r" --json > "$lora.json" || exit 1
  touch "$lora/.done"
fi
echo "gen_seconds=$(( $(date +%s) - t0 ))" >> "$res/machine.txt"
base_files=$(find "$base" -maxdepth 1 -name '*.safetensors' | sort)
nbytes=$(du -cb $base_files | tail -1 | cut -f1)
echo "base_bytes=$nbytes" >> "$res/machine.txt"
echo "lora_bytes=$(du -cb "$lora"/*.safetensors | tail -1 | cut -f1)" >> "$res/machine.txt"
log "base: $nbytes bytes in $(echo $base_files | wc -w) files"

# ---------------------------------------------------------------- I/O floor
floor="$out/parts-floor"
rm -rf "$floor"; mkdir -p "$floor"
log "I/O floor: cat > /dev/null, dd oflag=direct, cp (cold)"
drop; step_begin read
timed read sh -c 'cat "$@" > /dev/null' sh $base_files
step_end read
drop; step_begin write
# O_DIRECT: the device's write rate, not the page cache's; whole 16 MiB blocks (the
# remainder, under 16 MiB, is left out and the bytes recorded).
timed write sh -c 'dd if=/dev/zero of="$1" bs=16M count="$2" oflag=direct status=none && sync "$1"' sh "$floor/zeros" $(( nbytes / 16777216 ))
step_end write
echo "write_bytes=$(( nbytes / 16777216 * 16777216 ))" >> "$res/machine.txt"
rm -f "$floor/zeros"
drop; step_begin cp
timed cp sh -c 'cp "$@" && sync "${@: -1}"/*' sh $base_files "$floor"
step_end cp
rm -rf "$floor"

# ---------------------------------------------------------------- lorastream
merge_args=(merge --base "$base" --lora "$lora" --shard-size "$shard" --json)
single="$out/parts-single"
rm -rf "$single"
log "single run (--out DIR/, the reference bytes)"
drop; step_begin single
timed single "$BIN" "${merge_args[@]}" --out "$single/"
step_end single
for n in 1 2 4; do
  dest="$out/parts-N$n"
  rm -rf "$dest"
  log "N=$n parts at once, then stitch"
  drop; step_begin "N$n-parts"
  pids=()
  for k in $(seq 0 $((n - 1))); do
    timed "N$n-part$k" "$BIN" "${merge_args[@]}" --out "$dest/" --part "$k/$n" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  step_end "N$n-parts"
  # The stitch as it runs after the parts on a cluster: its node's cache does not hold
  # the shards, so it reads them from the device (drop first).
  drop; step_begin "N$n-stitch"
  timed "N$n-stitch" "$BIN" stitch "$dest/" --json
  step_end "N$n-stitch"
  if diff -r -q "$single" "$dest" > "$res/N$n.diff" 2>&1; then
    echo "identical" > "$res/N$n.same"
  else
    echo "DIFFERENT" > "$res/N$n.same"
  fi
  echo "out_bytes=$(du -cb "$dest"/*.safetensors | tail -1 | cut -f1)" > "$res/N$n.bytes"
  rm -rf "$dest"
done
rm -rf "$single"
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$res/machine.txt"
[ $clean = 1 ] && rm -rf "$base" "$lora" "$lora.json"

log "report -> $results"
"$PY" "$here/parts_report.py" "$res" "$(getconf CLK_TCK)" "$(nproc)" > "$results" || exit 1
cp "$results" "$res/"
log "done"
