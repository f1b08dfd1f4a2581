#!/usr/bin/env bash
# lorastream benchmark: I/O floor, compute floor, lorastream merge, the PEFT path, a 1 GiB
# cgroup run and a layer-scaling series, measured side by side in one run; writes a
# markdown report with the raw numbers and the ratios.
#
#   bench/run.sh --quick            # small sizes (2-layer "full"), ~4 min: checks the harness
#   bench/run.sh --full --calm 90   # InternLM2-7B shape (~15 GB), r=512 and r=16; ~13-15 min
#                                   # (+ ~30 s the first time to generate ~18 GB of inputs)
#
# Options:
#   --out DIR        generated models and outputs (default bench/out, git-ignored)
#   --results FILE   report (default bench/RESULTS.md for --full, DIR/RESULTS-quick.md for --quick)
#   --no-build       use target/release/lorastream as it is (default: cargo build --release)
#   --no-python      skip the PEFT path      --no-cgroup   skip the cgroup run
#   --no-hot         skip the hot-cache runs --clean       delete generated models at the end
#   --only LIST      comma list of steps: gemm,io,full,cgroup,scale,python (default all)
#   --repeat N       run each cp / lorastream measurement at least N times (default 1)
#   --max-try N      ... and at most N times: another try is made while other work used more
#   --retry-load X   than X of the CPUs during the last one (defaults 2, 0.15). The report
#                    uses the fastest try and lists the others.
#   --calm SECONDS   before each try, wait up to SECONDS for the CPU pressure (PSI some avg10)
#                    to fall under 20% (default 0: do not wait)
#
# Every measurement is timed with /usr/bin/time (wall, user, sys, max RSS) and records what
# else used the CPUs meanwhile ("other load": busy CPU time from /proc/stat minus the
# command's own, over wall x cores), the CPU pressure (PSI "some") and the load average,
# since this machine is shared.
# Writers are timed up to their outputs being on disk (the command, then `sync FILES`; the
# sync share is recorded; lorastream fsyncs its outputs itself since the durable-outputs
# change, so its sync share is ~0 and that time is in the command: bench/RESULTS.md,
# "Durable outputs"). "cold" = `sync; echo 3 > /proc/sys/vm/drop_caches` before the
# run (needs root; noted if not permitted); "hot" = the base files read into the page
# cache first (fincore says how much of them is resident when the run starts).
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
mode=""
out="$repo/bench/out"
results=""
build=1 python=1 cgroup=1 hot=1 clean=0 only="gemm,io,full,cgroup,scale,python"
repeat=1 max_try=2 retry_load=0.15 calm=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) mode=quick ;;
    --full) mode=full ;;
    --out) out=$2; shift ;;
    --results) results=$2; shift ;;
    --no-build) build=0 ;;
    --no-python) python=0 ;;
    --no-cgroup) cgroup=0 ;;
    --no-hot) hot=0 ;;
    --clean) clean=1 ;;
    --only) only=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --max-try) max_try=$2; shift ;;
    --retry-load) retry_load=$2; shift ;;
    --calm) calm=$2; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$mode" ] || { echo "give --quick or --full" >&2; exit 2; }

if [ "$mode" = full ]; then
  FULL_L=32 R_BIG=512 R_SMALL=16 SCALE_L="4 8 16" SCALE_R=64 PY_RUNS="4:512 8:512 8:16" CG_LIMIT=1G
  results=${results:-$repo/bench/RESULTS.md}
else
  FULL_L=2 R_BIG=512 R_SMALL=16 SCALE_L="1 2 4" SCALE_R=64 PY_RUNS="1:512 2:512 2:16" CG_LIMIT=1G
  results=${results:-$out/RESULTS-quick.md}
