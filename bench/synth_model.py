#!/usr/bin/env python3
"""Synthetic InternLM2-7B-shaped checkpoint + PEFT LoRA adapter, for benchmarks.

Writes, with real shapes and random fp16 values (values do not matter, speed does):

  * an HF sharded safetensors folder (model-0000i-of-0000n.safetensors +
    model.safetensors.index.json + config.json): model.tok_embeddings.weight [V,H],
    per layer attention.wqkv [H+2*KV*D, H], attention.wo [H,H], feed_forward.w1/w3 [I,H],
    feed_forward.w2 [H,I], attention_norm/ffn_norm [H], then model.norm [H] and
    output.weight [V,H]. Full size (32 layers) is about 15 GB.
  * a PEFT-format LoRA adapter folder (adapter_config.json, peft_type LORA;
    adapter_model.safetensors with base_model.model.<module>.lora_A.weight [r,in] and
    lora_B.weight [out,r], fp16).

Layout: one shard for the embeddings, one per decoder layer, one for norm+output. With
--pool DIR each part is written once into DIR (named by content, e.g. layer-00007) and the
model folder gets hard links to it under the HF shard names, so 4-, 8-, 16- and 32-layer
models share their bytes on disk. Files are stream-written from one random block read at
varied offsets, so the generator needs little RAM and runs at disk speed.

  synth_model.py --base OUT/base --layers 32 [--pool OUT/pool]
  synth_model.py --adapter OUT/lora-r512 --layers 32 --r 512 [--targets wqkv,wo,w1,w2,w3,output]
"""

import argparse
import json
import os
import shutil
import struct
import sys
import time

import numpy as np

# InternLM2-7B
FULL = dict(hidden=4096, inter=14336, vocab=92544, heads=32, kv_heads=8, layers=32)

# The Linear layers an adapter targets by default (--targets).
DEFAULT_TARGETS = ["wqkv", "wo", "w1", "w2", "w3", "output"]

CHUNK = 8 << 20  # fp16 elements written per write() (16 MB)


