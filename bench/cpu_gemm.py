#!/usr/bin/env python3
"""The CPU merge against this machine's own floors, side by side in one run (issue 13).

  PY=$(scripts/python-env.sh)
  $PY bench/cpu_gemm.py [--bin target/release/lorastream] [--out bench/out] [--layers 4]
                        [--ranks 16 512] [--paths auto avx2] [--results bench/RESULTS-cpu.md]

Measures, in this order, and writes one markdown report (plus the raw records as JSON next
to it):

  * numpy (OpenBLAS) sgemm C[4096,4096] = A[4096,K] @ B[K,4096] at K = each rank: all cores,
    1 thread, and all cores with OPENBLAS_CORETYPE=Haswell (OpenBLAS's AVX2 kernel: the rate
    an AVX2-only CPU would reach), via bench/gemm_rate.py;
  * the device I/O floor for the base's bytes: `cat > /dev/null` cold (page cache dropped)
    and `dd oflag=direct` of as many bytes, and `cp` (cold, then hot) with `sync` beside them;
  * `lorastream merge` of the InternLM2-shaped model (bench/synth_model.py: 4 layers by
    default) with an r=16 and an r=512 adapter, once per CPU path (`LORASTREAM_CPU`), cold
    cache: wall, CPU time, peak RSS, GFLOP/s (wall and per CPU-second), the ratio to the
    floor max(I/O floor, FLOPs / numpy's all-core rate at K=r).

Every record carries the load: the CPU time the rest of the machine used meanwhile (from
/proc/stat, minus the command's own) over wall x cores, and the 1-minute load average. The
machine may be shared: compare the per-CPU-second rates when the load is high. The inputs
are generated under --out once and reused.
"""

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz


def can_drop():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure(name, cmd, env=None, before=None, sync_path=None):
    """Runs cmd; wall (up to `sync` of sync_path when given), user, sys, maxrss, load."""
    if before:
        before()
    e = dict(os.environ)
    e.update(env or {})
    load1 = os.getloadavg()[0]
    b0, t0 = busy_seconds(), time.perf_counter()
    # wait4: this command's own CPU time and peak RSS (RUSAGE_CHILDREN would give the
    # largest child so far, e.g. numpy's).
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, env=e, stdout=fo, stderr=fe, text=True)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        p = subprocess.CompletedProcess(cmd, proc.returncode, fo.read(), fe.read())
    if sync_path is not None:
        subprocess.run(["sync", "-f", str(sync_path)])
    wall = time.perf_counter() - t0
    b1 = busy_seconds()
    user, sys_ = ru.ru_utime, ru.ru_stime
    cores = os.cpu_count() or 1
    rec = {
        "name": name,
        "cmd": " ".join(str(c) for c in cmd),
        "env": env or {},
        "rc": p.returncode,
        "wall": round(wall, 3),
        "user": round(user, 3),
        "sys": round(sys_, 3),
        "maxrss_mb": round(ru.ru_maxrss / 1024, 1),
        "other_load": round(max(0.0, (b1 - b0) - user - sys_) / (wall * cores), 3),
        "loadavg1_before": load1,
    }
    if p.returncode != 0:
        rec["stderr"] = p.stderr[-2000:]
    rec["stdout"] = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    print(f"  {name}: wall {rec['wall']} s, cpu {user + sys_:.1f} s, rss {rec['maxrss_mb']} MB, "
          f"other load {rec['other_load']}, rc {p.returncode}", file=sys.stderr)
    return rec