fi
step() { [[ ",$only," == *",$1,"* ]]; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
res="$out/results-$mode"
rm -rf "$res"; mkdir -p "$res"
PY=$("$repo/scripts/python-env.sh")
BIN="$repo/target/release/lorastream"
log() { echo "[$(date +%T)] $*" >&2; }

# ---------------------------------------------------------------- machine and build
if [ $build = 1 ]; then
  log "cargo build --release"
  (cd "$repo" && cargo build --release 2>&1 | tail -2) >&2 || { echo "build failed" >&2; exit 1; }
fi
can_drop=0
if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then can_drop=1; fi
{
  echo "date=$(date -Is)"
  echo "mode=$mode"
  echo "full_layers=$FULL_L"
  echo "host_kernel=$(uname -sr)"
  echo "cores=$(nproc)"
  echo "mem_total=$(awk '/MemTotal/{printf "%.0f", $2*1024}' /proc/meminfo)"
  echo "mem_available_start=$(awk '/MemAvailable/{printf "%.0f", $2*1024}' /proc/meminfo)"
  echo "cpu_model=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
  echo "cpu_flags=$(grep -o -w -E 'avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_fp16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "disk=$(df -h "$out" | awk 'NR==2{print $1" "$2" size, "$4" free"}')"
  echo "can_drop_caches=$can_drop"
  echo "lorastream_rev=$(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo '+dirty')"
  echo "lorastream_device=$("$BIN" merge --help >/dev/null 2>&1 && echo ok)"
  echo "python=$("$PY" -c 'import torch,peft,numpy,transformers;print(f"torch {torch.__version__}, peft {peft.__version__}, numpy {numpy.__version__}, transformers {transformers.__version__}")')"
  echo "openblas_env=OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} OPENBLAS_L2_SIZE=${OPENBLAS_L2_SIZE:-unset}"
  echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$res/machine.txt"

# ---------------------------------------------------------------- helpers
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }  # user nice system irq softirq steal
psi_some() { awk '/^some/{for(i=1;i<=NF;i++) if($i ~ /^total=/){sub("total=","",$i); print $i}}' /proc/pressure/cpu 2>/dev/null || echo 0; }
resident() { # bytes of the given files in the page cache
  fincore -b -n -r -o RES "$@" 2>/dev/null | awk '{s+=$1} END{printf "%.0f\n", s}'
}
files_of() { find "$1" -maxdepth 1 -type f -name '*.safetensors' | sort; }
drop() { sync; [ $can_drop = 1 ] && echo 3 > /proc/sys/vm/drop_caches; }
warm() { cat "$@" > /dev/null; }
# prepare CACHE FILES...: cold (drop) or hot (read them first)
prepare() { local c=$1; shift; if [ "$c" = cold ]; then drop; else warm "$@"; fi; }

# measure NAME META_JSON CMD...: runs CMD under /usr/bin/time; writes NAME.json
measure() {
  local name=$1 meta=$2; shift 2
  local p0 p1 l0 t0 t1
  RESIDENT=${RESIDENT:-}
  l0=$(cut -d' ' -f1 /proc/loadavg); p0=$(psi_some); b0=$(busy_ticks); t0=$(date +%s.%N)
  rm -f "$res/$name.sync"
  if [ -n "${SYNC_PATH:-}" ]; then
    # Timed up to the outputs being on disk: the command, then fsync of what it wrote
    # (lorastream, cp and torch.save all leave dirty pages behind otherwise).
    set -- sh -c '"$@"; rc=$?; s=$(date +%s.%N); if [ -d "$SP" ]; then sync "$SP"/*; else sync "$SP"; fi; echo "$s $(date +%s.%N)" > "$SF"; exit $rc' sh "$@"
  fi
  SP="${SYNC_PATH:-}" SF="$res/$name.sync" \
    /usr/bin/time -f '{"wall":%e,"user":%U,"sys":%S,"maxrss_kb":%M,"rc":%x}' -o "$res/$name.time" \
    "$@" > "$res/$name.stdout" 2> "$res/$name.stderr"
  t1=$(date +%s.%N); p1=$(psi_some); b1=$(busy_ticks)
  "$PY" - "$res" "$name" "$meta" "$l0" "$p0" "$p1" "$t0" "$t1" "${RESIDENT:-}" "$b0" "$b1" "$(getconf CLK_TCK)" "$(nproc)" <<'EOF'
import json, sys
res, name, meta, l0, p0, p1, t0, t1, resident, b0, b1, hz, cores = sys.argv[1:]
rec = {"name": name, **json.loads(meta)}
if resident != "":
    rec["resident_before"] = int(resident)
lines = [l for l in open(f"{res}/{name}.time").read().splitlines() if l.startswith("{")]
rec.update(json.loads(lines[-1]) if lines else {"rc": -1})
try:
    out = open(f"{res}/{name}.stdout").read().strip().splitlines()
    rec["report"] = json.loads(out[-1]) if out else None
except Exception:
    rec["report"] = None
wall = float(t1) - float(t0)
try:
    s0, s1 = open(f"{res}/{name}.sync").read().split()
    rec["sync_seconds"] = round(float(s1) - float(s0), 2)
except Exception:
    rec["sync_seconds"] = None
rec["loadavg1_before"] = float(l0)
rec["cpu_psi_some"] = round((int(p1) - int(p0)) / 1e6 / wall, 3) if wall > 0 else None
# CPU time the rest of the machine used meanwhile (other processes, kernel threads such as
# writeback), as a share of all cores: what the measured command had to share.
if "user" in rec and wall > 0:
    busy = (int(b1) - int(b0)) / int(hz)
    rec["other_load"] = round(max(0.0, busy - rec["user"] - rec["sys"]) / (wall * int(cores)), 3)
json.dump(rec, open(f"{res}/{name}.json", "w"))
print(f"  {name}: wall {rec.get('wall')} s, user {rec.get('user')} s, sys {rec.get('sys')} s, "
      f"(sync {rec['sync_seconds']} s), maxrss {rec.get('maxrss_kb', 0) / 1024:.0f} MB, rc {rec.get('rc')}, cpu-psi {rec['cpu_psi_some']}, other load {rec.get('other_load')}", file=sys.stderr)
EOF
  RESIDENT=
}

psi_avg10() { awk '/^some/{sub("avg10=","",$2); print $2}' /proc/pressure/cpu 2>/dev/null || echo 0; }
wait_calm() {
  local waited=0
  while [ "$waited" -lt "$calm" ] && awk -v p="$(psi_avg10)" 'BEGIN{exit !(p >= 20)}'; do
    sleep 5; waited=$((waited + 5))
  done
  [ "$waited" -gt 0 ] && log "  waited ${waited} s for the CPU to calm down (PSI avg10 now $(psi_avg10))"
  return 0
}
# tries NAME BEFORE_CMD MEASURE_ARGS...: `measure` up to max_try times (at least `repeat`),
# again while the CPU was contended; BEFORE_CMD (e.g. a cache drop) runs before each try.
tries() {
  local name=$1 before=$2 a nm psi; shift 2
  local most=${TRY_MAX:-$max_try}
  for a in $(seq 1 "$most"); do
    nm=$name; [ "$a" -gt 1 ] && nm="$name~$a"
    wait_calm
    eval "$before"
    measure "$nm" "$@"
    psi=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("other_load") or 0)' "$res/$nm.json")
    [ "$a" -ge "$repeat" ] && "$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) else 1)' "$psi" "$retry_load" && break
    [ "$a" -lt "$most" ] && log "  (other load $psi during $nm, or --repeat: trying again)"
  done
}

