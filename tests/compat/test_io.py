"""Real-client tests of lorastream's checkpoint I/O (`convert`, `inspect`).

Every output is read back with the real libraries (torch.load with weights_only=True,
with and without mmap; safetensors load_file / safe_open; transformers and peft
from_pretrained) and compared byte for byte against fixtures/io/expected.json, which
fixtures/make_io_fixtures.py computed with torch's and safetensors' own loaders.

Run: PY=$(scripts/python-env.sh); cargo build --release; $PY -m pytest tests/compat/test_io.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import (
    FLOAT_DTYPES,
    ST_DTYPE,
    REPO,
    assert_only,
    dir_listing,
    load_pth,
    load_st,
    sha256_hex,
    tensor_bytes,
)

IO = REPO / "fixtures" / "io"
EXPECTED: dict[str, dict] = json.loads((IO / "expected.json").read_text())["inputs"]
CASES: list[dict] = json.loads((IO / "bad" / "cases.json").read_text())["cases"]
GOOD = sorted(EXPECTED)
DIR_INPUTS = [k for k in GOOD if (IO / k).is_dir()]
FILE_INPUTS = [k for k in GOOD if (IO / k).is_file()]

SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# ----------------------------------------------------------------------------- helpers


def check_tensors(got: dict, expected: dict, where: str) -> None:
    """`got` (name -> torch.Tensor) holds exactly the expected tensors, bit for bit."""
    assert isinstance(got, dict), f"{where}: loaded a {type(got).__name__}, not a dict"
    exp = expected["tensors"]
    missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    assert not missing and not extra, f"{where}: missing {missing[:10]}, unexpected {extra[:10]}"
    for name, e in exp.items():
        t = got[name]
        assert isinstance(t, torch.Tensor), f"{where}: {name} is a {type(t).__name__}"
        assert ST_DTYPE[t.dtype] == e["dtype"], f"{where}: {name}: dtype {t.dtype}, expected {e['dtype']}"
        assert list(t.shape) == e["shape"], f"{where}: {name}: shape {list(t.shape)}, expected {e['shape']}"
        assert sha256_hex(t) == e["sha256"], f"{where}: {name}: bytes differ"


def check_torch_zip(path: Path) -> None:
    """Structural rules of torch's zip format that torch.load relies on (formats.md)."""
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert zf.testzip() is None, f"{path.name}: bad CRC"
        names = [i.filename for i in infos]
        tops = {n.split("/", 1)[0] for n in names}
        assert len(tops) == 1 and all("/" in n for n in names), f"entries not under one folder: {names[:5]}"
        top = tops.pop()
        assert f"{top}/data.pkl" in names and f"{top}/version" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos), "compressed entries"
    with open(path, "rb") as f:
        for info in infos:
            if not info.filename.startswith(f"{top}/data/"):
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            assert local[:4] == b"PK\x03\x04"
            n, e = struct.unpack("<HH", local[26:30])
            data_at = info.header_offset + 30 + n + e
            assert data_at % 64 == 0, f"{info.filename}: data at {data_at}, not 64-byte aligned"


def check_pth(out: Path, expected: dict) -> None:
    check_torch_zip(out)
    for mmap in (False, True):
        check_tensors(load_pth(out, mmap=mmap), expected, f"{out.name} (torch.load mmap={mmap})")