class Noise:
    """Random fp16 bytes: one block of N(0, 0.02) values, read at varied offsets."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        block = rng.standard_normal(2 * CHUNK, dtype=np.float32) * 0.02
        self.block = block.astype(np.float16)
        self.rng = rng

    def write(self, f, n):
        """Writes n random fp16 values to f."""
        while n > 0:
            k = min(n, CHUNK)
            off = int(self.rng.integers(0, CHUNK))
            f.write(memoryview(self.block[off : off + k]).cast("B"))
            n -= k


def shapes(cfg):
    h, i, v = cfg["hidden"], cfg["inter"], cfg["vocab"]
    d = h // cfg["heads"]
    qkv = h + 2 * cfg["kv_heads"] * d
    layer = lambda n: [  # noqa: E731
        (f"model.layers.{n}.attention.wqkv.weight", [qkv, h]),
        (f"model.layers.{n}.attention.wo.weight", [h, h]),
        (f"model.layers.{n}.feed_forward.w1.weight", [i, h]),
        (f"model.layers.{n}.feed_forward.w3.weight", [i, h]),
        (f"model.layers.{n}.feed_forward.w2.weight", [h, i]),
        (f"model.layers.{n}.attention_norm.weight", [h]),
        (f"model.layers.{n}.ffn_norm.weight", [h]),
    ]
    parts = [("embed", [("model.tok_embeddings.weight", [v, h])])]
    parts += [(f"layer-{n:05d}", layer(n)) for n in range(cfg["layers"])]
    parts.append(("head", [("model.norm.weight", [h]), ("output.weight", [v, h])]))
    return parts


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def write_safetensors(path, tensors, noise, ones=()):
    """Stream-writes fp16 tensors [(name, shape)]; names in `ones` are filled with 1.0."""
    header, off = {}, 0
    for name, shape in tensors:
        nb = numel(shape) * 2
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in tensors:
            if name in ones:
                f.write(np.ones(numel(shape), np.float16).tobytes())
            else:
                noise.write(f, numel(shape))
    os.replace(tmp, path)
    return off


def config_json(cfg):
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        # As InternLM2 releases ship it: the modeling code beside the weights (copied from
        # fixtures/xtuner/internlm2), which tells lorastream how its square weights lie.
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["inter"],
        "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"],
        "num_hidden_layers": cfg["layers"],
        "vocab_size": cfg["vocab"],
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


def make_base(out, cfg, pool, seed):
    os.makedirs(out, exist_ok=True)
    parts = shapes(cfg)
    n = len(parts)
    noise = Noise(seed)
    weight_map, total = {}, 0
    for idx, (tag, tensors) in enumerate(parts):
        fname = f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        dest = os.path.join(out, fname)
        ones = {t for t, s in tensors if len(s) == 1}
        want = sum(numel(s) * 2 for _, s in tensors)
        if pool:
            os.makedirs(pool, exist_ok=True)
            src = os.path.join(pool, f"{tag}-h{cfg['hidden']}-i{cfg['inter']}-v{cfg['vocab']}.safetensors")
            if not os.path.exists(src):
                write_safetensors(src, tensors, noise, ones)
            if os.path.exists(dest):
                os.remove(dest)
            os.link(src, dest)
        else:
            write_safetensors(dest, tensors, noise, ones)
        for t, s in tensors:
            weight_map[t] = fname
        total += want
    # Drop shards of an earlier, larger model in the same folder.
    for f in os.listdir(out):
        if f.startswith("model-") and f.endswith(".safetensors") and f"-of-{n:05d}." not in f:
            os.remove(os.path.join(out, f))
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_json(cfg), f, indent=2)
    code = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "xtuner", "internlm2")
    for name in ("modeling_internlm2.py", "configuration_internlm2.py"):
        shutil.copyfile(os.path.join(code, name), os.path.join(out, name))
    return total


def targeted(cfg, targets):
    """(module, out, in) for each Linear the targets name, in checkpoint order."""
    mods = []
    for tag, tensors in shapes(cfg):
        for name, shape in tensors:
            if len(shape) != 2 or name == "model.tok_embeddings.weight":
                continue
            module = name[: -len(".weight")]
            if module.split(".")[-1] in targets:
                mods.append((module, shape[0], shape[1]))
    return mods


def make_adapter(out, cfg, r, alpha, targets, seed):
    os.makedirs(out, exist_ok=True)
    mods = targeted(cfg, targets)
    tensors = []
    for module, o, i in mods:
        tensors.append((f"base_model.model.{module}.lora_A.weight", [r, i]))
        tensors.append((f"base_model.model.{module}.lora_B.weight", [o, r]))
    size = write_safetensors(os.path.join(out, "adapter_model.safetensors"), tensors, Noise(seed + 1))
    conf = {
        "alpha_pattern": {},
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    params = sum(o * i for _, o, i in mods)
    return size, params, len(mods)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="write the base model folder here")
    ap.add_argument("--adapter", help="write the LoRA adapter folder here")
    ap.add_argument("--pool", help="write base parts once here and hard-link them into --base")
    ap.add_argument("--layers", type=int, default=FULL["layers"])
    ap.add_argument("--hidden", type=int, default=FULL["hidden"])
    ap.add_argument("--inter", type=int, default=FULL["inter"])
    ap.add_argument("--vocab", type=int, default=FULL["vocab"])
    ap.add_argument("--heads", type=int, default=FULL["heads"])
    ap.add_argument("--kv-heads", type=int, default=FULL["kv_heads"])
    ap.add_argument("--r", type=int, default=512)
    ap.add_argument("--alpha", type=int, default=256)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print a summary object")
    a = ap.parse_args()
    if not a.base and not a.adapter:
        ap.error("give --base and/or --adapter")
    cfg = dict(hidden=a.hidden, inter=a.inter, vocab=a.vocab, heads=a.heads, kv_heads=a.kv_heads, layers=a.layers)
    targets = [t for t in a.targets.split(",") if t]
    summary = {"layers": a.layers}
    t0 = time.time()
    if a.base:
        summary["base_bytes"] = make_base(a.base, cfg, a.pool, a.seed)
    if a.adapter:
        size, params, mods = make_adapter(a.adapter, cfg, a.r, a.alpha, targets, a.seed)
        summary.update(adapter_bytes=size, r=a.r, targeted_modules=mods, targeted_params=params,
                       merge_flop=2 * a.r * params)
    summary["seconds"] = round(time.time() - t0, 2)
    if a.json:
        print(json.dumps(summary))
    else:
        print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