# ---------------------------------------------------------------- inputs
pool="$out/pool"
gen_base() { # layers -> prints folder
  local l=$1 d="$out/base-L$1"
  "$PY" "$here/synth_model.py" --base "$d" --pool "$pool" --layers "$l" --json > "$res/gen-base-L$l.json" || exit 1
  echo "$d"
}
gen_lora() { # layers r -> prints folder (kept between runs when its config matches)
  local l=$1 r=$2 d="$out/lora-L$1-r$2"
  if [ ! -f "$d/.done" ]; then
    rm -rf "$d"
    "$PY" "$here/synth_model.py" --adapter "$d" --layers "$l" --r "$r" --json > "$d.json" || exit 1
    touch "$d/.done"
  fi
  cp "$d.json" "$res/gen-lora-L$l-r$r.json"
  echo "$d"
}
log "generating inputs under $out (reused when present)"
t0=$(date +%s)
BASE_FULL=$(gen_base "$FULL_L")
LORA_BIG=$(gen_lora "$FULL_L" "$R_BIG")
LORA_SMALL=$(gen_lora "$FULL_L" "$R_SMALL")
log "inputs ready ($(( $(date +%s) - t0 )) s): $(du -sh --apparent-size "$BASE_FULL" | cut -f1) base"

# ---------------------------------------------------------------- lorastream runs
# merge NAME BASE LORA CACHE [CGROUP_DIR] [extra meta]
merge() {
  local name=$1 base=$2 lora=$3 cache=$4 cg=${5:-} layers r dest pre
  layers=$(sed -n 's/.*"layers": \([0-9]*\).*/\1/p' "$lora.json")
  r=$(sed -n 's/.*"r": \([0-9]*\).*/\1/p' "$lora.json")
  dest="$out/merged-$name"
  MERGE_BASE=$base MERGE_LORA=$lora MERGE_CACHE=$cache MERGE_DEST=$dest
  local meta="{\"kind\":\"lorastream\",\"layers\":$layers,\"r\":$r,\"cache\":\"$cache\",\"cgroup\":\"${cg:+$CG_LIMIT}\"}"
  local cmd=("$BIN" merge --base "$base" --lora "$lora" --out "$dest/" --json)
  if [ -n "$cg" ]; then
    cmd=(sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "${cmd[@]}")
  fi
  SYNC_PATH="$dest" tries "$name" merge_before "$meta" "${cmd[@]}"
  rm -rf "$dest"
}
merge_before() {
  rm -rf "$MERGE_DEST"
  prepare "$MERGE_CACHE" $(files_of "$MERGE_BASE") $(files_of "$MERGE_LORA")
  RESIDENT=$(resident $(files_of "$MERGE_BASE"))
}

