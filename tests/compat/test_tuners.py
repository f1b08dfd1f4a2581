"""`lorastream merge` against real PEFT 0.21.2 merges of every non-LoRA tuner that has a merge.

Fixtures: fixtures/make_tuner_matrix.py (rows: fixtures/tuner_rows/<tuner>.py) ->
fixtures/tuner_matrix/<tuner>/{bases,adapters,expected,cases.json} (see its README.md).

* Fixture self-checks (no binary needed): each expected file has the base's keys, dtypes and
  shapes and differs from the base in every changed key.
* `lorastream == "merge"` cases (the tuner's rows file says LORASTREAM_MERGES = True):

      lorastream merge --base BASE --lora ADAPTER --out out.safetensors

  must equal PeftModel.from_pretrained(base, adapter).merge_and_unload() within the case's
  ulp_tolerance; the case marked `pth` (one per tuner) is also written as .pth and read back with
  torch.load(weights_only=True).
* `lorastream == "refuse"` cases (tuner not merged by lorastream yet) and `refuse` cases (PEFT
  itself cannot merge the row): exit code 1, no output left, stderr names the peft_type (or, for
  PEFT-cannot-merge rows, one of the targeted modules).

Run: PY=$(scripts/python-env.sh); LORASTREAM_BIN=target/release/lorastream $PY -m pytest tests/compat/test_tuners.py -q
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_matrix import describe_output
from test_merge import assert_close_to_expected, listing, load_output, ulp_distance

REPO = Path(__file__).resolve().parents[2]
TM = REPO / "fixtures" / "tuner_matrix"
MANIFESTS = {p.parent.name: json.loads(p.read_text()) for p in sorted(TM.glob("*/cases.json"))}
CASES = [c for m in MANIFESTS.values() for c in m["cases"]]
WITH_EXPECTED = [c for c in CASES if not c.get("refuse")]
MERGE = [c for c in WITH_EXPECTED if c["lorastream"] == "merge"]
PTH = [c for c in MERGE if c.get("pth")]
REFUSE = [c for c in CASES if c.get("refuse") or c["lorastream"] == "refuse"]


def cid(c):
    return f"{c['tuner']}/{c['name']}"


def ids(cases):
    return [cid(c) for c in cases]


def fx(case, rel):
    return TM / case["tuner"] / rel


def merge_args(case, out):
    args = ["merge", "--base", fx(case, case["base"]), "--out", out]
    for lora in case["loras"]:
        args += ["--lora", fx(case, lora)]
    # Evidence the rows file supplies for a bare fixture base (LORASTREAM_ARGS).
    args += case.get("lorastream_args", [])
    return args


@pytest.fixture(scope="module")
def mrun(run):
    p = run(["merge", "--help"], expect_rc=None)
    assert p.returncode == 0, f"lorastream has no usable `merge` subcommand:\n{p.stderr}"
    return run


# --------------------------------------------------------------------------------------
# fixture self-checks
# --------------------------------------------------------------------------------------


def test_manifests():
    rows = sorted(f.stem for f in (REPO / "fixtures" / "tuner_rows").glob("*.py") if not f.stem.startswith("_"))
    assert sorted(MANIFESTS) == rows, "a rows file without generated fixtures (rerun fixtures/make_tuner_matrix.py)"
    for t, m in MANIFESTS.items():
        assert m["tuner"] == t and m["versions"]["peft"] == "0.21.2", t
        assert m["cases"] or m["skipped"], t
        assert len({c["name"] for c in m["cases"]}) == len(m["cases"]), t
        assert sum(bool(c.get("pth")) for c in m["cases"]) <= 1, t
        for c in m["cases"]:
            assert c["peft_type"] == m["peft_type"] and c["tuner"] == t, c["name"]
            # A row PEFT merges may still be refused by lorastream by name (LORASTREAM_REFUSES in
            # the rows file): then it says why and which name stderr must hold.
            by_name = bool(c.get("stderr_one_of")) and not c.get("refuse")
            want = "merge" if m["lorastream_merges"] and not c.get("refuse") and not by_name else "refuse"
            assert c["lorastream"] == want, c["name"]
            if by_name:
                assert c.get("note"), c["name"]
            assert fx(c, c["base"]).is_dir(), c["name"]
            for lora in c["loras"]:
                cfg = json.loads((fx(c, lora) / "adapter_config.json").read_text())
                assert cfg["peft_type"] == c["peft_type"], (c["name"], cfg["peft_type"])
            if not c.get("refuse"):
                assert fx(c, c["expected"]).is_file(), c["name"]
                assert isinstance(c["ulp_tolerance"], int) and c["ulp_tolerance"] >= 1, c["name"]
            else:
                assert c["peft_error"], c["name"]


@pytest.mark.parametrize("case", WITH_EXPECTED, ids=ids(WITH_EXPECTED))
def test_fixture_expected_is_a_real_merge(case):
    base = load_file(str(fx(case, case["base"]) / "model.safetensors"))
    exp = load_file(str(fx(case, case["expected"])))
    assert set(exp) == set(base)
    for k, v in exp.items():
        assert v.dtype == base[k].dtype and v.shape == base[k].shape, k
    assert case["changed_keys"]
    for k in case["changed_keys"]:
        assert ulp_distance(exp[k], base[k]).max() > 0, k
    for k in set(exp) - set(case["changed_keys"]):
        assert torch.equal(exp[k], base[k]), k


# --------------------------------------------------------------------------------------
# merge (tuners lorastream merges)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MERGE, ids=ids(MERGE))
def test_tuner_merge(mrun, tmp_path, case):
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out))
    exp = load_file(str(fx(case, case["expected"])))
    assert_close_to_expected(load_output(out), exp, case["ulp_tolerance"], cid(case))


@pytest.mark.parametrize("case", PTH, ids=ids(PTH))
def test_tuner_merge_pth(mrun, tmp_path, case):
    out = tmp_path / "out.pth"
    mrun(merge_args(case, out))
    got = torch.load(str(out), weights_only=True, map_location="cpu")
    exp = load_file(str(fx(case, case["expected"])))
    assert_close_to_expected(got, exp, case["ulp_tolerance"], f"{cid(case)} (.pth)")


# --------------------------------------------------------------------------------------
# refusals (tuners not merged yet; rows PEFT cannot merge)
# --------------------------------------------------------------------------------------


def _describe(out, case):
    if case.get("refuse"):
        return "it wrote an output"
    fake = dict(case, base=str(fx(case, case["base"])), expected=str(fx(case, case["expected"])),
                loras=[str(fx(case, x)) for x in case["loras"]])
    return describe_output(out, fake)


@pytest.mark.parametrize("case", REFUSE, ids=ids(REFUSE))
def test_tuner_refuse(mrun, tmp_path, case):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    p = mrun(merge_args(case, out), expect_rc=None)
    why = case.get("note") or f"peft_type {case['peft_type']} not merged by lorastream yet"
    if p.returncode != 1:
        what = _describe(out, case) if out.exists() else "no output"
        pytest.fail(f"expected exit code 1 (refusal: {why}), got {p.returncode}; {what}\nstderr:\n{p.stderr[-2000:]}")
    assert "error:" in p.stderr, p.stderr
    # the reason must be in stderr with the case's paths removed (a folder name is not a reason)
    stripped = p.stderr
    for q in sorted([fx(case, x) for x in case["loras"]] + [fx(case, case["base"])], key=lambda q: -len(str(q))):
        stripped = stripped.replace(str(q), "<path>")
    low = stripped.lower()
    names = case.get("stderr_one_of") or [case["peft_type"]]
    assert any(s.lower() in low for s in names), f"stderr (paths removed) names none of {names}:\n{stripped}"
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"


# --------------------------------------------------------------------------------------
# --keep-lora (PeftModel.from_pretrained(base, adapter).state_dict(), unmerged)
# --------------------------------------------------------------------------------------

# Tuners whose --keep-lora output lorastream writes (src/plan/keep_tuned.rs CHECKED); every other
# tuner with expected_keep_lora fixtures must be refused by name: for the reason in KEEP_REFUSED
# (a word stderr must hold), or because its state_dict is not checked against PEFT yet (a tuner
# added later: listing it in both places turns on the bit-exact comparison).
KEEP_WRITTEN = {"boft", "road", "pvera", "unilora", "c3a", "waveft",
                "gralora", "hira", "peanut", "ia3", "loha", "lokr", "oft", "hra", "vera", "vblora", "delora", "miss", "fourierft",
                "trainable_tokens", "ln_tuning", "beft", "glora", "supertuning", "deft", "adalora", "randlora", "tinylora"}
KEEP_REFUSED = {"shira": "shira_indices"}
KEEP_NOT_CHECKED = "not checked against PEFT"
KEEP = [c for c in MERGE if c.get("keep_lora") and c["tuner"] in KEEP_WRITTEN]
KEEP_REFUSE = [c for c in MERGE if c.get("keep_lora") and c["tuner"] not in KEEP_WRITTEN]


def keep_expected(case):
    """PEFT's state_dict with every alias key filled in from the tensor stored for it."""
    exp = load_file(str(fx(case, case["keep_lora"]["expected"])))
    for alias, canonical in case["keep_lora"]["aliases"].items():
        exp[alias] = exp[canonical]
    return exp


