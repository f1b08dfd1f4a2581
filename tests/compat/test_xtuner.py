"""XTuner LLaVA-InternLM2 recipes against ground truth made by XTuner's own LLaVAModel.

Fixtures and expected files: fixtures/make_xtuner_fixtures.py (see fixtures/xtuner/README.md).

Recipe 1 (continue XTuner training from the released adapters):
    lorastream merge --lora llm=R/llm_adapter --lora visual_encoder=R/visual_encoder_adapter
                     --base projector=R/projector --keep-lora --out llava.pth
  -> exactly the keys LLaVAModel.state_dict() returns (llm./visual_encoder. LoRA keys with
     ".default", projector.model.*), so LLaVAModel(pretrained_pth=llava.pth) ignores nothing.
Recipe 2 (merged): + --base llm=internlm2 --base visual_encoder=clip, no --keep-lora
  -> llm.<key>, visual_encoder.<key>, projector.<key> with both LoRAs folded in.

Run: PY=$(scripts/python-env.sh); $PY -m pytest tests/compat/test_xtuner.py
(LORASTREAM_BIN overrides the binary; tests against the real xtuner run only when the venv
of make_xtuner_fixtures.py --setup-xtuner-venv exists, ~/.cache/lorastream/xtuner-venv or
LORASTREAM_XTUNER_VENV.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "xtuner"
R = FIX / "llava"
sys.path.insert(0, str(REPO / "fixtures"))
import xtuner_llava_repro as repro  # noqa: E402

XTUNER_VENV = Path(os.environ.get("LORASTREAM_XTUNER_VENV", Path.home() / ".cache/lorastream/xtuner-venv"))
XTUNER_PY = XTUNER_VENV / "bin" / "python"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def load_expected(name):
    from safetensors.torch import load_file

    return load_file(str(FIX / name))


def load_pth(path):
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()), type(sd)
    return sd


def adapter_tensors(component):
    """Saved adapter tensors under the names they get in LLaVAModel.state_dict()."""
    sub = {"llm": "llm_adapter", "visual_encoder": "visual_encoder_adapter"}[component]
    raw = torch.load(str(R / sub / "adapter_model.bin"), map_location="cpu", weights_only=True)
    out = {}
    for k, v in raw.items():
        assert k.startswith("base_model.model.") and (".lora_A.weight" in k or ".lora_B.weight" in k), k
        k = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        out[f"{component}.{k}"] = v
    return out


def bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def ulp_distance(a, b):
    """Distance in units in the last place (same float dtype), +0 == -0."""
    assert a.dtype == b.dtype
    if a.dtype == torch.float16:
        ia, ib, mask, sh = a.view(torch.int16).long(), b.view(torch.int16).long(), 0x7FFF, 15
    elif a.dtype == torch.bfloat16:
        ia, ib, mask, sh = a.view(torch.int16).long(), b.view(torch.int16).long(), 0x7FFF, 15
    elif a.dtype == torch.float32:
        ia, ib, mask, sh = a.view(torch.int32).long(), b.view(torch.int32).long(), 0x7FFFFFFF, 31
    else:
        raise TypeError(a.dtype)

    def ordered(i):
        m = i & mask
        return torch.where(((i >> sh) & 1) == 1, -m, m)

    return (ordered(ia) - ordered(ib)).abs()


def lora_delta_info(component):
    """{output key of a targeted weight: (B, A, scale)} from the fixture adapter."""
    sub = {"llm": "llm_adapter", "visual_encoder": "visual_encoder_adapter"}[component]
    cfg = json.loads((R / sub / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    raw = torch.load(str(R / sub / "adapter_model.bin"), map_location="cpu", weights_only=True)
    out = {}
    for k, a in raw.items():
        if ".lora_A.weight" in k:
            mod = k[len("base_model.model."):-len(".lora_A.weight")]
            out[f"{component}.{mod}.weight"] = (raw[k.replace(".lora_A.", ".lora_B.")], a, scale)
    return out


def assert_merged_close(ours, expected, key, lora):
    """Targeted weights: within 1 ulp of the output dtype, or, where W + ΔW cancels (f32),
    within the f32 error bound of forming ΔW = s·(B@A) in any summation order:
    |ours - exp| <= ulp(exp) + (r+1)·eps32·s·(|B|@|A|). Everything else bit-exact."""
    assert ours.dtype == expected.dtype, (key, ours.dtype, expected.dtype)
    assert ours.shape == expected.shape, (key, ours.shape, expected.shape)
    if key not in lora:
        assert bits_equal(ours, expected), f"{key}: not bit-exact (untargeted tensor must pass through)"
        return 0
    b, a, s = lora[key]
    d = ulp_distance(ours, expected)
    if int(d.max()) <= 1:
        return int(d.max())
    e64 = expected.double()
    ulp = (torch.nextafter(expected.abs(), torch.tensor(float("inf"), dtype=expected.dtype)) - expected.abs()).double()
    bound = ulp + (a.shape[0] + 1) * torch.finfo(torch.float32).eps * s * (b.double().abs() @ a.double().abs())
    err = (ours.double() - e64).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{key}: {int(bad.sum())} elements beyond tolerance, max ulp {int(d.max())}, "
        f"e.g. ours={ours[bad][:3].tolist()} expected={expected[bad][:3].tolist()}"
    )
    return int(d.max())


KEEP_LORA_ARGS = [
    "merge",
    "--lora", f"llm={R / 'llm_adapter'}",
    "--lora", f"visual_encoder={R / 'visual_encoder_adapter'}",
    "--base", f"projector={R / 'projector'}",
    "--keep-lora",
]
MERGED_ARGS = [
    "merge",
    "--base", f"llm={FIX / 'internlm2'}",
    "--lora", f"llm={R / 'llm_adapter'}",
    "--base", f"visual_encoder={FIX / 'clip'}",
    "--lora", f"visual_encoder={R / 'visual_encoder_adapter'}",
    "--base", f"projector={R / 'projector'}",
]
# llava-hf names, as XTuner's LLaVAModel.to_huggingface_llava renames (convert_state_dict_to_hf
# with LLM_MAPPING / VIT_MAPPING / PROJECTOR_MAPPING, per component, prefix dropped). Rules are
# anchored and disjoint, so first-match and apply-all-in-order semantics agree.
LLAVA_HF_RENAMES = [
    r"^llm\.model\.=language_model.model.",
    r"^llm\.output\.=output.",  # InternLM2's head: no "model"/"lm_head" substring, kept as is
    r"^visual_encoder\.vision_model\.=vision_tower.vision_model.",
    r"^projector\.model\.0\.=multi_modal_projector.linear_1.",
    r"^projector\.model\.2\.=multi_modal_projector.linear_2.",
]


def run_recipe(run, out, args, extra=()):
    run([*args, *extra, "--out", str(out)])
    assert out.is_file(), out
    return load_pth(out)


def real_xtuner_check(pth, merged=False):
    if not XTUNER_PY.exists():
        if os.environ.get("LORASTREAM_REQUIRE_XTUNER") == "1":
            pytest.fail(f"no xtuner venv at {XTUNER_VENV} but LORASTREAM_REQUIRE_XTUNER=1")
        pytest.skip(f"no xtuner venv at {XTUNER_VENV} (fixtures/make_xtuner_fixtures.py --setup-xtuner-venv)")
    cmd = [str(XTUNER_PY), str(REPO / "fixtures" / "xtuner_ground_truth.py"), "check-load",
           "--fixtures", str(FIX), "--pth", str(pth)] + (["--merged"] if merged else [])
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(pth.parent))
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# ground-truth sanity (no binary needed)
# --------------------------------------------------------------------------------------
def test_expected_files_match_fixtures():
    """The expected files are what the fixture adapters say (guards against stale files)."""
    keep = load_expected("expected_keep_lora.safetensors")
    ad = {**adapter_tensors("llm"), **adapter_tensors("visual_encoder")}
    lora_keys = {k for k in keep if not k.startswith("projector.")}
    assert lora_keys == set(ad)
    for k, v in ad.items():
        assert bits_equal(keep[k], v.to(keep[k].dtype)), k
    from safetensors.torch import load_file

    proj = load_file(str(R / "projector" / "model.safetensors"))
    assert {k for k in keep if k.startswith("projector.")} == {f"projector.{k}" for k in proj}
    merged = load_expected("expected_merged.safetensors")
    hf_map = json.loads((FIX / "expected_llava_hf_rename.json").read_text())
    assert set(hf_map) == set(merged)


# --------------------------------------------------------------------------------------
# recipe 1: --keep-lora
# --------------------------------------------------------------------------------------
def test_keep_lora_matches_llava_state_dict(run, tmp_path):
    ours = run_recipe(run, tmp_path / "llava.pth", KEEP_LORA_ARGS)
    expected = load_expected("expected_keep_lora.safetensors")
    assert sorted(ours) == sorted(expected), (
        f"only ours: {sorted(set(ours) - set(expected))[:8]}\nonly expected: {sorted(set(expected) - set(ours))[:8]}"
    )
    sources = {**adapter_tensors("llm"), **adapter_tensors("visual_encoder")}
    from safetensors.torch import load_file

    sources.update({f"projector.{k}": v for k, v in load_file(str(R / "projector" / "model.safetensors")).items()})
    for k, exp in expected.items():
        # LoRA tensors come out in f32, as PEFT (and so XTuner's LLaVAModel) holds them after
        # loading: an exact widening of the fp16 LLM adapter; the projector passes through.
        # So the file is LLaVAModel.state_dict() bit for bit, dtypes included.
        assert ours[k].dtype == exp.dtype, (k, ours[k].dtype, exp.dtype)
        assert bits_equal(ours[k], exp), k
        assert bits_equal(ours[k], sources[k].to(exp.dtype)), k


def test_keep_lora_dtype_f16_is_the_adapters_on_disk(run, tmp_path):
    """--dtype f16: the LLM adapter's stored fp16 values come back bit for bit (the
    widening to f32 and back is exact); the fp32 CLIP adapter/projector are rounded."""
    ours = run_recipe(run, tmp_path / "llava_f16.pth", KEEP_LORA_ARGS, ["--dtype", "f16"])
    expected = load_expected("expected_keep_lora.safetensors")
    assert sorted(ours) == sorted(expected)
    llm = adapter_tensors("llm")
    for k, v in ours.items():
        assert v.dtype == torch.float16, (k, v.dtype)
        want = llm[k] if k in llm else expected[k].to(torch.float16)
        assert bits_equal(v, want), k


def _assert_loads_cleanly(model, sd, sources):
    res = model.load_state_dict(sd, strict=False)
    saved = set(model.state_dict())  # XTuner's override: LoRA keys + projector
    assert not [k for k in res.missing_keys if k in saved], "missing: " + str([k for k in res.missing_keys if k in saved][:8])
    assert not res.unexpected_keys, "unexpected: " + str(res.unexpected_keys[:8])
    full = torch.nn.Module.state_dict(model)
    for k, v in sources.items():
        assert bits_equal(full[k], v.to(full[k].dtype)), f"{k}: loaded tensor differs from the adapter's"


def test_keep_lora_loads_into_llava_without_ignoring_anything(run, tmp_path):
    """LLaVAModel (re-implemented, fixtures/xtuner_llava_repro.py) + load_state_dict(strict=False):
    nothing it would save is missing, nothing is unexpected, LoRA tensors equal the adapters'."""
    pth = tmp_path / "llava.pth"
    ours = run_recipe(run, pth, KEEP_LORA_ARGS)
    sources = {**adapter_tensors("llm"), **adapter_tensors("visual_encoder")}
    model = repro.build_lora_llava()
    _assert_loads_cleanly(model, ours, sources)
    # and the constructor path XTuner uses: pretrained_pth -> guess_load_checkpoint
    model2 = repro.build_lora_llava(pretrained_pth=str(pth))
    assert not model2.pretrained_load_result.unexpected_keys
    expected = load_expected("expected_keep_lora.safetensors")
    got = model2.state_dict()
    assert set(got) == set(expected)
    assert all(bits_equal(got[k], expected[k]) for k in expected)