# ---------------------------------------------------------------- 1. compute floor
gemm() {
  log "GEMM rate (numpy sgemm, OPENBLAS_CORETYPE/L2_SIZE unset)"
  measure "$1" '{"kind":"gemm","threads":"all"}' \
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" "$here/gemm_rate.py" --k "$R_SMALL" "$SCALE_R" "$R_BIG"
  measure "$1-1t" '{"kind":"gemm","threads":1}' \
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 "$PY" "$here/gemm_rate.py" --k "$R_BIG" --seconds 1
}
step gemm && gemm gemm-start

# ---------------------------------------------------------------- 2. I/O floor
if step io; then
  log "I/O floor: cp of the base files to the output disk (+ sync)"
  cpdest="$out/cp-floor"
  cp_before() {
    rm -rf "$cpdest"; mkdir -p "$cpdest"
    prepare "$CP_CACHE" $(files_of "$BASE_FULL")
    RESIDENT=$(resident $(files_of "$BASE_FULL"))
  }
  for cache in cold hot; do
    [ $cache = hot ] && [ $hot = 0 ] && continue
    CP_CACHE=$cache
    SYNC_PATH="$cpdest" tries "cp-$cache" cp_before "{\"kind\":\"cp\",\"layers\":$FULL_L,\"cache\":\"$cache\"}" \
      cp $(files_of "$BASE_FULL") "$cpdest"/
  done
  rm -rf "$cpdest"
  prepare cold
  measure "read-cold" "{\"kind\":\"read\",\"layers\":$FULL_L,\"cache\":\"cold\"}" sh -c 'cat "$@" > /dev/null' sh $(files_of "$BASE_FULL")
  # Writing alone (as many bytes as the base, from /dev/zero, then sync): with `read-cold`,
  # the floor of a reader and a writer that overlap (cp does both in one thread).
  mkdir -p "$cpdest"
  nbytes=$(du -cb $(files_of "$BASE_FULL") | tail -1 | cut -f1)
  SYNC_PATH="$cpdest" measure "write" "{\"kind\":\"write\",\"layers\":$FULL_L,\"bytes\":$nbytes}" \
    dd if=/dev/zero of="$cpdest/zeros" bs=16M count=$(( nbytes / 16777216 )) status=none
  rm -rf "$cpdest"
fi

# ---------------------------------------------------------------- 3. lorastream, full size
if step full; then
  log "lorastream merge, $FULL_L layers"
  merge "full-r$R_BIG-cold" "$BASE_FULL" "$LORA_BIG" cold
  merge "full-r$R_SMALL-cold" "$BASE_FULL" "$LORA_SMALL" cold
  [ $hot = 1 ] && merge "full-r$R_SMALL-hot" "$BASE_FULL" "$LORA_SMALL" hot
fi

# ---------------------------------------------------------------- 5. memory-limited cgroup
cg_make() { # name limit -> prints the cgroup folder (a child of this shell's own memory cgroup)
  local name=$1 limit=$2 own dir
  if [ -d /sys/fs/cgroup/memory ] && [ -f /sys/fs/cgroup/memory/cgroup.procs ]; then
    own=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
    for dir in "/sys/fs/cgroup/memory${own%/}/$name" "/sys/fs/cgroup/memory/$name"; do
      rmdir "$dir" 2>/dev/null
      if mkdir "$dir" 2>/dev/null && echo "$limit" > "$dir/memory.limit_in_bytes" 2>/dev/null; then
        echo "v1 $dir"; return 0
      fi
      rmdir "$dir" 2>/dev/null
    done
  fi
  if grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    own=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
    for dir in "/sys/fs/cgroup${own%/}/$name" "/sys/fs/cgroup/$name"; do
      rmdir "$dir" 2>/dev/null
      if mkdir "$dir" 2>/dev/null && echo "$limit" > "$dir/memory.max" 2>/dev/null; then
        echo "v2 $dir"; return 0
      fi
      rmdir "$dir" 2>/dev/null
    done
  fi
  return 1
}
cg_stats() { # version dir -> json
  local v=$1 d=$2
  if [ "$v" = v1 ]; then
    printf '{"cgroup_version":"v1","limit_bytes":%s,"max_usage_bytes":%s,"failcnt":%s,"oom_kill":%s}' \
      "$(cat "$d/memory.limit_in_bytes")" "$(cat "$d/memory.max_usage_in_bytes")" "$(cat "$d/memory.failcnt")" \
      "$(awk '/oom_kill /{print $2}' "$d/memory.oom_control" 2>/dev/null || echo null)"
  else
    printf '{"cgroup_version":"v2","limit_bytes":"%s","max_usage_bytes":%s,"oom_kill":%s}' \
      "$(cat "$d/memory.max")" "$(cat "$d/memory.peak" 2>/dev/null || echo null)" \
      "$(awk '/^oom_kill /{print $2}' "$d/memory.events")"
  fi
}
if step cgroup && [ $cgroup = 1 ]; then
  if cg=$(cg_make lorastream-bench "$CG_LIMIT"); then
    log "lorastream merge inside a $CG_LIMIT memory cgroup ($cg)"
    TRY_MAX=1 merge "cgroup-full-r$R_BIG-cold" "$BASE_FULL" "$LORA_BIG" cold "${cg#* }"
    cg_stats ${cg% *} "${cg#* }" > "$res/cgroup.json"
    rmdir "${cg#* }" 2>/dev/null
  else
    echo '{"error":"no writable memory cgroup (v1 memory controller or v2 memory.max)"}' > "$res/cgroup.json"
  fi
