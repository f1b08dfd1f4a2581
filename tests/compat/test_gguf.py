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
    items = [("norm.weight", rng.standard_normal(256).astype(np.float32), None),
             ("w.f32", rng.standard_normal((3, 256)).astype(np.float32), None),
             ("w.f16", rng.standard_normal((5, 256)).astype(np.float16), None),
             ("w.bf16", quants.quantize(rng.standard_normal((3, 256)).astype(np.float32), T.BF16), T.BF16)]
    for q in fx.SIMPLE:
        items.append((f"w.{q.name}", quants.quantize(rng.standard_normal((3, 256)).astype(np.float32), q), q))
    for q in fx.K_TYPES:
        items.append((f"w.{q.name}", fx.k_blocks(rng, q, 3, 256), q))
    fx.write(path, items)


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
    assert [f.name for f in r.fields.values()] == [f.name for f in GGUFReader(str(src)).fields.values()]
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
    assert "cut.gguf" in p.stderr and "k.q6_k" in p.stderr
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