def test_keep_lora_loads_into_real_xtuner(run, tmp_path):
    pth = tmp_path / "llava.pth"
    run_recipe(run, pth, KEEP_LORA_ARGS)
    rep = real_xtuner_check(pth)
    assert rep["missing_saved"] == [] and rep["unexpected"] == [] and rep["not_equal_after_load"] == [], rep
    assert rep["n_file"] == rep["n_saved"], rep


def test_keep_lora_expect_keys_from_llava_model(run, tmp_path):
    """--expect-keys-from guards against XTuner's silent strict=False: the key list of the
    LoRA-wrapped LLaVAModel accepts recipe 1 (a partial state dict by design: the model's
    frozen weights come from elsewhere, so --allow-missing-keys says so, and without it the
    run is refused); the same list without ".default" (what a converter that forgot PEFT's
    adapter name would target) is refused before writing, with or without the flag."""
    keys = list(torch.nn.Module.state_dict(repro.build_lora_llava()))
    good = tmp_path / "llava_keys.txt"
    good.write_text("\n".join(keys) + "\n")
    run_recipe(run, tmp_path / "ok.pth", KEEP_LORA_ARGS,
               ["--expect-keys-from", str(good), "--allow-missing-keys"])
    partial = tmp_path / "partial.pth"
    p = run([*KEEP_LORA_ARGS, "--expect-keys-from", str(good), "--out", str(partial)], expect_rc=1)
    assert "--allow-missing-keys" in p.stderr and not partial.exists()
    run_recipe(run, tmp_path / "ok2.pth", KEEP_LORA_ARGS,
               ["--expect-keys-from", str(FIX / "expected_keep_lora.safetensors")])
    bad = tmp_path / "bad_keys.txt"
    bad.write_text("\n".join(k.replace(".default", "") for k in keys) + "\n")
    out = tmp_path / "refused.pth"
    for extra in ([], ["--allow-missing-keys"]):
        run([*KEEP_LORA_ARGS, "--expect-keys-from", str(bad), *extra, "--out", str(out)], expect_rc=1)
        assert not out.exists()


