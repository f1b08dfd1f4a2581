#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. cargo fmt --check and clippy -D warnings;
#   2. Rust unit tests and the fixture tests in tests/*.rs (no Python needed); the unit
#      tests and the Python-free merge tests again, cross-compiled for aarch64 and run
#      under qemu (scripts/test-aarch64.sh: the NEON path, and every fixture merge's bytes
#      against the digests committed from x86); then short fuzz runs of every reader
#      (scripts/fuzz-smoke.sh: nightly + cargo-fuzz, which it installs into the cache when
#      missing; skipped with a message when that fails; bench/FUZZ.md);
#   3. the compatibility tests in tests/compat/ against the real clients: our outputs loaded
#      by torch.load (weights_only, mmap) and safetensors, merges compared with PEFT's
#      merge_and_unload, XTuner's LLaVA layout. Their Python venv is created once and cached
#      in ~/.cache/lorastream (scripts/python-env.sh).
#   4. the Python package (tests/python/run.sh): the wheel built with maturin and tested
#      through its API against the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo fmt --check --manifest-path bindings/python/Cargo.toml
cargo clippy --release --all-targets -- -D warnings
cargo build --release
# libnvrtc from PyPI (no GPU or CUDA toolkit needed) so the kernel-compile tests run in CI.
LD_LIBRARY_PATH="$(scripts/nvrtc-lib.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH LORASTREAM_REQUIRE_NVRTC=1
cargo test --release
scripts/test-aarch64.sh
scripts/fuzz-smoke.sh
PY=$(scripts/python-env.sh)
# Real XTuner 0.2.0 for the LLaVA load check, in its own cached venv (it pins an older
# transformers); torch and peft are shared with the compat venv.
(cd fixtures && "$PY" -c "import make_xtuner_fixtures as m; m.ensure_xtuner_venv()" >&2)
export LORASTREAM_BIN="$PWD/target/release/lorastream" LORASTREAM_REQUIRE_MERGE=1 \
  LORASTREAM_REQUIRE_XTUNER=1 PYTHONUNBUFFERED=1
"$PY" -m pytest tests/compat -q -p no:cacheprovider
# The Python package: wheel (rebuilt only when its inputs change), its own venv, API tests.
tests/python/run.sh
