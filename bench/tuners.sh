#!/usr/bin/env bash
# Tuners other than LoRA on the InternLM2-shaped model: time and peak memory of
# `lorastream merge` with a LoKr, an OFT and an IA3 adapter (PEFT's own tensor names and
# shapes, bench/tuner_adapter.py) beside a LoRA r=16 merge and the I/O floors of the same
# bytes (read alone: cat > /dev/null; write alone: dd oflag=direct; cp), measured in
# turn (floor, lorastream, floor, ...) in one run; the medians and the ratios go into a
# markdown report.
#
#   bench/tuners.sh [--layers 4] [--runs 3] [--out bench/out] [--results bench/RESULTS-tuners.md]
#
# Hot cache: the base files are read into the page cache before every run (this machine
# cannot drop caches), so the read floor is the page-cache read and every ratio compares
# like with like.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
layers=4 runs=3 out="$repo/bench/out" results="$repo/bench/RESULTS-tuners.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --runs) runs=$2; shift ;;
    --out) out=$2; shift ;;
    --results) results=$2; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
PY=$("$repo/scripts/python-env.sh")
BIN="$repo/target/release/lorastream"
(cd "$repo" && cargo build --release 2>&1 | tail -1) >&2
mkdir -p "$out"
base="$out/tuners-base$layers"
[ -d "$base" ] || "$PY" "$here/synth_model.py" --base "$base" --layers "$layers" >&2
[ -d "$out/tuners-lora16-$layers" ] || "$PY" "$here/synth_model.py" --adapter "$out/tuners-lora16-$layers" --layers "$layers" --r 16 --targets wqkv,wo,w1,w2,w3 >&2
for t in lokr oft ia3; do
  [ -d "$out/tuners-$t-$layers" ] || "$PY" "$here/tuner_adapter.py" --out "$out/tuners-$t-$layers" --layers "$layers" --tuner "$t" >&2
done
bytes=$(cat "$base"/*.safetensors | wc -c)
dst="$out/tuners-dst"
tsv="$out/tuners.tsv"
: > "$tsv"
warm() { cat "$base"/*.safetensors > /dev/null; }
# timed NAME CMD...: one run, hot cache, appended to the TSV as name wall user sys maxrss_kb
timed() {
  local name=$1; shift
  rm -rf "$dst" "$dst.safetensors"; sync; warm
  /usr/bin/time -f "$name	%e	%U	%S	%M" -a -o "$tsv" "$@" > /dev/null 2>&1
}
for i in $(seq "$runs"); do
  timed read sh -c "cat '$base'/*.safetensors > /dev/null"
  timed write dd if=/dev/zero of="$dst" bs=16M count=$(( (bytes + (16<<20) - 1) / (16<<20) )) oflag=direct status=none
  timed cp sh -c "mkdir -p '$dst' && cp '$base'/*.safetensors '$dst'/ && sync '$dst'/*"
  timed lora16 "$BIN" merge --base "$base" --lora "$out/tuners-lora16-$layers" --out "$dst/" -q
  for t in lokr oft ia3; do
    timed "$t" "$BIN" merge --base "$base" --lora "$out/tuners-$t-$layers" --out "$dst/" -q
  done
done
rm -rf "$dst"
"$PY" - "$tsv" "$results" "$layers" "$bytes" "$repo" <<'EOF'
import statistics, subprocess, sys, datetime, platform
tsv, results, layers, nbytes, repo = sys.argv[1:]
rows = {}
for line in open(tsv):
    p = line.rstrip("\n").split("\t")
    if len(p) == 5 and not p[0].startswith("Command"):
        rows.setdefault(p[0], []).append(tuple(float(x) for x in p[1:]))
med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
floor = max(med["read"][0], med["write"][0])
out = [f"# Tuners other than LoRA: time and peak memory ({layers}-layer InternLM2-shaped model)", "",
       f"Run by `bench/tuners.sh --layers {layers}` on {datetime.date.today()} at rev {rev}; {cpu}, "
       f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; {int(nbytes)/1e9:.2f} GB of fp16 base weights, "
       f"hot page cache; medians of {len(rows['read'])} runs taken in turn.", "",
       "| run | wall s | user s | sys s | peak RSS MB | wall / I/O floor | wall / cp | wall / LoRA r=16 |",
       "|---|---|---|---|---|---|---|---|"]
for k in ["read", "write", "cp", "lora16", "lokr", "oft", "ia3"]:
    w, u, s, rss = med[k]
    out.append(f"| {k} | {w:.2f} | {u:.2f} | {s:.2f} | {rss/1024:.0f} | {w/floor:.2f} | {w/med['cp'][0]:.2f} | {w/med['lora16'][0]:.2f} |")
out += ["", "I/O floor = max(read alone, write alone) of the same bytes. lokr: LoKrConfig(r=16, alpha=32); "
        "oft: OFTConfig(oft_block_size=32); ia3: IA3Config (w2 feed-forward); all on wqkv, wo, w1, w2, w3 "
        "of every layer; adapters from bench/tuner_adapter.py (PEFT's names and shapes, random values).", ""]
open(results, "w").write("\n".join(out))
print("\n".join(out))
EOF
