"""`lorastream merge --lora a --lora b …` with DoRA adapters after other adapters on one weight,
against real PEFT 0.21.2.

Fixtures: fixtures/make_dora_sequences.py -> fixtures/dora_sequences/{bases,adapters,expected,cases.json}.
Each case must equal `PeftModel.from_pretrained(a0).load_adapter(a1, …).merge_and_unload(adapter_names=[…])`:
every DoRA adapter's norm taken from the weight with the adapters before it unmerged again, and
those merged again (`LoraLayer._unmerged_base_weight`), on nn.Linear, Conv1D (fan_in_fan_out),
nn.Embedding and nn.Conv2d, with lora_bias going through the same round trips; a DoRA sequence
after a LoHa adapter is the LoHa merged first; a LoHa change between a LoRA and a later DoRA adapter
is refused (no PEFT model holds them in that order). 16-bit bases: within 1 ulp (measured: bit-exact);
f32 bases within the case's `abs_tolerance` (lorastream's exact norm against torch.linalg.norm's
f32 reduction, carried through the later adapters' unmerge/re-merge; see the generator).

Run: PY=$(scripts/python-env.sh); LORASTREAM_BIN=target/release/lorastream $PY -m pytest tests/compat/test_dora_sequences.py -q
"""

import json
from pathlib import Path

import pytest

from test_merge import assert_close_to_expected, load_output
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "dora_sequences"
CASES = json.loads((FIX / "cases.json").read_text())["cases"]


def test_manifest():
    rows = {c["row"] for c in CASES}
    assert {"dora_dora", "dora_dora_dora", "lora_dora", "loha_dora_dora", "lora_bias_dora_dora"} <= rows
    assert {c["base_dtype"] for c in CASES} == {"f32", "f16", "bf16"}
    assert any(c.get("refuse") for c in CASES)
    for c in CASES:
        if c.get("refuse"):
            continue
        assert (FIX / c["expected"]).is_file(), c["name"]
        assert c["changed_keys"], c["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("ext", [".safetensors", ".pth"])
def test_dora_sequence(run, tmp_path, case, ext):
    out = tmp_path / f"out{ext}"
    args = ["merge", "--base", FIX / case["base"], "--out", out]
    for lora in case["loras"]:
        args += ["--lora", FIX / lora]
    if case.get("refuse"):
        # Refused in planning: exit 1, the weight and the reason named, nothing written.
        p = run(args, expect_rc=case["refuse_rc"])
        assert all(s in p.stderr for s in case["stderr_contains"]), p.stderr
        assert not out.exists()
        return
    run(args)
    got, exp = load_output(out), load_file(str(FIX / case["expected"]))
    if "abs_tolerance" in case:
        assert set(got) == set(exp)
        for k, e in exp.items():
            g = got[k]
            assert g.dtype == e.dtype and g.shape == e.shape, k
            d = (g.double() - e.double()).abs().max().item() if g.numel() else 0.0
            assert d <= case["abs_tolerance"], f"{case['name']}: {k}: max |a-b| {d}"
        return
    assert_close_to_expected(got, exp, case["ulp_tolerance"], case["name"])
