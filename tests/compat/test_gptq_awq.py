"""GPTQ and AWQ bases (fixtures/gptq_awq, made by fixtures/make_gptq_awq_fixtures.py):
lorastream's dequantization against the reference code, run live here.

The references are GPTQModel's `dequantize_weight` (after its v1 → v2 zero conversion)
and AutoAWQ's `dequantize_gemm`, copied verbatim with citations into the fixture
generator (neither library installs on CPU without compiling) and imported from it; the
merges are PEFT's `merge_and_unload` on the model as dequantized (≤ 1 ulp of f16).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_st

ROOT = Path(__file__).resolve().parents[2]
FX = ROOT / "fixtures" / "gptq_awq"
GPTQ = ["gptq_v1_4bit", "gptq_v1_4bit_asym_act", "gptq_v2_4bit_asym_act", "gptq_v1_8bit", "gptq_v2_2bit"]
ALL = GPTQ + ["awq_gemm"]
Q = "model.layers.0.self_attn.q_proj"


def _gen():
    spec = importlib.util.spec_from_file_location("make_gptq_awq_fixtures", ROOT / "fixtures" / "make_gptq_awq_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = _gen()


def qconfig(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())["quantization_config"]


def reference(d: Path) -> dict:
    sd = load_st(d / "model.safetensors")
    qc = qconfig(d)
    return (G.awq_reference if qc["quant_method"] == "awq" else G.gptq_reference)(sd, qc)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def ulps16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place of two f16/bf16 tensors."""
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    fa = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    fb = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((fa - fb).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("name", ALL)
def test_convert_is_the_reference_dequantization(run, out_dir, name):
    out = out_dir / "m.safetensors"
    run(["convert", FX / name, out])
    got, want = load_st(out), reference(FX / name)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    assert not any(k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for k in got)
    for k, e in want.items():
        assert bits_equal(got[k], e), f"{name}: {k}: not bit-identical ({got[k].dtype} vs {e.dtype})"
    assert got[f"{Q}.weight"].dtype == torch.float16 and got[f"{Q}.weight"].shape == (64, 64)


def test_v1_and_v2_zeros_decode_alike_and_v1_borrows(run, out_dir):
    """The same grid saved as checkpoint_format "gptq" (zeros − 1, subtracted from the
    packed word) and "gptq_v2": both decode to the same weights. Some v1 fields are
    2^bits − 1 (a zero of 0 borrowed from its neighbour), so a per-field "+1" would differ:
    GPTQModel's word-wide addition is what is matched."""
    v1, v2 = FX / "gptq_v1_4bit_asym_act", FX / "gptq_v2_4bit_asym_act"
    a, b = out_dir / "a.safetensors", out_dir / "b.safetensors"
    run(["convert", v1, a])
    run(["convert", v2, b])
    ga, gb = load_st(a), load_st(b)
    for k in ga:
        assert bits_equal(ga[k], gb[k]), k
    sd1, sd2 = load_st(v1 / "model.safetensors"), load_st(v2 / "model.safetensors")
    qz1, qz2 = sd1[f"{Q}.qzeros"], sd2[f"{Q}.qzeros"]
    assert torch.equal(G.gptq_v1_to_v2(qz1, 4), qz2)
    fields = torch.stack([(qz1 >> (4 * j)) & 15 for j in range(8)])
    assert int((fields == 15).sum()) > 0
    per_field = torch.stack([((fields[j] + 1) & 15) << (4 * j) for j in range(8)]).sum(0).to(torch.int32)
    assert not torch.equal(per_field, qz2)


def test_act_order_g_idx_is_used(run, out_dir):
    """desc_act: g_idx is a permutation of the groups, not i // group_size; decoding with
    the trivial g_idx would give other weights."""
    d = FX / "gptq_v2_4bit_asym_act"
    sd = load_st(d / "model.safetensors")
    g_idx = sd[f"{Q}.g_idx"]
    trivial = torch.arange(64, dtype=torch.int32) // 32
    assert not torch.equal(g_idx, trivial)
    out = out_dir / "m.safetensors"
    run(["convert", d, out])
    got = load_st(out)[f"{Q}.weight"]
    wrong = G.gptqmodel_dequantize_weight(sd[f"{Q}.qweight"], sd[f"{Q}.qzeros"], sd[f"{Q}.scales"], trivial, 4).T
    assert not bits_equal(got, wrong.contiguous())


def test_awq_order_is_used(run, out_dir):
    """AWQ fields are interleaved [0, 2, 4, 6, 1, 3, 5, 7]: reading them in plain order
    would give other weights."""
    d = FX / "awq_gemm"
    sd = load_st(d / "model.safetensors")
    out = out_dir / "m.safetensors"
    run(["convert", d, out])
    got = load_st(out)[f"{Q}.weight"]
    iw, iz = G.unpack_awq(sd[f"{Q}.qweight"], sd[f"{Q}.qzeros"], 4)
    plain = ((iw & 15) - (iz & 15).repeat_interleave(32, 0)) * sd[f"{Q}.scales"].repeat_interleave(32, 0)
    assert not bits_equal(got, plain.T.contiguous())


def peft_merged(base_sd: dict, arch_dir: Path, lora: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(arch_dir)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    m.load_state_dict(base_sd, strict=True)
    merged = PeftModel.from_pretrained(m, lora).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("name", ["gptq_v1_4bit_asym_act", "gptq_v1_8bit", "gptq_v2_2bit", "awq_gemm"])
def test_merge_into_dequantized_base_is_peft(run, out_dir, name):
    from safetensors import safe_open

    base, lora = FX / name, FX / "lora_llama64"
    ref = reference(base)
    want = peft_merged(ref, base, lora)
    out = out_dir / "merged"
    run(["merge", "--base", base, "--lora", lora, "--out", f"{out}/"])
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_st(f))
    assert sorted(got) == sorted(want)
    with safe_open(lora / "adapter_model.safetensors", "pt") as f:
        targets = {k.split("base_model.model.")[1].split(".lora_")[0] + ".weight" for k in f.keys()}
    assert len(targets) == 7
    for k, e in want.items():
        g = got[k]
        assert g.dtype == e.dtype == torch.float16, k
        if k in targets:
            assert not bits_equal(g, ref[k]), f"{k}: the LoRA changed nothing"
            assert ulps16(g, e) <= 1, k
        else:
            # Unquantized tensors pass through as stored.
            assert bits_equal(g, ref[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, device_map="cpu")


def test_inspect_shows_the_stored_form(run):
    rep = json.loads(run(["inspect", "--json", FX / "gptq_v1_4bit_asym_act"]).stdout)
    q = [t for t in rep["tensors"] if t["name"] == f"{Q}.weight"][0]
    assert q["dtype"] == "F16" and q["shape"] == [64, 64]
    assert "GPTQ 4-bit" in q["stored"] and "act-order" in q["stored"] and "v1" in q["stored"]
    # qweight 8×64 + qzeros 2×8 int32, scales 2×64 f16, g_idx 64 int32.
    assert q["bytes"] == 8 * 64 * 4 + 2 * 8 * 4 + 2 * 64 * 2 + 64 * 4
    assert not any(t["name"].endswith((".qweight", ".qzeros", ".scales", ".g_idx")) for t in rep["tensors"])
    rep = json.loads(run(["inspect", "--json", FX / "awq_gemm"]).stdout)
    q = [t for t in rep["tensors"] if t["name"] == f"{Q}.weight"][0]
    assert "AWQ GEMM" in q["stored"], q


def _copy(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(FX / name, d)
    return d


def _edit_config(d: Path, **kv):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(kv)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn):
    from safetensors.torch import save_file

    sd = load_st(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors")


@pytest.mark.parametrize(
    "name,config,tensors,want",
    [
        ("gptq_v1_4bit", {"bits": 3}, None, ["bits = 3", "\"gptq\""]),
        ("gptq_v1_4bit", {"bits": 5}, None, ["bits = 5"]),
        ("gptq_v1_4bit", {"checkpoint_format": "marlin", "format": "marlin"}, None, ["\"marlin\""]),
        ("gptq_v1_4bit", {"dynamic": {"-:.*down_proj.*": {}}}, None, ["dynamic"]),
        ("gptq_v1_4bit", {"made_up_key": 1}, None, ["\"made_up_key\""]),
        ("awq_gemm", {"version": "gemv", "format": "gemv"}, None, ["\"gemv\"", "\"awq\""]),
        ("awq_gemm", {"bits": 8}, None, ["bits = 8"]),
        ("awq_gemm", {"zero_point": False}, None, ["zero_point"]),
        ("gptq_v1_4bit", None, lambda sd: sd.pop(f"{Q}.g_idx"), [f"{Q}.qweight", f"'{Q}.g_idx'"]),
        ("gptq_v1_4bit", None, lambda sd: sd.pop(f"{Q}.qzeros"), [f"{Q}.qweight", f"'{Q}.qzeros'"]),
        ("awq_gemm", None, lambda sd: sd.pop(f"{Q}.qzeros"), [f"{Q}.qweight", f"'{Q}.qzeros'"]),
        (
            "gptq_v1_4bit",
            None,
            lambda sd: sd.__setitem__(f"{Q}.qzeros", sd[f"{Q}.qzeros"][:1].clone()),
            [f"{Q}.qzeros", "expected [2, 8]"],
        ),
        (
            "gptq_v1_4bit",
            None,
            lambda sd: sd.__setitem__(f"{Q}.g_idx", sd[f"{Q}.g_idx"][:48].clone()),
            [f"{Q}.qweight", "48 inputs"],
        ),
        (
            "gptq_v1_4bit",
            None,
            lambda sd: sd[f"{Q}.g_idx"].__setitem__(3, 7),
            [f"{Q}.g_idx", "g_idx[3] = 7"],
        ),
        (
            "awq_gemm",
            None,
            lambda sd: sd.__setitem__(f"{Q}.scales", sd[f"{Q}.scales"][:, :32].clone()),
            [f"{Q}.scales", "expected [2, 64]"],
        ),
        (
            "awq_gemm",
            None,
            lambda sd: sd.__setitem__("model.layers.0.mlp.act.scales", torch.ones(128, dtype=torch.float16)),
            ["model.layers.0.mlp.act.scales"],
        ),
    ],
)
def test_refusals_name_tensor_and_key(run, out_dir, tmp_path, name, config, tensors, want):
    d = _copy(tmp_path, name)
    if config:
        _edit_config(d, **config)
    if tensors:
        _edit_tensors(d, tensors)
    out = out_dir / "m.safetensors"
    p = run(["convert", d, out], expect_rc=1)
    for w in want:
        assert w in p.stderr, (w, p.stderr)
    assert not out.exists()
    # merge refuses the same base the same way.
    p = run(["merge", "--base", d, "--lora", FX / "lora_llama64", "--out", out_dir / "x.safetensors"], expect_rc=1)
    assert want[0] in p.stderr
    assert not (out_dir / "x.safetensors").exists()
