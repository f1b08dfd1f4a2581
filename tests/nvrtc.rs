//! The CUDA backend, as far as the machine running the tests allows:
//!
//! - With libnvrtc (`scripts/nvrtc-lib.sh` installs it from PyPI; no GPU, driver or toolkit
//!   needed): every kernel of `kernels/merge.cu` compiles to PTX for compute_80 and
//!   compute_90, and to cubins for sm_80 and sm_90 (NVRTC's built-in ptxas: inline PTX and
//!   register allocation are checked, spills reported). Without libnvrtc the test prints a
//!   note and passes, unless `LORASTREAM_REQUIRE_NVRTC=1`, which makes it fail.
//! - With a C++20 compiler: the kernels themselves, compiled for the CPU by
//!   tests/gpu/emu (a block is 256 threads and a barrier), bit for bit against a sequential
//!   reference of the CPU path's arithmetic.
//! - Without a usable GPU: `--device cuda` exits 1 with one clear line, `--device auto`
//!   merges on the CPU (byte for byte what `--device cpu` writes) and says so in one line.
//! - With a GPU: the CUDA backend against the CPU backend on random tensors (every float
//!   dtype, both layouts, DoRA on rows and columns, round-delta-first, replacements, several
//!   steps, ranks past 256, band splits), at most 1 ulp apart. Skipped without a GPU unless
//!   `LORASTREAM_REQUIRE_GPU=1` (tests/gpu/run.sh sets it).
//! - `kernel_bench` (ignored; tests/gpu/run.sh runs it): the fused kernel alone.

use lorastream::Dtype;
use lorastream::compute::cpu::CpuBackend;
use lorastream::compute::cuda::{self, CudaBackend, CudaOptions, KERNEL_NAMES};
use lorastream::compute::{DeltaBackend, Source, Task, WorkItem};
use lorastream::dtype::{decode_f32, encode_f32};
use lorastream::error::Result;
use lorastream::plan::checked::CheckedMerge;
use lorastream::plan::merge_types::{DeltaLayout, LoraStep, Step};
use lorastream::sink::{MemorySink, OutTensor};
use lorastream::source::{MappedFile, TensorData, TensorEntry};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `w` with `steps` merged by `be` and written as `out`: a run of one item.
fn merge(be: &dyn DeltaBackend, w: &TensorEntry, steps: &[Step], out: Dtype) -> Result<Vec<u8>> {
    let out = OutTensor {
        name: w.name.clone(),
        dtype: out,
        shape: w.shape.clone(),
    };
    let item = WorkItem {
        out: &out,
        task: Task::Write {
            from: Source::Merge(CheckedMerge::new(w, steps, &out)?),
            rows: None,
        },
    };
    let mut sink = MemorySink::default();
    be.run(&[item], &mut sink, &mut |_, _| {})?;
    Ok(sink.0)
}

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn repo() -> PathBuf {
    std::env::var("LORASTREAM_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn bin() -> PathBuf {
    std::env::var("LORASTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_lorastream")))
}

// ---------------------------------------------------------------------------------------
// NVRTC

#[test]
fn kernels_compile_with_nvrtc() {
    if !cuda::nvrtc_present() {
        let ld = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        assert!(
            !env_on("LORASTREAM_REQUIRE_NVRTC"),
            "LORASTREAM_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH={ld:?}); \
             put the folder scripts/nvrtc-lib.sh prints on LD_LIBRARY_PATH"
        );
        eprintln!(
            "note: libnvrtc not found, kernels/merge.cu NOT compiled (scripts/nvrtc-lib.sh provides it)"
        );
        return;
    }
    eprintln!("NVRTC {:?}", cuda::nvrtc_version());
    for cc in ["80", "90"] {
        let c = cuda::compile(&format!("compute_{cc}"), &[])
            .unwrap_or_else(|e| panic!("compute_{cc}: {e}"));
        assert!(!c.is_cubin);
        let ptx = c.ptx();
        assert!(
            ptx.contains(&format!(".target sm_{cc}")),
            "compute_{cc}: no .target line"
        );
        for k in KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "compute_{cc}: kernel {k} missing from the PTX"
            );
        }
        // No naive global-memory inner loop: the fused kernel stages tiles in shared memory.
        assert!(ptx.contains(".shared"), "compute_{cc}: no shared memory");

        let c = cuda::compile(&format!("sm_{cc}"), &["--ptxas-options=-v"])
            .unwrap_or_else(|e| panic!("sm_{cc}: {e}"));
        assert!(c.is_cubin);
        assert!(
            c.image.starts_with(b"\x7fELF"),
            "sm_{cc}: the cubin is not an ELF image"
        );
        eprintln!("sm_{cc} ptxas:\n{}", c.log);
        // ptxas -v: "N bytes spill stores, M bytes spill loads" per kernel.
        for line in c.log.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                "sm_{cc}: register spills: {line}"
            );
        }
    }
}

