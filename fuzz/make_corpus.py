"""Seed corpora for the pickle targets: real torch.save pickles.

Writes, under fuzz/seeds/ (or the folder given as the first argument):
  pickle/ and torch_pickle/  the data.pkl of every torch.save here (protocols 2-5, the
                             layouts torch writes: plain, nested, shared storages, views,
                             Parameters, non-tensor entries, all dtypes) and of the
                             fixtures/io .pth files;
  torch_zip/                 the whole torch.save zips of protocols 2-5.
Storage keys stay 0..3 so the torch_pickle target's wrapper has records for them.
Run with the project venv: PY=$(scripts/python-env.sh); $PY fuzz/make_corpus.py
"""

import collections
import glob
import io
import os
import sys
import zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "seeds")


def state_dicts():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, generator=g)
    yield "plain", {"w": torch.randn(2, 3, generator=g), "b": torch.zeros(3)}
    yield "ordered", collections.OrderedDict(
        [("layer.weight", torch.randn(4, 4, generator=g).half()), ("layer.bias", torch.ones(4))]
    )
    yield "nested", {"model": {"a": torch.arange(6).reshape(2, 3)}, "epoch": 3, "lr": 0.1, "name": "x"}
    yield "shared", {"x": base, "y": base[1:3], "t": base.t()}
    yield "views", {"col": base[:, 1], "exp": torch.ones(1, 3).expand(4, 3), "s": base[::2, ::3]}
    yield "param", {"p": torch.nn.Parameter(torch.randn(2, 2, generator=g))}
    yield "dtypes", {
        str(d).split(".")[1]: torch.ones(2, dtype=d)
        for d in (torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool)
    }
    yield "scalar_empty", {"s": torch.tensor(1.5), "e": torch.zeros(0, 4)}
    yield "misc", {"w": torch.ones(1), "list": [1, 2, (3, None)], "set": {1, 2}, "bytes": b"ab", "big": 2**70}


def data_pkl(zbytes):
    with zipfile.ZipFile(io.BytesIO(zbytes)) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        return z.read(name)


def put(sub, name, data):
    os.makedirs(os.path.join(OUT, sub), exist_ok=True)
    with open(os.path.join(OUT, sub, name), "wb") as f:
        f.write(data)


for proto in (2, 3, 4, 5):
    for name, sd in state_dicts():
        buf = io.BytesIO()
        torch.save(sd, buf, pickle_protocol=proto)
        z = buf.getvalue()
        pkl = data_pkl(z)
        put("pickle", f"p{proto}-{name}.pkl", pkl)
        put("torch_pickle", f"p{proto}-{name}.pkl", pkl)
        if name in ("plain", "shared", "views", "misc"):
            put("torch_zip", f"p{proto}-{name}.pth", z)

for path in glob.glob(os.path.join(HERE, "..", "fixtures", "io", "**", "*.pth"), recursive=True):
    try:
        pkl = data_pkl(open(path, "rb").read())
    except (zipfile.BadZipFile, StopIteration):
        continue
    name = "fx-" + os.path.basename(path).replace(".pth", ".pkl")
    put("pickle", name, pkl)
    put("torch_pickle", name, pkl)
