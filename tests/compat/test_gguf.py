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
# merge into a GGUF: a tiny random Llama, a perturbed PEFT LoRA adapter, and the GGUF that
# llama.cpp's convert_hf_to_gguf.py naming (gguf-py's tensor_mapping) and q/k permutation
# (LlamaModel.permute, restated below as an index map) make of PEFT's merged model.

def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The q/k row order llama.cpp's convert_hf_to_gguf.py gives llama models
    (`LlamaModel.permute`, ggml-org/llama.cpp): within each head (of n_head_kv heads when
    that differs), the rows of the first and second halves are interleaved — GGUF row
    2i + j of a head is HF row j·half + i. Written here as an index map."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    rows = w.shape[0]
    half = rows // heads // 2
    order = [h * 2 * half + j * half + i for h in range(heads) for i in range(half) for j in range(2)]
    return w[np.array(order)]


def hf_to_gguf(state: dict, cfg, path: Path, qtype=None) -> None:
    """What convert_hf_to_gguf.py does for a LlamaForCausalLM, reduced to tensors and the
    metadata the merge needs: names by gguf-py's TensorNameMap, q/k rows permuted, 2-D
    weights in `qtype` (gguf.quants.quantize) or F32, 1-D tensors F32."""
    import gguf
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_embedding_length(cfg.hidden_size)
    w.add_array("test.tokens", ["<s>", "a", "b"])
    for name, t in state.items():
        data = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        if qtype is not None and data.ndim == 2:
            w.add_tensor(new, quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, np.ascontiguousarray(data.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import peft
    import transformers
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "down_proj"])
    pm = peft.get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(d / "adapter")
    merged = pm.merge_and_unload()
    merged_state = {k: v.clone() for k, v in merged.state_dict().items()}
    return d, cfg, base_state, merged_state


def peft_merge(cfg, state: dict, adapter: Path) -> dict:
    """PEFT's merge_and_unload of `adapter` on a LlamaForCausalLM holding `state`."""
    import peft
    import transformers
    model = transformers.LlamaForCausalLM(cfg).float()
    model.load_state_dict(state)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.clone() for k, v in merged.state_dict().items()}


def as_stored(state: dict, qtype) -> dict:
    """The weights as a `qtype` GGUF holds them, dequantized (gguf.quants), in HF order:
    quantization blocks run along rows, so they commute with the q/k row permutation."""
    out = {}
    for k, v in state.items():
        if v.ndim == 2:
            x = quants.dequantize(quants.quantize(v.float().numpy(), qtype), qtype)
            out[k] = torch.from_numpy(np.ascontiguousarray(x))
        else:
            out[k] = v.clone()
    return out


@pytest.mark.parametrize("qtype", [None, T.Q8_0])
def test_merge_into_gguf_equals_converted_peft_merge(run, tiny_llama, tmp_path, qtype):
    d, cfg, base_state, merged_state = tiny_llama
    base = tmp_path / "base.gguf"
    hf_to_gguf(base_state, cfg, base, qtype)
    if qtype is not None:
        # The reference merges into the weights as the quantized base holds them.
        merged_state = peft_merge(cfg, as_stored(base_state, qtype), d / "adapter")
    want_path = tmp_path / "want.gguf"
    hf_to_gguf(merged_state, cfg, want_path, qtype)
    out = tmp_path / "merged.gguf"
    rep = json.loads(run(["merge", "--base", base, "--lora", d / "adapter", "--out", out, "--json"]).stdout)
    assert rep["format"] == "gguf" and rep["merged"] == 12
    assert rep["components"][0]["adapters"][0]["path"] == str(d / "adapter")
    assert rep["components"][0]["adapters"][0]["used"] == rep["components"][0]["adapters"][0]["tensors"]
    got, want, src = GGUFReader(str(out)), GGUFReader(str(want_path)), GGUFReader(str(base))
    # All metadata kept, byte for byte.
    assert [(f.name, f.types, [bytes(p.tobytes()) for p in f.parts]) for f in got.fields.values()] == \
        [(f.name, f.types, [bytes(p.tobytes()) for p in f.parts]) for f in src.fields.values()]
    wt = {t.name: t for t in want.tensors}
    st = {t.name: t for t in src.tensors}
    merged = 0
    for t in got.tensors:
        w = wt[t.name]
        assert t.tensor_type == w.tensor_type == st[t.name].tensor_type, t.name
        if t.name in ("token_embd.weight", "output.weight") or t.name.endswith(("_norm.weight", ".ffn_up.weight")):
            # Not targeted by the adapter: copied as stored.
            assert np.asarray(t.data).tobytes() == np.asarray(w.data).tobytes(), t.name
            continue
        merged += 1
        g = quants.dequantize(np.asarray(t.data), t.tensor_type) if qtype else np.asarray(t.data)
        e = quants.dequantize(np.asarray(w.data), w.tensor_type) if qtype else np.asarray(w.data)
        if qtype is None:
            # f32 merge of the same W + s·BA, summed in another order: within a few ulp.
            np.testing.assert_allclose(g, e, rtol=2e-6, atol=2e-7, err_msg=t.name)
        else:
            # Re-quantized: identical blocks except where a value sits on a rounding edge.
            same = (np.asarray(t.data).reshape(-1, 34) == np.asarray(w.data).reshape(-1, 34)).all(axis=1)
            assert same.mean() > 0.97, (t.name, same.mean())
            step = np.abs(e).max() / 127
            assert np.abs(g - e).max() <= step * 1.01, t.name
    # q, k, v, o, gate, down in each of 2 layers.
    assert merged == 12


def test_merge_into_gguf_permutation_matters(run, tiny_llama, tmp_path):
    """Without the q/k permutation the merged attn_q would differ: the comparison above is
    sensitive to it (a check of the test, with the real reader)."""
    d, cfg, base_state, merged_state = tiny_llama
    q = merged_state["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(llama_permute(q, 4, 4), q)


def test_merge_into_gguf_refusals(run, tiny_llama, tmp_path, fixtures_dir):
    d, cfg, base_state, _ = tiny_llama
    base = tmp_path / "base.gguf"
    hf_to_gguf(base_state, cfg, base, None)
    # A llama GGUF without head counts: the q/k row order is unknown.
    p = run(["merge", "--base", fixtures_dir / "gguf" / "types.gguf", "--lora", d / "adapter",
             "--out", tmp_path / "x.gguf"], expect_rc=1)
    assert "head_count" in p.stderr
    # Adapters other than plain LoRA are refused by the field that makes them so.
    import shutil
    dora = tmp_path / "dora"
    shutil.copytree(d / "adapter", dora)
    c = json.loads((dora / "adapter_config.json").read_text())
    c["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(c))
    p = run(["merge", "--base", base, "--lora", dora, "--out", tmp_path / "x.gguf"], expect_rc=1)
    assert "use_dora" in p.stderr
    assert not (tmp_path / "x.gguf").exists()
    p = run(["merge", "--base", base, "--lora", d / "adapter", "--out", tmp_path / "y.gguf",
             "--dtype", "bf16"], expect_rc=2)
    assert not (tmp_path / "y.gguf").exists()
