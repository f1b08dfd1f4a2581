"""Metadata speed of a PyTorch .pth with many tiny tensors: `lorastream inspect --json`
against `torch.load(weights_only=True, mmap=True)`, side by side in one run.

Makes (once, cached) a state dict of N tiny tensors with real torch.save, then times each
reader in its own process (best of --repeat runs) and reports wall time and peak RSS
(ru_maxrss of the child, from wait4). Usage:

    PY=$(scripts/python-env.sh)
    $PY bench/metadata.py --bin target/release/lorastream [--tensors 140000] [--out bench/RESULTS-metadata.md]
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

TORCH_LOAD = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True, mmap=True)
n = sum(1 for v in sd.values() if isinstance(v, torch.Tensor))
print(n)
"""


def make(path, n):
    import torch

    sd = {}
    for i in range(n):
        # Tiny tensors of a few shapes and dtypes, named like a model's.
        layer, j = divmod(i, 7)
        name = f"model.layers.{layer}.block.{j}.weight"
        sd[name] = torch.full((2, 3) if j % 2 else (4,), float(i), dtype=torch.bfloat16 if j % 3 else torch.float32)
    torch.save(sd, path)


def run_one(cmd):
    """(seconds, peak RSS bytes) of one child process, its stdout discarded."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.execvp(cmd[0], cmd)
    t = time.perf_counter()
    _, status, ru = os.wait4(pid, 0)
    dt = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed with {status}")
    return dt, ru.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tensors", type=int, default=140_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--file", help="where the .pth goes (default: a cache in /tmp)")
    ap.add_argument("--out", help="write a markdown result here")
    a = ap.parse_args()

    import torch

    path = a.file or os.path.join(tempfile.gettempdir(), f"lorastream-meta-{a.tensors}.pth")
    if not os.path.exists(path):
        make(path, a.tensors)
    size = os.path.getsize(path)

    # Both readers must see the same number of tensors.
    got = subprocess.run([a.bin, "inspect", "--json", path], capture_output=True, check=True)
    import json

    n_ours = len(json.loads(got.stdout)["tensors"])
    n_torch = int(subprocess.run([sys.executable, "-c", TORCH_LOAD, path], capture_output=True, check=True, text=True).stdout)
    assert n_ours == n_torch == a.tensors, (n_ours, n_torch, a.tensors)

    rows = []
    for label, cmd in [
        ("lorastream inspect --json", [a.bin, "inspect", "--json", path]),
        ("torch.load(weights_only=True, mmap=True)", [sys.executable, "-c", TORCH_LOAD, path]),
    ]:
        runs = [run_one(cmd) for _ in range(a.repeat)]
        best = min(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        rows.append((label, best, rss))
        print(f"{label:45s} {best:8.2f} s  peak RSS {rss / 2**20:8.1f} MiB", flush=True)

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = [
        "# Metadata benchmark: many tiny tensors in one .pth",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- rev: {rev}",
        f"- machine: {platform.machine()}, {cpu}, {os.cpu_count()} CPUs (shared with other work)",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- file: {a.tensors} tensors written by torch.save, {size / 2**20:.1f} MiB",
        f"- best of {a.repeat} runs each, page cache warm; peak RSS = ru_maxrss of the process",
        "",
        "| reader | seconds | peak RSS MiB |",
        "|---|---:|---:|",
    ]
    text += [f"| {l} | {s:.2f} | {r / 2**20:.1f} |" for l, s, r in rows]
    text += ["", "Reproduce: `$PY bench/metadata.py --bin target/release/lorastream --out bench/RESULTS-metadata.md`", ""]
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(text))


if __name__ == "__main__":
    main()
