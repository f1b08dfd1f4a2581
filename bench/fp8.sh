#!/usr/bin/env bash
# FP8 benchmark (issue 14): convert and merge an FP8 block-scaled InternLM2-shaped model
# (bench/synth_fp8.py) next to the 16-bit model of the same shape (bench/synth_model.py),
# against I/O floors measured in the same run: `cat` of the inputs (cold), `dd
# oflag=direct` writing the output's bytes, `cp -r` of the input folder. Every command
# runs with a cold page cache (sync; drop_caches) and is timed until its output is on
# disk (the command, then `sync` of what it wrote); wall, CPU seconds (user+sys) and peak
# RSS from /usr/bin/time, and the CPU the rest of the machine used meanwhile (and the steal).
#
#   bench/fp8.sh                      # 4 layers, InternLM2-7B widths, r=16 → bench/RESULTS-fp8.md
#   bench/fp8.sh --small              # hidden 512, 2 layers: checks the harness (~1 min)
#
# Options: --layers N (4)  --r R (16)  --out DIR (bench/out/fp8)  --results FILE
#          --no-build (use $CARGO_TARGET_DIR or target/release as it is)  --clean
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
layers=4 r=16 out="$repo/bench/out/fp8" results="" build=1 small=0 clean=0
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --r) r=$2; shift ;;
    --out) out=$2; shift ;;
    --results) results=$2; shift ;;
    --no-build) build=0 ;;
    --small) small=1 ;;
    --clean) clean=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
shape=()
if [ $small = 1 ]; then
  shape=(--hidden 512 --inter 1024 --vocab 2048 --heads 4 --kv-heads 2)
  layers=2
  results=${results:-$out/RESULTS-fp8-small.md}
else
  results=${results:-$repo/bench/RESULTS-fp8.md}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
log() { echo "[$(date +%T)] $*" >&2; }
if [ $build = 1 ]; then
  log "cargo build --release"
  (cd "$repo" && cargo build --release -q)
fi
BIN="${CARGO_TARGET_DIR:-$repo/target}/release/lorastream"
PY=$("$repo/scripts/python-env.sh")
can_drop=0
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then can_drop=1; fi
drop() { sync; if [ $can_drop = 1 ]; then echo 3 > /proc/sys/vm/drop_caches; fi; }
gb() { awk -v b="$1" 'BEGIN{printf "%.2f", b/1e9}'; }
size_of() { du -sb --apparent-size "$@" | awk '{s+=$1} END{printf "%.0f\n", s}'; }

# ---------------------------------------------------------------- inputs
fp8="$out/fp8-L$layers" b16="$out/b16-L$layers" lora="$out/lora-L$layers-r$r"
log "generating inputs in $out"
rm -rf "$fp8" "$b16" "$lora"
"$PY" "$here/synth_fp8.py" --base "$fp8" --layers "$layers" "${shape[@]}" >/dev/null
"$PY" "$here/synth_model.py" --base "$b16" --layers "$layers" "${shape[@]}" >/dev/null
"$PY" "$here/synth_model.py" --adapter "$lora" --layers "$layers" --r "$r" \
  --targets wqkv,wo,w1,w2,w3 "${shape[@]}" >/dev/null
