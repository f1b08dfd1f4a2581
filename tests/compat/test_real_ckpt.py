"""Real-world checkpoints (fixtures/real/, made by fixtures/make_real_ckpt_fixtures.py with
the real torch.save): lorastream finds every tensor torch.load(weights_only=False) sees,
named by its path, bit-exactly, without running any pickled code; legacy files are read;
big-endian files and ambiguous zips are refused by name."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, load_st, tensor_bytes

REAL = REPO / "fixtures" / "real"
sys.path.insert(0, str(REPO / "fixtures"))  # real_ckpt_classes, for torch.load


def torch_tensors(obj, path="", out=None):
    """Every tensor torch.load gives, named as lorastream names them: dict keys, list and
    tuple positions, objects' attributes, joined with '.'."""
    out = {} if out is None else out
    join = lambda k: f"{path}.{k}" if path else str(k)  # noqa: E731
    if isinstance(obj, torch.Tensor):
        out[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            torch_tensors(v, join(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            torch_tensors(v, join(i), out)
    elif isinstance(obj, (argparse.Namespace, np.ndarray, np.generic, torch.device, set, bytes, complex)):
        pass
    elif hasattr(obj, "__dict__"):
        torch_tensors(vars(obj), path, out)
    elif hasattr(obj, "__slots__"):
        for k in obj.__slots__:
            torch_tensors(getattr(obj, k), join(k), out)
    return out


CONVERTIBLE = ["lightning.ckpt", "mp_rank_00_model_states.pt", "ema.pth", "mmengine_like.pth",
               "legacy_p2.pth", "legacy_p4.pth", "legacy_cuda.pth"]


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_converts_every_tensor_bit_exactly(name, run, out_dir):
    want = torch_tensors(torch.load(REAL / name, weights_only=False, map_location="cpu"))
    assert want, name
    out = out_dir / "out.safetensors"
    proc = run(["convert", REAL / name, out])
    assert f"({len(want)} tensors" in proc.stdout + proc.stderr
    got = load_st(out)
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and list(got[k].shape) == list(t.shape), k
        assert tensor_bytes(got[k]) == tensor_bytes(t), k


def test_lightning_names_and_skips(run):
    import json
    doc = json.loads(run(["inspect", REAL / "lightning.ckpt", "--json"]).stdout)
    names = {t["name"] for t in doc["tensors"]}
    assert {"state_dict.layer.weight", "optimizer_states.0.state.0.exp_avg",
            "callbacks.ModelCheckpoint.best_model_score"} <= names
    skipped = " ".join(s if isinstance(s, str) else s["name"] for s in doc["skipped"])
    for what in ["hparams (argparse.Namespace)", "device (torch.device)", "seed", "mean (numpy"]:
        assert what in skipped, what


def test_legacy_formats_are_read_not_refused(run):
    doc = __import__("json").loads(run(["inspect", REAL / "legacy_p4.pth", "--json"]).stdout)
    assert {t["name"] for t in doc["tensors"]} >= {"a", "a_view", "m_t", "nested.x"}


def test_empty_output_is_an_error_unless_allowed(run, out_dir, tmp_path):
    src = tmp_path / "no_tensors.pth"
    torch.save({"epoch": 3, "hparams": argparse.Namespace(lr=0.1)}, src)
    proc = run(["convert", src, out_dir / "out.safetensors"], expect_rc=1)
    assert "no tensors" in proc.stderr and "--allow-empty" in proc.stderr
    assert "hparams (argparse.Namespace)" in proc.stderr
    assert not list(out_dir.iterdir())
    run(["convert", src, out_dir / "out.safetensors", "--allow-empty"])
    assert load_st(out_dir / "out.safetensors") == {}


def test_big_endian_is_refused_by_name(run, out_dir):
    # torch.load swaps the bytes back: the file is valid, it is only big-endian.
    t = torch.load(REAL / "big_endian.pth", weights_only=True)
    assert t["i"].tolist() == [1, 256]
    proc = run(["convert", REAL / "big_endian.pth", out_dir / "o.safetensors"], expect_rc=1)
    assert "byteorder" in proc.stderr and "big-endian" in proc.stderr
    assert not list(out_dir.iterdir())


@pytest.mark.parametrize("name,says", [
    ("dup_data.pth", "'_amb/data/0' appears twice"),
    ("dup_pkl.pth", "'_amb/data.pkl' appears twice"),
    ("two_folders.pth", "'zzz/data.pkl' is outside the folder '_amb/'"),
])
def test_ambiguous_zips_are_refused(name, says, run, out_dir):
    proc = run(["convert", REAL / name, out_dir / "o.safetensors"], expect_rc=1)
    assert says in proc.stderr
    assert not list(out_dir.iterdir())


def test_two_folders_torch_refuses_too():
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch.load(REAL / "two_folders.pth", weights_only=True)


def test_pickled_code_never_runs(run, out_dir, tmp_path):
    """A checkpoint whose pickle calls os.system is read as data: the tensor is found, the
    call is an opaque value listed as skipped, and nothing runs."""
    import os

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pth"
    torch.save({"w": torch.arange(3.0), "payload": Evil()}, src)
    proc = run(["convert", src, out_dir / "o.safetensors"])
    assert not marker.exists()
    assert tensor_bytes(load_st(out_dir / "o.safetensors")["w"]) == tensor_bytes(torch.arange(3.0))
    doc = __import__("json").loads(run(["inspect", src, "--json"]).stdout)
    skipped = [s if isinstance(s, str) else s["name"] for s in doc["skipped"]]
    assert any("payload (posix.system)" in s or "payload (os.system)" in s for s in skipped), skipped
    assert not marker.exists()
