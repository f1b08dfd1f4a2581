"""The command line as a script meets it, checked with real clients.

- Every `--json` outcome (success, runtime failure, usage error found by lorastream or by
  its argument parser) is one object that Python's `json.loads` reads from stdout, with the
  documented keys, a `kind` from the README's table and the process's exit code.
- `inspect` of a PEFT adapter folder agrees with PEFT's own `LoraConfig` (r, alpha, scale,
  targets) and with safetensors (parameter count).
- A reader that closes stdout early ends the command quietly (exit 0, nothing on stderr).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from peft import LoraConfig
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
PEFT = REPO / "fixtures" / "peft"
BASE = PEFT / "bases" / "llama_f32"
ADAPTER = PEFT / "cases" / "llama_f32" / "adapter"


def readme_kinds() -> list[str]:
    text = (REPO / "README.md").read_text()
    table = text.split("| kind | meaning |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)


def one_object(proc: subprocess.CompletedProcess) -> dict:
    doc = json.loads(proc.stdout)  # raises on anything but exactly one JSON document
    assert isinstance(doc, dict), proc.stdout
    assert doc["exit_code"] == proc.returncode, doc
    return doc


def test_json_failures_and_successes_have_one_shape(run, tmp_path):
    kinds = readme_kinds()
    assert {"usage", "not_found", "io", "input", "plan", "device", "internal", "interrupted"} == set(kinds)
    gone = tmp_path / "gone.safetensors"
    bad = REPO / "fixtures" / "io" / "bad" / "st_out_of_range.safetensors"
    cases = [
        (["inspect", gone, "--json"], 1, "not_found"),
        (["convert", bad, tmp_path / "o.pth", "--json"], 1, "input"),
        (["convert", BASE, tmp_path / "o.txt", "--json"], 2, "usage"),
        (["merge", "--json", "--no-such-flag"], 2, "usage"),
        (["merge", "--lora", ADAPTER, "-o", tmp_path / "m.pth", "--json"], 2, "usage"),
        (["verify", gone, "--base", BASE, "--json"], 2, "not_found"),
        (["diff", BASE, gone, "--json"], 2, "not_found"),
    ]
    for args, rc, kind in cases:
        doc = one_object(run(args, expect_rc=rc))
        assert set(doc) == {"ok", "error", "exit_code"}, doc
        assert doc["ok"] is False
        assert set(doc["error"]) == {"kind", "message", "file", "tensor"}, doc
        assert doc["error"]["kind"] == kind and kind in kinds, doc
        assert doc["error"]["message"], doc
    doc = one_object(run(["convert", bad, tmp_path / "o.pth", "--json"], expect_rc=1))
    assert doc["error"]["file"] == str(bad) and doc["error"]["tensor"] == "oob_tensor", doc
    out = tmp_path / "m.safetensors"
    doc = one_object(run(["merge", "--base", BASE, "--lora", ADAPTER, "-o", out, "--json"]))
    assert doc["ok"] is True and doc["merged"] > 0 and doc["bytes"] == sum(
        t.numel() * t.element_size() for t in load_file(str(out)).values()
    ), doc


@pytest.mark.parametrize("case", ["llama_f32", "llama_rslora", "dora_linear", "llama_rank_alpha_pattern"])
def test_inspect_describes_the_adapter_as_peft_reads_it(run, case):
    folder = PEFT / "cases" / case / "adapter"
    cfg = LoraConfig.from_pretrained(str(folder))
    doc = one_object(run(["inspect", folder, "--json"]))
    a = doc["adapter"]
    assert a["type"] == ("DoRA" if cfg.use_dora else "LoRA")
    assert a["r"] == cfg.r and a["alpha"] == cfg.lora_alpha
    want = cfg.lora_alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
    assert a["scale"] == pytest.approx(want, rel=1e-12)
    targets = cfg.target_modules
    assert set(a["targets"]) == (set(targets) if not isinstance(targets, str) else {targets})
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert a["parameters"] == sum(t.numel() for t in tensors.values())
    text = run(["inspect", folder]).stdout
    assert f"r {cfg.r}, alpha {cfg.lora_alpha}," in text, text
    assert f"parameters: {a['parameters']} " in text, text


def test_a_closed_stdout_is_a_quiet_end(lorastream, tmp_path):
    # Many tensors: more table than a pipe holds, so the writer meets the closed pipe.
    from safetensors.torch import save_file
    import torch

    many = tmp_path / "many.safetensors"
    save_file({f"model.layers.{i}.mlp.a_rather_long_projection_name.weight": torch.zeros(1) for i in range(5000)},
              str(many))
    proc = subprocess.Popen([str(lorastream), "inspect", str(many)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert first.startswith("name"), first
    assert proc.returncode == 0, err
    assert err == "", err
    # Natural order: layers.2 before layers.10.
    doc = json.loads(subprocess.run([str(lorastream), "inspect", str(many), "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    names = [t["name"] for t in doc["tensors"]]
    assert names[:3] == [f"model.layers.{i}.mlp.a_rather_long_projection_name.weight" for i in range(3)]
