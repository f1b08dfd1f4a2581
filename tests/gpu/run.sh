#!/usr/bin/env bash
# GPU checks of lorastream's CUDA backend (issue 5), as one prepared run on a GPU machine:
# NVIDIA GPU + driver, CUDA toolkit (libnvrtc, compute-sanitizer), python3 with torch,
# safetensors and numpy; no Rust toolchain and no internet needed.
#
# Here (with Rust), first:   tests/gpu/bundle.sh      -> target/gpu/{lorastream,nvrtc-tests,fixtures-merge-tests}
# There, from the repo root: tests/gpu/run.sh         (carry target/gpu; results in $OUT)
#
# Stages (each bounded in time; a failing stage is recorded and the next one still runs):
#   1. Rust tests built here: GPU vs CPU backend on random tensors (every dtype, layout, DoRA,
#      rank > 256, band splits; <= 1 ulp), --device cuda through the CLI, fixture merges vs
#      PEFT with --device auto (= the GPU).
#   2. The PEFT fixture suite through the CLI: each merge case with --device cuda and
#      --device cpu (+ --dtype variants): <= 1 ulp on every element, and vs PEFT's result.
#   3. The fused kernel alone: achieved bandwidth (r=16) and FLOP/s (r=512) vs the device's
#      peak HBM bandwidth and FP32 rate.
#   4. compute-sanitizer: memcheck on the random GPU-vs-CPU cases, racecheck and synccheck on
#      a fixture merge.
#   5. End to end: a synthetic InternLM2-7B-shaped fp16 model (bench/synth_model.py) merged
#      with an r=512 adapter on the GPU and on the CPU, against cp of the same files; outputs
#      compared (<= 1 ulp).
#
# Environment: OUT (results folder; default ./gpu-out), WORK (scratch, ~50 GB free for the
# full model; default /tmp/lorastream-gpu), LAYERS (32), RANK (512), BUDGET_S (450: the whole
# run stays under 8 minutes), SKIP_E2E=1.
# Results: $OUT/gpu-results.md (markdown) and $OUT/*.log (at most 8 files in all).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-out}
WORK=${WORK:-/tmp/lorastream-gpu}
LAYERS=${LAYERS:-32}
RANK=${RANK:-512}
BUDGET_S=${BUDGET_S:-450}
G=$REPO/target/gpu
BIN=$G/lorastream
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
MD=$OUT/gpu-results.md
START=$(date +%s)
left() { echo $((START + BUDGET_S - $(date +%s))); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo $((l > 5 ? l : 5)); }
ms() { date +%s%3N; }
md() { printf '%s\n' "$*" >>"$MD"; }
FAILED=()
stage_result() { # name rc
  if [ "$2" -eq 0 ]; then md "**$1: passed**"; else md "**$1: FAILED (exit $2)**"; FAILED+=("$1"); fi
  md ""
}

: >"$MD"
md "# lorastream CUDA backend: GPU run ($(date -u +%Y-%m-%dT%H:%MZ))"
md ""

# --- 0. environment ---------------------------------------------------------------------
for f in lorastream nvrtc-tests fixtures-merge-tests; do
  [ -x "$G/$f" ] || { md "missing $G/$f: run tests/gpu/bundle.sh on a machine with Rust and carry target/gpu"; exit 2; }