def check_safetensors(out: Path, expected: dict) -> None:
    check_tensors(load_st(out), expected, f"{out.name} (safetensors load_file)")
    with safe_open(out, framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    check_tensors(got, expected, f"{out.name} (safe_open)")


def check_sharded_dir(d: Path, expected: dict, shard_size: int | None = None) -> dict:
    """An HF sharded safetensors folder: index + model-0000i-of-0000n.safetensors."""
    index_path = d / "model.safetensors.index.json"
    assert index_path.is_file(), f"no index in {dir_listing(d)}"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    shards = sorted(p.name for p in d.iterdir() if p.name.endswith(".safetensors"))
    assert shards, "no shards"
    n = len(shards)
    for i, s in enumerate(shards, 1):
        m = SHARD_RE.match(s)
        assert m and int(m[1]) == i and int(m[2]) == n, f"bad shard names {shards}"
    assert sorted(set(weight_map.values())) == shards, "weight_map and shard files disagree"
    assert set(weight_map) == set(expected["tensors"])
    total = sum(e["bytes"] for e in expected["tensors"].values())
    assert index["metadata"]["total_size"] == total
    got = {}
    for s in shards:
        part = load_st(d / s)
        assert part, f"{s} is empty"
        for k in part:
            assert weight_map[k] == s, f"{k} is in {s}, index says {weight_map[k]}"
        if shard_size is not None and len(part) > 1:
            size = sum(len(tensor_bytes(t)) for t in part.values())
            assert size <= shard_size, f"{s}: {size} bytes of tensors > shard size {shard_size}"
        got.update(part)
    check_tensors(got, expected, f"{d.name}/ (sharded)")
    return index


def total_bytes(expected: dict) -> int:
    return sum(e["bytes"] for e in expected["tensors"].values())


def write_safetensors(path: Path, entries) -> None:
    """Hand-written safetensors: entries = [(name, dtype, shape, raw_bytes)]."""
    header, off, blobs = {}, 0, []
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for b in blobs:
            f.write(b)


def rust_repl_to_python(repl: str) -> str:
    """Rust regex replacement syntax ($1, ${1}, $name, ${name}, $$) -> Python re.sub."""
    out, i = [], 0
    while i < len(repl):
        c = repl[i]
        if c == "$" and repl.startswith("$$", i):
            out.append("$")
            i += 2
        elif c == "$" and i + 1 < len(repl) and repl[i + 1] == "{":
            j = repl.index("}", i)
            out.append(f"\\g<{repl[i + 2:j]}>")
            i = j + 1
        elif c == "$":
            m = re.match(r"[_0-9A-Za-z]+", repl[i + 1:])
            assert m, repl
            out.append(f"\\g<{m[0]}>")
            i += 1 + len(m[0])
        elif c == "\\":
            out.append("\\\\")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def rename_all(names, rules):
    """Applies REGEX=REPLACEMENT rules in order (first match; the tests anchor their
    patterns so first-match and replace-all agree)."""
    out = {}
    for name in names:
        new = name
        for rule in rules:
            pat, repl = rule.split("=", 1)
            new = re.sub(pat, rust_repl_to_python(repl), new, count=1)
        out[name] = new
    return out


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize("name", GOOD)
def test_convert_to_pth(name, run, out_dir):
    out = out_dir / "out.pth"
    run(["convert", IO / name, out])
    assert_only(out_dir, ["out.pth"])
    check_pth(out, EXPECTED[name])


@pytest.mark.parametrize("name", GOOD)
def test_convert_to_safetensors(name, run, out_dir):
    out = out_dir / "out.safetensors"
    run(["convert", IO / name, out])
    assert_only(out_dir, ["out.safetensors"])
    check_safetensors(out, EXPECTED[name])


def assert_no_temp(out_dir: Path) -> None:
    # Temp files/folders are named .<outname>.lorastream-tmp-* beside the destination.
    left = [p for p in dir_listing(out_dir) if "lorastream-tmp" in p]
    assert not left, f"temp entries left: {left}"


@pytest.mark.parametrize("name", GOOD)
def test_convert_to_sharded_dir(name, run, out_dir):
    # An existing directory is a sharded safetensors output; 4000 bytes forces several
    # shards for everything but the smallest inputs.
    d = out_dir / "model"
    d.mkdir()
    run(["convert", IO / name, d, "--shard-size", "4000"])
    check_sharded_dir(d, EXPECTED[name], shard_size=4000)
    assert_no_temp(out_dir)


def test_convert_to_new_dir_with_trailing_slash(run, out_dir):
    out = out_dir / "new_folder"
    run(["convert", IO / "sharded_st", str(out) + "/", "--shard-size", "10KB"])
    index = check_sharded_dir(out, EXPECTED["sharded_st"], shard_size=10_000)
    assert len(set(index["weight_map"].values())) >= 3
    assert_no_temp(out_dir)


def test_default_shard_size_gives_one_shard(run, out_dir):
    run(["convert", IO / "hf_model", out_dir])
    index = check_sharded_dir(out_dir, EXPECTED["hf_model"])
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}