def test_keep_lora_with_bases_is_full_peft_state_dict(run, tmp_path):
    """--keep-lora with the bases too: the complete nn.Module state dict of the LoRA-wrapped
    LLaVAModel (base_layer.weight for targeted modules), which loads with strict=True."""
    ours = run_recipe(run, tmp_path / "llava_full.pth", MERGED_ARGS, ["--keep-lora"])
    model = repro.build_lora_llava()
    full = torch.nn.Module.state_dict(model)
    assert sorted(ours) == sorted(full), (
        f"only ours: {sorted(set(ours) - set(full))[:8]}\nonly model: {sorted(set(full) - set(ours))[:8]}"
    )
    base = {f"llm.{k}": v for k, v in repro.load_internlm2().state_dict().items()}
    base.update({f"visual_encoder.{k}": v for k, v in repro.load_clip_vision().state_dict().items()})
    for k, v in ours.items():
        plain = k.replace("base_model.model.", "", 1).replace(".base_layer.", ".")
        if plain in base:  # base tensors pass through in their on-disk dtype
            assert bits_equal(v, base[plain]), k
    model.load_state_dict(ours, strict=True)
    sources = {**adapter_tensors("llm"), **adapter_tensors("visual_encoder")}
    _assert_loads_cleanly(model, ours, sources)