#[test]
fn a_broken_arch_is_an_error_not_a_panic() {
    if !cuda::nvrtc_present() {
        return;
    }
    let e = cuda::compile("compute_1", &[]).expect_err("compute_1 accepted");
    assert!(e.contains("compute_1"), "{e}");
}

/// kernels/merge.cu compiled as C++ for the CPU (tests/gpu/emu): every kernel, launched as
/// src/compute/cuda/pipeline.rs launches them, bit for bit against a sequential reference of the
/// CPU path's arithmetic. Needs a C++20 compiler (`CXX`, default g++); skipped without one.
/// `LORASTREAM_EMU_SANITIZE=thread` (races on shared memory) or `=address,undefined`
/// (out-of-bounds accesses) builds it with that sanitizer (slower).
#[test]
fn kernels_match_a_sequential_reference_on_the_cpu() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("emu");
    let mut cmd = Command::new(&cxx);
    cmd.args([
        "-std=c++20",
        "-O2",
        "-pthread",
        "-ffp-contract=off",
        "-fno-strict-aliasing",
        "-Wall",
        "-Wno-unknown-pragmas",
    ]);
    if let Ok(s) = std::env::var("LORASTREAM_EMU_SANITIZE") {
        cmd.args([format!("-fsanitize={s}"), "-g".into()]);
    }
    cmd.arg(repo().join("tests/gpu/emu/emu.cpp"))
        .arg("-o")
        .arg(&exe);
    let built = match cmd.output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("note: no C++ compiler ({cxx}: {e}); kernel emulation NOT run");
            return;
        }
    };
    assert!(
        built.status.success(),
        "{cxx} could not build the emulation:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let ran = Command::new(&exe).output().unwrap();
    let text = String::from_utf8_lossy(&ran.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&ran.stderr));
    assert!(
        ran.status.success(),
        "emulated kernels differ from the reference:\n{text}"
    );
    assert!(text.contains(" 0 of "), "{text}");
}

// ---------------------------------------------------------------------------------------
// The CLI's --device handling

fn gpu_usable() -> bool {
    CudaBackend::new(0, Some(1)).is_ok()
}

fn fixture_args(out: &Path) -> Vec<String> {
    let peft = repo().join("fixtures/peft");
    vec![
        "merge".into(),
        "--base".into(),
        peft.join("bases/llama_bf16").display().to_string(),
        "--lora".into(),
        peft.join("cases/llama_bf16_adapter_bf16/adapter")
            .display()
            .to_string(),
        "--out".into(),
        out.display().to_string(),
        "--json".into(),
    ]
}

fn run_merge(out: &Path, device: &str) -> std::process::Output {
    Command::new(bin())
        .args(fixture_args(out))
        .args(["--device", device])
        .output()
        .expect("run lorastream")
}