def assert_same_tensors(got, exp, what):
    assert sorted(got) == sorted(exp), f"{what}: missing {sorted(set(exp) - set(got))}, extra {sorted(set(got) - set(exp))}"
    for k, v in exp.items():
        g = got[k]
        assert g.dtype == v.dtype and g.shape == v.shape, (what, k, g.dtype, v.dtype, g.shape, v.shape)
        assert torch.equal(g.view(torch.uint8) if v.dtype.is_floating_point else g,
                           v.view(torch.uint8) if v.dtype.is_floating_point else v), (what, k)


@pytest.mark.parametrize("case", KEEP, ids=ids(KEEP))
def test_tuner_keep_lora(mrun, tmp_path, case):
    """`merge --keep-lora` writes exactly PEFT's state_dict: same keys, dtypes, shapes, bits. The
    expected file stores a tensor PEFT holds under several names (VeRA's projections) once; every
    alias must hold the same values."""
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out) + ["--keep-lora"])
    assert_same_tensors(load_file(str(out)), keep_expected(case), cid(case))


# Tuners whose state_dict lorastream writes with tensors PEFT makes at load (AdaLoRA's ranknum,
# its rank_pattern factors rounded through the base dtype) or with aliases of shared tensors
# (RandLoRA's bases saved per module too, TinyLoRA's vector list): the output must also load back.
LOADBACK = [c for c in KEEP if c["tuner"] in {"adalora", "randlora", "tinylora"}]


