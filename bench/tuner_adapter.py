#!/usr/bin/env python3
"""A PEFT adapter of another tuner (LoKr, OFT, ...) for the synthetic InternLM2-shaped model of
bench/synth_model.py, for benchmarks: the adapter's tensor names and shapes are PEFT's own (its
layers are built on the meta device over modules of the real shapes, so no weight is allocated);
the values are random (speed does not depend on them).

  tuner_adapter.py --out DIR --layers 4 --tuner lokr   [--r 16]
  tuner_adapter.py --out DIR --layers 4 --tuner oft    [--block 32]
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

import peft
from peft import get_peft_model
from peft.utils import get_peft_model_state_dict

FULL = dict(hidden=4096, inter=14336, heads=32, kv_heads=8)


def skeleton(layers: int) -> nn.Module:
    h, i = FULL["hidden"], FULL["inter"]
    d = h // FULL["heads"]
    qkv = h + 2 * FULL["kv_heads"] * d

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wqkv = nn.Linear(h, qkv, bias=False)
            self.wo = nn.Linear(h, h, bias=False)

    class FF(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(h, i, bias=False)
            self.w3 = nn.Linear(h, i, bias=False)
            self.w2 = nn.Linear(i, h, bias=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attn()
            self.feed_forward = FF()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(layers)])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    with torch.device("meta"):
        return Model()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tuner", choices=["lokr", "oft", "loha", "ia3"], required=True)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--block", type=int, default=32)
    a = ap.parse_args()
    targets = ["wqkv", "wo", "w1", "w2", "w3"]
    cfg = {
        "lokr": lambda: peft.LoKrConfig(r=a.r, alpha=2 * a.r, target_modules=targets),
        "loha": lambda: peft.LoHaConfig(r=a.r, alpha=2 * a.r, target_modules=targets),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=a.block, target_modules=targets),
        "ia3": lambda: peft.IA3Config(target_modules=targets, feedforward_modules=["w2"]),
    }[a.tuner]()
    pm = get_peft_model(skeleton(a.layers), cfg)
    sd = get_peft_model_state_dict(pm)
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(tuple(v.shape), dtype=np.float32) * 0.01) for k, v in sd.items()}
    os.makedirs(a.out, exist_ok=True)
    save_file(tensors, os.path.join(a.out, "adapter_model.safetensors"))
    pm.peft_config["default"].save_pretrained(a.out)
    n = sum(v.size for v in tensors.values())
    print(json.dumps({"tuner": a.tuner, "tensors": len(tensors), "params": int(n)}))


if __name__ == "__main__":
    main()