def safetensors_shapes(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    return {k: v["shape"] for k, v in h.items() if k != "__metadata__"}


def lora_flops(adapter):
    """2 * r * out * in per targeted weight (the B @ A product of the merge)."""
    shapes = safetensors_shapes(Path(adapter) / "adapter_model.safetensors")
    total = 0
    for k, s in shapes.items():
        if k.endswith("lora_A.weight"):
            b = shapes.get(k.replace("lora_A", "lora_B"))
            if b:
                r, fan_in = s[0], 1
                for d in s[1:]:
                    fan_in *= d
                total += 2 * r * b[0] * fan_in
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release/lorastream"))
    ap.add_argument("--out", default=str(REPO / "bench/out"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--paths", nargs="+", default=["auto", "avx2"],
                    help="LORASTREAM_CPU values to run (auto = the best this CPU runs); "
                         "a path this CPU lacks is recorded with its error (rc 1)")
    ap.add_argument("--results", default=str(REPO / "bench/RESULTS-cpu.md"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    drop = can_drop()

    def drop_cache():
        if drop:
            can_drop()

    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    flags = set()
    for l in open("/proc/cpuinfo"):
        if l.startswith("flags") or l.startswith("Features"):
            flags |= set(l.split(":", 1)[1].split())
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src", "kernels", "Cargo.toml"]).returncode != 0
    machine = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "flags": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "fphp", "sve"}),
        "lorastream_rev": rev + ("+dirty" if dirty else ""),
        "loadavg_start": os.getloadavg(),
        "can_drop_caches": drop,
    }
    recs = {"machine": machine, "gemm": {}, "io": {}, "merge": []}

    # --- compute floor: numpy sgemm at K = r
    ks = [str(r) for r in a.ranks]
    base_env = {"OPENBLAS_CORETYPE": "", "OPENBLAS_L2_SIZE": ""}
    for label, env in [("all cores", {}), ("1 thread", {"OPENBLAS_NUM_THREADS": "1"}),
                       ("all cores, AVX2 kernel", {"OPENBLAS_CORETYPE": "Haswell"}),
                       ("1 thread, AVX2 kernel", {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"})]:
        e = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        e.update(env)
        print(f"numpy sgemm, {label}", file=sys.stderr)
        p = subprocess.run([py, str(HERE / "gemm_rate.py"), "--k", *ks, "--seconds", "1"], env=e, capture_output=True, text=True)
        try:
            recs["gemm"][label] = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception:
            recs["gemm"][label] = {"error": p.stderr[-500:]}
        recs["gemm"][label]["loadavg1"] = os.getloadavg()[0]
    del base_env

    # --- inputs
    base = out / f"base-L{a.layers}"
    if not (base / "config.json").exists():
        subprocess.run([py, str(HERE / "synth_model.py"), "--base", str(base), "--pool", str(out / "pool"), "--layers", str(a.layers), "--json"], check=True)
    loras = {}
    for r in a.ranks:
        d = out / f"lora-L{a.layers}-r{r}"
        if not (d / "adapter_model.safetensors").exists():
            subprocess.run([py, str(HERE / "synth_model.py"), "--adapter", str(d), "--layers", str(a.layers), "--r", str(r), "--json"], check=True)
        loras[r] = d
    files = sorted(str(p) for p in base.glob("*.safetensors"))
    nbytes = sum(os.path.getsize(f) for f in files)

    # --- device I/O floor and cp
    print("I/O floor", file=sys.stderr)
    recs["io"]["read_cold"] = measure("cat > /dev/null (cold)", ["sh", "-c", 'cat "$@" > /dev/null', "sh", *files], before=drop_cache)
    ddout = out / "dd-floor"
    recs["io"]["write_direct"] = measure("dd oflag=direct", ["dd", "if=/dev/zero", f"of={ddout}", "bs=16M", f"count={nbytes // (16 << 20)}", "oflag=direct", "status=none"], sync_path=ddout)
    ddout.unlink(missing_ok=True)
    cpdest = out / "cp-floor"

    def cp_cold():
        subprocess.run(["rm", "-rf", str(cpdest)])
        cpdest.mkdir()
        drop_cache()

    def cp_hot():
        subprocess.run(["rm", "-rf", str(cpdest)])
        cpdest.mkdir()
        subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "sh", *files])

    recs["io"]["cp_cold"] = measure("cp (cold)", ["cp", *files, str(cpdest)], before=cp_cold, sync_path=cpdest)
    recs["io"]["cp_hot"] = measure("cp (hot)", ["cp", *files, str(cpdest)], before=cp_hot, sync_path=cpdest)
    subprocess.run(["rm", "-rf", str(cpdest)])
    io_floor = max(recs["io"]["read_cold"]["wall"], recs["io"]["write_direct"]["wall"])

    # --- the merges
    dest = out / "merged-cpu"
    for r in a.ranks:
        flops = lora_flops(loras[r])
        for path in a.paths:
            name = f"merge r={r} LORASTREAM_CPU={path}"
            print(name, file=sys.stderr)

            def before():
                subprocess.run(["rm", "-rf", str(dest)])
                drop_cache()

            rec = measure(name, [a.bin, "merge", "--device", "cpu", "--base", str(base), "--lora", str(loras[r]), "--out", f"{dest}/", "--json"],
                          env={"LORASTREAM_CPU": path}, before=before)  # lorastream fsyncs its outputs itself
            subprocess.run(["rm", "-rf", str(dest)])
            rec.update({"r": r, "path": path, "flops": flops})
            try:
                rec["device"] = json.loads(rec["stdout"]).get("device")
            except Exception:
                rec["device"] = None
            cpu_s = rec["user"] + rec["sys"]
            rec["gflops_wall"] = round(flops / rec["wall"] / 1e9, 1) if rec["wall"] > 0 else None
            rec["gflops_per_cpu_s"] = round(flops / cpu_s / 1e9, 1) if cpu_s > 0 else None
            rate = recs["gemm"].get("all cores", {}).get("gflops", {}).get(f"k{r}")
            rec["compute_floor_s"] = round(flops / (rate * 1e9), 2) if rate else None
            floor = max(io_floor, rec["compute_floor_s"] or 0)
            rec["floor_s"] = round(floor, 2)
            rec["ratio_to_floor"] = round(rec["wall"] / floor, 2) if floor else None
            rec["ratio_to_cp_cold"] = round(rec["wall"] / recs["io"]["cp_cold"]["wall"], 2)
            recs["merge"].append(rec)
    machine["loadavg_end"] = os.getloadavg()

    # --- report
    res = Path(a.results)
    res.with_suffix(".json").write_text(json.dumps(recs, indent=1))
    g = recs["gemm"]
    L = []
    L.append("# lorastream CPU merge vs this machine's sgemm and I/O floors\n")
    L.append(f"Generated by `bench/cpu_gemm.py` on {machine['date']}; raw records in `{res.with_suffix('.json').name}`.\n")
    L.append("| what | value |\n| --- | --- |")
    L.append(f"| CPU | {machine['cpu_model']}, {machine['cores']} cores; {' '.join(machine['flags'])} |")
    L.append(f"| lorastream | rev {machine['lorastream_rev']} |")
    L.append(f"| load average start → end | {' '.join(f'{x:.2f}' for x in machine['loadavg_start'])} → {' '.join(f'{x:.2f}' for x in machine['loadavg_end'])} |")
    L.append(f"| page cache drop | {'yes' if drop else 'not permitted (cold = as found)'} |")
    L.append(f"| inputs | InternLM2-shaped, {a.layers} layers, {nbytes / 1e9:.2f} GB base (bench/synth_model.py) |\n")
    L.append("## numpy sgemm, C[4096,4096] = A[4096,K] @ B[K,4096] (GFLOP/s)\n")
    L.append("| threads | " + " | ".join(f"K={k}" for k in ks) + " | 4096³ | BLAS | load avg |")
    L.append("| --- |" + " --- |" * (len(ks) + 3))
    for label, rec in g.items():
        gf = rec.get("gflops", {})
        arch = (rec.get("blas") or {}).get("architecture", "?")
        L.append(f"| {label} | " + " | ".join(str(gf.get(f"k{k}", "–")) for k in ks) + f" | {gf.get('square', '–')} | {arch} | {rec.get('loadavg1', 0):.2f} |")
    L.append("\n## I/O floor for the base's bytes\n")
    L.append("| measured | wall | GB/s | CPU s | load |\n| --- | --- | --- | --- | --- |")
    for k, rec in recs["io"].items():
        L.append(f"| {rec['name']} | {rec['wall']} s | {nbytes / rec['wall'] / 1e9:.2f} | {rec['user'] + rec['sys']:.1f} | {rec['other_load']} |")
    L.append(f"\nDevice I/O floor = max(read cold, write direct) = {io_floor:.2f} s.\n")
    L.append("## lorastream merge (cold cache, outputs synced)\n")
    L.append("| r | LORASTREAM_CPU | device | wall | CPU s | peak RSS | TFLOP | GFLOP/s wall | numpy K=r all cores | merge / numpy (wall) | GFLOP/s per CPU-s | numpy per CPU-s (all cores / 1 thread, same kernel class) | merge / numpy (per CPU-s) | compute floor | floor | wall / floor | wall / cp cold | load | rc |")
    L.append("|" + " --- |" * 19)
    for m in recs["merge"]:
        rate = g.get("all cores", {}).get("gflops", {}).get(f"k{m['r']}")
        share = f"{m['gflops_wall'] / rate:.2f}" if rate and m.get("gflops_wall") else "–"
        pc = lambda label: g.get(label, {}).get("gflops_per_cpu_s", {}).get(f"k{m['r']}")
        # The better of numpy's 1-thread and all-core rates per CPU-second (OpenBLAS's
        # threads spin while they wait, which its all-core CPU time counts).
        kern = ["all cores, AVX2 kernel", "1 thread, AVX2 kernel"] if m["path"] == "avx2" else ["all cores", "1 thread"]
        ref = max([x for x in map(pc, kern) if x] or [0]) or None
        cshare = f"{m['gflops_per_cpu_s'] / ref:.2f}" if ref and m.get("gflops_per_cpu_s") else "–"
        L.append(f"| {m['r']} | {m['path']} | {m['device']} | {m['wall']} s | {m['user'] + m['sys']:.1f} | {m['maxrss_mb']:.0f} MB | {m['flops'] / 1e12:.2f} | {m['gflops_wall']} | {rate} | {share} | {m['gflops_per_cpu_s']} | {' / '.join(str(pc(x)) for x in kern)} | {cshare} | {m['compute_floor_s']} s | {m['floor_s']} s | {m['ratio_to_floor']} | {m['ratio_to_cp_cold']} | {m['other_load']} | {m['rc']} |")
    L.append("\n`load`: CPU time the rest of the machine used during the measurement over wall × cores. "
             "`per CPU-s`: FLOPs over the CPU time the command itself used (the merge's includes its "
             "decoding, rounding, encoding and I/O system time; numpy's is the GEMM alone): the fair "
             "comparison when others share the machine. The AVX2 row is compared with OpenBLAS's AVX2 "
             "(Haswell) kernel. `merge / numpy (wall)`: the merge's wall rate over numpy's all-core rate at "
             "K=r (I/O is inside the merge's wall; the target is ≥ 0.85 where the merge is compute-bound, "
             "r ≥ 64).")
    res.write_text("\n".join(L) + "\n")
    print(res)


if __name__ == "__main__":
    main()
