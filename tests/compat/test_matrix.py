"""`lorastream merge` against PEFT's own LoRA test matrix, merged by real PEFT 0.21.2.

Fixtures: fixtures/make_peft_matrix.py -> fixtures/peft_matrix/{bases,adapters,expected,cases.json}
(how the matrix was derived and what PEFT does: fixtures/peft_matrix/NOTES.md). For every merge case

    lorastream merge --base BASE --lora ADAPTER --out out.safetensors [case["args"]...]

must equal `PeftModel.from_pretrained(base, adapter).merge_and_unload()`: same key set, dtypes and
shapes, values within the case's `ulp_tolerance`. Cases marked `pth` are also written as .pth and
read back with `torch.load(weights_only=True)`. Cases with `refuse_without_args` must be refused
(exit 1, nothing written, stderr naming the module and the flag) when run without their `args`.
Refusal cases exit 1, leave no output and name the adapter and the reason on stderr.

Run: PY=$(scripts/python-env.sh); LORASTREAM_BIN=target/release/lorastream $PY -m pytest tests/compat/test_matrix.py -q
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_merge import assert_close_to_expected, listing, load_output, ulp_distance

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "peft_matrix"
MANIFEST = json.loads((FIX / "cases.json").read_text())
CASES = MANIFEST["cases"]
MERGE = [c for c in CASES if not c.get("refuse")]
PTH = [c for c in MERGE if c.get("pth")]
REFUSE = [c for c in CASES if c.get("refuse")]
NEEDS_ARGS = [c for c in MERGE if c.get("refuse_without_args")]


def ids(cases):
    return [c["name"] for c in cases]


def fx(rel):
    return FIX / rel


@pytest.fixture(scope="module")
def mrun(run):
    """`run`, but skip (not fail) while the binary has no `merge` subcommand yet
    (LORASTREAM_REQUIRE_MERGE=1 turns that into a failure), as in test_merge.py."""
    p = run(["merge", "--help"], expect_rc=None)
    if p.returncode != 0 and "unrecognized subcommand" in p.stderr and not os.environ.get("LORASTREAM_REQUIRE_MERGE"):
        pytest.skip("lorastream has no `merge` subcommand yet (LORASTREAM_REQUIRE_MERGE=1 to fail instead)")
    return run


def merge_args(case, out, with_args=True):
    args = ["merge", "--base", fx(case["base"]), "--out", out]
    for lora in case["loras"]:
        args += ["--lora", fx(lora)]
    if with_args:
        args += case.get("args", [])
    return args


def base_tensors(case) -> dict:
    d = fx(case["base"])
    st = d / "model.safetensors"
    if st.exists():
        return load_file(str(st))
    return torch.load(str(d / "pytorch_model.bin"), weights_only=True, map_location="cpu")


def check_stderr(err: str, case, must, one_of, names=()):
    """`names` must appear in stderr; `must` (all) and `one_of` (at least one) in stderr with the
    case's paths removed, so that a folder name such as 'conv2d_groups_lora' cannot stand in for
    the reason or the module."""
    assert "error:" in err, err
    low = err.lower()
    for s in names:
        assert s.lower() in low, f"stderr does not name {s!r}:\n{err}"
    stripped = err
    for p in sorted([fx(x) for x in case["loras"]] + [fx(case["base"])], key=lambda p: -len(str(p))):
        stripped = stripped.replace(str(p), "<path>")
    for p in case["loras"]:
        stripped = stripped.replace(Path(p).name, "<adapter>")
    low = stripped.lower()
    for s in must:
        assert s.lower() in low, f"stderr (paths removed) does not mention {s!r}:\n{stripped}"
    if one_of:
        assert any(s.lower() in low for s in one_of), f"stderr (paths removed) mentions none of {one_of}:\n{stripped}"


def describe_output(out: Path, case) -> str:
    """For a failure message: what an output that should not exist holds compared with PEFT."""
    try:
        got = load_output(out)
        exp = load_file(str(fx(case["expected"])))
        assert_close_to_expected(got, exp, case["ulp_tolerance"], case["name"])
        return "it wrote an output equal to PEFT's merge"
    except AssertionError as e:
        return f"it wrote an output that is WRONG: {str(e)[:600]}"
    except Exception as e:  # noqa: BLE001
        return f"it wrote an unreadable output: {e}"


# --------------------------------------------------------------------------------------
# fixture self-checks (no binary needed)
# --------------------------------------------------------------------------------------


def test_manifest():
    assert len(MERGE) >= 150 and len(REFUSE) >= 10 and PTH and NEEDS_ARGS  # refusals retire as tuners land
    assert len(set(ids(CASES))) == len(CASES)
    for c in CASES:
        assert fx(c["base"]).is_dir(), c["name"]
        for lora in c["loras"]:
            assert (fx(lora) / "adapter_config.json").is_file(), (c["name"], lora)
        if not c.get("refuse"):
            assert fx(c["expected"]).is_file(), c["name"]
            assert c["ulp_tolerance"] in (1, 4), c["name"]


@pytest.mark.parametrize("case", MERGE, ids=ids(MERGE))
def test_fixture_expected_is_a_real_merge(case):
    """expected has the base's keys, dtypes and shapes and differs from the base in every key
    listed in changed_keys (so no case compares a no-op)."""
    base = base_tensors(case)
    exp = load_file(str(fx(case["expected"])))
    assert set(exp) == set(base)
    for k, v in exp.items():
        assert v.dtype == base[k].dtype and v.shape == base[k].shape, k
    assert case["changed_keys"]
    for k in case["changed_keys"]:
        assert ulp_distance(exp[k], base[k]).max() > case["ulp_tolerance"], k


# --------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MERGE, ids=ids(MERGE))
def test_matrix_merge(mrun, tmp_path, case):
    out = tmp_path / "out.safetensors"
    mrun(merge_args(case, out))
    exp = load_file(str(fx(case["expected"])))
    assert_close_to_expected(load_output(out), exp, case["ulp_tolerance"], case["name"])


@pytest.mark.parametrize("case", PTH, ids=ids(PTH))
def test_matrix_merge_pth(mrun, tmp_path, case):
    out = tmp_path / "out.pth"
    mrun(merge_args(case, out))
    got = torch.load(str(out), weights_only=True, map_location="cpu")
    exp = load_file(str(fx(case["expected"])))
    assert_close_to_expected(got, exp, case["ulp_tolerance"], f"{case['name']} (.pth)")


@pytest.mark.parametrize("case", NEEDS_ARGS, ids=ids(NEEDS_ARGS))
def test_matrix_refuses_without_settling_flags(mrun, tmp_path, case):
    """Square Conv1D next to square Linear and no config.json: only a flag can say which weight
    is stored [in, out]; without it lorastream must refuse, naming the module and the flag."""
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    p = mrun(merge_args(case, out, with_args=False), expect_rc=None)
    if p.returncode != 1:
        what = describe_output(out, case) if out.exists() else "no output"
        pytest.fail(f"expected exit code 1 (refusal), got {p.returncode}; {what}\nstderr:\n{p.stderr[-2000:]}")
    check_stderr(p.stderr, case, case["stderr_contains_without_args"], case.get("stderr_one_of_without_args"))
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", REFUSE, ids=ids(REFUSE))
def test_matrix_refuse(mrun, tmp_path, case):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    p = mrun(merge_args(case, out), expect_rc=None)
    if p.returncode != 1:
        pytest.fail(f"expected exit code 1 (refusal: {case['note']}), got {p.returncode}; "
                    f"{'it wrote an output' if out.exists() else 'no output'}\nstderr:\n{p.stderr[-2000:]}")
    check_stderr(p.stderr, case, case["stderr_contains"], case.get("stderr_one_of"), case["stderr_names"])
    assert listing(out_dir) == [], f"output left behind: {listing(out_dir)}"