fi

# ---------------------------------------------------------------- 6. scaling with layers
if step scale; then
  log "scaling: layers $SCALE_L at r=$SCALE_R (two tries each, the faster kept)"
  for l in $SCALE_L; do
    b=$(gen_base "$l"); a=$(gen_lora "$l" "$SCALE_R")
    repeat=2 merge "scale-L$l-r$SCALE_R-cold" "$b" "$a" cold
  done
fi

# ---------------------------------------------------------------- 4. the PEFT path
if step python && [ $python = 1 ]; then
  for lr in $PY_RUNS; do
    l=${lr%:*} PY_R=${lr#*:}
    b=$(gen_base "$l"); a=$(gen_lora "$l" "$PY_R")
    bytes=$(sed -n 's/.*"base_bytes": \([0-9]*\).*/\1/p' "$res/gen-base-L$l.json")
    avail=$(awk '/MemAvailable/{printf "%.0f", $2*1024}' /proc/meminfo)
    # PEFT holds the fp16 model, copies of the merged weights, fp32 LoRA factors and an fp32
    # delta: allow 3x the base size, and stay under 75% of what is available now.
    need=$(( bytes * 3 )); cap=$(( avail * 3 / 4 ))
    if [ $need -gt $cap ]; then
      echo "{\"name\":\"peft-L$l-r$PY_R\",\"kind\":\"peft\",\"layers\":$l,\"skipped\":\"needs ~$need B, $avail B available\"}" > "$res/peft-L$l-r$PY_R-cold.json"
      continue
    fi
    merge "h2h-L$l-r$PY_R-cold" "$b" "$a" cold
    pcg=""
    if cgv=$(cg_make lorastream-bench-py "$cap"); then pcg="${cgv#* }"; fi
    prepare cold
    RESIDENT=$(resident $(files_of "$b"))
    log "PEFT merge_and_unload + torch.save, $l layers r=$PY_R (memory cap $cap B)"
    meta="{\"kind\":\"peft\",\"layers\":$l,\"r\":$PY_R,\"cache\":\"cold\",\"cap_bytes\":$cap}"
    if [ -n "$pcg" ]; then
      SYNC_PATH="$out/peft-merged.pth" measure "peft-L$l-r$PY_R-cold" "$meta" sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$pcg" \
        timeout 900 "$PY" "$here/peft_merge.py" "$b" "$a" "$out/peft-merged.pth"
      cg_stats ${cgv% *} "$pcg" > "$res/cgstat-peft-L$l-r$PY_R.json"; rmdir "$pcg" 2>/dev/null
    else
      SYNC_PATH="$out/peft-merged.pth" measure "peft-L$l-r$PY_R-cold" "$meta" timeout 900 "$PY" "$here/peft_merge.py" "$b" "$a" "$out/peft-merged.pth"
    fi
    rm -f "$out/peft-merged.pth"
  done
fi

step gemm && gemm gemm-end

echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$res/machine.txt"
echo "mem_available_end=$(awk '/MemAvailable/{printf "%.0f", $2*1024}' /proc/meminfo)" >> "$res/machine.txt"

# ---------------------------------------------------------------- report
"$PY" "$here/report.py" "$res" "$results" && log "wrote $results"

if [ $clean = 1 ]; then
  log "deleting generated models under $out"
  rm -rf "$pool" "$out"/base-L* "$out"/lora-L* "$out"/merged-*
fi
