"""`lorastream verify` and `lorastream diff` judged against real PEFT / torch.

- verify must accept PEFT's own `merge_and_unload()` outputs (the `expected.safetensors` of
  every merge case in fixtures/peft/cases.json, saved like save_pretrained): exit 0 with
  the case's ulp tolerance (`--max-ulp`) and with the default tolerance.
- verify on a folder written right here by PEFT + transformers `save_pretrained` (sharded,
  and of a model with tied embeddings, where save_pretrained drops lm_head.weight): exit 0,
  the dropped key reported as tied.
- verify on a copy of PEFT's output with one element changed by torch: exit 1, naming it.
- diff's --json (parsed with json.loads) agrees with torch's own comparison of the pair:
  keys, dtypes, shapes, differing counts, max |a-b| and max ulp.

Run: PY=$(scripts/python-env.sh); LORASTREAM_BIN=... $PY -m pytest tests/compat/test_verify.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "peft"
CASES = json.loads((FIX / "cases.json").read_text())["cases"]
MERGE = [c for c in CASES if not c.get("refuse")]


def merge_args(case, base=None):
    args = ["--base", str(base or FIX / case["base"]), "--device", "cpu"]
    for lora in case["loras"]:
        args += ["--lora", str(FIX / lora)]
    return args


def case(name):
    return next(c for c in MERGE if c["name"] == name)


@pytest.mark.parametrize("c", MERGE, ids=[c["name"] for c in MERGE])
def test_verify_accepts_peft_merge_and_unload(run, c):
    expected = FIX / c["expected"]
    p = run(["verify", expected, *merge_args(c), "--max-ulp", str(c["ulp_tolerance"]), "--json"])
    r = json.loads(p.stdout)
    assert r["matches"] is True and r["differing"] == [] and r["missing"] == [] and r["extra"] == []
    assert r["compared"] == len(load_file(str(expected)))
    # The default tolerance (<= 1 ulp, or rtol 1e-5 for f32) accepts PEFT's results too.
    run(["verify", expected, *merge_args(c)])


def ordered_bits(t: torch.Tensor) -> np.ndarray:
    w = {torch.float64: torch.int64, torch.float32: torch.int32,
         torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    i = t.contiguous().view(w).numpy().astype(object if w == torch.int64 else np.int64)
    sign = 1 << (8 * t.element_size() - 1)
    return np.where(i < 0, -(i + sign), i)


def torch_diff(a: dict, b: dict) -> dict:
    """What diff should say, computed with torch: per common key dtype/shape, differing
    elements by value (NaN == NaN), max |a-b| in f64, max ulp for equal float dtypes."""
    out = {}
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        row = {"dtype_changed": x.dtype != y.dtype, "shape_changed": x.shape != y.shape}
        if x.shape == y.shape:
            xd, yd = x.double(), y.double()
            both_nan = xd.isnan() & yd.isnan()
            row["differing"] = int(((xd != yd) & ~both_nan).sum())
            d = (xd - yd).abs()
            d = d[~d.isnan()]
            row["max_abs"] = float(d.max()) if d.numel() else 0.0
            if x.dtype == y.dtype and x.is_floating_point():
                u = np.abs(ordered_bits(x) - ordered_bits(y))
                row["max_ulp"] = int(u.max()) if u.size else 0
        out[k] = row
    return out


def check_diff(run, pa: Path, pb: Path, a: dict, b: dict):
    p = run(["diff", pa, pb, "--json"], expect_rc=None)
    r = json.loads(p.stdout)
    want = torch_diff(a, b)
    identical = set(a) == set(b) and all(
        not w["dtype_changed"] and not w["shape_changed"] and w["differing"] == 0 for w in want.values()
    )
    assert p.returncode == (0 if identical else 1), p.stdout
    assert r["identical"] is identical
    assert sorted(r["only_in_a"]) == sorted(set(a) - set(b))
    assert sorted(r["only_in_b"]) == sorted(set(b) - set(a))
    changed = {t["name"]: t for t in r["changed"]}
    for k, w in want.items():
        differs = w["dtype_changed"] or w["shape_changed"] or w["differing"] > 0
        assert (k in changed) == differs, (k, w, changed.get(k))
        if not differs:
            continue
        t = changed[k]
        assert t["shape_a"] == list(a[k].shape) and t["shape_b"] == list(b[k].shape)
        if w["shape_changed"]:
            continue
        assert t["differing"] == w["differing"], k
        assert t["compared"] == a[k].numel(), k
        assert t["max_abs"] == pytest.approx(w["max_abs"], rel=1e-12, abs=0), k
        if "max_ulp" in w:
            assert t["max_ulp"] == w["max_ulp"], k
        else:
            assert t["max_ulp"] is None, k
    return r


def test_diff_agrees_with_torch(run, tmp_path):
    # Our merge against PEFT's, f16 (differences of at most 1 ulp, if any).
    c = case("llama_f16_adapter_f32")
    ours = tmp_path / "ours.safetensors"
    run(["merge", "--out", ours, *merge_args(c)])
    check_diff(run, ours, FIX / c["expected"], load_file(str(ours)), load_file(str(FIX / c["expected"])))
    # Two different merges of the same base, bf16: many elements, ulp > 1.
    a, b = FIX / case("two_adapters_bf16")["expected"], FIX / case("llama_bf16_adapter_bf16")["expected"]
    r = check_diff(run, a, b, load_file(str(a)), load_file(str(b)))
    assert r["changed"]
    # f32 base against f16 base (dtype change everywhere), with a key removed, an extra key,
    # a reshaped tensor and NaNs on both sides, one side as .pth.
    fa = load_file(str(FIX / "bases/llama_f32/model.safetensors"))
    fb = load_file(str(FIX / "bases/llama_f16/model.safetensors"))
    fa["model.norm.weight"][3] = float("nan")
    fb["model.norm.weight"][3] = float("nan")
    fb["model.norm.weight"][4] = float("nan")
    del fb["lm_head.weight"]
    fb["extra.bias"] = torch.zeros(3)
    fb["model.layers.0.mlp.up_proj.weight"] = fb["model.layers.0.mlp.up_proj.weight"].reshape(16, 32).contiguous()
    pa, pb = tmp_path / "a.pth", tmp_path / "b.safetensors"
    torch.save(fa, pa)
    save_file(fb, str(pb))
    r = check_diff(run, pa, pb, fa, fb)
    assert r["only_in_a"] == ["lm_head.weight"] and r["only_in_b"] == ["extra.bias"]


def test_verify_finds_an_element_changed_by_torch(run, tmp_path):
    c = case("llama_bf16_adapter_bf16")
    sd = load_file(str(FIX / c["expected"]))
    name = "model.layers.1.mlp.down_proj.weight"
    t = sd[name].clone()
    t[5, 7] = t[5, 7] * 1.5 + 0.125
    sd[name] = t
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    p = run(["verify", bad, *merge_args(c), "--json"], expect_rc=1)
    r = json.loads(p.stdout)
    assert [d["name"] for d in r["differing"]] == [name]
    d = r["differing"][0]
    assert d["differing"] == 1 and d["first_differing"] == 5 * t.shape[1] + 7 and d["max_ulp"] > 1
    p = run(["verify", bad, *merge_args(c)], expect_rc=1)
    assert name in p.stdout and "DIFFERENT" in p.stdout


def peft_save_pretrained(base_dir: Path, adapter: Path, out: Path, **save_kw):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out), **save_kw)
    return merged


def test_verify_judges_a_peft_save_pretrained_folder(run, tmp_path):
    c = case("llama_f16_adapter_f16")
    out = tmp_path / "merged"
    peft_save_pretrained(FIX / c["base"], FIX / c["loras"][0], out, max_shard_size="10KB")
    assert (out / "model.safetensors.index.json").is_file(), sorted(p.name for p in out.iterdir())
    p = run(["verify", out, *merge_args(c), "--json"])
    assert json.loads(p.stdout)["matches"] is True
    run(["verify", out, *merge_args(c), "--sample", "3"])


def test_verify_reports_the_tied_lm_head_save_pretrained_drops(run, tmp_path):
    """A llama with tie_word_embeddings=True: save_pretrained writes embed_tokens only."""
    base = tmp_path / "tied_base"
    base.mkdir()
    cfg = json.loads((FIX / "bases/llama_f32/config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(FIX / "bases/llama_f32/model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    c = case("llama_f32")
    out = tmp_path / "merged"
    peft_save_pretrained(base, FIX / c["loras"][0], out)
    saved = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in saved, "transformers kept the tied lm_head: test premise gone"
    p = run(["verify", out, *merge_args(c, base=base / "model.safetensors"), "--json"])
    r = json.loads(p.stdout)
    assert r["tied"] == [{"name": "lm_head.weight", "equals": "model.embed_tokens.weight"}]
    assert r["missing"] == [] and r["matches"] is True
    # The untied base: lm_head differs from embed_tokens, so its absence is a failure.
    p = run(["verify", out, *merge_args(c), "--json"], expect_rc=1)
    r = json.loads(p.stdout)
    assert r["missing"] == ["lm_head.weight"] and r["tied"] == []
    # diff tells the same story about the keys.
    shutil.copy(base / "model.safetensors", tmp_path / "b.safetensors")
    p = run(["diff", tmp_path / "b.safetensors", out, "--json"], expect_rc=1)
    assert json.loads(p.stdout)["only_in_a"] == ["lm_head.weight"]