fp8_bytes=$(size_of "$fp8"/*.safetensors)
b16_bytes=$(size_of "$b16"/*.safetensors)

# ---------------------------------------------------------------- timing
rows=()
# CPU jiffies of the whole machine: busy (user+nice+system+irq+softirq), steal, total.
cpu_snap() { awk '/^cpu /{print $2+$3+$4+$7+$8, $9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
hz=$(getconf CLK_TCK)
# run NAME IN_BYTES OUTPUT CMD...: cold, timed to the output on disk; appends a row with
# the CPU the rest of the machine used meanwhile (busy time not the command's, over wall ×
# cores) and the share of time the hypervisor stole: what says whether the run was quiet
# (a load average would count this script's own previous commands).
run() {
  local name=$1 in_bytes=$2 dst=$3; shift 3
  rm -rf "$dst"
  drop
  local b0 s0 t0; read -r b0 s0 t0 < <(cpu_snap)
  /usr/bin/time -f '%e %U %S %M' -o "$out/time" \
    sh -c '"$@" >/dev/null 2>"$0.err" && if [ -d "$0" ]; then sync "$0"/*; elif [ -e "$0" ]; then sync "$0"; fi' "$dst" "$@" \
    || { echo "$name failed:" >&2; cat "$dst.err" >&2; exit 1; }
  local wall user sys rss; read -r wall user sys rss < "$out/time"
  local b1 s1 t1; read -r b1 s1 t1 < <(cpu_snap)
  local load; load=$(awk -v b="$((b1 - b0))" -v hz="$hz" -v u="$user" -v s="$sys" -v w="$wall" \
    -v n="$(nproc)" -v st="$((s1 - s0))" -v t="$((t1 - t0))" \
    'BEGIN{o=(b/hz-u-s)/(w*n); if (o<0) o=0; printf "%.3f/%.3f", o, (t>0 ? st/t : 0)}')
  local out_bytes=0
  if [ -e "$dst" ]; then out_bytes=$(size_of "$dst"); fi
  rows+=("$name|$in_bytes|$out_bytes|$wall|$(awk -v u="$user" -v s="$sys" 'BEGIN{printf "%.2f", u+s}')|$((rss / 1024))|$load")
  rm -rf "$dst" "$dst.err"
}
# Floors, on the FP8 input and the bf16 output size.
log "floors"
drop; load=$(cut -d' ' -f1 /proc/loadavg)
/usr/bin/time -f '%e' -o "$out/time" sh -c 'cat "$@" > /dev/null' sh "$fp8"/*.safetensors
cat_fp8=$(cat "$out/time")
drop
/usr/bin/time -f '%e' -o "$out/time" sh -c 'cat "$@" > /dev/null' sh "$b16"/*.safetensors
cat_b16=$(cat "$out/time")
drop
/usr/bin/time -f '%e' -o "$out/time" dd if=/dev/zero of="$out/dd" bs=16M \
  count=$(( (b16_bytes + (16 << 20) - 1) / (16 << 20) )) oflag=direct status=none
dd_s=$(cat "$out/time"); rm -f "$out/dd"
# dd_again: the same write at the end, since this disk's rate drifts within minutes.
dd_again() {
  drop
  /usr/bin/time -f '%e' -o "$out/time" dd if=/dev/zero of="$out/dd" bs=16M \
    count=$(( (b16_bytes + (16 << 20) - 1) / (16 << 20) )) oflag=direct status=none
  cat "$out/time"; rm -f "$out/dd"
}
run "cp -r fp8 folder" "$fp8_bytes" "$out/cp" cp -r "$fp8" "$out/cp"
cp_s=$(echo "${rows[-1]}" | cut -d'|' -f4)
log "lorastream runs"
run "convert fp8 → bf16 (dequantize)" "$fp8_bytes" "$out/o" "$BIN" convert "$fp8" "$out/o/"
run "convert fp8 --requantize fp8-block (copy)" "$fp8_bytes" "$out/o" "$BIN" convert "$fp8" "$out/o/" --requantize fp8-block
run "merge fp8 + LoRA → bf16" "$fp8_bytes" "$out/o" "$BIN" merge --base "$fp8" --lora "$lora" --out "$out/o/" --device cpu
run "merge fp8 + LoRA --requantize fp8-block" "$fp8_bytes" "$out/o" "$BIN" merge --base "$fp8" --lora "$lora" --out "$out/o/" --device cpu --requantize fp8-block
run "16-bit: convert (copy)" "$b16_bytes" "$out/o" "$BIN" convert "$b16" "$out/o/"
run "16-bit: merge + LoRA" "$b16_bytes" "$out/o" "$BIN" merge --base "$b16" --lora "$lora" --out "$out/o/" --device cpu
dd_end=$(dd_again)

# ---------------------------------------------------------------- report
# The read floor: the faster of the two cold cats (both read model files of that size).
cat_rate=$(awk -v b="$fp8_bytes" -v s="$cat_fp8" -v b2="$b16_bytes" -v s2="$cat_b16" \
  'BEGIN{r=b/1e9/s; r2=b2/1e9/s2; printf "%.3f", (r2 > r ? r2 : r)}')
# The write floor: the faster of the two dd runs (start and end).
dd_rate=$(awk -v b="$b16_bytes" -v s="$dd_s" -v s2="$dd_end" \
  'BEGIN{m=(s2 < s ? s2 : s); printf "%.3f", b/1e9/m}')
# Quiet when no lorastream run had more than 10 % of the CPUs used by others or 5 % stolen.
noisy=$(for row in "${rows[@]}"; do echo "$row"; done | awk -F'|' \
  '$1 !~ /^cp / { split($7, x, "/"); if (x[1] > 0.10 || x[2] > 0.05) n++ } END{print n+0}')
{
  echo
  echo "## $(date -u +%Y-%m-%dT%H:%MZ) — FP8 block-scaled vs 16-bit, $layers layers$([ $small = 1 ] && echo ' (small widths: harness check)')"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem/{print $2}') GiB RAM, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(uname -sr); disk $(df -h "$out" | awk 'NR==2{print $1}')."
  echo "lorastream $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo '+dirty'), $("$BIN" --version). Page cache: $([ $can_drop = 1 ] && echo 'dropped before every command' || echo 'NOT dropped (no permission): numbers are hot-cache')."
  echo "Shape: InternLM2 (synth_model.py) $([ $small = 1 ] && echo "${shape[*]}" || echo 'hidden 4096, inter 14336, vocab 92544, heads 32/8'), LoRA r=$r on wqkv,wo,w1,w2,w3."
  echo "FP8 input $(gb "$fp8_bytes") GB (fp8 Linear weights + f32 scales, bf16 embeddings/head), 16-bit input $(gb "$b16_bytes") GB (fp16)."
  echo
  echo "Floors (same run): cat of the FP8 input, cold: ${cat_fp8} s; cat of the 16-bit input: ${cat_b16} s (read floor: the faster, ${cat_rate} GB/s); dd oflag=direct of $(gb "$b16_bytes") GB: ${dd_s} s at the start, ${dd_end} s at the end (write floor: the faster, ${dd_rate} GB/s); cp -r of the FP8 folder: ${cp_s} s."
  echo "floor s = input GB / cat rate + output GB / dd rate (reading and writing at the floors, not overlapped)."
  echo
  echo "| run | in GB | out GB | wall s | CPU s | peak RSS MB | floor s | wall ÷ floor | others' CPU / stolen |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for row in "${rows[@]}"; do
    IFS='|' read -r name ib ob wall cpu rss load <<< "$row"
    floor=$(awk -v i="$ib" -v o="$ob" -v c="$cat_rate" -v d="$dd_rate" 'BEGIN{printf "%.2f", i/1e9/c + o/1e9/d}')
    echo "| $name | $(gb "$ib") | $(gb "$ob") | $wall | $cpu | $rss | $floor | $(awk -v w="$wall" -v f="$floor" 'BEGIN{printf "%.2f", w/f}') | $load |"
  done
  echo
  echo "others' CPU: busy CPU time of the machine that was not the command's, over wall × cores; stolen: the hypervisor's steal share of that time."
  if [ "$noisy" = 0 ]; then echo "Quiet run: every lorastream run had ≤ 10 % of the CPUs used by others and ≤ 5 % stolen."
  else echo "NOISY: $noisy lorastream run(s) shared the machine (> 10 % of the CPUs used by others or > 5 % stolen)."; fi
} | tee -a "$results"
if [ $clean = 1 ]; then rm -rf "$fp8" "$b16" "$lora"; fi
