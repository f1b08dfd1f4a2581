#!/usr/bin/env python3
"""Output checks for tests/gpu/run.sh (needs torch and safetensors; uses the GPU when there is one).

  check.py compare A B [--tol N]
      A and B: .safetensors files or sharded folders (model.safetensors.index.json). Same keys,
      dtypes and shapes; every element within N units in the last place of its dtype (NaN
      equals NaN). Prints one JSON object; exit 1 when they differ by more.

  check.py summary CMP.json
      One line from what compare printed.

  check.py fixtures --bin BIN [--peft fixtures/peft] [--work DIR] [--md FILE]
      Every merge case of fixtures/peft/cases.json through the CLI with --device cuda and
      --device cpu (plus --dtype variants of a few): GPU vs CPU within 1 ulp on every element,
      GPU vs PEFT's merge_and_unload within the case's tolerance. Writes a markdown table;
      exit 1 on any failure.
"""

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import torch
from safetensors import safe_open

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def files_of(path):
    """(key -> file) for a .safetensors file or a sharded folder."""
    if os.path.isdir(path):
        idx = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(idx):
            with open(idx) as f:
                wm = json.load(f)["weight_map"]
            return {k: os.path.join(path, v) for k, v in wm.items()}
        shards = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
        out = {}
        for s in shards:
            with safe_open(os.path.join(path, s), "pt") as f:
                for k in f.keys():
                    out[k] = os.path.join(path, s)
        return out
    with safe_open(path, "pt") as f:
        return {k: path for k in f.keys()}


def ordered(t):
    """Integers that are consecutive for consecutive values of t's dtype."""
    if t.dtype in (torch.float16, torch.bfloat16):
        i, mag = t.view(torch.int16).to(torch.int64), 0x7FFF
    elif t.dtype == torch.float32:
        i, mag = t.view(torch.int32).to(torch.int64), 0x7FFFFFFF
    elif t.dtype == torch.float64:
        i, mag = t.view(torch.int64), 0x7FFFFFFFFFFFFFFF
    else:
        return None
    return torch.where(i < 0, -(i & mag), i)


def raw(t):
    return t.reshape(-1).contiguous().view(torch.uint8)


