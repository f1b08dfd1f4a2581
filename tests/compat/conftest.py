"""Shared pytest fixtures and helpers of lorastream's compatibility tests.

The compat tests run the real `lorastream` binary and check what it writes with real
clients (torch, safetensors, transformers, peft) from the pinned venv:

    PY=$(scripts/python-env.sh)
    cargo build --release
    $PY -m pytest tests/compat -q            # LORASTREAM_BIN=... to test another binary

Fixtures: `repo_root`, `fixtures_dir` (<repo>/fixtures), `lorastream` (the binary's path),
`run` (run the binary, assert its exit code), `out_dir` (an empty folder under tmp_path).
Helpers importable by test modules (`from conftest import ...`): `tensor_bytes`,
`sha256_hex`, `ST_DTYPE`, `TORCH_DTYPE`, `FLOAT_DTYPES`, `load_pth`, `load_st`,
`dir_listing`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# torch dtype <-> safetensors dtype name.
ST_DTYPE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
TORCH_DTYPE: dict[str, torch.dtype] = {v: k for k, v in ST_DTYPE.items()}
# The dtypes `--dtype` casts; everything else passes through untouched.
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long-running (multi-GB) test; still part of the default run (CI runs all)"
    )


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's elements in C order as little-endian raw bytes (any dtype, any strides,
    0-dim and zero-size included)."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def sha256_hex(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def load_pth(path: Path | str, mmap: bool = False) -> dict:
    """torch.load the way a careful user does: weights only, on CPU."""
    return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")


def load_st(path: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def dir_listing(d: Path) -> list[str]:
    """Every entry under `d` (hidden ones included), relative, sorted."""
    return sorted(p.relative_to(d).as_posix() for p in Path(d).rglob("*"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return REPO / "fixtures"


@pytest.fixture(scope="session")
def lorastream() -> Path:
    path = Path(os.environ.get("LORASTREAM_BIN", REPO / "target" / "release" / "lorastream"))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"lorastream binary not found at {path}: run `cargo build --release` "
            "or set LORASTREAM_BIN",
            pytrace=False,
        )
    return path


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


@pytest.fixture(scope="session")
def run(lorastream):
    """run(args, expect_rc=0, *, timeout=900, env=None, cwd=None) -> CompletedProcess.

    `args` are the arguments after the binary name (str or Path). Output is captured as
    text. The exit code must equal `expect_rc` (pass None to skip that check); a Rust
    panic is never acceptable, whatever the expected code."""

    def _run(
        args: Sequence[str | os.PathLike],
        expect_rc: int | None = 0,
        *,
        timeout: float = 900,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        cmd = [str(lorastream), *[os.fspath(a) for a in args]]
        full_env = {**os.environ, "RUST_BACKTRACE": "0", **(env or {})}
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace",
            timeout=timeout, env=full_env, cwd=cwd,
        )
        report = (
            f"$ {' '.join(cmd)}\nexit code {proc.returncode}\n"
            f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}"
        )
        assert "panicked" not in proc.stderr, "lorastream panicked:\n" + report
        if expect_rc is not None:
            assert proc.returncode == expect_rc, f"expected exit code {expect_rc}\n" + report
        return proc

    return _run


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """An empty folder for a test's outputs (tests check nothing else lands in it)."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def assert_only(d: Path, expected: Iterable[str]) -> None:
    """`d` contains exactly the entries `expected` (relative paths; no temp files)."""
    got = dir_listing(d)
    assert got == sorted(expected), f"unexpected contents of {d}: {got}"
