#!/usr/bin/env python3
"""Checks that a benchmark's merged output is right, cheaply enough to run after every merge.

  verify_merge.py BASE_DIR LORA_DIR MERGED_DIR [--rows 64]     # the formula, with numpy
  verify_merge.py --hash MERGED_DIR                            # sha256 over the shards
  verify_merge.py --peft OUT.pth MERGED_DIR                    # PEFT's merged tensors

Used by bench/cpu_gemm.py (imported) and runnable by hand. What it owns:

  * reading safetensors shards with np.memmap (header parsed here, no safetensors package),
    so a check of a 15 GB model touches only the rows it looks at;
  * `check_formula`: for the first and last targeted weight and `output.weight` (when
    targeted), a fixed random set of rows: W' = round16(f32(W) + s·(B @ A)) with numpy f32,
    s = lora_alpha / r (rsLoRA: alpha / sqrt(r)); the merged rows must be within 1 ulp of it
    everywhere and bit-equal on ≥ 99 % of elements (shared/docs/peft-merge.md: "at most ~1
    ulp ... caused by summation order; more than that is a bug"), and the delta must have
    changed ≥ 50 % of the elements (so the check is not vacuous); an untargeted tensor
    (a norm, the embedding rows) must be bit-equal to the base;
  * `tree_hash`: sha256 of the shard files in name order: the CPU paths give identical bytes
    by design (tests/cpu_paths.rs), so a per-path run is checked against the others;
  * `compare_peft`: PEFT's merge_and_unload() state dict (torch.save) against lorastream's
    output, tensor by tensor for the same tensors, as ulp distances.
"""

import argparse
import hashlib
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

DT = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}


class CheckError(Exception):
    """A merged output that is not what the formula says (message names file and tensor)."""


def header(path):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return n + 8, h


class Tensors:
    """All tensors of a folder of .safetensors files (or of one file), memory-mapped lazily."""

    def __init__(self, path):
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckError(f"{path}: no .safetensors files")
        self.where = {}
        for f in files:
            start, h = header(f)
            for name, e in h.items():
                self.where[name] = (f, start, e)

    def names(self):
        return list(self.where)

    def dtype(self, name):
        return self.where[name][2]["dtype"]

    def shape(self, name):
        return self.where[name][2]["shape"]

    def get(self, name):
        """The tensor as a read-only memmap (16-bit floats as float16, bf16 as uint16 bits)."""
        if name not in self.where:
            raise CheckError(f"tensor {name} missing")
        f, start, e = self.where[name]
        if e["dtype"] not in DT:
            raise CheckError(f"{f}: {name} has dtype {e['dtype']}, this check reads F16, BF16, F32")
        a, b = e["data_offsets"]
        shape = tuple(e["shape"]) or (1,)
        return np.memmap(f, dtype=DT[e["dtype"]], mode="r", offset=start + a, shape=shape)