def max_ulp(a, b):
    """Largest ulp distance (0 for equal bytes; non-floats must be equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return None
    if a.numel() == 0 or torch.equal(raw(a), raw(b)):
        return 0
    a, b = a.to(DEV), b.to(DEV)
    oa, ob = ordered(a), ordered(b)
    if oa is None:
        return None
    d = (oa - ob).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, torch.zeros_like(d), d)
    return int(d.max().item()) if d.numel() else 0


def compare(a_path, b_path, tol):
    fa, fb = files_of(a_path), files_of(b_path)
    res = {"a": a_path, "b": b_path, "tol": tol, "tensors": len(fa), "identical": 0,
           "within": 0, "worst_ulp": 0, "worst": None, "problems": []}
    if set(fa) != set(fb):
        res["problems"].append(f"key sets differ: {sorted(set(fa) ^ set(fb))[:10]}")
        return res
    handles = {}

    def get(path, key):
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path].get_tensor(key)

    for k in fa:
        x, y = get(fa[k], k), get(fb[k], k)
        if x.dtype != y.dtype or x.shape != y.shape:
            res["problems"].append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        d = max_ulp(x, y)
        if d is None:
            res["problems"].append(f"{k}: differs")
            continue
        if d == 0:
            res["identical"] += 1
        if d <= tol:
            res["within"] += 1
        else:
            res["problems"].append(f"{k}: {d} ulp")
        if d > res["worst_ulp"]:
            res["worst_ulp"], res["worst"] = d, k
    res["ok"] = not res["problems"]
    return res


def run(cmd):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p, time.time() - t


def fixtures(args):
    peft = os.path.abspath(args.peft)
    with open(os.path.join(peft, "cases.json")) as f:
        cases = [c for c in json.load(f)["cases"] if c.get("expected")]
    os.makedirs(args.work, exist_ok=True)
    jobs = []
    for c in cases:
        jobs.append((c, "keep"))
        if c["name"] in ("llama_bf16_adapter_bf16", "llama_f16_adapter_f32", "gpt2_conv1d",
                         "embed_lm_head_f16", "dora_linear_bf16", "two_adapters_bf16"):
            jobs += [(c, "f32"), (c, "bf16"), (c, "f16")]

    def one(job):
        c, dt = job
        name = c["name"]
        outs = {}
        for device in ("cuda", "cpu"):
            out = os.path.join(args.work, f"{name}.{dt}.{device}.safetensors")
            cmd = [args.bin, "merge", "--base", os.path.join(peft, c["base"]), "--out", out,
                   "--device", device, "--dtype", dt, "--json"]
            for l in c["loras"]:
                cmd += ["--lora", os.path.join(peft, l)]
            p, secs = run(cmd)
            if p.returncode != 0 or "panicked" in p.stderr:
                return dict(case=name, dtype=dt, ok=False, why=f"--device {device}: rc {p.returncode}: {p.stderr.strip()[-400:]}")
            rep = json.loads(p.stdout)
            if device == "cuda" and not rep["device"].startswith("cuda"):
                return dict(case=name, dtype=dt, ok=False, why=f"--device cuda ran on {rep['device']}")
            outs[device] = out
        gc = compare(outs["cuda"], outs["cpu"], 1)
        row = dict(case=name, dtype=dt, gpu_cpu_ulp=gc["worst_ulp"], identical=gc["identical"],
                   tensors=gc["tensors"], ok=gc["ok"], why="; ".join(gc["problems"][:3]))
        if dt == "keep":
            tol = c.get("ulp_tolerance", 1)
            ge = compare(outs["cuda"], os.path.join(peft, c["expected"]), tol)
            row.update(gpu_peft_ulp=ge["worst_ulp"], peft_tol=tol)
            if not ge["ok"]:
                row["ok"] = False
                row["why"] = (row["why"] + "; vs PEFT: " + "; ".join(ge["problems"][:3])).strip("; ")
        for o in outs.values():
            os.remove(o)
        return row

    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        rows = list(ex.map(one, jobs))
    bad = [r for r in rows if not r["ok"]]
    lines = ["| case | --dtype | GPU vs CPU (max ulp) | bit-identical tensors | GPU vs PEFT (max ulp / allowed) | |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peft_col = f"{r['gpu_peft_ulp']} / {r['peft_tol']}" if "gpu_peft_ulp" in r else ""
        lines.append(f"| {r['case']} | {r['dtype']} | {r.get('gpu_cpu_ulp', '')} | "
                     f"{r.get('identical', '')}/{r.get('tensors', '')} | {peft_col} | "
                     f"{'ok' if r['ok'] else 'FAIL: ' + r.get('why', '')} |")
    ident = sum(1 for r in rows if r.get("identical") == r.get("tensors"))
    summary = (f"{len(rows) - len(bad)} of {len(rows)} merges pass; {ident} of {len(rows)} "
               f"GPU outputs byte-identical to the CPU's")
    md = "\n".join([summary, ""] + lines) + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    print(md)
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--tol", type=int, default=1)
    f = sub.add_parser("fixtures")
    f.add_argument("--bin", required=True)
    f.add_argument("--peft", default="fixtures/peft")
    f.add_argument("--work", default="/tmp/lorastream-gpu-fixtures")
    f.add_argument("--md")
    m = sub.add_parser("summary", help="one line from the JSON that compare printed")
    m.add_argument("json")
    a = ap.parse_args()
    if a.cmd == "summary":
        with open(a.json) as fh:
            d = json.load(fh)
        verdict = "ok" if d.get("ok") else "FAILED: " + "; ".join(d["problems"][:3])
        print(f"{d['identical']} of {d['tensors']} tensors byte-identical, worst {d['worst_ulp']} ulp "
              f"({d['worst']}); {verdict}")
        return 0
    if a.cmd == "compare":
        r = compare(a.a, a.b, a.tol)
        print(json.dumps(r))
        return 0 if r.get("ok") else 1
    return fixtures(a)


if __name__ == "__main__":
    sys.exit(main())
