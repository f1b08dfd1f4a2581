"""Real-client tests of lorastream's GGUF reader and writer.

GGUF files are made with the real `gguf` package (llama.cpp's gguf-py, 0.19.0: GGUFWriter,
gguf.quants) by fixtures/make_gguf_fixtures.py; outputs are read back with its GGUFReader
and compared with `gguf.quants.dequantize` / `gguf.quants.quantize` bit for bit.

Run: PY=$(scripts/python-env.sh); cargo build --release; $PY -m pytest tests/compat/test_gguf.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter, quants
from safetensors.torch import load_file

from conftest import REPO

sys.path.insert(0, str(REPO / "fixtures"))
import make_gguf_fixtures as fx  # noqa: E402


def f32_bits(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().view(np.uint32)


def reference(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as the real reader and gguf.quants.dequantize give it, in
    PyTorch order (GGUFReader's `shape` is ggml's ne; its `data` is already reversed)."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        data = np.asarray(t.data)
        if t.tensor_type in (T.F32, T.F16):
            out[t.name] = np.ascontiguousarray(data)
        else:
            out[t.name] = quants.dequantize(data, t.tensor_type)
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_gguf_to_safetensors_equals_dequantize(run, tmp_path, seed):
    src = tmp_path / "m.gguf"
    fx.write(src, fx.tensors(seed))
    out = tmp_path / "m.safetensors"
    run(["convert", src, out, "-q"])
    got = load_file(str(out))
    want = reference(src)
    assert list(got) == list(want), "names and file order kept"
    for name, w in want.items():
        g = got[name]
        assert tuple(g.shape) == w.shape, name
        if w.dtype == np.float16:
            assert g.dtype == torch.float16 and g.numpy().tobytes() == w.tobytes(), name
        else:
            # bf16 is stored as bf16 (its f32 widening is exact); the rest are f32.
            assert (f32_bits(g) == w.astype(np.float32).view(np.uint32)).all(), name


def test_gguf_to_pth_keeps_names_and_rows(run, tmp_path):
    src = tmp_path / "m.gguf"
    fx.write(src, fx.tensors(3))
    out = tmp_path / "m.pth"
    run(["convert", src, out, "-q"])
    got = torch.load(out, weights_only=True)
    want = reference(src)
    assert list(got) == list(want)
    for name, w in want.items():
        assert (f32_bits(got[name]) == w.astype(np.float32).view(np.uint32)).all() or \
            got[name].numpy().tobytes() == w.tobytes(), name


@pytest.mark.parametrize("name", ["types.gguf", "aligned64.gguf"])
def test_gguf_rewrite_is_byte_identical(run, tmp_path, fixtures_dir, name):
    src = fixtures_dir / "gguf" / name
    out = tmp_path / "out.gguf"
    run(["convert", src, out, "-q"])
    assert out.read_bytes() == src.read_bytes()
    # And a freshly generated one, with another seed.
    fresh = tmp_path / "fresh.gguf"
    fx.write(fresh, fx.tensors(11), alignment=128)
    run(["convert", fresh, out, "-q"])
    assert out.read_bytes() == fresh.read_bytes()


def test_undecodable_types_round_trip_and_are_listed_but_never_read(run, tmp_path):
    """Q8_1 and Q1_0 (no dequantizer in gguf.quants, so none here): `convert` to a .gguf
    copies them byte for byte and `inspect` lists them; anything that needs their values
    (another output format, --gguf-type re-encoding) is refused naming the tensor."""
    src = tmp_path / "odd.gguf"
    w = GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    w.add_tensor("plain.weight", np.arange(256, dtype=np.float32).reshape(4, 64))
    rng = np.random.default_rng(7)
    for name, qt in [("q81.weight", T.Q8_1), ("q10.weight", T.Q1_0)]:
        bs, ts = quants.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(2, 2 * ts), dtype=np.uint8)
        w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out.gguf"
    run(["convert", src, out, "-q"])
    assert out.read_bytes() == src.read_bytes()
    rep = json.loads(run(["inspect", src, "--json"]).stdout)
    t = {x["name"]: x for x in rep["tensors"]}
    r = {x.name: x for x in GGUFReader(str(src)).tensors}
    assert set(t) == set(r)
    for name, x in t.items():
        assert x["stored"] == r[name].tensor_type.name and x["bytes"] == r[name].n_bytes
        assert x["shape"] == [int(d) for d in reversed(r[name].shape)]
    assert t["q81.weight"]["dtype"] == "not decoded" and t["plain.weight"]["dtype"] == "F32"
    for args in (["convert", src, tmp_path / "o.safetensors"],
                 ["convert", src, tmp_path / "o2.gguf", "--gguf-type", "F16"]):
        p = run(args, expect_rc=1)
        assert "q81.weight" in p.stderr or "q10.weight" in p.stderr, p.stderr
        assert "cannot be dequantized" in p.stderr
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o2.gguf").exists()


def requant_source(path: Path) -> None:
    """2-D tensors of every decodable type with rows of a multiple of 256, and a 1-D norm."""
    rng = np.random.default_rng(5)
    fx_metadata = fx.metadata

    def metadata(w):
        fx_metadata(w)
        w.add_file_type(15)  # MOSTLY_Q4_K_M, say
    fx.metadata = metadata
    items = [("norm.weight", rng.standard_normal(256).astype(np.float32), None),
             ("w.f32", rng.standard_normal((3, 256)).astype(np.float32), None),
             ("w.f16", rng.standard_normal((5, 256)).astype(np.float16), None),
             ("w.bf16", quants.quantize(rng.standard_normal((3, 256)).astype(np.float32), T.BF16), T.BF16)]
    for q in fx.SIMPLE:
        items.append((f"w.{q.name}", quants.quantize(rng.standard_normal((3, 256)).astype(np.float32), q), q))
    for q in fx.K_TYPES + fx.IQ4_TYPES:
        items.append((f"w.{q.name}", fx.k_blocks(rng, q, 3, 256), q))
    for q in fx.OTHER_QUANTIZED:
        items.append((f"w.{q.name}", quants.quantize(rng.standard_normal((3, 256)).astype(np.float32), q), q))
    try:
        fx.write(path, items)
    finally:
        fx.metadata = fx_metadata


@pytest.mark.parametrize("target", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"])
def test_requantization_equals_gguf_quantize(run, tmp_path, target):
    src = tmp_path / "src.gguf"
    requant_source(src)
    out = tmp_path / "out.gguf"
    run(["convert", src, out, "--gguf-type", target, "-q"])
    qt = T[target]
    want = reference(src)
    r_src = {t.name: t for t in GGUFReader(str(src)).tensors}
    r = GGUFReader(str(out))
    fields = {f.name: f for f in r.fields.values()}
    assert list(fields) == [f.name for f in GGUFReader(str(src)).fields.values()]
    from gguf import LlamaFileType
    ft = LlamaFileType.ALL_F32 if target == "F32" else LlamaFileType[f"MOSTLY_{target}"]
    assert int(fields["general.file_type"].parts[-1][0]) == int(ft)
    for t in r.tensors:
        s = r_src[t.name]
        if len(s.shape) < 2:
            assert t.tensor_type == s.tensor_type
            assert bytes(t.data.tobytes()) == bytes(s.data.tobytes())
            continue
        assert t.tensor_type == qt, t.name
        if s.tensor_type == qt:
            expect = np.asarray(s.data)
        else:
            expect = quants.quantize(want[t.name].astype(np.float32), qt)
        assert np.asarray(t.data).tobytes() == expect.tobytes(), (t.name, target)


def test_inspect_shows_ggml_types_metadata_and_stored_bytes(run, fixtures_dir):
    p = run(["inspect", fixtures_dir / "gguf" / "types.gguf", "--json"])
    rep = json.loads(p.stdout)
    assert rep["format"] == "gguf"
    t = {x["name"]: x for x in rep["tensors"]}
    r = {x.name: x for x in GGUFReader(str(fixtures_dir / "gguf" / "types.gguf")).tensors}
    for name, x in t.items():
        assert x["stored"] == r[name].tensor_type.name
        assert x["bytes"] == r[name].n_bytes
        assert x["shape"] == [int(d) for d in reversed(r[name].shape)]
    m = rep["metadata"]
    assert m["general.architecture"] == "llama"
    assert m["test.u64"] == 2**63 + 5 and m["test.i8"] == -100
    assert m["test.array.str"] == ["a", "bc", "", "déf"]
    assert m["test.f64"] == -1e-300


def test_bad_gguf_inputs_fail_cleanly(run, tmp_path, fixtures_dir):
    data = (fixtures_dir / "gguf" / "types.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 100])
    p = run(["convert", bad, tmp_path / "o.safetensors"], expect_rc=1)
    assert "cut.gguf" in p.stderr and "x.iq4_xs" in p.stderr
    assert not (tmp_path / "o.safetensors").exists()
    # A GGUF output from a non-GGUF input, and --gguf-type for another output.
    st = tmp_path / "x.safetensors"
    run(["convert", fixtures_dir / "gguf" / "types.gguf", st, "-q"])
    p = run(["convert", st, tmp_path / "x.gguf"], expect_rc=2)
    assert "GGUF input" in p.stderr
    run(["convert", fixtures_dir / "gguf" / "types.gguf", tmp_path / "y.safetensors",
         "--gguf-type", "Q8_0"], expect_rc=2)
    run(["convert", fixtures_dir / "gguf" / "types.gguf", tmp_path / "y.gguf",
         "--gguf-type", "Q2_K"], expect_rc=2)
    # Rows that do not fit the requested blocks are refused by name.
    p = run(["convert", fixtures_dir / "gguf" / "types.gguf", tmp_path / "z.gguf",
             "--gguf-type", "Q8_0"], expect_rc=1)
    assert "plain.f32" in p.stderr and "block size" in p.stderr
    assert not (tmp_path / "z.gguf").exists()


# ---------------------------------------------------------------------------------------
# merge into a GGUF: tiny random models of every architecture lorastream allows (made by
# real transformers, fixed seeds), a PEFT LoRA on every linear layer with every lora tensor
# perturbed, and the GGUF that convert_hf_to_gguf.py's reduction below makes of the base and
# of PEFT's merge_and_unload() model. The merged GGUF is read back with GGUFReader.

from gguf_reduction import ARCHS, hf_to_gguf, llama_permute  # noqa: E402

FLOAT_BITS = {T.F32: np.uint32, T.F16: np.uint16, T.BF16: np.uint16}


def ordered(bits: np.ndarray) -> np.ndarray:
    """IEEE bit patterns as integers in the floats' order (adjacent floats differ by 1)."""
    b = bits.astype(np.int64)
    sign = 1 << (bits.dtype.itemsize * 8 - 1)
    return np.where(b & sign, -(b & (sign - 1)), b)


