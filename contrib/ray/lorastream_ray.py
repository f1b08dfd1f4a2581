#!/usr/bin/env python3
"""Run one lorastream merge or convert as N parts on a Ray cluster, then stitch.

Each part is one Ray task that runs `lorastream ... --part K/N --json` on whichever node
Ray picks; every node must see the output folder at the same path (NFS, Lustre, a mounted
bucket) and the inputs. lorastream itself decides which shards each part writes (the same
plan on every node, from the inputs and options alone), so this driver only launches the
tasks and, when all have finished, runs `lorastream stitch OUT/` on the driver's machine.

A part whose worker or node dies (preemption, OOM kill, a lost node) is retried by Ray
(`max_retries`); a part that lorastream ended on a signal (exit 128+N: SIGTERM from a
scheduler, say) is retried too. A rerun part rewrites identical bytes, so retries are
safe. A part that fails on its input (exit 1) or its arguments (exit 2) is not retried:
the driver reports lorastream's error and exits 1.

    python contrib/ray/lorastream_ray.py --parts 16 [--address auto] -- \
        merge --base /shared/Llama-3-405B/ --lora /shared/adapter/ --out /shared/merged/

Library use: `run_parts(args, parts=16)` returns the parts' and stitch's JSON reports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from typing import Optional, Sequence

import ray


class PartInterrupted(Exception):
    """lorastream ended on a signal: worth a retry (Ray retries it)."""


class PartFailed(Exception):
    """lorastream refused the part (bad input or arguments): a retry would fail again."""


def _die_with_parent() -> None:
    # Linux: when the Ray worker running this task dies (SIGKILL, a lost node), the
    # lorastream child gets SIGKILL too instead of writing on as an orphan beside the retry.
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def _error_of(stdout: str, stderr: str) -> str:
    try:
        return json.loads(stdout)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return stderr.strip() or stdout.strip()


def part_command(binary: str, args: Sequence[str], k: int, n: int) -> list[str]:
    return [binary, *args, "--part", f"{k}/{n}", "--json"]


@ray.remote
def run_part(binary: str, args: Sequence[str], k: int, n: int) -> dict:
    """Runs part k of n and returns its JSON report."""
    cmd = part_command(binary, args, k, n)
    p = subprocess.run(
        cmd, capture_output=True, text=True, preexec_fn=_die_with_parent
    )
    if p.returncode == 0:
        return json.loads(p.stdout)
    message = _error_of(p.stdout, p.stderr)
    if p.returncode < 0 or p.returncode >= 128:
        raise PartInterrupted(f"part {k}/{n} interrupted (exit {p.returncode}): {message}")
    raise PartFailed(f"part {k}/{n} failed (exit {p.returncode}): {message}")


def output_of(args: Sequence[str]) -> str:
    """The output folder of a merge/convert command line: --out/-o, else convert's OUTPUT."""
    for i, a in enumerate(args):
        if a in ("--out", "-o") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    positional = [a for a in args[1:] if not a.startswith("-")]
    if args and args[0] == "convert" and len(positional) >= 2:
        return positional[-1]
    raise ValueError("cannot tell the output folder: give --out DIR/")


def stitch(binary: str, out: str) -> dict:
    p = subprocess.run([binary, "stitch", out, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise PartFailed(f"stitch failed (exit {p.returncode}): {_error_of(p.stdout, p.stderr)}")
    return json.loads(p.stdout)


def run_parts(
    args: Sequence[str],
    parts: int,
    binary: str = "lorastream",
    max_retries: int = 3,
    num_cpus: float = 1,
    out: Optional[str] = None,
) -> dict:
    """Runs `lorastream ARGS --part K/N` for every K as Ray tasks (ray.init must have been
    called), then stitches. Returns {"parts": [reports], "stitch": report}."""
    if args and args[0] not in ("merge", "convert"):
        raise ValueError(f"lorastream {args[0]} has no parts: give merge or convert")
    out = out or output_of(args)
    task = run_part.options(
        max_retries=max_retries, retry_exceptions=[PartInterrupted], num_cpus=num_cpus
    )
    reports = ray.get([task.remote(binary, list(args), k, parts) for k in range(parts)])
    return {"parts": reports, "stitch": stitch(binary, out)}


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        description="Run a lorastream merge/convert as N parts on a Ray cluster, then stitch.",
        usage="%(prog)s --parts N [options] -- merge|convert ARGS...",
    )
    ap.add_argument("--parts", type=int, required=True, help="number of parts (Ray tasks)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    ap.add_argument("--lorastream", default="lorastream", help="the lorastream binary on the nodes")
    ap.add_argument("--max-retries", type=int, default=3, help="retries of a part whose worker died")
    ap.add_argument("--cpus-per-part", type=float, default=1, help="Ray CPUs each part reserves")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then lorastream's merge/convert arguments")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if a.parts < 1 or not command:
        ap.error("give --parts N (N >= 1) and, after --, a lorastream merge or convert command")
    ray.init(address=a.address)
    try:
        result = run_parts(
            command, a.parts, a.lorastream, a.max_retries, a.cpus_per_part
        )
    except (PartFailed, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = result["stitch"]
    print(
        f"stitched {s['output']}: {s['parts']} parts, {s['shards']} shards, {s['bytes']} bytes",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
