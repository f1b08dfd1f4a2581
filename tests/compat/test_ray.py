"""Partitioned outputs on a real engine: a local Ray cluster runs 4 parts of a merge
through contrib/ray's driver (one task per part, then stitch), and the stitched folder is
byte for byte the single run's, including when a part's Ray worker is SIGKILLed while it
writes a shard and Ray retries the task (max_retries).

Skipped (with the reason) only when `ray` is not importable.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO

ray = pytest.importorskip("ray", reason="ray is not importable: the Ray engine test needs it")

sys.path.insert(0, str(REPO / "contrib" / "ray"))
import lorastream_ray  # noqa: E402

LAYERS = 8
ROWS, COLS, RANK = 4096, 1024, 8


def make_inputs(root: Path) -> tuple[Path, Path]:
    """A base folder of eight [4096, 1024] f32 Linear weights (128 MiB) with a config,
    and a LoRA adapter on all of them, from a fixed seed."""
    g = torch.Generator().manual_seed(15)
    base = root / "base"
    base.mkdir()
    save_file(
        {f"layers.{i}.proj.weight": torch.randn(ROWS, COLS, generator=g) for i in range(LAYERS)},
        str(base / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (base / "config.json").write_text('{"model_type": "toy", "torch_dtype": "float32"}\n')
    ad = root / "adapter"
    ad.mkdir()
    tensors = {}
    for i in range(LAYERS):
        m = f"base_model.model.layers.{i}.proj"
        tensors[f"{m}.lora_A.weight"] = torch.randn(RANK, COLS, generator=g) * 0.01
        tensors[f"{m}.lora_B.weight"] = torch.randn(ROWS, RANK, generator=g) * 0.01
    save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    (ad / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["proj"], '
        '"fan_in_fan_out": false, "bias": "none", "use_dora": false, "use_rslora": false}\n'
    )
    return base, ad


def tree(d: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
    }


def merge_args(base: Path, ad: Path, out: Path) -> list[str]:
    return [
        "merge", "--base", str(base), "--lora", str(ad), "--device", "cpu",
        "--threads", "1", "--shard-size", "20MB", "--out", f"{out}/",
    ]


class KillFirstWriter(threading.Thread):
    """Watches `out` for the first part writing a shard (a temp file, which names the
    lorastream process) and SIGKILLs the Ray worker running it, and lorastream with it."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out = out
        self.killed: tuple[int, int] | None = None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and self.killed is None:
            try:
                names = os.listdir(self.out)
            except FileNotFoundError:
                names = []
            for n in names:
                if n.startswith(".model-") and ".lorastream-tmp-" in n:
                    pid = int(n.rsplit("-", 2)[1])
                    try:
                        stat = Path(f"/proc/{pid}/stat").read_text()
                    except OSError:
                        continue  # already done with that shard
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    try:
                        parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    if b"ray" not in parent:
                        continue  # not run by a Ray worker: never kill anything else
                    os.kill(ppid, signal.SIGKILL)  # the Ray worker: a lost worker
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.killed = (pid, ppid)
                    return
            time.sleep(0.001)


@pytest.fixture(scope="module")
def cluster():
    # Workers import the driver module by name, as on a real cluster with it installed.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO / "contrib" / "ray"), old] if p
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def test_ray_parts_with_a_killed_and_retried_part_stitch_to_the_single_runs_bytes(
    tmp_path, lorastream, run, cluster
):
    base, ad = make_inputs(tmp_path)
    single = tmp_path / "single"
    run(merge_args(base, ad, single))
    expected = tree(single)
    shards = [n for n in expected if n.startswith("model-")]
    assert len(shards) == LAYERS and "config.json" in expected

    # All 4 parts, nothing killed.
    out = tmp_path / "ray4"
    r = lorastream_ray.run_parts(merge_args(base, ad, out), 4, binary=str(lorastream))
    assert [p["part"]["part"] for p in r["parts"]] == [0, 1, 2, 3]
    assert sum(p["part"]["bytes"] for p in r["parts"]) == r["stitch"]["bytes"]
    assert tree(out) == expected, "Ray parts: not the single run's bytes"

    # A part's worker killed mid-shard: Ray retries the task, the bytes are the same.
    out = tmp_path / "killed"
    watcher = KillFirstWriter(out)
    watcher.start()
    try:
        r = lorastream_ray.run_parts(
            merge_args(base, ad, out), 4, binary=str(lorastream), max_retries=2
        )
    finally:
        watcher.stop.set()
        watcher.join()
    assert watcher.killed is not None, "no part was seen writing, so none was killed"
    assert r["stitch"]["parts"] == 4
    got = tree(out)
    assert sorted(got) == sorted(expected), sorted(set(got) ^ set(expected))
    assert got == expected, "after a killed and retried part: not the single run's bytes"


def test_a_part_that_fails_on_its_input_is_not_retried_and_names_the_error(
    tmp_path, lorastream, cluster
):
    out = tmp_path / "bad"
    args = ["merge", "--base", str(tmp_path / "missing"), "--out", f"{out}/"]
    with pytest.raises(lorastream_ray.PartFailed) as e:
        lorastream_ray.run_parts(args, 2, binary=str(lorastream), max_retries=3)
    assert "does not exist" in str(e.value) and "exit 1" in str(e.value)
