"""`lorastream merge` of several adapters at once and of fused MoE experts, against real PEFT 0.21.2.

Fixtures: fixtures/make_peft_combos.py -> fixtures/peft_combos/{bases,adapters,expected,cases.json}:

- sequences (`--lora a --lora b`) must equal
  `PeftModel.from_pretrained(a).load_adapter(b).merge_and_unload(adapter_names=[a, b])`, a DoRA
  adapter after another one on the same weight included (PEFT 0.21.2 takes its norm from the
  weight with the earlier adapters unmerged and re-merged; more in test_dora_sequences.py);
- weighted combinations (`--lora a:W1 --lora b:W2 --combine TYPE [--density D]
  [--majority-sign-method M]`) must equal `add_weighted_adapter(...)` then
  `merge_and_unload(adapter_names=["combo"])`;
- 3-D experts of an `is_transposed` module ([E, in, out]) and square experts (with the flag
  that settles their layout; refused without it).

The SVD types are compared within an absolute 1e-6 on f32 bases (PEFT's own f32 SVD error;
1 ulp on 16-bit bases). DARE (`dare_linear`, `dare_ties`, and their `_svd` forms) must equal PEFT
bit for bit (`_svd`: within the SVD tolerances) given `--seed` (PEFT's `torch.manual_seed` just
before `add_weighted_adapter`) and the model's module order (`--module-order`, or a pickle base);
without a seed it is refused (exit 2), without evidence of the order too (exit 1).

Run: PY=$(scripts/python-env.sh); LORASTREAM_BIN=target/release/lorastream $PY -m pytest tests/compat/test_combos.py -q
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_merge import assert_close_to_expected, load_output, ulp_distance

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "fixtures" / "peft_combos"
CASES = json.loads((FIX / "cases.json").read_text())["cases"]
# What lorastream refuses although PEFT merges it (the fixture says why): DARE.
REFUSED = [c for c in CASES if c.get("refuse")]
MERGE = [c for c in CASES if c not in REFUSED]


def ids(cases):
    return [c["name"] for c in cases]


def args_of(case, out, with_args=True):
    a = ["merge", "--base", FIX / case["base"], "--out", out]
    for i, lora in enumerate(case["loras"]):
        w = case.get("weights")
        a += ["--lora", f"{FIX / lora}:{w[i]!r}" if w else FIX / lora]
    if with_args:
        a += case.get("args", [])
        if case.get("module_order"):
            a += ["--module-order", FIX / case["module_order"]]
    return a


def test_manifest():
    kinds = {c.get("combination_type") for c in CASES}
    assert {"cat", "linear", "ties", "magnitude_prune", "dare_linear", "svd", "ties_svd",
            "magnitude_prune_svd", "dare_ties", "dare_linear_svd", "dare_ties_svd"} <= kinds
    # DARE is compared, not only refused, in every dtype.
    for k in ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"):
        assert {c["base_dtype"] for c in MERGE if c.get("combination_type") == k} == {"f32", "f16", "bf16"}, k
    assert any(c["row"] == "dora_then_dora" and not c.get("refuse") for c in CASES)
    assert any(c["row"] == "dora_then_lora" and not c.get("refuse") for c in CASES)
    for c in CASES:
        assert (FIX / c["expected"]).is_file(), c["name"]
        if "expected_exact_svd" in c:
            assert (FIX / c["expected_exact_svd"]).is_file(), c["name"]
        assert c["changed_keys"], c["name"]


@pytest.mark.parametrize("case", MERGE, ids=ids(MERGE))
def test_combo_merge(run, tmp_path, case):
    out = tmp_path / "out.safetensors"
    run(args_of(case, out))
    exp = load_file(str(FIX / case["expected"]))
    got = load_output(out)
    if "expected_exact_svd" in case:
        # DARE's _svd forms: also against the same PEFT run with an f64 SVD (masks included).
        _assert_abs(got, load_file(str(FIX / case["expected_exact_svd"])), case["exact_svd_abs_tolerance"],
                    case["name"] + " (PEFT with an f64 SVD)")
    if "abs_tolerance" in case:
        # svd into f32: PEFT's own f32 SVD is the larger error (see the generator).
        _assert_abs(got, exp, case["abs_tolerance"], case["name"])
        return
    if "abs_or_ulp_tolerance" in case:
        assert set(got) == set(exp)
        for k, e in exp.items():
            g = got[k]
            assert g.dtype == e.dtype and g.shape == e.shape, k
            far = (ulp_distance(g, e) > case["ulp_tolerance"]) & (
                (g.double() - e.double()).abs().numpy() > case["abs_or_ulp_tolerance"])
            assert not far.any(), f"{case['name']}: {k}: {int(far.sum())} elements beyond both tolerances"
        return
    assert_close_to_expected(got, exp, case["ulp_tolerance"], case["name"])


def _assert_abs(got, exp, tol, what):
    assert set(got) == set(exp)
    for k, e in exp.items():
        g = got[k]
        assert g.dtype == e.dtype and g.shape == e.shape, k
        d = (g.double() - e.double()).abs().max().item() if g.numel() else 0.0
        assert d <= tol, f"{what}: {k}: max |a-b| {d}"


@pytest.mark.parametrize("case", [c for c in MERGE if c.get("refuse_without_args")],
                         ids=ids([c for c in MERGE if c.get("refuse_without_args")]))
def test_combo_refused_without_args(run, tmp_path, case):
    out = tmp_path / "out.safetensors"
    p = run(args_of(case, out, with_args=False), expect_rc=1)
    assert not out.exists()
    for s in case["stderr_contains_without_args"]:
        assert s.lower() in p.stderr.lower(), p.stderr


@pytest.mark.parametrize("case", REFUSED, ids=ids(REFUSED))
def test_combo_refused_by_name(run, tmp_path, case):
    out = tmp_path / "out.safetensors"
    p = run(args_of(case, out), expect_rc=case.get("refuse_rc", 2))
    assert not out.exists()
    err = p.stderr.lower()
    if case.get("combination_type"):
        assert case["combination_type"] in err, p.stderr
    must = case["stderr_contains"]
    assert all(s.lower() in err for s in must), p.stderr


def test_weight_without_combine_is_not_a_path(run, tmp_path):
    """A weight on an adapter without --combine would be silently ignored: it is refused."""
    c = next(c for c in CASES if c.get("combination_type") == "linear")
    out = tmp_path / "out.safetensors"
    a = ["merge", "--base", FIX / c["base"], "--out", out, "--lora", f"{FIX / c['loras'][0]}:0.5"]
    p = run(a, expect_rc=2)
    assert "--combine" in p.stderr and not out.exists()


def test_combine_needs_every_weight(run, tmp_path):
    c = next(c for c in CASES if c.get("combination_type") == "linear")
    out = tmp_path / "out.safetensors"
    a = ["merge", "--base", FIX / c["base"], "--out", out, "--lora", f"{FIX / c['loras'][0]}:0.5",
         "--lora", FIX / c["loras"][1], "--combine", "linear"]
    p = run(a, expect_rc=2)
    assert ":WEIGHT" in p.stderr and not out.exists()


def _square_base_with_config(tmp_path, model_type):
    c = next(c for c in MERGE if c["row"] == "experts_square" and c["base_dtype"] == "f32")
    d = tmp_path / "base"
    d.mkdir()
    (d / "model.safetensors").write_bytes((FIX / c["base"] / "model.safetensors").read_bytes())
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return c, d


def test_square_experts_settled_by_config(run, tmp_path):
    """A transformers model type whose experts are not is_transposed: [E, out, in], as PEFT."""
    c, d = _square_base_with_config(tmp_path, "qwen3_moe")
    out = tmp_path / "out.safetensors"
    run(["merge", "--base", d, "--lora", FIX / c["loras"][0], "--out", out])
    exp = load_file(str(FIX / c["expected"]))
    assert_close_to_expected(load_output(out), exp, c["ulp_tolerance"], c["name"])


def test_square_experts_of_an_is_transposed_model_type_need_its_experts_module(run, tmp_path):
    """gpt_oss experts are is_transposed, but only under its 'experts' module: this one is
    named 'moe', so nothing settles the layout."""
    c, d = _square_base_with_config(tmp_path, "gpt_oss")
    out = tmp_path / "out.safetensors"
    p = run(["merge", "--base", d, "--lora", FIX / c["loras"][0], "--out", out], expect_rc=1)
    assert "is_transposed" in p.stderr and not out.exists()
    # The flag settles it: this module has no is_transposed, so PEFT took it as [E, out, in].
    run(["merge", "--base", d, "--lora", FIX / c["loras"][0], "--out", out, "--no-fan-in-fan-out", "^moe$"])
    exp = load_file(str(FIX / c["expected"]))
    assert_close_to_expected(load_output(out), exp, c["ulp_tolerance"], c["name"])


def _dare(row="dare_linear_stack", dn="f32"):
    return next(c for c in MERGE if c["row"] == row and c["base_dtype"] == dn)


def _without(args, flag, n=1):
    i = args.index(flag)
    return args[:i] + args[i + 1 + n:]


def test_dare_needs_a_seed(run, tmp_path):
    c = _dare()
    out = tmp_path / "out.safetensors"
    p = run(_without(args_of(c, out), "--seed"), expect_rc=2)
    assert "--seed" in p.stderr and "dare_linear" in p.stderr and not out.exists()


def test_dare_needs_the_module_order(run, tmp_path):
    """A safetensors base keeps its keys sorted: nothing settles named_modules() order."""
    c = _dare()
    out = tmp_path / "out.safetensors"
    p = run(_without(args_of(c, out), "--module-order"), expect_rc=1)
    assert "--module-order" in p.stderr and "named_modules" in p.stderr and not out.exists()


def test_dare_module_order_must_name_every_module(run, tmp_path):
    c = _dare()
    order = (FIX / c["module_order"]).read_text().splitlines()
    f = tmp_path / "order.txt"
    f.write_text("\n".join(n for n in order if n != "blocks.1.up") + "\n")
    out = tmp_path / "out.safetensors"
    a = _without(args_of(c, out), "--module-order") + ["--module-order", f]
    p = run(a, expect_rc=1)
    assert "blocks.1.up" in p.stderr and str(f) in p.stderr and not out.exists()


def test_dare_order_matters(run, tmp_path):
    """The same modules listed sorted (what a safetensors file would suggest) give other masks:
    the order is evidence, not a detail. (The names may also carry PEFT's base_model.model.)"""
    c = _dare()
    order = [n for n in (FIX / c["module_order"]).read_text().splitlines() if n]
    exp = load_file(str(FIX / c["expected"]))
    for lines, same in ((sorted(order), False), (["base_model.model." + n for n in order], True)):
        f = tmp_path / "order.txt"
        f.write_text("\n".join(lines) + "\n")
        out = tmp_path / f"out_{same}.safetensors"
        run(_without(args_of(c, out), "--module-order") + ["--module-order", f])
        got = load_output(out)
        equal = all(got[k].equal(exp[k]) for k in exp)
        assert equal == same, lines


def test_dare_seed_matters(run, tmp_path):
    c = _dare()
    args = args_of(c, tmp_path / "out.safetensors")
    i = args.index("--seed")
    args[i + 1] = "1"
    run(args)
    got = load_output(tmp_path / "out.safetensors")
    exp = load_file(str(FIX / c["expected"]))
    assert not all(got[k].equal(exp[k]) for k in exp)
