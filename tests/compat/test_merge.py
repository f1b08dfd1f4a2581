"""`lorastream merge` against ground truth produced by real PEFT 0.21.2.

Fixtures: fixtures/make_peft_fixtures.py -> fixtures/peft/{bases,cases,cases.json}
(what PEFT does is written down in fixtures/peft/NOTES.md). For every merge case:

    lorastream merge --base BASE_DIR --lora ADAPTER_DIR [--lora ADAPTER_DIR2] --out out.safetensors|.pth

must equal `PeftModel.from_pretrained(base, adapter).merge_and_unload()` (saved like save_pretrained):
same key set, dtypes and shapes, values within the case's `ulp_tolerance` (1 ulp of the output
dtype; 4 for DoRA into f32 weights, see cases.json). `--keep-lora` must give exactly
`PeftModel.state_dict()` (keys, dtypes, bits); `--keep-lora` without `--base` exactly the adapter
tensors under their state_dict names. `--base m=DIR --lora m=DIR` prefixes every key with `m.`.
Refusal cases exit 1, name the adapter and the problem on stderr and leave no output.

Run: PY=$(scripts/python-env.sh); $PY -m pytest tests/compat/test_merge.py
(LORASTREAM_BIN overrides the binary; without a binary only the fixture self-checks run.)
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "peft"
MANIFEST = json.loads((FIX / "cases.json").read_text())
CASES = MANIFEST["cases"]
MERGE = [c for c in CASES if not c.get("refuse")]
REFUSE = [c for c in CASES if c.get("refuse")]
KEEP = [c for c in MERGE if c.get("expected_keep_lora")]


@pytest.fixture(scope="module")
def mrun(run):
    """`run`, but skip (not fail) while the binary has no `merge` subcommand yet.
    Set LORASTREAM_REQUIRE_MERGE=1 to turn that skip into a failure."""
    p = run(["merge", "--help"], expect_rc=None)
    if p.returncode != 0 and "unrecognized subcommand" in p.stderr and not os.environ.get("LORASTREAM_REQUIRE_MERGE"):
        pytest.skip("lorastream has no `merge` subcommand yet (LORASTREAM_REQUIRE_MERGE=1 to fail instead)")
    return run


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def fx(rel):
    return FIX / rel


def ids(cases):
    return [c["name"] for c in cases]


def ordered_bits(t: torch.Tensor) -> np.ndarray:
    """Map float bit patterns to integers whose difference is the ulp distance (f32/f16/bf16)."""
    if t.dtype == torch.float32:
        i = t.contiguous().view(torch.int32).numpy().astype(np.int64)
        sign = 1 << 31
    elif t.dtype in (torch.float16, torch.bfloat16):
        i = t.contiguous().view(torch.int16).numpy().astype(np.int64)
        sign = 1 << 15
    else:
        raise TypeError(t.dtype)
    return np.where(i < 0, -(i + sign), i)  # -0.0 and +0.0 both map to 0


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    return np.abs(ordered_bits(a) - ordered_bits(b))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    w = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(w), b.contiguous().view(w))


def load_output(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    assert isinstance(sd, dict), f"{path}: .pth must hold a flat dict name -> tensor, got {type(sd)}"
    for k, v in sd.items():
        assert isinstance(k, str) and isinstance(v, torch.Tensor), f"{path}: entry {k!r} is {type(v)}"
    return sd


def assert_close_to_expected(got: dict, exp: dict, tol: int, what: str):
    assert set(got) == set(exp), (
        f"{what}: key sets differ\n  missing: {sorted(set(exp) - set(got))[:10]}\n"
        f"  unexpected: {sorted(set(got) - set(exp))[:10]}"
    )
    for k in sorted(exp):
        g, e = got[k], exp[k]
        assert g.dtype == e.dtype, f"{what}: {k}: dtype {g.dtype}, expected {e.dtype}"
        assert tuple(g.shape) == tuple(e.shape), f"{what}: {k}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        u = ulp_distance(g, e)
        if u.size and u.max() > tol:
            j = int(u.argmax())
            raise AssertionError(
                f"{what}: {k}: {int((u > tol).sum())} elements beyond {tol} ulp (max {int(u.max())} ulp at flat "
                f"index {j}: got {g.flatten()[j].item()!r}, expected {e.flatten()[j].item()!r})"
            )


def assert_bit_exact(got: dict, exp: dict, what: str, dtype_either=()):
    assert set(got) == set(exp), (
        f"{what}: key sets differ\n  missing: {sorted(set(exp) - set(got))[:10]}\n"
        f"  unexpected: {sorted(set(got) - set(exp))[:10]}"
    )
    for k in sorted(exp):
        g, e = got[k], exp[k]
        if k in dtype_either and g.dtype != e.dtype:
            # without --base the tool cannot know the base dtype PEFT would cast this tensor to
            assert torch.equal(g.to(e.dtype), e), f"{what}: {k}: values differ ({g.dtype} vs {e.dtype})"
            continue
        assert bits_equal(g, e), f"{what}: {k}: not bit-identical (got {g.dtype}{tuple(g.shape)}, expected {e.dtype}{tuple(e.shape)})"


def merge_args(case, out, prefix=None, with_base=True):
    p = f"{prefix}=" if prefix else ""
    args = ["merge", "--out", out]
    if with_base:
        args += ["--base", f"{p}{fx(case['base'])}"]
    for lora in case["loras"]:
        args += ["--lora", f"{p}{fx(lora)}"]
    return args


def prefixed(sd: dict, prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def listing(d: Path):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# --------------------------------------------------------------------------------------
# fixture self-checks (no binary needed)
# --------------------------------------------------------------------------------------


def test_ulp_distance_helper():
    one = torch.tensor([1.0])
    for dt, eps in ((torch.float32, 2.0**-23), (torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)):
        a = one.to(dt)
        b = (one + eps).to(dt)
        assert b.item() != a.item()
        assert ulp_distance(a, b).tolist() == [1]
        assert ulp_distance(torch.tensor([0.0]).to(dt), torch.tensor([-0.0]).to(dt)).tolist() == [0]
        zero_bits = torch.tensor([0.0]).to(dt).view(torch.int32 if dt == torch.float32 else torch.int16)
        pos = (zero_bits + 1).view(dt)  # smallest positive subnormal
        neg = -pos
        assert ulp_distance(pos, neg).tolist() == [2]
        assert ulp_distance(-a, -b).tolist() == [1]


def test_manifest_paths_exist():
    assert MERGE and REFUSE
    for c in CASES:
        assert fx(c["base"]).is_dir(), c["name"]
        for lora in c["loras"]:
            assert (fx(lora) / "adapter_config.json").is_file(), (c["name"], lora)
        for key in ("expected", "expected_keep_lora", "expected_keep_lora_adapter_only"):
            if c.get(key):
                assert fx(c[key]).is_file(), (c["name"], key)


def _is_lora(case) -> bool:
    cfg = json.loads((fx(case["loras"][0]) / "adapter_config.json").read_text())
    return cfg.get("peft_type", "LORA") == "LORA"


# The numpy reference re-derives the LoRA math only; other tuners' cases are checked against
# real PEFT alone (their expected files are PEFT's merge_and_unload()).
NUMPY_CHECKED = [c for c in MERGE if _is_lora(c)] + REFUSE


@pytest.mark.parametrize("case", NUMPY_CHECKED, ids=ids(NUMPY_CHECKED))
def test_fixture_matches_numpy_reference(case):
    """fixtures/check_peft_fixtures.py (numpy, peft-merge.md math) agrees with PEFT's expected files."""
    sys.path.insert(0, str(REPO / "fixtures"))
    import check_peft_fixtures as ref

    base = str(fx(case["base"]))
    loras = [str(fx(x)) for x in case["loras"]]
    if case.get("refuse"):
        with pytest.raises(ref.Refused) as ei:
            ref.merge_reference(base, loras)
        for s in case["must_mention"]:
            assert s in str(ei.value)
        return
    got = ref.merge_reference(base, loras)
    problems, worst, _ = ref.compare(got, str(fx(case["expected"])))
    assert not problems
    if worst[0] <= case["ulp_tolerance"]:
        return
    # numpy's f32 B @ A (this machine's BLAS) sums in another order than the torch that
    # made the expected files, which counts many ulps on elements near 0 after
    # cancellation. For f32 tensors the reference must then agree within 2 f32 epsilons of
    # the tensor's largest value, the size of a GEMM's rounding, not of the element's.
    exp = ref.load_tensors(str(fx(case["expected"])))
    for k, (a, dt) in got.items():
        b = exp[k][0]
        if dt != "f32":
            u = ref.ulp_distance(a, b, dt)
            assert u.max() <= case["ulp_tolerance"], (k, int(u.max()))
            continue
        bound = 2 * np.finfo(np.float32).eps * max(float(np.abs(b).max()), np.finfo(np.float32).tiny)
        assert float(np.abs(a - b).max()) <= bound, (k, float(np.abs(a - b).max()), bound)