@pytest.mark.parametrize("case", LOADBACK, ids=ids(LOADBACK))
def test_tuner_keep_lora_loads_back(mrun, tmp_path, case):
    """`merge --keep-lora` output loads into `PeftModel.from_pretrained(base, adapter)` with
    `load_state_dict(strict=True)` (no key missing or unexpected, every shape right), and that
    model's `merge_and_unload()` gives bit for bit what PEFT's own merge of the adapter gives
    on this CPU (computed here, not the stored expected file: torch's f32 matmul rounds
    differently on CPUs with and without AVX-512)."""
    import sys

    sys.path.insert(0, str(REPO / "fixtures"))
    import make_tuner_matrix as mtm
    from peft import PeftModel

    if case["model"] not in mtm.mpm.CUSTOM:
        pytest.skip(f"{case['model']} is not a custom model of the generator")
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out) + ["--keep-lora"])
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[case["base_dtype"]]

    def peft_model():
        base = mtm.mpm.CUSTOM[case["model"]]().to(dt)
        base.load_state_dict(load_file(str(fx(case, case["base"]) / "model.safetensors")))
        return PeftModel.from_pretrained(base, str(fx(case, case["loras"][0])))

    pm = peft_model()
    pm.load_state_dict(load_file(str(out)), strict=True)
    merged = pm.merge_and_unload().state_dict()
    exp = peft_model().merge_and_unload().state_dict()
    assert set(load_file(str(fx(case, case["expected"])))) <= set(exp)
    for k, v in exp.items():
        assert torch.equal(merged[k].view(torch.uint8), v.view(torch.uint8)), (cid(case), k)


