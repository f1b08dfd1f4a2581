"""Quantized bases (fixtures/quant, made by fixtures/make_quant_fixtures.py): lorastream's
dequantization against each format's own library, run live here.

- bitsandbytes 4-bit: `bitsandbytes.backends.default.ops._dequantize_4bit_compute` with the
  absmax `dequantize_4bit` computes (`dequantize_blockwise(absmax, state2) + offset`) — the
  flattened-block arithmetic of bitsandbytes' quantizer and CUDA kernel (0.50's CPU C kernel
  blocks each row and differs for these shapes; checked below so a fix upstream is noticed).
- bitsandbytes 8-bit: `bitsandbytes.functional.int8_vectorwise_dequant`.
- FP8 block: transformers' own loading (`from_pretrained` on CPU dequantizes to bf16).
- MXFP4: transformers' `convert_moe_packed_tensors`.
- merges: PEFT's `merge_and_unload` on the model as dequantized above (≤ 1 ulp of bf16).
- `--requantize fp8-block`: transformers' own quantizer, `Fp8Quantize._quantize_one`
  (transformers/integrations/finegrained_fp8.py), applied to PEFT's merged bf16 weight;
  the output loaded back by transformers' FP8 loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_st

FX = Path(__file__).resolve().parents[2] / "fixtures" / "quant"


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    # Sign-magnitude to a monotone integer line.
    fa = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    fb = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((fa - fb).abs().max()) if a.numel() else 0


def bnb_reference(model: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a bitsandbytes checkpoint as bitsandbytes dequantizes it."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    sd = load_st(model / "model.safetensors")
    out = {}
    states = [k for k in sd if ".quant_state.bitsandbytes__" in k]
    used = set()
    for sk in states:
        w = sk.split(".quant_state.")[0]
        parts = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
        used |= {f"{w}.{k}" for k in parts} | {w}
        qs = F.QuantState.from_dict(parts, device=torch.device("cpu"))
        absmax = qs.absmax
        if qs.nested:
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        code = _get_4bit_code(qs.quant_type, torch.device("cpu"))
        packed = sd[w].reshape(-1).view(torch.uint8)
        out[w] = _dequantize_4bit_compute(packed, absmax.float(), code, qs.blocksize, qs.shape, qs.dtype)
    for k in [k for k in sd if k.endswith(".SCB")]:
        m = k[: -len(".SCB")]
        out[f"{m}.weight"] = F.int8_vectorwise_dequant(sd[f"{m}.weight"], sd[k])
        used |= {k, f"{m}.weight", f"{m}.weight_format"}
    for k, v in sd.items():
        if k not in used:
            out[k] = v
    return out


def fp8_reference(model: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, device_map="cpu")
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def check_all(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), f"{what}: names differ: {sorted(set(got) ^ set(want))}"
    for k, e in want.items():
        assert bits_equal(got[k], e), f"{what}: {k}: not bit-identical ({got[k].dtype} vs {e.dtype})"


@pytest.mark.parametrize("name", ["bnb_nf4", "bnb_fp4", "bnb_int8"])
def test_bitsandbytes_convert_is_bitsandbytes_dequantization(run, out_dir, name):
    """Decoded exactly in the state's dtype (seen whole with --dtype f32, a widening of
    every dtype here); written as bf16 by default, like every quantized base."""
    ref = bnb_reference(FX / name)
    out = out_dir / "f32.safetensors"
    run(["convert", FX / name, out, "--dtype", "f32"])
    check_all(load_st(out), {k: v.to(torch.float32) if v.is_floating_point() else v
                             for k, v in ref.items()}, name)
    out = out_dir / "m.safetensors"
    run(["convert", FX / name, out])
    stored = load_st(FX / name / "model.safetensors")
    # Weights bitsandbytes decodes: its result rounded to bf16; the rest as stored.
    want = {k: v if k in stored and stored[k].dtype == v.dtype else v.to(torch.bfloat16)
            for k, v in ref.items()}
    check_all(load_st(out), want, name)


def test_bnb_cpu_kernel_still_blocks_rows():
    """Documents why the reference is the default backend: bitsandbytes 0.50's CPU
    `dequantize_4bit` blocks per row on some CPUs (seen on a Xeon with AVX-512; in_features
    96 is not a multiple of 64). Where this CPU's kernel agrees with the reference (seen on
    an AVX2-only AMD EPYC) there is nothing to document: skipped, saying so."""
    import bitsandbytes.functional as F

    sd = load_st(FX / "bnb_nf4" / "model.safetensors")
    w = "model.layers.0.self_attn.q_proj.weight"
    parts = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
    qs = F.QuantState.from_dict(parts, device=torch.device("cpu"))
    cpu = F.dequantize_4bit(sd[w], qs)
    if torch.equal(cpu, bnb_reference(FX / "bnb_nf4")[w]):
        pytest.skip("this CPU's bitsandbytes dequantize_4bit agrees with the reference")


def test_fp8_convert_is_transformers_dequantization(run, out_dir):
    out = out_dir / "m.safetensors"
    run(["convert", FX / "fp8_block", out])
    check_all(load_st(out), fp8_reference(FX / "fp8_block"), "fp8")


def test_mxfp4_convert_is_convert_moe_packed_tensors(run, out_dir):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = out_dir / "m.safetensors"
    run(["convert", FX / "mxfp4_experts", out])
    got = load_st(out)
    sd = load_st(FX / "mxfp4_experts" / "model.safetensors")
    want = {}
    for k, v in sd.items():
        if k.endswith("_blocks"):
            p = k[: -len("_blocks")]
            want[p] = convert_moe_packed_tensors(v, sd[p + "_scales"])
        elif not k.endswith("_scales"):
            want[k] = v
    check_all(got, want, "mxfp4")


def peft_merged(base_sd: dict, arch_dir: Path, lora: Path, dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(arch_dir)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    m.load_state_dict(base_sd, strict=True)
    merged = PeftModel.from_pretrained(m, lora).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    "name,lora",
    [("fp8_block", "lora_llama128"), ("bnb_nf4", "lora_llama96"), ("bnb_int8", "lora_llama96")],
)
def test_merge_into_dequantized_base_is_peft(run, out_dir, name, lora):
    base = FX / name
    if name == "fp8_block":
        ref = fp8_reference(base)
    else:
        ref = bnb_reference(base)
    # PEFT merges in the weight's dtype; the int8 base dequantizes to f32.
    dtype = {v.dtype for k, v in ref.items() if k.endswith("q_proj.weight")}.pop()
    ref = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.items()}
    want = peft_merged(ref, base, FX / lora, dtype)
    out = out_dir / "merged"
    run(["merge", "--base", base, "--lora", FX / lora, "--out", f"{out}/"])
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_st(f))
    assert sorted(got) == sorted(want)
    for k, e in want.items():
        g = got[k]
        # Every output bf16 by default (the int8 base dequantizes to f32, as bitsandbytes
        # does, and PEFT merges in f32: its result rounded to bf16); merged weights within
        # 1 ulp, unquantized tensors as stored.
        assert g.dtype == torch.bfloat16, k
        assert ulps_bf16(g, e.to(g.dtype)) <= 1, k
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    # The folder output loads as a plain model.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, device_map="cpu")


def test_inspect_shows_the_stored_form(run):
    p = run(["inspect", "--json", FX / "fp8_block"])
    rep = json.loads(p.stdout)
    q = [t for t in rep["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight"][0]
    assert q["dtype"] == "BF16" and q["shape"] == [128, 128]
    assert q["bytes"] == 128 * 128 + 4 and "float8_e4m3fn" in q["stored"]
    assert not any(t["name"].endswith("_scale_inv") for t in rep["tensors"])


def test_unknown_quantization_is_refused_by_name(run, out_dir, tmp_path):
    import shutil

    d = tmp_path / "gptq"
    shutil.copytree(FX / "fp8_block", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    p = run(["convert", d, out_dir / "m.safetensors"], expect_rc=1)
    assert "quant_method = \"gptq\"" in p.stderr and "config.json" in p.stderr
    # Scales without a config: refused, never copied.
    (d / "config.json").unlink()
    p = run(["convert", d / "model.safetensors", out_dir / "m.safetensors"], expect_rc=1)
    assert "weight_scale_inv" in p.stderr
    assert not (out_dir / "m.safetensors").exists()


def test_fp8_partial_edge_blocks_follow_weight_dequant(run, tmp_path, out_dir):
    """Shapes that are not multiples of the block (transformers' loader refuses them):
    DeepSeek-V3's `weight_dequant` (inference/kernel.py, commit 0623163) runs a
    cdiv(M, 128) × cdiv(N, 128) grid, masks the edges and computes `x.to(f32) * s` per
    block, stored to bf16 (its default dtype) — written out here with torch."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    M, N, B = 200, 300, 128
    w = (torch.randn(M, N, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(-(-M // B), -(-N // B), generator=g) * 0.01
    d = tmp_path / "edge"
    d.mkdir()
    save_file({"l.weight": w, "l.weight_scale_inv": s}, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [B, B]},
    }))
    full = s.repeat_interleave(B, 0)[:M].repeat_interleave(B, 1)[:, :N]
    want = (w.to(torch.float32) * full).to(torch.bfloat16)
    out = out_dir / "m.safetensors"
    run(["convert", d, out])
    got = load_st(out)
    assert sorted(got) == ["l.weight"]
    assert bits_equal(got["l.weight"], want)


def test_merge_into_mxfp4_experts_is_peft(run, out_dir):
    """A LoRA on gpt-oss expert parameters (target_parameters) merged into MXFP4 experts:
    equal to PEFT's merge_and_unload on the model with the experts as
    convert_moe_packed_tensors returns them ([experts, in, out])."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    base = FX / "mxfp4_gptoss"
    sd = load_st(base / "model.safetensors")
    ref = {}
    for k, v in sd.items():
        if k.endswith("_blocks"):
            p = k[: -len("_blocks")]
            ref[p] = convert_moe_packed_tensors(v, sd[p + "_scales"])
        elif not k.endswith("_scales"):
            ref[k] = v
    want = peft_merged(ref, base, FX / "lora_gptoss", torch.bfloat16)
    out = out_dir / "merged.safetensors"
    p = run(["merge", "--base", base, "--lora", FX / "lora_gptoss", "--out", out])
    got = load_st(out)
    assert sorted(got) == sorted(want)
    merged = [k for k in got if not bits_equal(got[k], ref[k])]
    assert merged == ["model.layers.0.mlp.experts.gate_up_proj"], p.stderr
    for k, e in want.items():
        assert ulps_bf16(got[k], e) <= 1, k


def fp8_quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' FP8 block quantizer itself (what saving an FP8-quantized model writes)."""
    import types

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qc = FineGrainedFP8Config(weight_block_size=list(block))
    r = Fp8Quantize(types.SimpleNamespace(quantization_config=qc))._quantize_one("x.weight", w)
    assert set(r) == {"x.weight", "x.weight_scale_inv"}, "not quantized: shape not whole blocks?"
    return r["x.weight"], r["x.weight_scale_inv"]


def fp8_dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    full = s.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return (q.to(torch.float32) * full).to(torch.bfloat16)


def make_fp8_llama(d: Path, lora_dir: Path):
    """A tiny Llama (hidden 256, intermediate 384: several 128x128 blocks per weight)
    quantized by transformers' own Fp8Quantize, and a PEFT LoRA on all but gate_proj."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=128,
                      vocab_size=64, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    stored = {}
    for k, v in m.state_dict().items():
        if ".layers." in k and k.endswith("_proj.weight"):
            stored[k], stored[k + "_scale_inv"] = fp8_quantize(v, (128, 128))
        else:
            stored[k] = v.contiguous()
    d.mkdir()
    save_file(stored, d / "model.safetensors", metadata={"format": "pt"})
    m.config.quantization_config = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"],
    }
    m.config.save_pretrained(d)
    torch.manual_seed(8)
    lc = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    get_peft_model(m, lc).save_pretrained(lora_dir)


@pytest.mark.parametrize("case", ["fixture", "generated"])
def test_requantize_is_fp8quantize_of_the_peft_merge(run, out_dir, tmp_path, case):
    """`merge --requantize fp8-block`: every merged weight is exactly what transformers'
    Fp8Quantize makes of PEFT's merged bf16 weight; unmerged fp8 weights and their scales,
    and every other tensor, as stored; quantization_config kept; transformers loads it."""
    from transformers import AutoModelForCausalLM

    if case == "fixture":
        base, lora = FX / "fp8_block", FX / "lora_llama128"
    else:
        base, lora = tmp_path / "fp8", tmp_path / "lora"
        make_fp8_llama(base, lora)
    block = tuple(json.loads((base / "config.json").read_text())["quantization_config"]["weight_block_size"])
    ref = fp8_reference(base)
    want = peft_merged(ref, base, lora, torch.bfloat16)
    out = out_dir / "merged"
    run(["merge", "--base", base, "--lora", lora, "--out", f"{out}/", "--requantize", "fp8-block"])
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_st(f))
    stored = load_st(base / "model.safetensors")
    assert sorted(got) == sorted(stored)
    merged, errs = [], []
    for k, v in stored.items():
        if k.endswith("_scale_inv"):
            continue
        if k + "_scale_inv" in stored and not torch.equal(want[k], ref[k]):
            merged.append(k)
            q, s = fp8_quantize(want[k], block)
            assert bits_equal(got[k], q), f"{k}: fp8 codes differ from Fp8Quantize"
            assert bits_equal(got[k + "_scale_inv"], s), f"{k}: scales differ from Fp8Quantize"
            e = (fp8_dequantize(q, s, block).float() - want[k].float()).abs()
            amax = want[k].float().abs().amax()
            nz = want[k].float().abs() > 0
            rel = (e[nz] / want[k].float().abs()[nz])
            errs.append((e.max() / amax).item())
            print(f"{k}: max abs err {e.max().item():.4g} = {errs[-1]:.4f} amax, "
                  f"mean rel {rel.mean().item():.4f}, max rel {rel.max().item():.4f}")
        else:
            assert bits_equal(got[k], v), f"{k}: not as stored"
            if k + "_scale_inv" in stored:
                assert bits_equal(got[k + "_scale_inv"], stored[k + "_scale_inv"]), k
    assert len(merged) == (3 if case == "fixture" else 6), merged
    # The documented error bound (README): scaled values lie in [-448, 448], where e4m3's
    # largest half ulp is 16, so |error| <= amax/28 of the block (amax/28 <= the tensor's),
    # plus the bf16 rounding of the dequantized value (amax/512).
    assert max(errs) <= 1 / 28 + 1 / 512, errs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((base / "config.json").read_text())["quantization_config"]
    # transformers loads it (on CPU it dequantizes FP8 to bf16 itself) with the values
    # the fp8 codes and scales stand for.
    m = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    loaded = m.state_dict()
    for k in merged:
        assert bits_equal(loaded[k], fp8_dequantize(got[k], got[k + "_scale_inv"], block)), k


def test_requantize_refusals(run, out_dir):
    # A base that is not FP8 block-scaled.
    p = run(["merge", "--base", FX / "bnb_nf4", "--lora", FX / "lora_llama96", "--out",
             out_dir / "m.safetensors", "--requantize", "fp8-block"], expect_rc=2)
    assert "--requantize fp8-block" in p.stderr and "FP8" in p.stderr
    p = run(["merge", "--base", FX / "fp8_block", "--lora", FX / "lora_llama128", "--out",
             out_dir / "m.gguf", "--requantize", "fp8-block"], expect_rc=2)
    assert "gguf" in p.stderr
    p = run(["merge", "--base", FX / "fp8_block", "--lora", FX / "lora_llama128", "--keep-lora",
             "--out", out_dir / "m.safetensors", "--requantize", "fp8-block"], expect_rc=2)
    assert "--keep-lora" in p.stderr
    assert not list(out_dir.iterdir())


def test_requantize_convert_keeps_the_fp8_layout(run, out_dir):
    """`convert --requantize fp8-block` of an FP8 base: the fp8 weights and scales as
    stored, the rest cast per --dtype, config kept; transformers loads it."""
    from transformers import AutoModelForCausalLM

    out = out_dir / "c"
    run(["convert", FX / "fp8_block", f"{out}/", "--requantize", "fp8-block", "--dtype", "f32"])
    got = load_st(next(out.glob("*.safetensors")))
    stored = load_st(FX / "fp8_block" / "model.safetensors")
    assert sorted(got) == sorted(stored)
    for k, v in stored.items():
        if v.dtype == torch.float8_e4m3fn or k.endswith("_scale_inv"):
            assert bits_equal(got[k], v), k
        else:
            assert bits_equal(got[k], v.to(torch.float32)), k
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(out, device_map="cpu")


def test_requantize_pth_is_torch_loadable(run, out_dir):
    """A .pth output holds the fp8 codes as torch.float8_e4m3fn storage: torch.load reads
    the same tensors as the safetensors output."""
    args = ["merge", "--base", FX / "fp8_block", "--lora", FX / "lora_llama128",
            "--requantize", "fp8-block", "--out"]
    run(args + [out_dir / "m.pth"])
    run(args + [out_dir / "m.safetensors"])
    pth = torch.load(out_dir / "m.pth", weights_only=True)
    st = load_st(out_dir / "m.safetensors")
    assert sorted(pth) == sorted(st)
    assert pth["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    for k in st:
        assert bits_equal(pth[k], st[k]), k
