#!/usr/bin/env bash
# The Python package's tests: builds the wheel (maturin, from the compat venv), installs it
# into a venv of its own that holds only the wheel and pytest, and runs test_api.py there
# against the lorastream binary ($LORASTREAM_BIN, default: cargo build --release's).
#   tests/python/run.sh [pytest args...]
# Cached, so CI pays only for what changed: the bindings' cargo target lives under
# ${CARGO_TARGET_DIR:-target}/python; the wheel is rebuilt only when a file it is built
# from changed (keyed by their hash); the venv is made once (keyed by its Python and
# pytest) and gets the new wheel reinstalled when the wheel changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
PY=$(scripts/python-env.sh)
tdir="${CARGO_TARGET_DIR:-$repo/target}/python"
mkdir -p "$tdir"
exec 9>"$tdir/.lock"
flock 9

# What the wheel is built from: the crate, the bindings, the Python code, the metadata.
key=$(git ls-files -co --exclude-standard -- Cargo.toml Cargo.lock src bindings/python python \
        pyproject.toml README.md | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
wheels="$tdir/wheels-$key"
if ! compgen -G "$wheels/lorastream-*.whl" >/dev/null; then
  rm -rf "$tdir"/wheels-*
  # Linted only when it is rebuilt: CI pays for it only when the bindings may have changed.
  (cd bindings/python && CARGO_TARGET_DIR="$tdir" PYO3_PYTHON="$PY" \
    cargo clippy --release --all-targets --quiet -- -D warnings)
  CARGO_TARGET_DIR="$tdir" "$PY" -m maturin build --release --quiet --out "$wheels.tmp" >&2
  mv "$wheels.tmp" "$wheels"
fi
wheel=$(compgen -G "$wheels/lorastream-*.whl" | head -n1)

pytest_version=$("$PY" -c 'import pytest; print(pytest.__version__)')
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv="$tdir/venv-py$pyver-pytest$pytest_version"
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$tdir"/venv-*
  # A venv of the compat venv's interpreter without its packages: the wheel must work on
  # its own.
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "pytest==$pytest_version"
  touch "$venv/.complete"
fi
if [ "$(cat "$venv/.wheel" 2>/dev/null)" != "$wheel" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$wheel"
  echo "$wheel" >"$venv/.wheel"
fi

if [ -z "${LORASTREAM_BIN:-}" ]; then
  cargo build --release --quiet
  LORASTREAM_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/lorastream"
fi
export LORASTREAM_BIN LORASTREAM_VENV_BIN="$venv/bin"
exec "$venv/bin/python" -m pytest "$repo/tests/python" -q -p no:cacheprovider "$@"