@pytest.mark.parametrize("ext", [".pt", ".bin"])
def test_other_torch_extensions(ext, run, out_dir):
    out = out_dir / f"model{ext}"
    run(["convert", IO / "dtypes.safetensors", out])
    check_pth(out, EXPECTED["dtypes.safetensors"])


def test_roundtrip_through_both_formats(run, tmp_path):
    a, b, c = tmp_path / "a.pth", tmp_path / "b.safetensors", tmp_path / "c.pth"
    run(["convert", IO / "shared_storage.pth", a])
    run(["convert", a, b])
    run(["convert", b, c])
    check_pth(c, EXPECTED["shared_storage.pth"])
    check_safetensors(b, EXPECTED["shared_storage.pth"])


def test_convert_json_report(run, out_dir):
    exp = EXPECTED["dtypes.safetensors"]
    proc = run(["convert", IO / "dtypes.safetensors", out_dir / "out.pth", "--json"])
    report = json.loads(proc.stdout)  # exactly one JSON object, nothing else on stdout
    assert isinstance(report, dict)
    assert report["tensors"] == len(exp["tensors"])
    assert report["bytes"] == total_bytes(exp)
    assert isinstance(report["seconds"], (int, float)) and report["seconds"] >= 0
    assert isinstance(report["peak_rss_bytes"], int) and report["peak_rss_bytes"] > 0


# ----------------------------------------------------------------------------- --dtype


def source_tensors(name: str) -> dict:
    p = IO / name
    return load_st(p) if p.suffix == ".safetensors" else load_pth(p)


INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_cast(name: str, got: torch.Tensor, src: torch.Tensor, target: torch.dtype) -> None:
    if src.dtype not in FLOAT_DTYPES:
        assert got.dtype == src.dtype, f"{name}: non-float {src.dtype} became {got.dtype}"
        assert got.shape == src.shape and tensor_bytes(got) == tensor_bytes(src), f"{name} changed"
        return
    exp = src.detach().to(target)
    assert got.dtype == target, f"{name}: {got.dtype}, expected {target}"
    assert got.shape == exp.shape, f"{name}: shape {got.shape}, expected {exp.shape}"
    g, e = got.contiguous().reshape(-1), exp.contiguous().reshape(-1)
    gnan, enan = torch.isnan(g), torch.isnan(e)
    # torch's own NaN bit patterns differ between its scalar and vector paths, so only
    # "NaN stays NaN" is required; every other value must match bit for bit (RNE,
    # subnormals, overflow to inf, signed zero, f64 -> f32 -> 16-bit as torch does it).
    assert torch.equal(gnan, enan), f"{name}: NaN positions differ"
    gb, eb = g.view(INT_VIEW[target])[~gnan], e.view(INT_VIEW[target])[~enan]
    bad = (gb != eb).nonzero().reshape(-1)
    if bad.numel():
        i = bad[0].item()
        src_flat = src.detach().contiguous().reshape(-1)[~enan]
        pytest.fail(
            f"{name}: {bad.numel()} values differ from torch .to({target}); first: "
            f"src={src_flat[i].item()!r} got={g[~gnan][i].item()!r} torch={e[~enan][i].item()!r}"
        )


