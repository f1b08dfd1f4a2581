"""Folder outputs of an HF model folder load with real transformers.

`lorastream merge --base fixtures/peft/bases/llama_f32 --lora .../adapter --out DIR/` copies the
base folder's config.json (and any tokenizer, chat template, custom code) beside the shards, so
`AutoModelForCausalLM.from_pretrained(DIR)` works and its weights are exactly the merge (the
same merge written to one .safetensors file). `--dtype bf16` rewrites config.json's dtype keys,
and the model loads in bf16; a sharded output written into an existing folder (an HF repo clone
with a README) loads the same way; with a NAME= prefix nothing is copied (a note says why).

Run: PY=$(scripts/python-env.sh); LORASTREAM_BIN=... $PY -m pytest tests/compat/test_unattended.py
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_st

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "fixtures" / "peft" / "bases" / "llama_f32"
ADAPTER = REPO / "fixtures" / "peft" / "cases" / "llama_f32" / "adapter"


def merge(run, out, *extra, expect_rc=0):
    args = ["merge", "--base", BASE, "--lora", ADAPTER, "--device", "cpu", "--out", out, *extra]
    return run(args, expect_rc=expect_rc)


def load(folder, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kw)


def assert_weights_equal(model, expected):
    sd = model.state_dict()
    assert set(expected) <= set(sd), sorted(set(expected) - set(sd))
    for k, v in expected.items():
        got = sd[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got, v), k


def test_merged_folder_loads_with_from_pretrained(run, tmp_path):
    single = tmp_path / "merged.safetensors"
    merge(run, single)
    out = tmp_path / "merged"
    p = merge(run, f"{out}/")
    assert "note: copied config.json beside the weights" in p.stderr, p.stderr
    assert json.loads((out / "config.json").read_text()) == json.loads((BASE / "config.json").read_text())
    model = load(out)
    assert_weights_equal(model, load_st(single))
    # A forward pass runs on the loaded model (the config describes these weights).
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_bf16_folder_says_bf16_and_loads_as_bf16(run, tmp_path):
    merged = tmp_path / "merged"
    merge(run, f"{merged}/")
    out = tmp_path / "bf16"
    p = run(["convert", merged, f"{out}/", "--dtype", "bf16"])
    assert "config.json dtype = \"bfloat16\"" in p.stderr, p.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    model = load(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    assert_weights_equal(model, load_st(out / "model-00001-of-00001.safetensors"))


def test_existing_repo_clone_folder_gets_a_loadable_model(run, tmp_path):
    repo = tmp_path / "clone"
    repo.mkdir()
    (repo / "README.md").write_text("# merged model\n")
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    single = tmp_path / "merged.safetensors"
    merge(run, single)
    merge(run, f"{repo}/", "--shard-size", "20KB")
    names = sorted(p.name for p in repo.iterdir())
    assert "README.md" in names and ".gitattributes" in names and "config.json" in names
    assert sum(n.startswith("model-0") for n in names) > 1, names
    assert_weights_equal(load(repo), load_st(single))
    # Again into the same folder: refused (it now holds a checkpoint) unless --overwrite.
    p = merge(run, f"{repo}/", expect_rc=1)
    assert "--overwrite" in p.stderr
    merge(run, f"{repo}/", "--overwrite")
    assert sorted(p.name for p in repo.iterdir()) == sorted(
        [n for n in names if not n.startswith("model-0")] + ["model-00001-of-00001.safetensors"]
    )
    assert_weights_equal(load(repo), load_st(single))


def test_named_component_copies_nothing(run, tmp_path):
    out = tmp_path / "named"
    p = run(["merge", "--base", f"llm={BASE}", "--lora", f"llm={ADAPTER}", "--device", "cpu", "--out", f"{out}/"])
    assert "not copied" in p.stderr, p.stderr
    assert not (out / "config.json").exists()
