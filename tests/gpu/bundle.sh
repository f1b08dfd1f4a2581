#!/usr/bin/env bash
# Builds, on a machine with Rust, what tests/gpu/run.sh needs on a GPU machine without one:
#   target/gpu/lorastream             the release binary
#   target/gpu/nvrtc-tests            tests/nvrtc.rs (GPU vs CPU backend, --device paths, kernel bench)
#   target/gpu/fixtures-merge-tests   tests/fixtures_merge.rs (merges vs PEFT; --device auto = the GPU there)
# Prints the folder to carry (target/ is ignored by git, so name it in the device tool's carry).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release >&2
mkdir -p target/gpu
cp target/release/lorastream target/gpu/lorastream
for t in nvrtc fixtures_merge; do
  exe=$(cargo test --release --no-run --test "$t" --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m.get("target", {}).get("kind", []):
        print(m["executable"])' | tail -1)
  [ -x "$exe" ] || { echo "bundle.sh: no test executable for $t" >&2; exit 1; }
  cp "$exe" "target/gpu/${t//_/-}-tests"
done
du -sh target/gpu >&2
echo target/gpu
