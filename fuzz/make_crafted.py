"""Hand-made inputs for the blowup classes random mutation is slow to reach, written as
fuzz/regressions/<target>/<name> (small ones, replayed by scripts/fuzz-smoke.sh), plus, with
--big DIR, the same shapes past the fuzzers' 64 KiB input cap (a real data.pkl has no such
cap) into DIR. bench/FUZZ.md says what each one did when it was made.
Run with the project venv: PY=$(scripts/python-env.sh); $PY fuzz/make_crafted.py [--big DIR]
"""

import io
import os
import struct
import sys
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
P = b"\x80\x02"  # PROTO 2


def X(s):
    """SHORT text as BINUNICODE."""
    s = s.encode()
    return b"X" + struct.pack("<I", len(s)) + s


def deep_list(n):
    # n empty lists, each APPENDed into the one below it.
    return P + b"]" * n + b"a" * (n - 1) + b"."


def deep_dict(n):
    # {"a": {"a": ... }} n deep, as a state dict: flattening recurses n times.
    return P + b"}" + (X("a") + b"}") * n + b"s" * n + b"."


def deep_tuple(n):
    return P + b"N" + b"\x85" * n + b"."


def self_dict():
    # d = {}; d["a"] = d  (memo BINPUT 0 / BINGET 0)
    return P + b"}q\x00" + X("a") + b"h\x00s."


def billion_laughs(levels):
    # d0 = {"x": 1}; d_{i+1} = {"a": d_i, "b": d_i}: 2**levels paths through shared dicts.
    s = P + b"}" + X("x") + b"K\x01s" + b"q\x00"
    for i in range(levels):
        s += b"}(" + X("a") + b"h" + bytes([i]) + X("b") + b"h" + bytes([i]) + b"uq" + bytes([i + 1])
    return s + b"."


def memo_copies(size, gets):
    # One bytes object, fetched from the memo `gets` times into a list.
    return P + b"B" + struct.pack("<I", size) + b"x" * size + b"q\x00(" + b"h\x00" * gets + b"l."


def many_keys(n, batched):
    # One dict of n distinct keys, by SETITEM each or one SETITEMS (what torch.save writes,
    # in batches): every insert searches the keys so far.
    if batched:
        return P + b"}(" + b"".join(X("k%06d" % i) + b"K\x01" for i in range(n)) + b"u."
    return P + b"}" + b"".join(X("k%06d" % i) + b"K\x01s" for i in range(n)) + b"."


def expand_zip(n):
    """A real torch.save of torch.ones(1).expand(n): a stride-0 view, one stored element."""
    buf = io.BytesIO()
    torch.save({"huge": torch.ones(1).expand(n)}, buf)
    return buf.getvalue()


def data_pkl(z):
    with zipfile.ZipFile(io.BytesIO(z)) as f:
        return f.read(next(n for n in f.namelist() if n.endswith("/data.pkl")))


def put(dirname, name, data):
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, name), "wb") as f:
        f.write(data)


reg = os.path.join(HERE, "regressions")
put(f"{reg}/torch_pickle", "self-dict", self_dict())
put(f"{reg}/torch_pickle", "billion-laughs-40", billion_laughs(40))
put(f"{reg}/torch_pickle", "expand-1e9", data_pkl(expand_zip(10**9)))
put(f"{reg}/torch_zip", "expand-1e9.pth", expand_zip(10**9))
put(f"{reg}/pickle", "self-dict-cycle", self_dict())
put(f"{reg}/pickle", "memo-copies-64k", memo_copies(32000, 16000))
if "--big" in sys.argv:
    big = sys.argv[sys.argv.index("--big") + 1]
    put(big, "pickle-deep-list-1M", deep_list(1_000_000))
    put(big, "pickle-deep-tuple-300k", deep_tuple(300_000))
    put(big, "torch_pickle-deep-dict-200k", deep_dict(200_000))
    put(big, "pickle-memo-copies-1M", memo_copies(500_000, 250_000))
    put(big, "pickle-dict-setitem-20k", many_keys(20_000, False))
    put(big, "pickle-dict-setitems-20k", many_keys(20_000, True))
