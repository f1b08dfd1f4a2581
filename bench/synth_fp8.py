#!/usr/bin/env python3
"""Synthetic FP8 block-scaled InternLM2-shaped checkpoint, for bench/fp8.sh.

The same tensors, shapes, shard layout and config as bench/synth_model.py's 16-bit model
(imported from it, not copied), except that every decoder Linear weight (wqkv, wo, w1, w3,
w2) is stored as DeepSeek-V3 / Qwen3-FP8 releases store it: `X.weight` float8_e4m3fn
(random codes, NaN codes 0x7F/0xFF avoided) + `X.weight_scale_inv` f32 (one per 128×128
block, ceil grid), with `quantization_config` {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}. Embeddings, norms and
the output head stay 16-bit (bf16, as those releases keep them; `modules_to_not_convert`).
Values do not matter, speed does.

  synth_fp8.py --base OUT/fp8 --layers 4 [--hidden ... --inter ... --vocab ...]
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synth_model  # noqa: E402  (shapes, config_json, FULL: the 16-bit model's definition)

CHUNK = 16 << 20
BLOCK = 128
FP8_TARGETS = ("wqkv", "wo", "w1", "w3", "w2")


class Codes:
    """Random fp8 codes (no NaN) and random bf16 bits, from one block read at varied offsets."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        c = rng.integers(0, 256, 2 * CHUNK, dtype=np.uint8)
        c[(c & 0x7F) == 0x7F] -= 1  # 0x7F / 0xFF are NaN in e4m3fn
        self.codes = c
        f = (rng.standard_normal(CHUNK, dtype=np.float32) * 0.02).view(np.uint32)
        self.bf16 = (f >> 16).astype(np.uint16).view(np.uint8)  # truncation: values do not matter
        self.rng = rng

    def write(self, f, src, nbytes):
        while nbytes > 0:
            k = min(nbytes, CHUNK)
            off = int(self.rng.integers(0, CHUNK))
            f.write(memoryview(src[off : off + k]))
            nbytes -= k


def is_fp8(name, shape):
    return len(shape) == 2 and name.split(".")[-2] in FP8_TARGETS


def tensors_of(tensors):
    """(name, dtype, shape, nbytes) of one shard: fp8 weights with their scales after them."""
    out = []
    for name, shape in tensors:
        if is_fp8(name, shape):
            grid = [math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)]
            out.append((name, "F8_E4M3", shape, shape[0] * shape[1]))
            out.append((name + "_scale_inv", "F32", grid, grid[0] * grid[1] * 4))
        else:
            out.append((name, "BF16", shape, synth_model.numel(shape) * 2))
    return out


def write_shard(path, tensors, codes, rng):
    header, off = {}, 0
    for name, dtype, shape, nb in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, dtype, shape, nb in tensors:
            if dtype == "F8_E4M3":
                codes.write(f, codes.codes, nb)
            elif dtype == "F32":
                f.write(rng.uniform(1e-4, 2e-4, nb // 4).astype(np.float32).tobytes())
            elif len(shape) == 1:
                f.write(np.full(shape[0], 0x3F80, np.uint16).tobytes())  # norms: 1.0
            else:
                codes.write(f, codes.bf16, nb)
    os.replace(tmp, path)
    return off


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    full = synth_model.FULL
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=full["hidden"])
    ap.add_argument("--inter", type=int, default=full["inter"])
    ap.add_argument("--vocab", type=int, default=full["vocab"])
    ap.add_argument("--heads", type=int, default=full["heads"])
    ap.add_argument("--kv-heads", type=int, default=full["kv_heads"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = dict(hidden=a.hidden, inter=a.inter, vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads, layers=a.layers)
    os.makedirs(a.base, exist_ok=True)
    parts = synth_model.shapes(cfg)
    codes, rng = Codes(a.seed), np.random.default_rng(a.seed + 1)
    weight_map, total = {}, 0
    for idx, (_, tensors) in enumerate(parts):
        fname = f"model-{idx + 1:05d}-of-{len(parts):05d}.safetensors"
        ts = tensors_of(tensors)
        total += write_shard(os.path.join(a.base, fname), ts, codes, rng)
        for name, *_ in ts:
            weight_map[name] = fname
    with open(os.path.join(a.base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    conf = synth_model.config_json(cfg)
    conf["torch_dtype"] = "bfloat16"
    conf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": ["output"],
    }
    with open(os.path.join(a.base, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "xtuner", "internlm2")
    for name in ("modeling_internlm2.py", "configuration_internlm2.py"):
        shutil.copyfile(os.path.join(code, name), os.path.join(a.base, name))
    print(json.dumps({"base_bytes": total, "layers": a.layers}))


if __name__ == "__main__":
    main()