def f32(x, dtype):
    if dtype == "BF16":
        return (np.asarray(x, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, np.float32)


def round_to(x, dtype):
    """f32 -> the stored type's bits/values, round to nearest even."""
    if dtype == "F16":
        return x.astype(np.float16)
    if dtype == "BF16":
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype(np.float32)


def ordered(bits, width):
    """Float bit patterns -> integers in the floats' order (ulp distance = difference)."""
    b = bits.astype(np.int64)
    sign = 1 << (width - 1)
    return np.where(b & sign, sign - 1 - b, b)


def ulps(a, b, dtype):
    if dtype == "F32":
        ia, ib = ordered(np.asarray(a, np.float32).view(np.uint32), 32), ordered(np.asarray(b, np.float32).view(np.uint32), 32)
    else:
        ia, ib = ordered(np.asarray(a).view(np.uint16), 16), ordered(np.asarray(b).view(np.uint16), 16)
    return np.abs(ia - ib)


def lora_pairs(lora_dir):
    """{module: (A name, B name)} and the scale of a PEFT LoRA adapter folder."""
    conf = json.loads((Path(lora_dir) / "adapter_config.json").read_text())
    if conf.get("peft_type") != "LORA" or conf.get("use_dora") or conf.get("fan_in_fan_out"):
        raise CheckError(f"{lora_dir}: this check covers plain LoRA (no DoRA, no fan_in_fan_out)")
    r, alpha = conf["r"], conf["lora_alpha"]
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    t = Tensors(Path(lora_dir) / "adapter_model.safetensors")
    pairs = {}
    for n in t.names():
        if n.endswith(".lora_A.weight"):
            mod = n[len("base_model.model."):-len(".lora_A.weight")] if n.startswith("base_model.model.") else n[:-len(".lora_A.weight")]
            pairs[mod] = (n, n.replace(".lora_A.", ".lora_B."))
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise CheckError(f"{lora_dir}: rank_pattern/alpha_pattern not covered by this check")
    return t, pairs, scale


def pick_rows(n, k, seed):
    rng = np.random.default_rng(seed)
    rows = {0, n - 1} | set(int(x) for x in rng.integers(0, n, size=min(k, n)))
    return np.array(sorted(rows))


def check_formula(base_dir, lora_dir, merged_dir, rows=64):
    """Raises CheckError when a checked row is off; returns a summary dict."""
    base, merged = Tensors(base_dir), Tensors(merged_dir)
    ad, pairs, scale = lora_pairs(lora_dir)
    mods = [m for m in pairs if m + ".weight" in base.where]
    if not mods:
        raise CheckError(f"{lora_dir}: no targeted module is in {base_dir}")
    in_layers = [m for m in mods if m.startswith("model.layers.")] or mods
    pick = [in_layers[0], in_layers[-1]] + (["output"] if "output" in pairs else [])
    checked, worst, exact_all, changed_all, elems = [], 0, 0, 0, 0
    for i, m in enumerate(dict.fromkeys(pick)):
        w = m + ".weight"
        dt = base.dtype(w)
        if merged.dtype(w) != dt:
            raise CheckError(f"{merged_dir}: {w} is {merged.dtype(w)}, the base's is {dt}")
        if merged.shape(w) != base.shape(w):
            raise CheckError(f"{merged_dir}: {w} has shape {merged.shape(w)}, the base's {base.shape(w)}")
        rs = pick_rows(base.shape(w)[0], rows, i)
        A = f32(ad.get(pairs[m][0]), ad.dtype(pairs[m][0]))
        B = f32(ad.get(pairs[m][1])[rs], ad.dtype(pairs[m][1]))
        W = f32(base.get(w)[rs], dt)
        want = round_to(W + np.float32(scale) * (B @ A), dt)
        got = np.asarray(merged.get(w)[rs])
        d = ulps(got, want, dt)
        moved = ulps(got, np.asarray(base.get(w)[rs]), dt)
        worst = max(worst, int(d.max()))
        exact, changed = int((d == 0).sum()), int((moved != 0).sum())
        exact_all, changed_all, elems = exact_all + exact, changed_all + changed, elems + d.size
        checked.append({"tensor": w, "rows": len(rs), "max_ulp": int(d.max()), "exact": round(exact / d.size, 5), "changed": round(changed / d.size, 4)})
        if d.max() > 1 or exact / d.size < 0.99:
            raise CheckError(f"{merged_dir}: {w}: {int(d.max())} ulp from W + s·B@A at worst, {exact / d.size:.4f} bit-equal (want ≤ 1 ulp, ≥ 0.99)")
        if changed / d.size < 0.5:
            raise CheckError(f"{merged_dir}: {w}: only {changed / d.size:.3f} of elements differ from the base: was the delta applied?")
    # Untargeted: copied bit for bit.
    for w in [n for n in base.names() if n[: -len(".weight")] not in pairs][:3]:
        b, g = base.get(w), merged.get(w)
        n = b.shape[0]
        sl = slice(0, min(n, 64))
        if not np.array_equal(np.asarray(b[sl]).view(np.uint8), np.asarray(g[sl]).view(np.uint8)):
            raise CheckError(f"{merged_dir}: untargeted {w} differs from the base")
        checked.append({"tensor": w, "untargeted": True, "bit_equal": True})
    return {"ok": True, "scale": scale, "max_ulp": worst, "exact": round(exact_all / elems, 5), "changed": round(changed_all / elems, 4), "tensors": checked}


def tree_hash(merged_dir):
    """sha256 over the shard files (name order): equal outputs, equal hash."""
    h = hashlib.sha256()
    files = sorted(Path(merged_dir).glob("*.safetensors"))
    if not files:
        raise CheckError(f"{merged_dir}: no .safetensors files to hash")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while True:
                b = fh.read(16 << 20)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()


def compare_peft(pth, merged_dir, lora_dir):
    """PEFT's saved state dict vs lorastream's output: ulp distance on every targeted
    tensor of the first and last layer, `output.weight`, and the smallest untargeted one."""
    import torch

    sd = torch.load(pth, map_location="cpu", mmap=True, weights_only=True)
    merged = Tensors(merged_dir)
    _, pairs, _ = lora_pairs(lora_dir)
    mods = [m for m in pairs if m + ".weight" in merged.where]
    layers = sorted({m.split(".")[2] for m in mods if m.startswith("model.layers.")}, key=int)
    keep = [m for m in mods if not m.startswith("model.layers.") or m.split(".")[2] in (layers[:1] + layers[-1:])]
    untargeted = sorted((n for n in merged.names() if n[: -len(".weight")] not in pairs), key=lambda n: math.prod(merged.shape(n)))
    names = [m + ".weight" for m in keep] + untargeted[:1]
    out, worst, exact, elems = [], 0, 0, 0
    for n in names:
        if n not in sd:
            raise CheckError(f"{pth}: PEFT's state dict has no {n}")
        p = sd[n]
        dt = merged.dtype(n)
        if dt == "F16":
            pv = p.to(torch.float16).numpy()
        elif dt == "BF16":
            pv = p.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            pv = p.to(torch.float32).numpy()
        g = merged.get(n)
        if tuple(pv.shape) != g.shape:
            raise CheckError(f"{n}: PEFT shape {tuple(pv.shape)}, lorastream {g.shape}")
        # In row blocks: the int64 ulp arithmetic on a whole output.weight would take GBs.
        step = max(1, (1 << 22) // max(1, g[0].size))
        mx, e = 0, 0
        for i in range(0, g.shape[0], step):
            d = ulps(np.asarray(g[i : i + step]), pv[i : i + step], dt)
            mx, e = max(mx, int(d.max())), e + int((d == 0).sum())
        worst = max(worst, mx)
        exact, elems = exact + e, elems + g.size
        out.append({"tensor": n, "max_ulp": mx, "exact": round(e / g.size, 6)})
    res = {"ok": worst <= 1, "max_ulp": worst, "exact": round(exact / elems, 6), "elements": elems, "tensors": out}
    if worst > 1:
        bad = max(out, key=lambda x: x["max_ulp"])
        raise CheckError(f"{merged_dir} vs PEFT {pth}: {bad['tensor']} is {bad['max_ulp']} ulp apart (want ≤ 1)")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--hash", metavar="MERGED_DIR")
    ap.add_argument("--peft", metavar="OUT_PTH", help="with MERGED_DIR LORA_DIR")
    ap.add_argument("--rows", type=int, default=64)
    a = ap.parse_args()
    try:
        if a.hash:
            print(tree_hash(a.hash))
        elif a.peft:
            if len(a.dirs) != 2:
                ap.error("--peft OUT.pth MERGED_DIR LORA_DIR")
            print(json.dumps(compare_peft(a.peft, *a.dirs)))
        else:
            if len(a.dirs) != 3:
                ap.error("give BASE_DIR LORA_DIR MERGED_DIR")
            print(json.dumps(check_formula(*a.dirs, rows=a.rows)))
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