KEEP_F32 = [c for c in KEEP if c["base_dtype"] == "f32"]


@pytest.mark.parametrize("case", KEEP_F32, ids=ids(KEEP_F32))
def test_tuner_keep_lora_without_base(mrun, tmp_path, case):
    """Without --base, --keep-lora writes the adapter's part of PEFT's state_dict: every key that
    does not come from the base model (its own tensors, `base_layer`, `original_module`). Checked
    against the f32 base's state_dict: with no base, what PEFT makes in the base's dtype (LN
    Tuning's layer copies, modules_to_save) keeps the saved dtype, here f32 like the f32 base."""
    out = tmp_path / "out.safetensors"
    args = ["merge", "--out", out, "--keep-lora"] + [a for lora in case["loras"] for a in ("--lora", fx(case, lora))]
    mrun(args)
    base = set(load_file(str(fx(case, case["base"]) / "model.safetensors")))
    exp = keep_expected(case)

    def from_base(k):
        k = k.removeprefix("base_model.model.")
        return k in base or k.replace(".base_layer.", ".") in base or k.replace(".original_module.", ".") in base

    assert_same_tensors(load_file(str(out)), {k: v for k, v in exp.items() if not from_base(k)}, cid(case))


@pytest.mark.parametrize("case", KEEP_REFUSE, ids=ids(KEEP_REFUSE))
def test_tuner_keep_lora_refused(mrun, tmp_path, case):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    p = mrun(merge_args(case, out) + ["--keep-lora"], expect_rc=None)
    assert p.returncode == 1, p.stderr
    assert "--keep-lora" in p.stderr and KEEP_REFUSED.get(case["tuner"], KEEP_NOT_CHECKED) in p.stderr, p.stderr
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"


KEEP_BY_NAME = [c for c in WITH_EXPECTED if c.get("keep_lora") and c["lorastream"] == "refuse" and c.get("stderr_one_of")]


@pytest.mark.parametrize("with_base", [True, False], ids=["base", "adapter_only"])
@pytest.mark.parametrize("case", KEEP_BY_NAME, ids=ids(KEEP_BY_NAME))
def test_tuner_keep_lora_option_refused(mrun, tmp_path, case, with_base):
    """An option lorastream refuses by name for merging (VeRA's save_projection=False: projections
    regenerated at load; DEFT's qr) is refused under --keep-lora too, with or without a base."""
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    args = merge_args(case, out) if with_base else ["merge", "--out", out] + [
        a for lora in case["loras"] for a in ("--lora", fx(case, lora))]
    p = mrun(args + ["--keep-lora"], expect_rc=None)
    assert p.returncode == 1, p.stderr
    # A tuner whose state_dict is not checked is refused for that before its options are read.
    names = case["stderr_one_of"] + ([] if case["tuner"] in KEEP_WRITTEN else [KEEP_NOT_CHECKED])
    assert any(s.lower() in p.stderr.lower() for s in names), p.stderr
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"


def test_glora_bias_after_another_adapter_is_refused(mrun, tmp_path):
    """GLoRA's bias merge reads W (b + b*D + E + W@C). After an earlier adapter changed W, PEFT
    reads the merged W and lorastream would read the stored one: refused, nothing written; the
    other order (GLoRA first) merges."""
    base = REPO / "fixtures" / "tuner_matrix" / "glora" / "bases" / "mlp_f32"
    glora = REPO / "fixtures" / "tuner_matrix" / "glora" / "adapters" / "vanilla_mlp_1_glora"
    lora = REPO / "fixtures" / "peft_matrix" / "adapters" / "vanilla_mlp_1_lora"
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    common = ["merge", "--base", base, "--out", out, "--no-fan-in-fan-out", "."]
    p = mrun(common + ["--lora", lora, "--lora", glora], expect_rc=None)
    assert p.returncode == 1, p.stderr
    assert "lin0.bias" in p.stderr and "lin0.weight" in p.stderr and "earlier adapter" in p.stderr, p.stderr
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"
    mrun(common + ["--lora", glora, "--lora", lora], expect_rc=0)
    assert listing(out_dir) == ["out.safetensors"]