# --------------------------------------------------------------------------------------
# recipe 2: merged
# --------------------------------------------------------------------------------------
def test_merged_matches_peft_merge_and_unload(run, tmp_path):
    ours = run_recipe(run, tmp_path / "merged.pth", MERGED_ARGS)
    expected = load_expected("expected_merged.safetensors")
    assert sorted(ours) == sorted(expected), (
        f"only ours: {sorted(set(ours) - set(expected))[:8]}\nonly expected: {sorted(set(expected) - set(ours))[:8]}"
    )
    lora = {**lora_delta_info("llm"), **lora_delta_info("visual_encoder")}
    assert len(lora) == 23  # 2 layers x 5 + output; 2 layers x 6
    worst = {}
    for k, exp in expected.items():
        worst[k] = assert_merged_close(ours[k], exp, k, lora)
    # the LoRAs really were folded in: every targeted weight moved away from the base
    base = {f"llm.{k}": v for k, v in repro.load_internlm2().state_dict().items()}
    base.update({f"visual_encoder.{k}": v for k, v in repro.load_clip_vision().state_dict().items()})
    for k in lora:
        assert not torch.equal(ours[k], base[k]), f"{k}: LoRA not applied"


def test_merged_loads_into_llava(run, tmp_path):
    """LLaVAModel without LoRA, LLM and CLIP trained fully: strict=False load ignores nothing."""
    ours = run_recipe(run, tmp_path / "merged.pth", MERGED_ARGS)
    model = repro.LLaVALike(repro.load_internlm2(), repro.load_clip_vision())
    res = model.load_state_dict(ours, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == [], res
    assert set(model.state_dict()) == set(ours)


def test_merged_loads_into_real_xtuner(run, tmp_path):
    pth = tmp_path / "merged.pth"
    run_recipe(run, pth, MERGED_ARGS)
    rep = real_xtuner_check(pth, merged=True)
    assert rep["missing_saved"] == [] and rep["unexpected"] == [] and rep["not_equal_after_load"] == [], rep


def test_merged_llava_hf_rename(run, tmp_path):
    """--rename gives the llava-hf names XTuner's to_huggingface_llava would use."""
    plain = run_recipe(run, tmp_path / "merged.pth", MERGED_ARGS)
    extra = []
    for r in LLAVA_HF_RENAMES:
        extra += ["--rename", r]
    ours = run_recipe(run, tmp_path / "merged_hf.pth", MERGED_ARGS, extra)
    hf_map = json.loads((FIX / "expected_llava_hf_rename.json").read_text())
    assert sorted(ours) == sorted(hf_map.values()), (
        f"only ours: {sorted(set(ours) - set(hf_map.values()))[:8]}\n"
        f"only expected: {sorted(set(hf_map.values()) - set(ours))[:8]}"
    )
    for old, new in hf_map.items():
        assert bits_equal(ours[new], plain[old]), (old, new)