# --------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
@pytest.mark.parametrize("case", MERGE, ids=ids(MERGE))
def test_merge(mrun, tmp_path, case, ext):
    out = tmp_path / f"out{ext}"
    mrun(merge_args(case, out))
    exp = load_file(str(fx(case["expected"])))
    assert_close_to_expected(load_output(out), exp, case["ulp_tolerance"], f"{case['name']} ({ext})")


@pytest.mark.parametrize("case", MERGE, ids=ids(MERGE))
def test_merge_component_prefix(mrun, tmp_path, case):
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out, prefix="m"))
    exp = prefixed(load_file(str(fx(case["expected"]))), "m")
    assert_close_to_expected(load_output(out), exp, case["ulp_tolerance"], f"{case['name']} (m=)")


def test_merge_json_report(mrun, tmp_path):
    c = next(c for c in MERGE if c["name"] == "llama_f32")
    out = tmp_path / "out.safetensors"
    p = mrun(merge_args(c, out) + ["--json"])
    rep = json.loads(p.stdout)
    for key in ("tensors", "merged", "bytes", "seconds", "peak_rss_bytes"):
        assert key in rep, f"--json report lacks {key!r}: {rep}"
    exp = load_file(str(fx(c["expected"])))
    assert rep["tensors"] == len(exp)
    assert rep["merged"] == 14  # 7 target modules x 2 layers
    assert isinstance(rep["bytes"], int) and rep["bytes"] >= sum(t.numel() * t.element_size() for t in exp.values())
    assert isinstance(rep["seconds"], (int, float)) and rep["seconds"] >= 0
    assert isinstance(rep["peak_rss_bytes"], int) and rep["peak_rss_bytes"] > 0
    assert out.is_file()


