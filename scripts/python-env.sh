#!/usr/bin/env bash
# Creates (once) and prints the path of the Python venv that the compatibility tests use:
# real torch, safetensors, peft and transformers, pinned. Cached outside the checkout
# (~/.cache/lorastream) and keyed by this file's requirement list, so CI reuses it.
# Usage: PY=$(scripts/python-env.sh)   # prints the venv's python
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
req="$here/requirements-compat.txt"
key=$(sha256sum "$req" | cut -c1-12)
venv="${LORASTREAM_VENV:-$HOME/.cache/lorastream/venv-$key}"
mkdir -p "$(dirname "$venv")"
# One creator at a time: a second caller waits for the first instead of deleting its
# half-built venv.
exec 9>"$venv.lock"
flock 9
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r "$req" >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
