"""Tied weights stay tied: a base that stores two names as one storage (`torch.save` of a
GPT-2 state_dict: `transformer.wte.weight` and `lm_head.weight`) gives a `.pth` output in which
real `torch.load` sees one storage again, for `merge` (both names carry the merged value) and
for `convert` (byte-identical values). Bases: fixtures/peft_matrix/bases/gpt2lmbin_* (made by
fixtures/make_peft_matrix.py with real transformers)."""

from pathlib import Path

import pytest
import torch

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "peft_matrix"
TIED = ("transformer.wte.weight", "lm_head.weight")


def bin_of(dn):
    return next((FIX / "bases" / f"gpt2lmbin_{dn}").glob("*.bin"))


def shares(sd):
    a, b = (sd[k] for k in TIED)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("dn", ["f32", "f16", "bf16"])
def test_input_is_really_tied(dn):
    assert shares(torch.load(bin_of(dn), weights_only=True))


@pytest.mark.parametrize("dn", ["f32", "f16", "bf16"])
def test_convert_keeps_one_storage(run, tmp_path, dn):
    out = tmp_path / "out.pth"
    run(["convert", str(bin_of(dn)), str(out)])
    got, want = torch.load(out, weights_only=True), torch.load(bin_of(dn), weights_only=True)
    assert shares(got)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("adapter", ["repro_tied_bin_lora_on_wte", "repro_tied_bin_lora_on_lm_head"])
@pytest.mark.parametrize("dn", ["f32", "bf16"])
def test_merge_keeps_one_storage_with_the_merged_value(run, tmp_path, dn, adapter):
    out = tmp_path / "out.pth"
    base = FIX / "bases" / f"gpt2lmbin_{dn}"
    run(["merge", "--base", str(base), "--lora", str(FIX / "adapters" / adapter), "--out", str(out)])
    got = torch.load(out, weights_only=True)
    assert shares(got)
    before = torch.load(bin_of(dn), weights_only=True)
    assert not torch.equal(got[TIED[0]], before[TIED[0]]), "the merge changed nothing"