fn stderr_lines(o: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn device_cuda_without_a_gpu_is_one_clear_error() {
    if gpu_usable() {
        eprintln!("note: a GPU is usable here; the no-GPU error path is not exercised");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for device in ["cuda", "cuda:3"] {
        let out = dir.path().join("merged.safetensors");
        let o = run_merge(&out, device);
        let lines = stderr_lines(&o);
        assert_eq!(o.status.code(), Some(1), "{device}: {lines:?}");
        assert_eq!(lines.len(), 1, "{device}: {lines:?}");
        let n = if device == "cuda" { "0" } else { "3" };
        assert!(
            lines[0].starts_with(&format!("error: --device cuda:{n}: no usable CUDA GPU (")),
            "{device}: {}",
            lines[0]
        );
        assert!(!lines[0].contains("panicked"));
        // --json: stdout is the one failure object.
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
        assert_eq!(
            (v["ok"].as_bool(), v["exit_code"].as_u64()),
            (Some(false), Some(1))
        );
        assert_eq!(v["error"]["kind"], "device", "{v}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{device}: output left behind"
        );
    }
}

#[test]
fn device_auto_without_a_gpu_merges_on_the_cpu_and_says_so_once() {
    if gpu_usable() {
        eprintln!("note: a GPU is usable here; the CPU fallback is not exercised");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let auto = dir.path().join("auto.safetensors");
    let cpu = dir.path().join("cpu.safetensors");
    let o = run_merge(&auto, "auto");
    let lines = stderr_lines(&o);
    assert!(o.status.success(), "{lines:?}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("note: no usable CUDA GPU (")
            && lines[0].ends_with("); merging on the CPU"),
        "{}",
        lines[0]
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        report["device"].as_str().unwrap().starts_with("cpu"),
        "{report}"
    );
    let o = run_merge(&cpu, "cpu");
    assert!(o.status.success());
    assert!(
        stderr_lines(&o).is_empty(),
        "--device cpu printed: {:?}",
        stderr_lines(&o)
    );
    assert_eq!(std::fs::read(&auto).unwrap(), std::fs::read(&cpu).unwrap());
}

#[test]
fn device_cuda_with_a_gpu_matches_the_cpu() {
    if !gpu_usable() {
        assert!(!env_on("LORASTREAM_REQUIRE_GPU"), "no usable GPU");
        eprintln!("note: no usable GPU; --device cuda not exercised");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (g, c) = (
        dir.path().join("gpu.safetensors"),
        dir.path().join("cpu.safetensors"),
    );
    let o = run_merge(&g, "cuda");
    assert!(o.status.success(), "{:?}", stderr_lines(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["device"].as_str().unwrap().starts_with("cuda:0"));
    assert!(run_merge(&c, "cpu").status.success());
    let (a, b) = (
        lorastream::source::open(&g).unwrap(),
        lorastream::source::open(&c).unwrap(),
    );
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!((&x.name, x.dtype), (&y.name, y.dtype));
        let d = max_ulps(x.dtype, &x.bytes(), &y.bytes());
        assert!(d <= 1, "{}: {d} ulp", x.name);
    }
}

// ---------------------------------------------------------------------------------------
// GPU against CPU on random tensors

/// Tensors written to one temporary file and mapped, as the readers would hand them over.
struct Store {
    _dir: tempfile::TempDir,
    entries: Vec<TensorEntry>,
}

fn store(tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bin");
    let mut bytes = Vec::new();
    let mut spans = Vec::new();
    for (_, dt, shape, vals) in tensors {
        assert_eq!(shape.iter().product::<usize>(), vals.len());
        while bytes.len() % 8 != 0 {
            bytes.push(0);
        }
        let mut b = vec![0u8; vals.len() * dt.size()];
        encode_f32(*dt, vals, &mut b);
        spans.push((bytes.len(), b.len()));
        bytes.extend_from_slice(&b);
    }
    bytes.extend_from_slice(&[0u8; 8]);
    std::fs::write(&path, &bytes).unwrap();
    let file = MappedFile::open(&path).unwrap();
    let entries = tensors
        .iter()
        .zip(spans)
        .map(|((name, dt, shape, _), (start, len))| TensorEntry {
            name: name.to_string(),
            dtype: *dt,
            shape: shape.clone(),
            file: file.clone(),
            data: TensorData::Contiguous { start, len },
        })
        .collect();
    Store { _dir: dir, entries }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Largest distance in units of the last place of `dt` (f32 units for f64, whose values
/// here are all f32 values).
fn max_ulps(dt: Dtype, a: &[u8], b: &[u8]) -> u64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() / dt.size();
    let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
    decode_f32(dt, a, &mut x);
    decode_f32(dt, b, &mut y);
    let ord = |v: f32| -> i64 {
        if v.is_nan() {
            return i64::MIN;
        }
        let (bits, sign) = match dt {
            Dtype::F16 => (half::f16::from_f32(v).to_bits() as i64, 0x8000),
            Dtype::BF16 => (half::bf16::from_f32(v).to_bits() as i64, 0x8000),
            _ => (v.to_bits() as i64, 0x8000_0000),
        };
        if bits & sign != 0 { sign - bits } else { bits }
    };
    x.iter()
        .zip(&y)
        .map(|(p, q)| {
            if p.is_nan() && q.is_nan() {
                0
            } else {
                ord(*p).abs_diff(ord(*q))
            }
        })
        .max()
        .unwrap_or(0)
}

/// One random merge case.
#[derive(Clone)]
struct Case {
    name: &'static str,
    wd: Dtype,
    fd: Dtype,
    out: Dtype,
    /// Weight shape (Normal: [out, in…]; Transposed: [in, out]).
    shape: Vec<usize>,
    r: usize,
    layout: DeltaLayout,
    dora: bool,
    round_delta_first: bool,
    /// A second LoRA step (Normal layouts only), DoRA if true.
    second: Option<bool>,
    /// A full replacement (in this dtype) before the steps.
    replace: Option<Dtype>,
    band_elems: Option<usize>,
}

fn case(name: &'static str, wd: Dtype, shape: &[usize], r: usize) -> Case {
    Case {
        name,
        wd,
        fd: Dtype::F32,
        out: wd,
        shape: shape.to_vec(),
        r,
        layout: DeltaLayout::Normal,
        dora: false,
        round_delta_first: false,
        second: None,
        replace: None,
        band_elems: None,
    }
}

fn cases() -> Vec<Case> {
    use Dtype::*;
    let t = DeltaLayout::Transposed;
    vec![
        case("tiny f32 r=1", F32, &[7, 5], 1),
        case("one element", BF16, &[1, 1], 1),
        Case {
            fd: BF16,
            ..case("bf16 vector epilogue", BF16, &[130, 260], 3)
        },
        Case {
            band_elems: Some(129 * 40),
            ..case("f16 odd columns, bands", F16, &[257, 129], 17)
        },
        Case {
            band_elems: Some(512 * 130),
            ..case("bf16 r=300 (k blocks of 256)", BF16, &[300, 512], 300)
        },
        case("r=600 f32", F32, &[200, 136], 600),
        Case {
            out: BF16,
            ..case("f32 weight, bf16 output", F32, &[64, 4096], 16)
        },
        Case {
            fd: F64,
            out: F32,
            ..case("f64 weight, f32 output", F64, &[33, 20], 4)
        },
        case("f64 weight and output", F64, &[40, 44], 8),
        Case {
            fd: F16,
            ..case("conv k x k", F32, &[32, 8, 3, 3], 4)
        },
        Case {
            layout: t,
            ..case("conv1d f32", F32, &[96, 200], 8)
        },
        Case {
            layout: t,
            fd: F16,
            band_elems: Some(5000),
            ..case("conv1d f16, bands", F16, &[150, 72], 8)
        },
        Case {
            layout: t,
            round_delta_first: true,
            ..case("embedding bf16 (delta rounded first)", BF16, &[500, 64], 8)
        },
        Case {
            dora: true,
            ..case("dora rows f32", F32, &[48, 64], 4)
        },
        Case {
            dora: true,
            band_elems: Some(64 * 20),
            ..case("dora rows bf16, bands", BF16, &[100, 64], 8)
        },
        Case {
            dora: true,
            layout: t,
            band_elems: Some(70 * 33),
            ..case("dora columns f32, bands", F32, &[100, 70], 4)
        },
        Case {
            dora: true,
            layout: t,
            ..case("dora columns bf16", BF16, &[64, 48], 4)
        },
        Case {
            second: Some(false),
            ..case("two steps f16", F16, &[96, 128], 8)
        },
        Case {
            dora: true,
            second: Some(false),
            ..case("dora then lora f16", F16, &[64, 80], 4)
        },
        Case {
            second: Some(true),
            ..case("lora then dora bf16", BF16, &[64, 80], 4)
        },
        Case {
            replace: Some(F32),
            layout: t,
            round_delta_first: true,
            ..case("replaced embedding", BF16, &[300, 64], 8)
        },
        Case {
            fd: BF16,
            band_elems: Some(100_000),
            ..case("1000 x 1000 r=64 bands", BF16, &[1000, 1000], 64)
        },
    ]
}

/// The entries and steps of a case (the store keeps the file mapped).
fn build(c: &Case, seed: u64) -> (Store, Vec<Step>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let rows = c.shape[0];
    let cols: usize = c.shape[1..].iter().product();
    let mut t: Vec<(&str, Dtype, Vec<usize>, Vec<f32>)> =
        vec![("w", c.wd, c.shape.clone(), rng.vec(rows * cols, 0.5))];
    let r = c.r;
    let (a_shape, b_shape) = match c.layout {
        DeltaLayout::Normal => {
            let mut a = vec![r];
            a.extend_from_slice(&c.shape[1..]);
            let mut b = vec![rows, r];
            b.extend(std::iter::repeat_n(1, c.shape.len() - 2));
            (a, b)
        }
        DeltaLayout::Transposed => (vec![r, rows], vec![cols, r]),
    };
    let mag_len = match c.layout {
        DeltaLayout::Normal => rows,
        DeltaLayout::Transposed => cols,
    };
    let steps_n = 1 + c.second.is_some() as usize;
    for s in 0..steps_n {
        let an = a_shape.iter().product();
        let bn = b_shape.iter().product();
        let (an_, bn_, mn_) = (["a0", "a1"][s], ["b0", "b1"][s], ["m0", "m1"][s]);
        t.push((an_, c.fd, a_shape.clone(), rng.vec(an, 0.3)));
        t.push((bn_, c.fd, b_shape.clone(), rng.vec(bn, 0.3)));
        t.push((
            mn_,
            c.fd,
            vec![mag_len],
            rng.vec(mag_len, 0.5)
                .iter()
                .map(|x| x.abs() + 0.5)
                .collect(),
        ));
    }
    if let Some(rd) = c.replace {
        t.push(("rep", rd, c.shape.clone(), rng.vec(rows * cols, 0.5)));
    }
    let st = store(&t);
    let get = |n: &str| st.entries.iter().find(|e| e.name == n).unwrap().clone();
    let mut steps = Vec::new();
    if c.replace.is_some() {
        steps.push(Step::Replace(get("rep")));
    }
    for s in 0..steps_n {
        let dora = if s == 0 {
            c.dora
        } else {
            c.second.unwrap_or(false)
        };
        steps.push(Step::Lora(Box::new(LoraStep {
            a: get(["a0", "a1"][s]),
            b: get(["b0", "b1"][s]),
            r,
            scale: [2.0, 0.375][s],
            layout: c.layout,
            round_delta_first: c.round_delta_first && !dora,
            magnitude: dora.then(|| get(["m0", "m1"][s])),
        })));
    }
    (st, steps)
}

#[test]
fn gpu_matches_cpu_on_random_tensors() {
    if !gpu_usable() {
        assert!(
            !env_on("LORASTREAM_REQUIRE_GPU"),
            "LORASTREAM_REQUIRE_GPU=1 but no usable GPU"
        );
        eprintln!("note: no usable GPU; the CUDA backend's arithmetic is NOT checked here");
        return;
    }
    let cpu = CpuBackend::new(Some(4)).unwrap();
    let mut worst = 0;
    let mut report = Vec::new();
    for (i, c) in cases().iter().enumerate() {
        let gpu = CudaBackend::with_options(
            0,
            CudaOptions {
                threads: Some(2),
                band_elems: c.band_elems,
            },
        )
        .unwrap();
        assert!(gpu.describe().starts_with("cuda:0"));
        let (st, steps) = build(c, i as u64 + 1);
        let w = &st.entries[0];
        let a = merge(&cpu, w, &steps, c.out).unwrap();
        let b = merge(&gpu, w, &steps, c.out).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(a.len(), b.len(), "{}: output size", c.name);
        let d = max_ulps(c.out, &a, &b);
        let same = a == b;
        report.push(format!(
            "{:<40} {d} ulp{}",
            c.name,
            if same { " (bit-identical)" } else { "" }
        ));
        worst = worst.max(d);
        assert!(d <= 1, "{}: GPU is {d} ulp from the CPU", c.name);
    }
    eprintln!("GPU vs CPU:\n  {}", report.join("\n  "));
    println!("GPU vs CPU: worst {worst} ulp over {} cases", report.len());
}

#[test]
fn jobs_without_a_lora_step_run_on_the_cpu_backend() {
    if !gpu_usable() {
        return;
    }
    let mut rng = Rng(7);
    let st = store(&[
        ("bias", Dtype::F16, vec![40], rng.vec(40, 1.0)),
        ("lb", Dtype::F32, vec![40], rng.vec(40, 1.0)),
    ]);
    let steps = vec![Step::AddBias {
        bias: st.entries[1].clone(),
        scale: 0.5,
    }];
    let cpu = CpuBackend::new(Some(1)).unwrap();
    let gpu = CudaBackend::new(0, Some(1)).unwrap();
    let a = merge(&cpu, &st.entries[0], &steps, Dtype::F16).unwrap();
    let b = merge(&gpu, &st.entries[0], &steps, Dtype::F16).unwrap();
    assert_eq!(a, b);
}

/// The non-finite check (on by default) refuses the same f16 overflow on both backends,
/// with the same count and first element, also when the hits are in several bands and an
/// element that was inf in the base is not counted; with the check off both write the
/// same bytes.
#[test]
fn both_backends_refuse_the_same_created_non_finite_values() {
    if !gpu_usable() {
        return;
    }
    let (rows, cols) = (300usize, 64usize);
    let mut w = vec![1.0f32; rows * cols];
    w[130 * cols + 5] = f32::INFINITY;
    let b: Vec<f32> = (0..rows)
        .map(|i| if i == 130 || i == 290 { 300.0 } else { 0.001 })
        .collect();
    let st = store(&[
        ("w", Dtype::F16, vec![rows, cols], w),
        ("a", Dtype::F32, vec![1, cols], vec![300.0; cols]),
        ("b", Dtype::F32, vec![rows, 1], b),
    ]);
    let steps = vec![Step::Lora(Box::new(LoraStep {
        a: st.entries[1].clone(),
        b: st.entries[2].clone(),
        r: 1,
        scale: 1.0,
        layout: DeltaLayout::Normal,
        round_delta_first: false,
        magnitude: None,
    }))];
    let mut cpu = CpuBackend::new(Some(2)).unwrap();
    let opts = CudaOptions {
        threads: Some(1),
        band_elems: Some(64 * cols),
    };
    let mut gpu = CudaBackend::with_options(0, opts).unwrap();
    let run = |be: &dyn DeltaBackend| merge(be, &st.entries[0], &steps, Dtype::F16);
    let (ec, eg) = (run(&cpu).unwrap_err(), run(&gpu).unwrap_err());
    let msg = ec.to_string();
    assert!(
        msg.contains("created 127 non-finite") && msg.contains("(row 130, column 0"),
        "{msg}"
    );
    assert_eq!(msg, eg.to_string().replace("value inf", "value 90001"));
    cpu.set_check_non_finite(false);
    gpu.set_check_non_finite(false);
    assert_eq!(run(&cpu).unwrap(), run(&gpu).unwrap());
}

// ---------------------------------------------------------------------------------------
// Kernel timing (tests/gpu/run.sh)

#[test]
#[ignore = "GPU benchmark; tests/gpu/run.sh runs it"]
fn kernel_bench() {
    let Ok(gpu) = CudaBackend::new(0, Some(1)) else {
        panic!("no usable GPU");
    };
    let shapes = std::env::var("LORASTREAM_BENCH_SHAPES")
        .unwrap_or_else(|_| "14336x4096:16,14336x4096:512,4096x4096:16,4096x4096:512".into());
    for spec in shapes.split(',').filter(|s| !s.is_empty()) {
        let (dims, r) = spec.split_once(':').expect("ROWSxCOLS:R");
        let (rows, cols) = dims.split_once('x').expect("ROWSxCOLS:R");
        let (rows, cols, r): (usize, usize, usize) = (
            rows.parse().unwrap(),
            cols.parse().unwrap(),
            r.parse().unwrap(),
        );
        let b = gpu
            .bench_lora_kernel(rows, cols, r, Dtype::BF16, 20)
            .unwrap();
        println!("BENCH {}", serde_json::to_string(&b).unwrap());
    }
}