@pytest.mark.parametrize("name", ["llama_f32", "embed_lm_head", "two_adapters_f16"])
def test_dry_run_json_writes_nothing(mrun, tmp_path, name):
    c = next(c for c in MERGE if c["name"] == name)
    out = tmp_path / "out.safetensors"
    before = listing(tmp_path)
    p = mrun(merge_args(c, out) + ["--dry-run", "--json"])
    plan = json.loads(p.stdout)
    assert isinstance(plan, (dict, list)) and plan
    assert not out.exists()
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name", ["llama_f32", "dora_linear", "gpt2_conv1d"])
def test_merge_dtype_bf16_rounds_once(mrun, tmp_path, name):
    """--dtype bf16 on an f32 base: the f32 merge result rounded once to bf16 (<= 1 ulp bf16)."""
    c = next(c for c in MERGE if c["name"] == name)
    out = tmp_path / "out.safetensors"
    mrun(merge_args(c, out) + ["--dtype", "bf16"])
    exp = {k: v.to(torch.bfloat16) for k, v in load_file(str(fx(c["expected"]))).items()}
    assert_close_to_expected(load_output(out), exp, 1, f"{name} --dtype bf16")


# --------------------------------------------------------------------------------------
# --keep-lora
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
@pytest.mark.parametrize("case", KEEP, ids=ids(KEEP))
def test_keep_lora(mrun, tmp_path, case, ext):
    """Exactly PeftModel.from_pretrained(base, adapter).state_dict() (adapter tensors f32, as PEFT upcasts)."""
    out = tmp_path / f"out{ext}"
    mrun(merge_args(case, out) + ["--keep-lora"])
    assert_bit_exact(load_output(out), load_file(str(fx(case["expected_keep_lora"]))), f"{case['name']} keep-lora{ext}")


@pytest.mark.parametrize("case", KEEP, ids=ids(KEEP))
def test_keep_lora_component_prefix(mrun, tmp_path, case):
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out, prefix="m") + ["--keep-lora"])
    exp = prefixed(load_file(str(fx(case["expected_keep_lora"]))), "m")
    assert_bit_exact(load_output(out), exp, f"{case['name']} keep-lora m=")


@pytest.mark.parametrize("case", KEEP, ids=ids(KEEP))
def test_keep_lora_adapter_only(mrun, tmp_path, case):
    """--keep-lora without --base: the adapter's tensors under their PeftModel.state_dict() names."""
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out, with_base=False) + ["--keep-lora"])
    assert_bit_exact(
        load_output(out),
        load_file(str(fx(case["expected_keep_lora_adapter_only"]))),
        f"{case['name']} keep-lora adapter only",
        dtype_either=set(case.get("adapter_only_dtype_from_base", [])),
    )


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
@pytest.mark.parametrize("case", REFUSE, ids=ids(REFUSE))
def test_refuse(mrun, tmp_path, case, ext):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / f"out{ext}"
    p = mrun(merge_args(case, out), expect_rc=1)
    err = p.stderr
    assert "error:" in err, err
    for s in case["must_mention"]:
        assert s.lower() in err.lower(), f"stderr does not mention {s!r}:\n{err}"
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"
