#!/usr/bin/env python3
"""The CPU merge against this machine's own floors, and against PEFT, side by side in one
run (issue 13). bench/README.md says how to read the report.

  PY=$(scripts/python-env.sh)
  $PY bench/cpu_gemm.py --quick                       # tiny shapes, ~1 min: checks the harness
  $PY bench/cpu_gemm.py                               # 4 layers (3.3 GB), r=16 and r=512
  $PY bench/cpu_gemm.py --layers 4 32 --peft          # + full InternLM2-7B (15.5 GB) + PEFT at 8 layers

On a quiet 2-core machine (this one, ~1.7 GB/s disk reads): the default run about 3 min,
`--layers 4 32 --peft` about 10-12 min (32 layers ~5 min of it, PEFT ~2 min), 35 GB of disk.

Measures, in this order, and writes one markdown report plus the raw records as JSON beside
it (--results; --quick writes under --workdir, never into bench/):

  * numpy (OpenBLAS) sgemm C[4096,4096] = A[4096,K] @ B[K,4096] at K = each rank: all cores,
    1 thread, and both again with OPENBLAS_CORETYPE=Haswell (OpenBLAS's AVX2 kernel: the rate
    an AVX2-only CPU would reach), via bench/gemm_rate.py; all cores once more at the end;
  * for each --layers size, the device I/O floor for the base's bytes: `cat > /dev/null` cold
    (page cache dropped) and `dd iflag=direct` (the faster read counts), `dd oflag=direct`
    of as many bytes, one write at a time and as two halves at once (the faster counts),
    each read (`cat`, and `dd iflag=direct` where it works) and that write at once (the
    faster is shown beside the floor, not part of it), and
    `cp` (cold, then hot) beside them, writers timed up to `sync`;
  * `lorastream merge --device cpu` of the InternLM2-shaped model (bench/synth_model.py) with
    each --ranks adapter, once per CPU path (`LORASTREAM_CPU` = each --paths), cold cache:
    wall, CPU time, peak RSS, the ISA path it reports, the ratio to the floor
    max(I/O floor, FLOPs / numpy's all-core rate at K=r); every output is checked
    (bench/verify_merge.py: rows against W + s·B@A with numpy, ≤ 1 ulp; untargeted tensors
    bit-equal) and hashed, and the paths' hashes must agree (they give the same bytes);
  * with --peft: PeftModel.from_pretrained(...).merge_and_unload() + torch.save
    (bench/peft_merge.py) on a model built from the same files (--peft-layers, --peft-r),
    cold, against lorastream's auto path right before it; PEFT's tensors are compared with
    lorastream's (ulp).

Inputs are generated under --workdir (streamed to disk, base layers shared between sizes by
hard links) and deleted at the end unless --keep (kept inputs are reused by the next run).
Every record carries the 1-minute load average before and after, and the CPU time the rest
of the machine used meanwhile. Exit status: 0 when every command ran and every check
passed (targets missed are reported, not failures), 1 otherwise, 2 on bad usage.
"""

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import synth_model  # noqa: E402
import verify_merge  # noqa: E402

QUICK_SHAPE = dict(hidden=512, inter=1024, vocab=2048, heads=8, kv_heads=2)
TARGET_FLOOR = 1.15  # wall / max(floors)
TARGET_RSS_MB = 256
TARGET_PEFT = 5.0  # PEFT wall / lorastream wall


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system irq softirq steal
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / hz


