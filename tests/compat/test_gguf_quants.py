"""lorastream's ggml block decoders and encoders against the real `gguf` package (0.19.0,
llama.cpp's gguf-py): every type `gguf.quants.dequantize` handles, decoded bit for bit
(random blocks, every scale edge case: subnormal, 65504, inf, NaN), and every type
`gguf.quants.quantize` handles, written by `--gguf-type` byte for byte, over random data
and the edge cases of each quantizer (all-zero blocks, rounding ties, ±max ties,
subnormals, the largest magnitudes a scale can hold, powers of two for MXFP4). Blocks the
reference would write as garbage (non-finite values, an f16 scale overflow) are refused,
and the test shows the reference's bytes are garbage there.

Run: PY=$(scripts/python-env.sh); cargo build --release; $PY -m pytest tests/compat/test_gguf_quants.py
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants
from gguf.constants import GGML_QUANT_SIZES
from safetensors.numpy import load_file

from conftest import REPO

sys.path.insert(0, str(REPO / "fixtures"))
import make_gguf_quant_fixtures as fx  # noqa: E402

QUANTIZED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.TQ1_0, T.TQ2_0, T.MXFP4]
PLAIN = [T.F32, T.F16, T.BF16]


def test_grid_tables_are_generated_from_gguf():
    """src/source/gguf/iq_grids.rs is exactly what scripts/gen_iq_grids.py makes from the
    installed gguf package (so no table is hand-typed or stale)."""
    got = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_iq_grids.py")],
                         check=True, capture_output=True, text=True).stdout
    assert got == (REPO / "src" / "source" / "gguf" / "iq_grids.rs").read_text()


def test_committed_fixture_is_reproducible(tmp_path):
    subprocess.run([sys.executable, str(REPO / "fixtures" / "make_gguf_quant_fixtures.py"),
                    str(tmp_path)], check=True)
    for name in ["blocks.gguf", "blocks.expected.safetensors"]:
        assert (tmp_path / name).read_bytes() == \
            (REPO / "fixtures" / "gguf_quants" / name).read_bytes(), name


@pytest.mark.parametrize("seed", [1, 2])
def test_every_decodable_type_dequantizes_bit_exactly(run, tmp_path, seed):
    def n(q):
        bs = GGML_QUANT_SIZES[q][0]
        # MXFP4/NVFP4: all 256 scale bytes; the others: every edge scale, then random ones.
        return {T.MXFP4: 256, T.NVFP4: 64}.get(q, 48 if bs == 256 else 96)
    items = fx.items(seed, fx.DECODED, n)
    src = tmp_path / "b.gguf"
    fx.write(src, items)
    out = tmp_path / "b.safetensors"
    run(["convert", src, out, "-q"])
    got = load_file(str(out))
    checked_nan = 0
    for name, arr, q in items:
        with np.errstate(all="ignore"):
            want = quants.dequantize(arr, q)
        g = got[name]
        assert g.dtype == np.float32 and g.shape == want.shape, name
        gb, wb = g.view(np.uint32).ravel(), want.view(np.uint32).ravel()
        bad = np.nonzero(gb != wb)[0]
        assert bad.size == 0, (name, bad[:8], g.ravel()[bad[:8]], want.ravel()[bad[:8]])
        checked_nan += int(np.isnan(want).sum())
    assert checked_nan > 0, "the NaN scales were exercised (and matched bit for bit)"


def table_row(rows: list[np.ndarray], bs: int) -> np.ndarray:
    return np.concatenate([np.resize(r.astype(np.float32), bs) for r in rows])


def edge_rows(q: T, rng: np.random.Generator) -> np.ndarray:
    """Blocks that hit each quantizer's edge cases, 256 values per row (one TQ/K block, 8
    blocks of 32), all of them values the reference writes faithfully."""
    bs = GGML_QUANT_SIZES[q][0]
    f = np.float32
    cases = [
        np.zeros(bs, f),                                          # all zero: d = 0
        np.array([0.0] * (bs - 1) + [1e-40], f),                  # one subnormal
        np.full(bs, 1e-40, f),                                    # all subnormal
        (np.arange(bs) - bs / 2).astype(f) * f(0.5),              # halves: rounding ties
        np.array([-3.0, 3.0] * (bs // 2), f),                     # ±max tie: first wins
        np.array([3.0, -3.0] * (bs // 2), f),
        np.linspace(-1, 1, bs, dtype=f),
        np.full(bs, -2.5, f),                                     # constant block
        (rng.standard_normal(bs) * 1e-30).astype(f),              # tiny normals
    ]
    if q in (T.Q8_0,):
        cases.append(np.linspace(-127 * 65504, 127 * 65504, bs, dtype=f) * f(0.99))
    if q in (T.Q4_0,):
        cases.append(np.linspace(-8 * 65504, 8 * 65504, bs, dtype=f) * f(0.99))
    if q in (T.Q5_0,):
        cases.append(np.linspace(-16 * 65504, 16 * 65504, bs, dtype=f) * f(0.99))
    if q in (T.Q4_1, T.Q5_1, T.TQ1_0, T.TQ2_0):
        cases.append(np.linspace(-30000, 30000, bs, dtype=f))
    if q == T.MXFP4:
        # Block maxima at and just below every power of two the exponent can hold, and
        # the largest floats.
        for k in range(-125, 128):
            p = f(2.0) ** f(k)
            below = np.nextafter(p, f(0))
            for m in (p, below, f(p * f(1.5))):
                if np.isfinite(m):
                    cases.append(np.array([m] + list(rng.uniform(-1, 1, bs - 1) * m), f))
        cases.append(np.full(bs, np.finfo(f).max, f))
        cases.append(np.full(bs, -np.finfo(f).max, f))
    # Every case as one block; 256-value rows.
    flat = np.concatenate([c.astype(f) for c in cases])
    pad = (-flat.size) % 256
    flat = np.concatenate([flat, np.zeros(pad, f)])
    return flat.reshape(-1, 256)


def source_gguf(path, rows: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.001, 10, size=(rows.shape[0], 1)).astype(np.float32)
    items = [
        ("norm.weight", rng.standard_normal(256).astype(np.float32), None),
        ("w.edge", rows, None),
        ("w.rand", (rng.standard_normal((24, 256)) * 0.3).astype(np.float32), None),
        ("w.scaled", (rng.standard_normal(rows.shape) * scale).astype(np.float32), None),
    ]
    fx.write(path, items)
    return {n: a for n, a, _ in items}


@pytest.mark.parametrize("target", [t.name for t in QUANTIZED + PLAIN])
def test_gguf_type_writes_what_gguf_quantize_writes(run, tmp_path, target):
    qt = T[target]
    rng = np.random.default_rng(11)
    rows = edge_rows(qt, rng) if qt in QUANTIZED else np.concatenate(
        [edge_rows(q, rng) for q in [T.Q8_0, T.MXFP4]])
    if qt in PLAIN:
        # Casts take anything: inf, NaN (bf16 makes it quiet), overflow to f16 inf.
        rows[0, :6] = [np.inf, -np.inf, np.nan, 1e30, -70000.0, 65520.0]
        rows[0, 6] = np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)[0]
    src = tmp_path / "src.gguf"
    vals = source_gguf(src, rows, 3)
    out = tmp_path / "out.gguf"
    run(["convert", src, out, "--gguf-type", target, "-q"])
    r = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert r["norm.weight"].tensor_type == T.F32, "1-D tensors keep their type"
    for name in ["w.edge", "w.rand", "w.scaled"]:
        t = r[name]
        assert t.tensor_type == qt, name
        with np.errstate(all="ignore"):
            want = quants.quantize(vals[name], qt)
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        w = np.ascontiguousarray(want).view(np.uint8).reshape(-1)
        assert got.size == w.size, name
        bad = np.nonzero(got != w)[0]
        assert bad.size == 0, (target, name, bad[:8], got[bad[:8]], w[bad[:8]])


@pytest.mark.parametrize("target,value,why", [
    ("Q8_0", np.inf, "non-finite value"),
    ("Q4_0", np.nan, "non-finite value"),
    ("TQ2_0", -np.inf, "non-finite value"),
    ("Q8_0", 1e10, "beyond f16's range"),
    ("Q4_1", -1e6, "beyond f16's range"),
    ("TQ1_0", 70000.0, "beyond f16's range"),
])
def test_blocks_the_reference_would_garble_are_refused(run, tmp_path, target, value, why):
    qt = T[target]
    rows = (np.random.default_rng(4).standard_normal((4, 256)) * 0.1).astype(np.float32)
    rows[2, 40] = np.float32(value)
    # What gguf.quants writes for that row does not decode to it (inf/NaN or a wrapped
    # exponent), which is why lorastream refuses instead of copying the reference.
    with np.errstate(all="ignore"):
        back = quants.dequantize(quants.quantize(rows[2:3], qt), qt)
        err = np.abs(back - rows[2:3])
    assert not np.isfinite(back).all() or err.max() > 1e30
    src = tmp_path / "src.gguf"
    fx.write(src, [("w.x", rows, None)])
    out = tmp_path / "out.gguf"
    p = run(["convert", src, out, "--gguf-type", target], expect_rc=1)
    assert "w.x" in p.stderr and why in p.stderr and "F16" in p.stderr, p.stderr
    assert not out.exists(), "nothing half written"


def test_inspect_names_every_ggml_type(run, tmp_path):
    """Every type gguf.quants can dequantize is read and shown by name (`stored`) with its
    stored bytes; the two it cannot (Q8_1, Q1_0) are listed too (dtype "not decoded") and
    refused by tensor and type name where their values are needed."""
    import json
    rng = np.random.default_rng(6)
    undecodable = [T.Q8_1, T.Q1_0]
    items = []
    for q in T:
        bs, ts = GGML_QUANT_SIZES[q]
        n = max(256, bs) // bs
        arr = rng.integers(0, 256, size=(2, n * ts), dtype=np.uint8)
        if q in (T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64):
            arr = np.zeros((2, n * ts), np.uint8)  # plain types: values as stored
        items.append((f"t.{q.name}", arr, q))
    src = tmp_path / "all.gguf"
    fx.write(src, [i for i in items if i[2] not in undecodable])
    info = json.loads(run(["inspect", src, "--json"]).stdout)
    by_name = {t["name"]: t for t in info["tensors"]}
    for name, arr, q in items:
        if q in undecodable:
            continue
        t = by_name[name]
        assert t["stored"] == q.name and t["bytes"] == arr.size, t
    for q in undecodable:
        bad = tmp_path / f"{q.name}.gguf"
        fx.write(bad, [i for i in items if i[2] == q])
        t = {x["name"]: x for x in json.loads(run(["inspect", bad, "--json"]).stdout)["tensors"]}
        assert t[f"t.{q.name}"]["stored"] == q.name and t[f"t.{q.name}"]["dtype"] == "not decoded"
        p = run(["convert", bad, tmp_path / f"{q.name}.safetensors"], expect_rc=1)
        assert f"t.{q.name}" in p.stderr and f"ggml type {q.name}" in p.stderr, p.stderr
        assert not (tmp_path / f"{q.name}.safetensors").exists()
