#!/usr/bin/env bash
# Installs (once) NVIDIA's NVRTC runtime compiler from PyPI (wheel nvidia-cuda-nvrtc-cu12: no
# CUDA toolkit, no GPU, no driver needed) and prints the folder that holds libnvrtc.so.12, for
# LD_LIBRARY_PATH. With it the Rust tests compile every kernel in kernels/*.cu to PTX and to
# cubins (tests/nvrtc.rs), which is all a machine without a GPU can check of them.
# Cached outside the checkout (~/.cache/lorastream), keyed by the version, so CI reuses it.
# Usage: export LD_LIBRARY_PATH="$(scripts/nvrtc-lib.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set -euo pipefail
# 12.8 matches the cudarc feature cuda-12080 in Cargo.toml.
ver="${LORASTREAM_NVRTC_VERSION:-12.8.93}"
dir="${LORASTREAM_NVRTC_DIR:-$HOME/.cache/lorastream/nvrtc-cu12-$ver}"
lib="$dir/nvidia/cuda_nvrtc/lib"
if [ ! -f "$dir/.complete" ] || [ ! -e "$lib/libnvrtc.so.12" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 -m pip install -q --no-deps --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$dir" "nvidia-cuda-nvrtc-cu12==$ver" >&2
  [ -e "$lib/libnvrtc.so.12" ] || { echo "nvrtc-lib.sh: no libnvrtc.so.12 in $lib" >&2; exit 1; }
  touch "$dir/.complete"
fi
echo "$lib"