def ulps(a, b, qtype) -> np.ndarray:
    """Per element, how many representable values of `qtype` lie between a and b."""
    u = FLOAT_BITS[qtype]
    x = np.frombuffer(np.asarray(a).tobytes(), dtype=u)
    y = np.frombuffer(np.asarray(b).tobytes(), dtype=u)
    return np.abs(ordered(x) - ordered(y))


def hf_state(model_dir: Path) -> dict:
    """What convert_hf_to_gguf.py reads: the tensors save_pretrained wrote (a tied lm_head
    is not among them)."""
    return {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def stored_values(case, state: dict, qtype) -> dict:
    """The HF weights as a `qtype` GGUF holds them (gguf.quants round trip) for every tensor
    the reduction writes in `qtype` (tensors it skips stay as they are): the base PEFT
    merges into for the reference. Blocks run
    along rows, so they commute with the q/k row permutation."""
    out = {}
    for k, v in state.items():
        if v.ndim == 2 and not k.endswith("norm.weight") and not case.skip(k):
            x = quants.dequantize(quants.quantize(v.numpy(), qtype), qtype)
            out[k] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        else:
            out[k] = v.clone()
    return out


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny(request, tmp_path_factory):
    """(case, model class, config, base folder, adapter folder) for one architecture."""
    import peft
    case = ARCHS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(case.seed)
    model = case.cls()(case.config()).float()
    model.save_pretrained(d / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(**case.lora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(d / "adapter")
    return case, d


def peft_merged(case, state: dict, base_dir: Path, adapter: Path, out: Path) -> dict:
    """PEFT's merge_and_unload of `adapter` on the model holding `state` (saved names, as
    in `base_dir`; from_pretrained maps them to the live model's), as saved."""
    import shutil
    import peft
    from safetensors.torch import save_file
    src = out.with_name(out.name + "-base")
    src.mkdir()
    shutil.copy(base_dir / "config.json", src / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    model = case.cls().from_pretrained(src, dtype=torch.float32)
    # Every saved tensor loaded as given: from_pretrained's own load report.
    _, info = case.cls().from_pretrained(src, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    return hf_state(out)


def targeted(case, state) -> set[str]:
    """GGUF names of the weights the adapter changes."""
    return {case.gguf_name(k) for k in state if case.targets(k)}


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0], ids=lambda q: q.name)
def test_merge_into_gguf_equals_converted_peft_merge(run, tiny, tmp_path, qtype):
    case, d = tiny
    base_state = hf_state(d / "base")
    base = tmp_path / "base.gguf"
    hf_to_gguf(case, base_state, base, qtype)
    # The reference: PEFT merges into the weights as the GGUF holds them, and the
    # converter's reduction writes the result in the same type.
    merged_state = peft_merged(case, stored_values(case, base_state, qtype), d / "base", d / "adapter",
                               tmp_path / "peft")
    want_path = tmp_path / "want.gguf"
    hf_to_gguf(case, merged_state, want_path, qtype)
    out = tmp_path / "merged.gguf"
    rep = json.loads(run(["merge", "--base", base, "--lora", d / "adapter", "--out", out, "--json",
                          "--device", "cpu"]).stdout)
    names = targeted(case, base_state)
    assert rep["format"] == "gguf" and rep["merged"] == len(names) == case.n_targets
    a = rep["components"][0]["adapters"][0]
    assert a["path"] == str(d / "adapter") and a["used"] == a["tensors"]
    got, want, src = GGUFReader(str(out)), GGUFReader(str(want_path)), GGUFReader(str(base))
    # All metadata kept, byte for byte.
    assert [(f.name, f.types, [bytes(p.tobytes()) for p in f.parts]) for f in got.fields.values()] == \
        [(f.name, f.types, [bytes(p.tobytes()) for p in f.parts]) for f in src.fields.values()]
    wt = {t.name: t for t in want.tensors}
    st = {t.name: t for t in src.tensors}
    assert [t.name for t in got.tensors] == [t.name for t in src.tensors]
    seen = set()
    for t in got.tensors:
        w = wt[t.name]
        assert t.tensor_type == w.tensor_type == st[t.name].tensor_type, t.name
        if t.name not in names:
            # Not targeted by the adapter: copied as stored.
            assert np.asarray(t.data).tobytes() == np.asarray(st[t.name].data).tobytes(), t.name
            continue
        seen.add(t.name)
        # The base is changed: the check below is not vacuous.
        assert np.asarray(t.data).tobytes() != np.asarray(st[t.name].data).tobytes(), t.name
        # Bit for bit what the converter writes of PEFT's merge (the CPU engine sums
        # W + s·BA in torch's order); on a mismatch, by how many ulps.
        if np.asarray(t.data).tobytes() != np.asarray(w.data).tobytes():
            u = ulps(t.data, w.data, qtype) if qtype in FLOAT_BITS else None
            pytest.fail(f"{t.name} ({qtype.name}) differs from the converted PEFT merge: "
                        f"{None if u is None else (int(u.max()), float((u > 0).mean()))}")
    assert seen == names
    if qtype == T.Q8_0:
        # Q8_0: the merged f32 values (--gguf-type F32 on the same base) equal PEFT's, and
        # the Q8_0 output is exactly gguf.quants.quantize of them.
        f32 = tmp_path / "merged-f32.gguf"
        run(["merge", "--base", base, "--lora", d / "adapter", "--out", f32, "--gguf-type", "F32", "-q",
             "--device", "cpu"])
        vals = {t.name: np.asarray(t.data) for t in GGUFReader(str(f32)).tensors}
        for t in got.tensors:
            if t.name not in names:
                continue
            hf = next(k for k in merged_state if not case.skip(k) and case.gguf_name(k) == t.name)
            ref = case.reduce_tensor(hf, merged_state[hf]).numpy()
            assert vals[t.name].astype(np.float32).tobytes() == ref.astype(np.float32).tobytes(), \
                (t.name, int(ulps(vals[t.name].astype(np.float32), ref.astype(np.float32), T.F32).max()))
            assert np.asarray(t.data).tobytes() == quants.quantize(vals[t.name], T.Q8_0).tobytes(), t.name


def test_merge_into_gguf_permutation_matters(tiny):
    """The llama reduction's q/k permutation changes the rows (so the comparison above is
    sensitive to it); the other architectures keep HF row order."""
    case, d = tiny
    key = next(k for k in hf_state(d / "base") if k.endswith("layers.0.self_attn.q_proj.weight"))
    q = hf_state(d / "base")[key].numpy()
    p = case.reduce_tensor(key, torch.from_numpy(q)).numpy()
    assert np.array_equal(p, q) != (case.gguf_arch == "llama")
    if case.gguf_arch == "llama":
        assert np.array_equal(p, llama_permute(q, case.text_config().num_attention_heads, None))


def test_merge_into_gguf_lm_head(run, tmp_path):
    """lm_head → output.weight where the GGUF has one (an untied llama); refused by name
    where the converter wrote none (a tied Gemma: llama.cpp reads token_embd instead)."""
    import peft
    for key, expect_rc in (("llama", 0), ("gemma", 1)):
        case = ARCHS[key]
        d = tmp_path / key
        torch.manual_seed(3)
        model = case.cls()(case.config()).float()
        model.save_pretrained(d / "base")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "v_proj"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        # Targeting lm_head, PEFT also saves lm_head's base weight unless told not to;
        # merging into a GGUF refuses such copies (checked below).
        pm.save_pretrained(d / "adapter", save_embedding_layers=False)
        pm.save_pretrained(d / "with-copy")
        base_state = hf_state(d / "base")
        hf_to_gguf(case, base_state, d / "base.gguf", T.F32)
        p = run(["merge", "--base", d / "base.gguf", "--lora", d / "with-copy", "--out", d / "c.gguf"],
                expect_rc=1)
        assert "lm_head.base_layer.weight" in p.stderr and "save_embedding_layers=False" in p.stderr, p.stderr
        out = d / "merged.gguf"
        p = run(["merge", "--base", d / "base.gguf", "--lora", d / "adapter", "--out", out, "--json",
                 "--device", "cpu"], expect_rc=expect_rc)
        if expect_rc:
            assert "'lm_head'" in p.stderr and "'output.weight'" in p.stderr and "tied" in p.stderr, p.stderr
            assert not out.exists()
            continue
        merged_state = peft_merged(case, base_state, d / "base", d / "adapter", d / "peft")
        hf_to_gguf(case, merged_state, d / "want.gguf", T.F32)
        got = {t.name: np.asarray(t.data) for t in GGUFReader(str(out)).tensors}
        want = {t.name: np.asarray(t.data) for t in GGUFReader(str(d / "want.gguf")).tensors}
        assert json.loads(p.stdout)["merged"] == 3
        for name in ("output.weight", "blk.0.attn_v.weight", "blk.1.attn_v.weight"):
            assert not np.array_equal(got[name], np.asarray(
                {t.name: t.data for t in GGUFReader(str(d / "base.gguf")).tensors}[name])), name
            assert got[name].tobytes() == want[name].tobytes(), (name, int(ulps(got[name], want[name], T.F32).max()))


def test_merge_into_gguf_refusals(run, tiny, tmp_path, fixtures_dir):
    import shutil
    case, d = tiny
    if case.key != "llama":
        pytest.skip("one architecture is enough for the refusals")
    base = tmp_path / "base.gguf"
    hf_to_gguf(case, hf_state(d / "base"), base, T.F32)
    # A llama GGUF without head counts: the q/k row order is unknown.
    p = run(["merge", "--base", fixtures_dir / "gguf" / "types.gguf", "--lora", d / "adapter",
             "--out", tmp_path / "x.gguf"], expect_rc=1)
    assert "head_count" in p.stderr
    # An architecture outside the tested list is refused by name, listing the supported.
    other = tmp_path / "phi3.gguf"
    hf_to_gguf(case, hf_state(d / "base"), other, T.F32, arch="phi3")
    p = run(["merge", "--base", other, "--lora", d / "adapter", "--out", tmp_path / "x.gguf"], expect_rc=1)
    assert "'phi3'" in p.stderr and "llama, qwen2, qwen3, gemma, gemma2, gemma3" in p.stderr, p.stderr
    # Adapters other than plain LoRA are refused by the field that makes them so.
    for field, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("fan_in_fan_out", True)):
        bad = tmp_path / field
        shutil.copytree(d / "adapter", bad)
        c = json.loads((bad / "adapter_config.json").read_text())
        c[field] = value
        (bad / "adapter_config.json").write_text(json.dumps(c))
        p = run(["merge", "--base", base, "--lora", bad, "--out", tmp_path / "x.gguf"], expect_rc=None)
        assert p.returncode in (1, 2) and field in p.stderr, (field, p.stderr)
    # Real PEFT adapters of forms the GGUF merge does not take: refused by module.
    import peft
    for kw, words in ((dict(lora_bias=True), ["lora_bias", "model.layers.0.self_attn.q_proj"]),
                      (dict(target_modules=["q_proj", "embed_tokens"]), ["Embedding LoRA", "model.embed_tokens"])):
        torch.manual_seed(0)
        m = case.cls()(case.config()).float()
        pm = peft.get_peft_model(m, peft.LoraConfig(**{**dict(r=2, lora_alpha=4, target_modules=["q_proj"]), **kw}))
        with torch.no_grad():
            for n, prm in pm.named_parameters():
                if "lora_" in n:
                    prm.copy_(torch.randn_like(prm) * 0.1)
        ad = tmp_path / f"peft-{len(words[0])}"
        pm.save_pretrained(ad, save_embedding_layers=False)
        p = run(["merge", "--base", base, "--lora", ad, "--out", tmp_path / "x.gguf"], expect_rc=1)
        assert all(w in p.stderr for w in words), (kw, p.stderr)
    # A module the table does not know names the HF module.
    bad = tmp_path / "renamed"
    shutil.copytree(d / "adapter", bad)
    w = load_file(str(bad / "adapter_model.safetensors"))
    from safetensors.torch import save_file
    save_file({k.replace("mlp.down_proj", "mlp.fc2"): v for k, v in w.items()},
              str(bad / "adapter_model.safetensors"))
    p = run(["merge", "--base", base, "--lora", bad, "--out", tmp_path / "x.gguf"], expect_rc=1)
    assert "model.layers.0.mlp.fc2" in p.stderr and "llama" in p.stderr, p.stderr
    assert not (tmp_path / "x.gguf").exists()
    p = run(["merge", "--base", base, "--lora", d / "adapter", "--out", tmp_path / "y.gguf",
             "--dtype", "bf16"], expect_rc=2)
    assert not (tmp_path / "y.gguf").exists()


def test_merge_into_gguf_refuses_vision_modules(run, tmp_path):
    """A LoRA on Gemma3ForConditionalGeneration that also adapts the vision tower (whose
    tensors the converter puts in the mmproj file, not this GGUF) is refused by module."""
    import peft
    case = ARCHS["gemma3mm"]
    torch.manual_seed(8)
    model = case.cls()(case.config()).float()
    model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    hf_to_gguf(case, hf_state(tmp_path / "base"), tmp_path / "base.gguf", T.F32)
    p = run(["merge", "--base", tmp_path / "base.gguf", "--lora", tmp_path / "adapter",
             "--out", tmp_path / "x.gguf"], expect_rc=1)
    assert "vision_tower" in p.stderr and "q_proj" in p.stderr and "gemma3" in p.stderr, p.stderr
    assert not (tmp_path / "x.gguf").exists()