@pytest.mark.parametrize("target", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("name", ["dtypes.safetensors", "dtypes.pth", "noncontiguous.pth",
                                  "shared_storage.pth", "module_params.pth"])
@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_dtype_cast_matches_torch(target, name, fmt, run, out_dir):
    tdt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[target]
    out = out_dir / f"out{fmt}"
    run(["convert", IO / name, out, "--dtype", target])
    got = load_pth(out) if fmt == ".pth" else load_st(out)
    src = source_tensors(name)
    assert set(got) == set(src)
    for k in src:
        assert_cast(k, got[k], src[k], tdt)
    if fmt == ".pth":
        got_mmap = load_pth(out, mmap=True)
        for k in src:
            assert tensor_bytes(got_mmap[k]) == tensor_bytes(got[k])


def test_dtype_keep_is_identity(run, out_dir):
    run(["convert", IO / "dtypes.pth", out_dir / "out.safetensors", "--dtype", "keep"])
    check_safetensors(out_dir / "out.safetensors", EXPECTED["dtypes.pth"])


# ----------------------------------------------------------------------------- --rename


def test_rename_rules_apply_in_order(run, out_dir):
    exp = EXPECTED["hf_model"]["tensors"]
    rules = [r"^model\.layers\.(\d+)\.=blocks.${1}.",
             r"^blocks\.(\d+)\.self_attn\.=blocks.$1.attn.",   # sees the first rule's output
             r"^model\.(embed_tokens)\.weight$=tok.$1",
             r"^lm_head\.=head."]
    mapping = rename_all(exp, rules)
    assert len(set(mapping.values())) == len(mapping)
    assert mapping["model.layers.1.self_attn.q_proj.weight"] == "blocks.1.attn.q_proj.weight"
    assert mapping["model.embed_tokens.weight"] == "tok.embed_tokens"
    out = out_dir / "out.safetensors"
    args = ["convert", IO / "hf_model", out]
    for r in rules:
        args += ["--rename", r]
    run(args)
    got = load_st(out)
    assert set(got) == set(mapping.values())
    for old, new in mapping.items():
        assert sha256_hex(got[new]) == exp[old]["sha256"], f"{old} -> {new}"


def test_rename_to_pth_and_unmatched_rule_is_noop(run, out_dir):
    exp = EXPECTED["nested.pth"]["tensors"]
    rules = [r"^state_dict\.=", r"^nothing_matches_this$=x"]
    mapping = rename_all(exp, rules)
    out = out_dir / "out.pth"
    run(["convert", IO / "nested.pth", out, "--rename", rules[0], "--rename", rules[1]])
    got = load_pth(out)
    assert set(got) == {"layer.weight", "layer.bias", "sub.w"} == set(mapping.values())
    for old, new in mapping.items():
        assert sha256_hex(got[new]) == exp[old]["sha256"]


@pytest.mark.parametrize("rule,colliding", [
    (r"^.*$=same", "same"),
    (r"\.weight$=.bias", "state_dict.layer.bias"),
])
def test_rename_collision_fails(rule, colliding, run, out_dir):
    proc = run(["convert", IO / "nested.pth", out_dir / "out.pth", "--rename", rule], expect_rc=1)
    assert colliding in proc.stderr
    assert_only(out_dir, [])


@pytest.mark.parametrize("rule", ["no-equals-sign", "([unclosed=x"])
def test_rename_bad_rule_is_usage_error(rule, run, out_dir):
    run(["convert", IO / "nested.pth", out_dir / "out.pth", "--rename", rule], expect_rc=2)
    assert_only(out_dir, [])


# ----------------------------------------------------------------------------- inspect


def _skipped_names(items) -> list[str]:
    return sorted(i if isinstance(i, str) else i["name"] for i in items)


@pytest.mark.parametrize("name", GOOD)
def test_inspect_json(name, run):
    exp = EXPECTED[name]
    proc = run(["inspect", IO / name, "--json"])
    doc = json.loads(proc.stdout)
    tensors = doc["tensors"]
    assert isinstance(tensors, list)
    by_name = {t["name"]: t for t in tensors}
    assert len(by_name) == len(tensors), "duplicate names"
    assert set(by_name) == set(exp["tensors"])
    for k, e in exp["tensors"].items():
        t = by_name[k]
        assert t["dtype"] == e["dtype"], k
        assert list(t["shape"]) == e["shape"], k
        assert t["bytes"] == e["bytes"], k
        assert Path(t["file"]).name == Path(e["file"]).name, f"{k}: file {t['file']}, expected {e['file']}"
    assert doc["total_tensors"] == len(exp["tensors"])
    assert doc["total_bytes"] == total_bytes(exp)
    assert _skipped_names(doc["skipped"]) == exp["skipped"]
    if "adapter" in exp:
        if exp["adapter"] is None:
            assert doc["adapter"] is None
        else:
            a = doc["adapter"]
            assert a is not None, "adapter folder not recognised"
            for key in ("peft_type", "r", "lora_alpha"):
                assert a[key] == exp["adapter"][key], key
            assert sorted(a["target_modules"]) == exp["adapter"]["target_modules"]
    else:
        assert "adapter" in doc


def test_inspect_human_output(run):
    proc = run(["inspect", IO / "dtypes.safetensors"])
    assert "bf16" in proc.stdout.lower() and "scalar_f32" in proc.stdout


def test_hf_folder_prefers_safetensors(run):
    doc = json.loads(run(["inspect", IO / "hf_model", "--json"]).stdout)
    assert {Path(t["file"]).name for t in doc["tensors"]} == {"model.safetensors"}


# ----------------------------------------------------------------------------- usage


@pytest.mark.parametrize("args", [
    [],
    ["convert"],
    ["convert", "IN_ONLY"],
    ["convert", "{io}/dtypes.pth", "{out}/x.pth", "--dtype", "f8"],
    ["convert", "{io}/dtypes.pth", "{out}/x.unknown-extension"],
    ["convert", "{io}/dtypes.pth", "{out}/", "--shard-size", "lots"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(args, run, out_dir):
    args = [a.format(io=IO, out=out_dir) for a in args]
    run(args, expect_rc=2)
    assert_only(out_dir, [])


def test_missing_input_exits_1_naming_it(run, out_dir):
    proc = run(["convert", IO / "no_such_file.safetensors", out_dir / "x.pth"], expect_rc=1)
    assert "no_such_file.safetensors" in proc.stderr
    assert_only(out_dir, [])


# ----------------------------------------------------------------------------- bad inputs


def destination(out_dir: Path, out_kind: str) -> tuple[str, list[str]]:
    """The OUT argument for an output kind, and what out_dir holds before the run (and
    must hold after a failed or interrupted one): files and a new folder leave nothing,
    an existing folder stays, empty."""
    if out_kind == "existing_dir":
        (out_dir / "existing").mkdir()
        return str(out_dir / "existing"), ["existing"]
    if out_kind == "new_dir/":
        return str(out_dir / "new_dir") + "/", []
    return str(out_dir / out_kind), []


def check_mentions(case: dict, stderr: str) -> None:
    """Every must_mention substring is in the message (case-insensitive). The file name
    is looked for anywhere; the other words outside the file's path, so that a keyword
    that is also part of the file name (`pth_os_system.pth` / "system") still counts."""
    name = Path(case["file"]).name
    rest = stderr
    for token in sorted({str(IO / case["file"]), case["file"], name}, key=len, reverse=True):
        rest = rest.replace(token, "<input>")
    for s in case["must_mention"]:
        where = stderr if s == name else rest
        assert s.lower() in where.lower(), f"{case['what']}: stderr lacks {s!r}:\n{stderr}"


OUT_KINDS = ["out.pth", "out.safetensors", "existing_dir", "new_dir/"]


@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_bad_input_convert(case, out_kind, run, out_dir):
    out, before = destination(out_dir, out_kind)
    proc = run(["convert", IO / case["file"], out], expect_rc=1)
    assert "error" in proc.stderr.lower()
    check_mentions(case, proc.stderr)
    assert "lorastream-executed-a-pickle" not in proc.stdout + proc.stderr
    assert_only(out_dir, before)


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_bad_input_inspect(case, run):
    if case.get("inspect_ok"):
        # Reads (nothing is executed) and lists the opaque values it holds instead.
        proc = run(["inspect", IO / case["file"]])
        check_mentions(case, f"{Path(case['file']).name}: {proc.stdout}")
        assert "0 tensors" in proc.stdout
    else:
        proc = run(["inspect", IO / case["file"], "--json"], expect_rc=1)
        check_mentions(case, proc.stderr)
    assert "lorastream-executed-a-pickle" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- real clients


def _tiny_llama_from(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin", "sharded"])
def test_transformers_loads_converted_model(layout, run, tmp_path):
    src = "hf_model/pytorch_model.bin"  # the .bin's values differ from model.safetensors
    d = tmp_path / "model"
    d.mkdir()
    if layout == "sharded":
        run(["convert", IO / src, d, "--shard-size", "10KB"])
        assert len(list(d.glob("model-*.safetensors"))) >= 3
    else:
        run(["convert", IO / src, d / layout])
    shutil.copy(IO / "hf_model" / "config.json", d)
    model = _tiny_llama_from(d)
    check_tensors(dict(model.state_dict()), EXPECTED[src], f"transformers from_pretrained ({layout})")


@pytest.mark.parametrize("src,out_name", [("adapter_bin", "adapter_model.safetensors"),
                                          ("adapter_st", "adapter_model.bin")])
def test_peft_loads_converted_adapter(src, out_name, run, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "adapter"
    d.mkdir()
    run(["convert", IO / src, d / out_name])
    shutil.copy(IO / src / "adapter_config.json", d)
    base = LlamaForCausalLM(LlamaConfig.from_pretrained(IO / "hf_model"))
    pm = PeftModel.from_pretrained(base, d)
    got = get_peft_model_state_dict(pm)
    check_tensors(got, EXPECTED[src], f"peft from_pretrained ({out_name})")


# ----------------------------------------------------------------------------- scale


def test_70000_tensors_to_pth(run, tmp_path):
    n = 70_000
    entries, want = [], {}
    for i in range(n):
        name = f"blocks.{i // 100}.t{i % 100:02d}.weight"
        kind = i % 4
        if kind == 0:
            arr, dt = np.array([i, -i / 3], dtype=np.float32), "F32"
        elif kind == 1:
            arr, dt = np.array([i % 2048, 0.5, -1], dtype=np.float16), "F16"
        elif kind == 2:
            arr, dt = np.array([[i], [-i]], dtype=np.int64), "I64"
        else:
            arr, dt = np.array([], dtype=np.uint8).reshape(0, 3), "U8"
        raw = arr.tobytes()
        entries.append((name, dt, arr.shape, raw))
        want[name] = (dt, list(arr.shape), raw)
    src = tmp_path / "many.safetensors"
    write_safetensors(src, entries)
    out = tmp_path / "many.pth"
    try:
        run(["convert", src, out], timeout=1200)
        with zipfile.ZipFile(out) as zf:
            assert len(zf.infolist()) > 65_535  # needs the zip64 end records
        for mmap in (False, True):
            got = load_pth(out, mmap=mmap)
            assert len(got) == n and set(got) == set(want)
            for k, (dt, shape, raw) in want.items():
                t = got[k]
                assert ST_DTYPE[t.dtype] == dt and list(t.shape) == shape, k
                assert tensor_bytes(t) == raw, k
            del got
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


BIG = 4_300_000_000  # bytes, > 4 GiB (2**32 = 4_294_967_296)
PERIOD = 251
CHUNK = PERIOD * (1 << 18)  # ~66 MB, a multiple of the period: every chunk starts at 0


def _pattern() -> np.ndarray:
    return (np.arange(CHUNK, dtype=np.int64) % PERIOD).astype(np.uint8)


def _check_big(read_chunk, pattern: np.ndarray) -> None:
    for off in range(0, BIG, CHUNK):
        m = min(CHUNK, BIG - off)
        got = read_chunk(off, off + m)
        if not np.array_equal(got, pattern[:m]):
            bad = int(np.nonzero(got != pattern[:m])[0][0])
            pytest.fail(f"big tensor differs at byte {off + bad}: {got[bad]} != {pattern[bad]}")


@pytest.mark.slow
def test_tensor_over_4gib(run, tmp_path):
    pattern = _pattern()
    after = np.array([1.5, -2.0, 3.25, 1e30], dtype=np.float32)
    header = {
        "big": {"dtype": "U8", "shape": [BIG], "data_offsets": [0, BIG]},
        "after_big": {"dtype": "F32", "shape": [4], "data_offsets": [BIG, BIG + 16]},
    }
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    src, out_pth, out_st = tmp_path / "big.safetensors", tmp_path / "big.pth", tmp_path / "big_out.safetensors"
    try:
        with open(src, "wb") as f:  # streamed: never more than one chunk in memory
            f.write(struct.pack("<Q", len(hb)) + hb)
            for off in range(0, BIG, CHUNK):
                f.write(pattern[: min(CHUNK, BIG - off)].tobytes())
            f.write(after.tobytes())

        report = json.loads(run(["convert", src, out_pth, "--json"], timeout=1800).stdout)
        assert report["bytes"] == BIG + 16
        assert report["peak_rss_bytes"] < 2 * 1024**3, f"peak RSS {report['peak_rss_bytes']} while streaming"
        check_torch_zip(out_pth)
        sd = load_pth(out_pth, mmap=True)
        big = sd["big"]
        assert big.dtype == torch.uint8 and big.shape == (BIG,)
        _check_big(lambda a, b: big[a:b].numpy(), pattern)
        assert sd["after_big"].tolist() == after.tolist()
        del sd, big
        out_pth.unlink()

        run(["convert", src, out_st], timeout=1800)
        with safe_open(out_st, framework="pt") as f:
            assert f.get_tensor("after_big").tolist() == after.tolist()
            sl = f.get_slice("big")
            assert sl.get_shape() == [BIG]
            _check_big(lambda a, b: sl[a:b].numpy(), pattern)
    finally:
        for p in (src, out_pth, out_st):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.fixture(scope="module")
def sparse_input(tmp_path_factory):
    """A 4 GiB safetensors file of zeros that costs no disk (sparse): slow enough to
    interrupt mid-write."""
    path = tmp_path_factory.mktemp("sigint") / "big_sparse.safetensors"
    n, size = 64, 64 << 20
    header = {f"t{i:02d}": {"dtype": "U8", "shape": [size], "data_offsets": [i * size, (i + 1) * size]}
              for i in range(n)}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        f.truncate(8 + len(hb) + n * size)
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("out_kind", OUT_KINDS)
def test_sigint_leaves_nothing(out_kind, sparse_input, lorastream, out_dir):
    out, before = destination(out_dir, out_kind)
    proc = subprocess.Popen([str(lorastream), "convert", str(sparse_input), out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until it writes (a temp file or folder appears beside the destination).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None and dir_listing(out_dir) == before:
            time.sleep(0.002)
        seen = dir_listing(out_dir)
        time.sleep(0.05)  # let it write a little
        assert proc.poll() is None, (
            f"convert finished before SIGINT (rc {proc.returncode}); input too small?\n{proc.stderr.read()}")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, -signal.SIGINT), (
        f"rc {proc.returncode}: SIGINT not handled (temp files seen before: {seen})\n{stderr}")
    assert "panicked" not in stderr
    assert "interrupt" in stderr.lower(), stderr
    assert_only(out_dir, before)