def drop_caches():
    """sync + drop the page cache; False when not permitted (not root)."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def gnu_time():
    """/usr/bin/time when it is GNU time (takes -f), else None."""
    t = shutil.which("time", path="/usr/bin:/bin")
    if t and subprocess.run([t, "-f", "%M", "true"], capture_output=True).returncode == 0:
        return t
    return None


GNU_TIME = gnu_time()


CALM = {"seconds": 0}  # --calm: how long to wait for a quiet CPU before each measurement


def psi_avg10():
    """CPU pressure, share of the last 10 s some task waited for a CPU (%), or None."""
    try:
        for line in open("/proc/pressure/cpu"):
            if line.startswith("some"):
                return float(line.split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None
    return None


def wait_calm():
    """Waits up to CALM seconds for the CPU pressure to fall under 20 %; seconds waited."""
    waited = 0
    while waited < CALM["seconds"] and (psi_avg10() or 0) >= 20:
        time.sleep(2)
        waited += 2
    return waited


def measure(name, cmd, env=None, before=None, sync_path=None, cold=False):
    """Runs cmd; wall (up to `sync` of sync_path when given), user, sys, maxrss, load.
    cold: drop the page cache first (after `before`)."""
    waited = wait_calm()
    if before:
        before()
    dropped = drop_caches() if cold else None
    e = dict(os.environ)
    e.update(env or {})
    load1, psi0 = os.getloadavg()[0], psi_avg10()
    b0, t0 = busy_seconds(), time.perf_counter()
    # wait4: this command's own CPU time and peak RSS (RUSAGE_CHILDREN would give the
    # largest child so far, e.g. numpy's).
    # Peak RSS through GNU time, which forks the command from its own small process: a
    # child forked from this Python process starts its ru_maxrss at this process's RSS
    # (Linux carries the high-water mark across exec), which would overstate small ones.
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe, tempfile.NamedTemporaryFile("r") as ft:
        full = [GNU_TIME, "-f", "%M", "-o", ft.name, *cmd] if GNU_TIME else list(cmd)
        try:
            proc = subprocess.Popen([str(c) for c in full], env=e, stdout=fo, stderr=fe, text=True)
        except OSError as err:
            raise SystemExit(f"error: cannot run {cmd[0]}: {err}")
        _, status, ru = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, errs = fo.read(), fe.read()
        maxrss_kb = ru.ru_maxrss
        if GNU_TIME:
            lines = [x for x in ft.read().split() if x.isdigit()]
            maxrss_kb = int(lines[-1]) if lines else ru.ru_maxrss
    if sync_path is not None and rc == 0:
        subprocess.run(["sync", "-f", str(sync_path)])
    wall = time.perf_counter() - t0
    b1 = busy_seconds()
    user, sys_ = ru.ru_utime, ru.ru_stime
    cores = os.cpu_count() or 1
    rec = {
        "name": name,
        "cmd": " ".join(str(c) for c in cmd),
        "env": env or {},
        "rc": rc,
        "wall": round(wall, 3),
        "user": round(user, 3),
        "sys": round(sys_, 3),
        "maxrss_mb": round(maxrss_kb / 1024, 1),
        "maxrss_from": "GNU time %M" if GNU_TIME else "wait4 ru_maxrss (includes this harness's RSS at fork)",
        "other_load": round(max(0.0, (b1 - b0) - user - sys_) / (wall * cores), 3),
        "loadavg1_before": round(load1, 2),
        "loadavg1_after": round(os.getloadavg()[0], 2),
        "cache_dropped": dropped,
        "calm_wait_s": waited,
        "cpu_psi_avg10_before": psi0,
    }
    if rc != 0:
        rec["stderr"] = errs[-2000:]
    rec["stdout"] = out.strip().splitlines()[-1] if out.strip() else ""
    log(f"  {name}: wall {rec['wall']} s, cpu {user + sys_:.1f} s, rss {rec['maxrss_mb']} MB, "
        f"other load {rec['other_load']}, load avg {rec['loadavg1_before']}→{rec['loadavg1_after']}, rc {rc}")
    if rc != 0:
        log(f"    stderr: {errs.strip()[-600:]}")
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


def expected_isa(flags):
    """The path LORASTREAM_CPU=auto should pick on a CPU with these flags (compute/gemm.rs)."""
    if platform.machine() in ("aarch64", "arm64"):
        return "neon"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "scalar"


def isa_of(device):
    """'cpu (2 threads, avx512)' -> 'avx512'."""
    if not device or "(" not in device:
        return None
    return device.rsplit(",", 1)[-1].strip(" )")


def machine_info(drop_ok):
    cpu_model = platform.machine()
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith(("model name", "Model", "CPU part")) and cpu_model == platform.machine():
            cpu_model = line.split(":", 1)[1].strip()
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)  # noqa: E731
    rev = git("rev-parse", "HEAD").stdout.strip()
    dirty = git("diff", "--quiet", "HEAD", "--", "src", "kernels", "Cargo.toml", "Cargo.lock").returncode != 0
    mem = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.split(":")[0] in ("MemTotal", "MemAvailable")}
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host_kernel": platform.release(),
        "cpu_model": cpu_model,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "flags": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "fphp", "sve"}),
        "expected_auto_isa": expected_isa(flags),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_start_bytes": mem.get("MemAvailable"),
        "lorastream_rev": rev,
        "lorastream_dirty": dirty,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "can_drop_caches": drop_ok,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_bin = str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release/lorastream")
    ap.add_argument("--bin", default=default_bin,
                    help="the lorastream binary (default $CARGO_TARGET_DIR/release/lorastream)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lorastream-bench"),
                    help="generated models and outputs (default %(default)s); outside the repo")
    ap.add_argument("--layers", type=int, nargs="+", help="model sizes to run (default 4; 32 = full InternLM2-7B)")
    ap.add_argument("--ranks", type=int, nargs="+", help="adapter ranks (default 16 512)")
    ap.add_argument("--paths", nargs="+", default=["auto", "avx2"],
                    help="LORASTREAM_CPU values to run (auto = the best this CPU runs); "
                         "a path this CPU lacks is recorded with its error and skipped")
    ap.add_argument("--skip", nargs="*", default=[], metavar="L:R:PATH",
                    help="runs to leave out, e.g. 32:512:avx2")
    ap.add_argument("--peft", action="store_true", help="also run PEFT merge_and_unload against lorastream")
    ap.add_argument("--peft-layers", type=int, help="(default 8)")
    ap.add_argument("--peft-r", type=int, help="(default 512)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny shapes (hidden 512, 2 layers, r 8 and 64, PEFT at 2 layers r 64)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models (reused next time)")
    ap.add_argument("--no-hash", action="store_true", help="do not hash outputs (no cross-path check)")
    ap.add_argument("--gemm-seconds", type=float, help="length of each timed numpy batch (default 1)")
    ap.add_argument("--calm", type=float, default=0, metavar="SECONDS",
                    help="before each measurement wait up to SECONDS for the CPU pressure (PSI some avg10) to fall under 20%% (default 0)")
    ap.add_argument("--results", help="report path (default bench/RESULTS-cpu.md; --quick: WORKDIR/RESULTS-quick.md)")
    a = ap.parse_args()

    shape = dict(QUICK_SHAPE) if a.quick else {k: synth_model.FULL[k] for k in ("hidden", "inter", "vocab", "heads", "kv_heads")}
    layers = a.layers or ([2] if a.quick else [4])
    ranks = a.ranks or ([8, 64] if a.quick else [16, 512])
    peft_layers = a.peft_layers or (2 if a.quick else 8)
    peft_r = a.peft_r or (64 if a.quick else 512)
    run_peft = a.peft or a.quick
    gemm_s = a.gemm_seconds or (0.2 if a.quick else 1.0)
    mn = 512 if a.quick else 4096
    skip = set()
    for s in a.skip:
        try:
            l, r, p = s.split(":")
            skip.add((int(l), int(r), p))
        except ValueError:
            ap.error(f"--skip {s}: want LAYERS:R:PATH, e.g. 32:512:avx2")
    if any(x < 1 for x in layers + ranks + [peft_layers, peft_r]):
        ap.error("--layers, --ranks, --peft-layers and --peft-r must be ≥ 1")
    binary = Path(a.bin)
    if not os.access(binary, os.X_OK):
        ap.error(f"--bin {binary}: no executable there (cargo build --release, or pass --bin)")
    # The build of this checkout, older than its sources, would measure other code (a --bin
    # given elsewhere is taken as it is).
    if a.bin == default_bin or binary.resolve().is_relative_to(REPO.resolve()):
        srcs = [p for d in ("src", "kernels") for p in (REPO / d).rglob("*") if p.is_file()] + [REPO / "Cargo.toml"]
        newest = max(srcs, key=lambda p: p.stat().st_mtime, default=None)
        if newest and newest.stat().st_mtime > binary.stat().st_mtime:
            ap.error(f"--bin {binary} is older than {newest.relative_to(REPO)}: cargo build --release first")
    work = Path(a.workdir).resolve()
    if work == REPO or REPO in work.parents:
        ap.error(f"--workdir {work}: inside the repository; give a folder outside it (models are GBs)")
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work if work.exists() else work.parent)], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs") and not a.quick:
        ap.error(f"--workdir {work} is on {fs}: the I/O floors would measure memory; give a folder on the disk under test")
    results = Path(a.results) if a.results else (work / "RESULTS-quick.md" if a.quick else REPO / "bench/RESULTS-cpu.md")
    work.mkdir(parents=True, exist_ok=True)

    # Room on disk: the largest base (smaller bases share its layers by hard links), the
    # adapters, and one output at a time: a merge, cp or dd of the largest base, or with
    # --peft lorastream's output and PEFT's .pth of the PEFT-sized model.
    cfg = lambda l: dict(shape, layers=l)  # noqa: E731
    base_bytes = lambda l: sum(synth_model.numel(s) * 2 for _, ts in synth_model.shapes(cfg(l)) for _, s in ts)  # noqa: E731
    lora_bytes = lambda l, r: sum((o + i) * r * 2 for _, o, i in synth_model.targeted(cfg(l), synth_model.DEFAULT_TARGETS))  # noqa: E731
    big = max(layers + ([peft_layers] if run_peft else []))
    need = (base_bytes(big) + sum(lora_bytes(l, r) for l in layers for r in ranks)
            + (lora_bytes(peft_layers, peft_r) if run_peft else 0)
            + max(base_bytes(max(layers)), 2 * base_bytes(peft_layers) if run_peft else 0))
    free = shutil.disk_usage(work).free
    if need > free:
        raise SystemExit(f"error: {work}: needs about {need / 1e9:.1f} GB free, has {free / 1e9:.1f} GB "
                         "(--workdir elsewhere, or fewer --layers)")

    CALM["seconds"] = max(0.0, a.calm)
    py = sys.executable
    drop_ok = drop_caches()
    machine = machine_info(drop_ok)
    df = subprocess.run(["df", "-hP", str(work)], capture_output=True, text=True).stdout.splitlines()[-1:]
    ver = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    machine.update(quick=a.quick, shape=shape, bin=str(binary), bin_version=ver, workdir=str(work), workdir_fs=fs,
                   workdir_disk=" ".join(df[0].split()[:2]) if df else None)
    recs = {"machine": machine, "gemm": {}, "gemm_end": {}, "sizes": [], "peft": None, "errors": []}
    if not drop_ok:
        log("note: cannot drop the page cache (not root): 'cold' runs read whatever is cached")
    err = lambda msg: (recs["errors"].append(msg), log(f"ERROR: {msg}"))  # noqa: E731

    def gemm(label, env, ks=None, extra=()):
        e = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")}
        e.update(env)
        log(f"numpy sgemm, {label}")
        p = subprocess.run([py, str(HERE / "gemm_rate.py"), "--k", *map(str, ks or ranks), "--mn", str(mn), "--seconds", str(gemm_s), *extra],
                           env=e, capture_output=True, text=True)
        try:
            rec = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            rec = {"error": p.stderr[-500:]}
            err(f"gemm_rate.py ({label}) failed: {p.stderr.strip()[-300:]}")
        rec["loadavg1"] = round(os.getloadavg()[0], 2)
        return rec

    def gen_base(l):
        d = work / f"base-L{l}-h{shape['hidden']}"
        if not (d / "config.json").exists() or not (d / ".done").exists():
            log(f"generating the {l}-layer base ({base_bytes(l) / 1e9:.2f} GB) under {d}")
            args = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
            subprocess.run([py, str(HERE / "synth_model.py"), "--base", d, "--pool", work / "pool", "--layers", str(l), *args, "--json"], check=True)
            (d / ".done").touch()
        return d

    def gen_lora(l, r):
        d = work / f"lora-L{l}-r{r}-h{shape['hidden']}"
        if not (d / ".done").exists():
            shutil.rmtree(d, ignore_errors=True)
            args = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
            subprocess.run([py, str(HERE / "synth_model.py"), "--adapter", d, "--layers", str(l), "--r", str(r), *args, "--json"], check=True)
            (d / ".done").touch()
        return d

    def lorastream(name, base, lora, path, dest, r, flops, check=True):
        """One cold merge, checked; returns its record (output left at dest)."""
        shutil.rmtree(dest, ignore_errors=True)
        rec = measure(name, [binary, "merge", "--device", "cpu", "--base", base, "--lora", lora, "--out", f"{dest}/", "--json"],
                      env={"LORASTREAM_CPU": path}, cold=True)  # lorastream fsyncs its outputs itself
        rec.update({"r": r, "path": path, "flops": flops})
        try:
            rep = json.loads(rec["stdout"])
        except ValueError:
            rep = {}
        rec["device"] = rep.get("device")
        rec["isa"] = isa_of(rec["device"])
        rec["self_reported_peak_rss_mb"] = round(rep["peak_rss_bytes"] / 2**20, 1) if rep.get("peak_rss_bytes") else None
        if rec["rc"] != 0:
            rec["check"] = "not run (merge failed)"
            return rec
        want = machine["expected_auto_isa"] if path == "auto" else path
        if rec["isa"] != want:
            err(f"{name}: lorastream reports device {rec['device']!r}, expected the {want} path")
        if check:
            try:
                rec["verify"] = verify_merge.check_formula(base, lora, dest)
                rec["check"] = f"max {rec['verify']['max_ulp']} ulp, {rec['verify']['exact'] * 100:.2f}% bit-exact"
            except (verify_merge.CheckError, OSError, KeyError, ValueError) as e:
                rec["check"] = f"FAILED: {e}"
                err(f"{name}: output check failed: {e}")
            if not a.no_hash:
                rec["sha256"] = verify_merge.tree_hash(dest)
        return rec

    try:
        # ---------------------------------------------------------- compute floor
        for label, env in [("all cores", {}), ("1 thread", {"OPENBLAS_NUM_THREADS": "1"}),
                           ("all cores, AVX2 kernel", {"OPENBLAS_CORETYPE": "Haswell"}),
                           ("1 thread, AVX2 kernel", {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"})]:
            if platform.machine() not in ("x86_64", "AMD64") and "Haswell" in env.get("OPENBLAS_CORETYPE", ""):
                continue
            recs["gemm"][label] = gemm(label, env)
        rate = lambda r: recs["gemm"].get("all cores", {}).get("gflops", {}).get(f"k{r}")  # noqa: E731

        # ---------------------------------------------------------- per size
        for l in layers:
            base = gen_base(l)
            loras = {r: gen_lora(l, r) for r in ranks}
            files = sorted(str(p) for p in base.glob("*.safetensors"))
            nbytes = sum(os.path.getsize(f) for f in files)
            size = {"layers": l, "base_bytes": nbytes, "io": {}, "merge": []}
            recs["sizes"].append(size)
            log(f"{l} layers: I/O floor for {nbytes / 1e9:.2f} GB")
            io = size["io"]
            io["read_cold"] = measure("cat > /dev/null (cold)", ["sh", "-c", 'cat "$@" > /dev/null', "sh", *files], cold=True)
            # The same bytes read past the page cache (O_DIRECT, 16 MiB at a time, as
            # lorastream reads them): where the cache's page allocation costs CPU (a VM's
            # first touch of its memory), faster than cat, and then the read floor. A
            # filesystem that refuses O_DIRECT fails it: then cat's read counts alone.
            direct_read = 'for f; do dd if="$f" of=/dev/null bs=16M iflag=direct status=none || exit 1; done'
            io["read_direct"] = measure("dd iflag=direct (cold)", ["sh", "-c", direct_read, "sh", *files], cold=True)
            if io["read_direct"]["rc"] != 0:
                io["read_direct"]["skipped"] = "O_DIRECT refused here"
                io["read_direct"]["name"] += " — refused here, not counted"
            read_keys = ["read_cold"] + (["read_direct"] if io["read_direct"]["rc"] == 0 else [])
            ddout = work / "dd-floor"
            count = max(1, nbytes // (16 << 20))
            io["write_direct"] = measure("dd oflag=direct", ["dd", "if=/dev/zero", f"of={ddout}", "bs=16M", f"count={count}", "oflag=direct", "status=none"], sync_path=ddout)
            io["write_direct"]["bytes"] = count * (16 << 20)
            ddout.unlink(missing_ok=True)
            # The same bytes as two halves written at once (two O_DIRECT writes in flight, as
            # lorastream's writer keeps them): on some devices much faster than one at a time,
            # and then the floor to compare with.
            half = max(1, count // 2)
            two = f'dd if=/dev/zero of="$1" bs=16M count={half} oflag=direct conv=notrunc status=none & ' \
                  f'dd if=/dev/zero of="$1" bs=16M count={half} seek={half} oflag=direct conv=notrunc status=none & wait'
            io["write_direct_2"] = measure("dd oflag=direct, 2 in flight", ["sh", "-c", two, "sh", ddout], sync_path=ddout)
            io["write_direct_2"]["bytes"] = 2 * half * (16 << 20)
            ddout.unlink(missing_ok=True)
            # Reading and writing at once (the cold read beside the two-in-flight write):
            # what the device gives a pipeline that overlaps them. Not the floor (that
            # is each alone); beside it, it tells a disk that shares its bandwidth between
            # reads and writes from a merge that fails to overlap them.
            # With each read that works: `cat` beside the writes pays the page cache's CPU
            # (a VM's first touch of its pages) where a pipeline reading past the cache, as
            # lorastream does, does not; the faster of the two counts.
            at_once_keys = []
            for key, (read_cmd, reader) in {"read_write_at_once": ('cat "$@" > /dev/null', "cat"),
                                             "read_write_direct_at_once": (direct_read, "dd iflag=direct")}.items():
                if key == "read_write_direct_at_once" and "read_direct" not in read_keys:
                    continue
                both = f'(shift; {read_cmd}) & {two}'
                io[key] = measure(f"{reader} (cold) + dd 2 in flight, at once", ["sh", "-c", both, "sh", ddout, *files],
                                  cold=True, sync_path=ddout)
                io[key]["bytes"] = nbytes
                ddout.unlink(missing_ok=True)
                at_once_keys.append(key)
            cpdest = work / "cp-floor"

            def fresh_cpdest():
                shutil.rmtree(cpdest, ignore_errors=True)
                cpdest.mkdir()

            def cp_hot():
                fresh_cpdest()
                subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "sh", *files])

            io["cp_cold"] = measure("cp (cold)", ["cp", *files, cpdest], before=fresh_cpdest, cold=True, sync_path=cpdest)
            io["cp_hot"] = measure("cp (hot)", ["cp", *files, cpdest], before=cp_hot, sync_path=cpdest)
            shutil.rmtree(cpdest, ignore_errors=True)
            # read_direct may fail (a filesystem without O_DIRECT): marked above, not an error.
            for k in ("read_cold", "write_direct", "write_direct_2", *at_once_keys, "cp_cold", "cp_hot"):
                if io[k]["rc"] != 0:
                    err(f"{l} layers: {io[k]['name']} failed (rc {io[k]['rc']}): {io[k].get('stderr', '')[-200:]}")
            write_floor = min(io[k]["wall"] * nbytes / io[k]["bytes"] for k in ("write_direct", "write_direct_2"))
            io_floor = max(min(io[k]["wall"] for k in read_keys), write_floor)
            size["io_floor_s"] = round(io_floor, 3)
            # Scaled to the base's bytes (the dd halves round them down to 32 MiB), as the
            # write floor is.
            at_once = min(io[k]["wall"] for k in at_once_keys) * nbytes / io["write_direct_2"]["bytes"]
            size["io_at_once_s"] = round(max(at_once, io_floor), 3)

            dest = work / "merged-cpu"
            for r in ranks:
                flops = lora_flops(loras[r])
                hashes = {}
                for path in a.paths:
                    if (l, r, path) in skip:
                        continue
                    name = f"{l} layers r={r} LORASTREAM_CPU={path}"
                    log(name)
                    # numpy's all-core rate at K = r just before and just after this merge:
                    # this VM's speed drifts by 10 % and more over a run (epyc-run6: 178 at
                    # the start, 154 at the end), so the floor measured beside the merge is
                    # the fairer one; both are reported.
                    near = [gemm(f"all cores, K={r}, before the merge", {}, [r], ["--no-square"])]
                    rec = lorastream(name, base, loras[r], path, dest, r, flops)
                    near.append(gemm(f"all cores, K={r}, after the merge", {}, [r], ["--no-square"]))
                    rates = [g.get("gflops", {}).get(f"k{r}") for g in near]
                    rates = [x for x in rates if x]
                    rec["gemm_beside"] = rates
                    shutil.rmtree(dest, ignore_errors=True)
                    if rec["rc"] != 0:
                        lacks = "this CPU cannot run that path" in rec.get("stderr", "")
                        rec["skipped"] = "CPU lacks this path" if lacks else None
                        if not lacks:
                            err(f"{name}: lorastream failed (rc {rec['rc']}): {rec.get('stderr', '').strip()[-300:]}")
                    elif rec.get("sha256"):
                        hashes[path] = rec["sha256"]
                    cpu_s = rec["user"] + rec["sys"]
                    rec["gflops_wall"] = round(flops / rec["wall"] / 1e9, 1) if rec["wall"] > 0 else None
                    rec["gflops_per_cpu_s"] = round(flops / cpu_s / 1e9, 1) if cpu_s > 0 else None
                    rec["compute_floor_s"] = round(flops / (rate(r) * 1e9), 3) if rate(r) else None
                    floor = max(io_floor, rec["compute_floor_s"] or 0)
                    rec["floor_s"] = round(floor, 3)
                    rec["ratio_to_floor"] = round(rec["wall"] / floor, 3) if floor else None
                    at_once_floor = max(size["io_at_once_s"], rec["compute_floor_s"] or 0)
                    rec["ratio_to_io_at_once"] = round(rec["wall"] / at_once_floor, 3) if at_once_floor else None
                    rec["ratio_to_cp_cold"] = round(rec["wall"] / io["cp_cold"]["wall"], 3) if io["cp_cold"]["wall"] else None
                    beside = sum(rates) / len(rates) if rates else None
                    rec["compute_floor_beside_s"] = round(flops / (beside * 1e9), 3) if beside else None
                    floor_beside = max(io_floor, rec["compute_floor_beside_s"] or 0)
                    rec["ratio_to_floor_beside"] = round(rec["wall"] / floor_beside, 3) if rates else None
                    size["merge"].append(rec)
                if len(set(hashes.values())) > 1:
                    err(f"{l} layers r={r}: the CPU paths wrote different bytes: {hashes} (they must be identical)")
                elif len(hashes) > 1:
                    for m in size["merge"]:
                        if m["r"] == r and m.get("sha256"):
                            m["check"] += f"; same sha256 on {', '.join(hashes)}"

        # ---------------------------------------------------------- PEFT
        if run_peft:
            l, r = peft_layers, peft_r
            base, lora = gen_base(l), gen_lora(l, r)
            nb = sum(p.stat().st_size for p in base.glob("*.safetensors"))
            avail = next(int(x.split()[1]) * 1024 for x in open("/proc/meminfo") if x.startswith("MemAvailable"))
            pe = {"layers": l, "r": r, "base_bytes": nb}
            recs["peft"] = pe
            # PEFT holds the fp16 model, the merged weights, fp32 LoRA factors and an fp32
            # delta (2.1x the base at 8 layers last time): want 3x, under 90% of what is free.
            if 3 * nb > 0.9 * avail and not a.quick:
                pe["skipped"] = f"needs ~{3 * nb / 1e9:.1f} GB of memory, {avail / 1e9:.1f} GB available"
                err(f"PEFT comparison skipped: {pe['skipped']}")
            else:
                dest = work / "merged-peft-cmp"
                log(f"PEFT comparison, {l} layers r={r}: lorastream first")
                pe["lorastream"] = lorastream(f"{l} layers r={r} lorastream (auto)", base, lora, "auto", dest, r, lora_flops(lora))
                if pe["lorastream"]["rc"] != 0:
                    err(f"PEFT comparison: lorastream failed (rc {pe['lorastream']['rc']}): {pe['lorastream'].get('stderr', '').strip()[-300:]}")
                pth = work / "peft-merged.pth"
                pth.unlink(missing_ok=True)
                log("PEFT merge_and_unload + torch.save")
                pe["peft"] = measure(f"{l} layers r={r} PEFT", ["timeout", "1800", py, HERE / "peft_merge.py", base, lora, pth], cold=True, sync_path=pth)
                try:
                    pe["peft"]["report"] = json.loads(pe["peft"]["stdout"])
                except ValueError:
                    pe["peft"]["report"] = None
                if pe["peft"]["rc"] != 0:
                    err(f"PEFT run failed (rc {pe['peft']['rc']}): {pe['peft'].get('stderr', '').strip()[-300:]}")
                elif pe["lorastream"]["rc"] == 0:
                    try:
                        pe["agreement"] = verify_merge.compare_peft(pth, dest, lora)
                    except (verify_merge.CheckError, OSError, KeyError, RuntimeError) as e:
                        pe["agreement"] = {"ok": False, "error": str(e)}
                        err(f"PEFT vs lorastream: {e}")
                    ls_, pf = pe["lorastream"], pe["peft"]
                    pe["speedup"] = round(pf["wall"] / ls_["wall"], 2)
                    pe["memory_ratio"] = round(pf["maxrss_mb"] / ls_["maxrss_mb"], 1)
                    ph = (pf.get("report") or {}).get("seconds", {})
                    if ph.get("merge"):
                        pe["speedup_vs_merge_phase"] = round(ph["merge"] / ls_["wall"], 2)
                pth.unlink(missing_ok=True)
                shutil.rmtree(dest, ignore_errors=True)

        recs["gemm_end"]["all cores"] = gemm("all cores (end)", {})
    except KeyboardInterrupt:
        err("interrupted")
    except Exception as e:  # report what ran; the traceback says where it stopped
        err(f"harness stopped: {e!r}")
        traceback.print_exc()
    finally:
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        machine["mem_available_end_bytes"] = next(int(x.split()[1]) * 1024 for x in open("/proc/meminfo") if x.startswith("MemAvailable"))
        for d in ("merged-cpu", "merged-peft-cmp", "cp-floor", "dd-floor", "peft-merged.pth"):
            p = work / d
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if not a.keep:
            log(f"deleting the generated models under {work} (--keep keeps them)")
            for p in list(work.glob("base-L*")) + list(work.glob("lora-L*")) + [work / "pool"]:
                shutil.rmtree(p, ignore_errors=True)

    machine["busy_max_other_load"] = busy_share(recs)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".json").write_text(json.dumps(recs, indent=1))
    results.write_text(report(recs, results, ranks))
    log(f"wrote {results} and {results.with_suffix('.json').name}")
    if recs["errors"]:
        log(f"{len(recs['errors'])} error(s):")
        for e in recs["errors"]:
            log(f"  {e}")
        sys.exit(1)


def fmt(x, unit="", nd=2):
    if x is None:
        return "–"
    return f"{x:.{nd}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


BUSY = 0.1  # other_load above which a measurement shared the machine


def busy_share(recs):
    """The most any timed command had to share the CPUs (other_load)."""
    rs = [r for s in recs["sizes"] for r in list(s["io"].values()) + s["merge"]]
    pe = recs.get("peft") or {}
    rs += [pe[k] for k in ("lorastream", "peft") if pe.get(k)]
    return max([r.get("other_load", 0) for r in rs] or [0])


def report(recs, results, ranks):
    m = recs["machine"]
    g = recs["gemm"]
    L = ["# lorastream CPU merge vs this machine's sgemm and I/O floors, and vs PEFT\n"]
    L.append(f"Generated by `bench/cpu_gemm.py` on {m['date']}; raw records in `{results.with_suffix('.json').name}`. "
             "How to read each column: `bench/README.md`.\n")
    L.append("| what | value |\n| --- | --- |")
    L.append(f"| CPU | {m['cpu_model']} ({m['arch']}), {m['cores']} cores; flags: {' '.join(m['flags'])} |")
    L.append(f"| lorastream | {m.get('bin_version') or m['bin']}, rev {m['lorastream_rev'][:12]}{' + uncommitted changes in src/' if m['lorastream_dirty'] else ''}; auto path expected: {m['expected_auto_isa']} |")
    L.append(f"| load average start → end | {' '.join(map(str, m['loadavg_start']))} → {' '.join(map(str, m.get('loadavg_end', [])))} |")
    L.append(f"| memory total / available at start | {m['mem_total_bytes'] / 2**30:.1f} GiB / {m['mem_available_start_bytes'] / 2**30:.1f} GiB |")
    L.append(f"| disk under test | {m.get('workdir_disk')} ({m.get('workdir_fs')}), --workdir {m.get('workdir')} |")
    L.append(f"| page cache drop before cold runs | {'yes' if m['can_drop_caches'] else 'not permitted (cold = as found)'} |")
    L.append(f"| inputs | InternLM2-shaped (hidden {m['shape']['hidden']}, intermediate {m['shape']['inter']}, vocab {m['shape']['vocab']}), fp16, bench/synth_model.py{'; --quick' if m['quick'] else ''} |\n")
    busy = busy_share(recs)
    if busy > BUSY or m["loadavg_start"][0] > m["cores"] / 2:
        L.append(f"**Busy machine**: other work used up to {busy:.2f} of the CPUs during a measurement "
                 f"(load average {m['loadavg_start'][0]} at the start, {m['cores']} cores): these timings "
                 "are not for publishing; rerun on a quiet machine.\n")
    if recs["errors"]:
        L.append("**Errors in this run** (the numbers below them are not to be trusted):\n")
        L += [f"- {e}" for e in recs["errors"]]
        L.append("")

    L.append("## numpy sgemm, C[M,M] = A[M,K] @ B[K,M] (GFLOP/s)\n")
    L.append("| threads | " + " | ".join(f"K={k}" for k in ranks) + " | square | BLAS kernel | load avg |")
    L.append("| --- |" + " --- |" * (len(ranks) + 3))
    for label, rec in list(g.items()) + [(f"{k}, at the end", v) for k, v in recs["gemm_end"].items()]:
        gf = rec.get("gflops", {})
        arch = (rec.get("blas") or {}).get("architecture", "?")
        L.append(f"| {label} | " + " | ".join(fmt(gf.get(f"k{k}")) for k in ranks) + f" | {fmt(gf.get('square'))} | {arch} | {rec.get('loadavg1', 0):.2f} |")

    targets = []
    for s in recs["sizes"]:
        l, nb = s["layers"], s["base_bytes"]
        L.append(f"\n## {l} layers: {nb / 1e9:.2f} GB base\n")
        L.append("| I/O | wall | GB/s | CPU s | load avg before → after | other load |\n| --- | --- | --- | --- | --- | --- |")
        for k, rec in s["io"].items():
            b = rec.get("bytes", nb)
            L.append(f"| {rec['name']} | {rec['wall']} s | {b / rec['wall'] / 1e9:.2f} | {rec['user'] + rec['sys']:.1f} | {rec['loadavg1_before']} → {rec['loadavg1_after']} | {rec['other_load']} |")
        L.append(f"\nDevice I/O floor = max(the faster cold read, the faster direct write) = **{s.get('io_floor_s', 0):.2f} s**; "
                 f"reading and writing at once took {s.get('io_at_once_s', 0):.2f} s, the faster of the rows at once (not a floor of the targets: "
                 "shown to tell how much of a merge's distance to the floor is the device's).\n")
        L.append("| r | LORASTREAM_CPU | path ran | wall | CPU s | peak RSS | TFLOP | GFLOP/s | compute floor | floor | **wall / floor** | numpy all-core K=r before, after | wall / floor beside | wall / max(compute floor, I/O at once) | wall / cp cold | GFLOP/s per CPU-s | output check | load avg before → after | other load | rc |")
        L.append("|" + " --- |" * 20)
        for r in s["merge"]:
            if r.get("skipped"):
                L.append(f"| {r['r']} | {r['path']} | – | skipped: {r['skipped']} |" + " |" * 16)
                continue
            L.append(f"| {r['r']} | {r['path']} | {r['isa'] or '–'} | {r['wall']} s | {r['user'] + r['sys']:.1f} | {r['maxrss_mb']:.0f} MB | {r['flops'] / 1e12:.2f} | {fmt(r['gflops_wall'])} | {fmt(r['compute_floor_s'], ' s')} | {fmt(r['floor_s'], ' s')} | **{fmt(r['ratio_to_floor'])}** | {', '.join(fmt(x) for x in r.get('gemm_beside') or []) or '–'} | {fmt(r.get('ratio_to_floor_beside'))} | {fmt(r.get('ratio_to_io_at_once'))} | {fmt(r['ratio_to_cp_cold'])} | {fmt(r['gflops_per_cpu_s'])} | {r.get('check', '–')} | {r['loadavg1_before']} → {r['loadavg1_after']} | {r['other_load']} | {r['rc']} |")
            if r["rc"] == 0:
                targets.append((f"{l} layers r={r['r']} ({r['path']}): wall ≤ {TARGET_FLOOR} × floor", f"{r['wall']} s / {r['floor_s']} s = {r['ratio_to_floor']}×", r["ratio_to_floor"] <= TARGET_FLOOR))
                if r.get("ratio_to_floor_beside") is not None:
                    targets.append((f"{l} layers r={r['r']} ({r['path']}): wall ≤ {TARGET_FLOOR} × floor at numpy's rate beside the merge",
                                    f"{r['wall']} s / {max(s.get('io_floor_s', 0), r.get('compute_floor_beside_s') or 0):.3f} s = {r['ratio_to_floor_beside']}×",
                                    r["ratio_to_floor_beside"] <= TARGET_FLOOR))
                targets.append((f"{l} layers r={r['r']} ({r['path']}): peak RSS ≤ {TARGET_RSS_MB} MB", f"{r['maxrss_mb']:.0f} MB", r["maxrss_mb"] <= TARGET_RSS_MB))

    pe = recs.get("peft")
    if pe:
        L.append(f"\n## PEFT merge_and_unload() vs lorastream, {pe['layers']} layers, r={pe['r']} ({pe['base_bytes'] / 1e9:.2f} GB base)\n")
        if pe.get("skipped"):
            L.append(f"Skipped: {pe['skipped']}.")
        else:
            L.append("| tool | wall | CPU s | peak RSS | phases (s) | load avg before → after | other load | rc |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
            for k in ("peft", "lorastream"):
                r = pe.get(k)
                if not r:
                    continue
                ph = ", ".join(f"{a} {b}" for a, b in ((r.get("report") or {}).get("seconds") or {}).items()) if k == "peft" else (r.get("device") or "")
                L.append(f"| {'PEFT' if k == 'peft' else 'lorastream'} | {r['wall']} s | {r['user'] + r['sys']:.1f} | {r['maxrss_mb']:.0f} MB | {ph} | {r['loadavg1_before']} → {r['loadavg1_after']} | {r['other_load']} | {r['rc']} |")
            if "speedup" in pe:
                ag = pe.get("agreement") or {}
                agree = f"max {ag['max_ulp']} ulp, {ag['exact'] * 100:.4f}% bit-equal over {ag['elements']:,} elements" if ag.get("ok") else f"FAILED: {ag.get('error')}"
                L.append(f"\nSpeed-up (PEFT wall / lorastream wall): **{pe['speedup']}×** "
                         f"(PEFT's merge phase alone / lorastream wall: {pe.get('speedup_vs_merge_phase', '–')}×); "
                         f"memory ratio {pe['memory_ratio']}×. PEFT's tensors vs lorastream's: {agree}.")
                targets.append((f"≥ {TARGET_PEFT:g}× faster than PEFT ({pe['layers']} layers, r={pe['r']})", f"{pe['speedup']}×", pe["speedup"] >= TARGET_PEFT))

    L.append("\n## Targets\n")
    L.append("| target | measured | verdict |\n| --- | --- | --- |")
    for t, v, ok in targets:
        L.append(f"| {t} | {v} | {'HIT' if ok else 'MISS'} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
