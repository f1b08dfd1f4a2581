#!/usr/bin/env python3
"""Single-precision GEMM rate of numpy's BLAS on this machine (all cores it may use).

  gemm_rate.py [--k 16 64 512] [--mn 4096] [--seconds 1.5] [--no-square]

Measures C[M,N] = A[M,K] @ B[K,N] in f32 for each K (M = N = --mn: the shape of a merge's
B @ A for a 4096-wide weight at rank K), and a square --mn^3 product (the peak). Reports
the best of 3 timed batches, each at least --seconds long, as GFLOP/s (2*M*N*K per product),
and (gflops_per_cpu_s) per CPU-second the process used: the per-core rate on a shared machine.
Run it with OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset so OpenBLAS picks its own kernel.
"""

import argparse
import json
import os
import time

import numpy as np


def rate(m, n, k, seconds):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    c = np.empty((m, n), np.float32)
    np.matmul(a, b, out=c)  # warm up
    best = best_cpu = 0.0
    for _ in range(3):
        reps, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            np.matmul(a, b, out=c)
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        flop = 2.0 * m * n * k * reps
        best = max(best, flop / dt)
        # Per CPU-second of this process (all its BLAS threads): what it does per core
        # when the machine is shared.
        best_cpu = max(best_cpu, flop / max(time.process_time() - c0, 1e-9))
    RATES_PER_CPU_S[f"k{k}" if k != m else "square"] = round(best_cpu / 1e9, 1)
    return best / 1e9


RATES_PER_CPU_S = {}


def blas_info():
    info = {}
    try:
        from threadpoolctl import threadpool_info

        for p in threadpool_info():
            if p.get("user_api") == "blas":
                info = {k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture", "threading_layer")}
    except Exception as e:  # threadpoolctl missing: say so
        info = {"note": f"threadpoolctl unavailable: {e}"}
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 512])
    ap.add_argument("--mn", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--no-square", action="store_true", help="only the --k products (a quick rate beside a merge)")
    a = ap.parse_args()
    out = {
        "numpy": np.__version__,
        "blas": blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "gflops": {},
    }
    for k in a.k:
        out["gflops"][f"k{k}"] = round(rate(a.mn, a.mn, k, a.seconds), 1)
    if not a.no_square:
        out["gflops"]["square"] = round(rate(a.mn, a.mn, a.mn, a.seconds), 1)
    out["gflops_per_cpu_s"] = RATES_PER_CPU_S
    out["mn"] = a.mn
    print(json.dumps(out))


if __name__ == "__main__":
    main()