done
# libnvrtc for the run-time compile: cudarc (built for CUDA 12.8) loads libnvrtc.so,
# .so.12 or .so.11; with only CUDA 13 present, link the unversioned name to it.
nvrtc_dir=""
nvrtc_link=""
cands=("${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64 /usr/local/cuda/targets/*/lib)
IFS=: read -r -a ldp <<<"${LD_LIBRARY_PATH:-}"
cands+=("${ldp[@]}")
cands+=($(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ {print $NF}' | xargs -r -n1 dirname | sort -u))
cands+=($("$PY" -c 'import glob, os, nvidia
print(" ".join(sorted({os.path.dirname(p) for b in nvidia.__path__ for p in glob.glob(os.path.join(b, "*", "lib", "libnvrtc.so*"))})))' 2>/dev/null))
for d in "${cands[@]}"; do # a name cudarc loads as is
  if [ -n "$d" ] && ls "$d"/libnvrtc.so "$d"/libnvrtc.so.12 >/dev/null 2>&1; then nvrtc_dir=$d; break; fi
done
if [ -z "$nvrtc_dir" ]; then # only another major version (CUDA 13): link the unversioned name
  for d in "${cands[@]}"; do
    lib=$(ls "$d"/libnvrtc.so.[0-9]* 2>/dev/null | head -1)
    if [ -n "$lib" ]; then
      nvrtc_dir=$d
      nvrtc_link=$WORK/nvrtc
      mkdir -p "$nvrtc_link" && ln -sf "$lib" "$nvrtc_link/libnvrtc.so"
      break
    fi
  done
fi
[ -n "$nvrtc_dir" ] && export LD_LIBRARY_PATH="${nvrtc_link:+$nvrtc_link:}$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
SAN=$(command -v compute-sanitizer || ls ${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer 2>/dev/null || true)
# fixtures-merge-tests looks for the fixtures where it was built (/work/main).
if [ ! -e /work/main/fixtures/peft/cases.json ] && [ ! -e /work/main ]; then
  mkdir -p /work && ln -s "$REPO" /work/main
fi
{
  md "## Machine"
  md '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv 2>&1 | head -3
  (nvcc --version 2>/dev/null | tail -2) || true
  echo "libnvrtc from: ${nvrtc_dir:-NOT FOUND}${nvrtc_link:+ (as libnvrtc.so via $nvrtc_link)}"
  echo "compute-sanitizer: ${SAN:-NOT FOUND}"
  nproc | sed 's/^/cpus: /'
  free -g | awk '/Mem:/ {print "memory: " $2 " GiB"}'
  df -h "$WORK" | tail -1 | awk '{print "scratch " $6 ": " $4 " free"}'
  "$PY" -c 'import torch, safetensors; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1
  echo '```'
} >>"$MD" 2>&1
md ""
"$BIN" --version >/dev/null || { md "lorastream binary does not run here"; exit 2; }

# --- 1. Rust tests ----------------------------------------------------------------------
md "## 1. Rust tests (built by bundle.sh)"
export LORASTREAM_REPO=$REPO LORASTREAM_BIN=$BIN
LOG=$OUT/rust-tests.log
t0=$(ms)
LORASTREAM_REQUIRE_GPU=1 LORASTREAM_REQUIRE_NVRTC=1 timeout "$(cap 150)" "$G/nvrtc-tests" \
  --test-threads=1 --skip kernels_match_a_sequential >"$LOG" 2>&1
rc=$?
md '```'
grep -E "^test |test result|GPU vs CPU|ulp|note:" "$LOG" | head -60 >>"$MD"
md '```'
md "($(( ($(ms) - t0) / 1000 )) s)"
stage_result "nvrtc-tests" $rc
t0=$(ms)
timeout "$(cap 120)" "$G/fixtures-merge-tests" --test-threads=2 >>"$LOG" 2>&1
rc=$?
md '```'
grep -E "test result" "$LOG" | tail -1 >>"$MD"
md '```'
md "($(( ($(ms) - t0) / 1000 )) s)"
stage_result "fixtures-merge-tests (--device auto = the GPU)" $rc

# --- 2. fixture suite through the CLI -----------------------------------------------------
md "## 2. PEFT fixture suite: --device cuda vs --device cpu (CLI)"
t0=$(ms)
timeout "$(cap 150)" "$PY" tests/gpu/check.py fixtures --bin "$BIN" --peft fixtures/peft \
  --work "$WORK/fixtures" --md "$OUT/fixtures.md.tmp" >"$OUT/fixtures.log" 2>&1
rc=$?
[ -f "$OUT/fixtures.md.tmp" ] && cat "$OUT/fixtures.md.tmp" >>"$MD" && rm -f "$OUT/fixtures.md.tmp"
md ""
md "($(( ($(ms) - t0) / 1000 )) s)"
stage_result "fixture suite" $rc

# --- 3. kernel alone --------------------------------------------------------------------
md "## 3. The fused kernel alone (bf16 in/out, data on the GPU, 20 launches)"
BLOG=$OUT/bench.log
timeout "$(cap 90)" "$G/nvrtc-tests" kernel_bench --ignored --exact --nocapture >"$BLOG" 2>&1
rc=$?
"$PY" - "$BLOG" >>"$MD" <<'PYEOF'
import json, sys
rows = [json.loads(l.split("BENCH ", 1)[1]) for l in open(sys.argv[1]) if l.startswith("BENCH ")]
pct = lambda x, p: f"{100 * x / p:.0f}% of {p / 1e9:.0f} G" if p else "n/a"
print("| W shape | r | time/launch | bytes moved | achieved bandwidth | vs HBM peak (B/s) | FLOP/s | vs FP32 peak (FLOP/s) |")
print("|---|---|---|---|---|---|---|---|")
for b in rows:
    t = b["seconds_per_launch"]
    bw, fl = b["bytes_per_second"], b["flop_per_second"]
    print(f"| {b['rows']}x{b['cols']} | {b['r']} | {t * 1e6:.0f} us | {bw * t / 1e6:.0f} MB | {bw / 1e9:.0f} GB/s | "
          f"{pct(bw, b.get('peak_bytes_per_second'))} | {fl / 1e12:.1f} TFLOP/s | {pct(fl, b.get('peak_fp32_flop_per_second'))} |")
if rows:
    print(f"\ndevice: {rows[0]['device']}. Bytes = W read + output written + both factors read once. "
          "Peaks: memory clock x bus width x 2, and SMs x FP32 lanes x 2 x SM clock, as the driver reports them (nominal).")
else:
    print("no BENCH lines: see bench.log")
PYEOF
md ""
stage_result "kernel benchmark" $rc

# --- 4. compute-sanitizer ---------------------------------------------------------------
md "## 4. compute-sanitizer"
SLOG=$OUT/sanitizer.log
: >"$SLOG"
if [ -n "$SAN" ]; then
  peft=fixtures/peft
  for spec in "memcheck:tests:gpu_matches_cpu_on_random_tensors" \
    "racecheck:merge:two_adapters_bf16" "synccheck:merge:dora_conv1d" "memcheck:merge:dora_conv1d"; do
    IFS=: read -r tool kind what <<<"$spec"
    t0=$(ms)
    if [ "$kind" = tests ]; then
      LORASTREAM_REQUIRE_GPU=1 timeout "$(cap 120)" "$SAN" --tool "$tool" --error-exitcode 9 \
        "$G/nvrtc-tests" "$what" --exact --test-threads=1 >>"$SLOG" 2>&1
    else
      args=()
      case $what in
        two_adapters_bf16) args=(--base $peft/bases/llama_bf16 --lora $peft/cases/two_adapters_bf16/adapter_x --lora $peft/cases/two_adapters_bf16/adapter_y) ;;
        dora_conv1d) args=(--base $peft/bases/gpt2_f32 --lora $peft/cases/dora_conv1d/adapter) ;;
      esac
      timeout "$(cap 90)" "$SAN" --tool "$tool" --error-exitcode 9 "$BIN" merge "${args[@]}" \
        --out "$WORK/san.safetensors" --device cuda --json >>"$SLOG" 2>&1
    fi
    rc=$?
    md "- $tool on $what: $( [ $rc -eq 0 ] && echo clean || echo "FAILED (exit $rc)") ($(( ($(ms) - t0) / 1000 )) s)"
    [ $rc -eq 0 ] || FAILED+=("compute-sanitizer $tool $what")
  done
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$SLOG" | sort | uniq -c | sed 's/^/    /' >>"$MD"
else
  md "compute-sanitizer not found: NOT RUN"
  FAILED+=("compute-sanitizer missing")
fi
md ""

# --- 5. end to end ----------------------------------------------------------------------
md "## 5. End to end: synthetic InternLM2-7B-shaped model, r=$RANK adapter"
ELOG=$OUT/e2e.log
: >"$ELOG"
if [ "${SKIP_E2E:-0}" = 1 ]; then
  md "skipped (SKIP_E2E=1)"
elif [ "$(left)" -lt 60 ]; then
  md "skipped: the time budget is spent ($(left) s left)"
  FAILED+=("e2e not run")
else
  free_gb=$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)
  # base ~0.47 GB/layer (+1.5 GB embeddings/head), adapter ~0.08 GB/layer at r=512, two outputs.
  while [ "$LAYERS" -gt 1 ] && [ $(( (LAYERS * 47 + 150) * 3 / 100 + LAYERS * 8 / 100 + 3 )) -gt "$free_gb" ]; do
    LAYERS=$((LAYERS / 2))
  done
  [ "$(left)" -lt 240 ] && [ "$LAYERS" -gt 8 ] && LAYERS=8
  md "layers: $LAYERS (of 32), scratch: $WORK ($free_gb GB free)"
  rm -rf "$WORK/base" "$WORK/lora" "$WORK/copy" "$WORK/out-gpu" "$WORK/out-cpu"
  t0=$(ms)
  synth=bench/synth_model.py
  if [ ! -f $synth ]; then
    md "bench/synth_model.py missing: NOT RUN"; FAILED+=("e2e: no generator")
  else
    timeout "$(cap 150)" "$PY" $synth --base "$WORK/base" --layers "$LAYERS" --json >>"$ELOG" 2>&1 &&
      timeout "$(cap 90)" "$PY" $synth --adapter "$WORK/lora" --layers "$LAYERS" --r "$RANK" --json >>"$ELOG" 2>&1
    rc=$?
    md "generated in $(( ($(ms) - t0) / 1000 )) s: $(tail -2 "$ELOG" | tr '\n' ' ')"
    if [ $rc -ne 0 ]; then
      FAILED+=("e2e: generator failed")
    else
      drop() { sync; if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then echo cold; else echo warm; fi; }
      cache=$(drop)
      t0=$(ms); cp -r "$WORK/base" "$WORK/copy"; sync; t_cp=$(( $(ms) - t0 )); rm -rf "$WORK/copy"
      cache=$(drop)
      t0=$(ms)
      timeout "$(cap 240)" "$BIN" merge --base "$WORK/base" --lora "$WORK/lora" --out "$WORK/out-gpu/" \
        --device cuda --json >"$WORK/gpu.json" 2>>"$ELOG"
      rc_g=$?; sync; t_gpu=$(( $(ms) - t0 ))
      cache=$(drop)
      t_cpu=""
      if [ "$(left)" -gt 60 ]; then
        t0=$(ms)
        timeout "$(cap 240)" "$BIN" merge --base "$WORK/base" --lora "$WORK/lora" --out "$WORK/out-cpu/" \
          --device cpu --json >"$WORK/cpu.json" 2>>"$ELOG"
        rc_c=$?; sync; t_cpu=$(( $(ms) - t0 ))
      else
        rc_c=124
      fi
      cat "$WORK/gpu.json" "$WORK/cpu.json" >>"$ELOG" 2>/dev/null
      bytes=$(du -sb "$WORK/base" | cut -f1)
      md ""
      md "page cache before each run: $cache (drop_caches $( [ "$cache" = cold ] && echo worked || echo "not permitted: all runs read a warm cache"))"
      md ""
      md "| run | wall time | throughput (base bytes / s) | |"
      md "|---|---|---|---|"
      md "| cp -r base (+ sync) | $((t_cp / 1000)).$(( (t_cp % 1000) / 100 )) s | $(( bytes / (t_cp + 1) / 1000 )) MB/s | |"
      md "| merge --device cuda (+ sync) | $((t_gpu / 1000)).$(( (t_gpu % 1000) / 100 )) s | $(( bytes / (t_gpu + 1) / 1000 )) MB/s | exit $rc_g; $(head -c 300 "$WORK/gpu.json" | grep -o '"device":"[^"]*"') |"
      if [ -n "$t_cpu" ]; then
        md "| merge --device cpu (+ sync) | $((t_cpu / 1000)).$(( (t_cpu % 1000) / 100 )) s | $(( bytes / (t_cpu + 1) / 1000 )) MB/s | exit $rc_c; $(head -c 300 "$WORK/cpu.json" | grep -o '"device":"[^"]*"') |"
      else
        md "| merge --device cpu | not run (time budget) | | |"
      fi
      md ""
      [ $rc_g -eq 0 ] || FAILED+=("e2e: GPU merge")
      if [ $rc_g -eq 0 ] && [ "$rc_c" -eq 0 ] && [ "$(left)" -gt 20 ]; then
        timeout "$(cap 150)" "$PY" tests/gpu/check.py compare "$WORK/out-gpu" "$WORK/out-cpu" --tol 1 >"$WORK/cmp.json" 2>>"$ELOG"
        rc=$?
        cat "$WORK/cmp.json" >>"$ELOG"
        md "GPU output vs CPU output: $("$PY" tests/gpu/check.py summary "$WORK/cmp.json" 2>&1)"
        [ $rc -eq 0 ] || FAILED+=("e2e: GPU vs CPU output")
      else
        md "GPU vs CPU output: not compared (a run failed or the budget is spent)"
      fi
      rm -rf "$WORK/out-gpu" "$WORK/out-cpu"
    fi
  fi
fi
md ""

# --- summary ----------------------------------------------------------------------------
md "## Summary"
md "wall time of this script: $(( $(date +%s) - START )) s"
if [ ${#FAILED[@]} -eq 0 ]; then
  md "**all stages passed**"
else
  md "**failed: ${FAILED[*]}**"
fi
cat "$MD"
[ ${#FAILED[@]} -eq 0 ]
