#!/usr/bin/env python3
"""The Python way, for comparison: build an InternLM2-shaped nn.Module (same module names
as modeling_internlm2.py), load the base safetensors into it, wrap it with
PeftModel.from_pretrained, merge_and_unload(), torch.save(state_dict).

  peft_merge.py BASE_DIR ADAPTER_DIR OUT.pth

Prints one JSON object: seconds per phase, total, peak RSS (ru_maxrss). The model is built
on the meta device and the weights are assigned (load_state_dict(assign=True)), which is
the low-memory path transformers' from_pretrained takes too.
"""

import json
import os
import resource
import sys
import time

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        d = h // c["num_attention_heads"]
        self.wqkv = nn.Linear(h, h + 2 * c["num_key_value_heads"] * d, bias=False)
        self.wo = nn.Linear(h, h, bias=False)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.w1 = nn.Linear(h, i, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.feed_forward = MLP(c)
        self.attention_norm = RMSNorm(c["hidden_size"])
        self.ffn_norm = RMSNorm(c["hidden_size"])


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"])


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.model = Model(c)
        self.output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    # PeftModelForCausalLM (task_type CAUSAL_LM) looks this up.
    def prepare_inputs_for_generation(self, *a, **k):
        raise NotImplementedError


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    base, adapter, out = sys.argv[1:4]
    from peft import PeftModel
    from safetensors.torch import load_file

    t = {}
    t0 = time.time()
    conf = json.load(open(os.path.join(base, "config.json")))
    index = json.load(open(os.path.join(base, "model.safetensors.index.json")))
    with torch.device("meta"):
        model = InternLM2ForCausalLM(conf).to(torch.float16)
    sd = {}
    for f in sorted(set(index["weight_map"].values())):
        sd.update(load_file(os.path.join(base, f)))
    model.load_state_dict(sd, assign=True, strict=True)
    del sd
    t["load_base"] = time.time() - t0
    rss = {"after_load_base_mb": rss_mb()}

    t1 = time.time()
    model = PeftModel.from_pretrained(model, adapter)
    t["load_adapter"] = time.time() - t1
    rss["after_load_adapter_mb"] = rss_mb()

    t2 = time.time()
    model = model.merge_and_unload()
    t["merge"] = time.time() - t2
    rss["after_merge_mb"] = rss_mb()

    t3 = time.time()
    torch.save(model.state_dict(), out)
    t["save"] = time.time() - t3
    rss["after_save_mb"] = rss_mb()
    t["total"] = time.time() - t0
    print(json.dumps({"seconds": {k: round(v, 2) for k, v in t.items()}, "peak_rss_mb": rss,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
