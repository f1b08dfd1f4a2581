//! The CPU microkernel paths (`compute/gemm.rs`: scalar, AVX2, AVX-512, NEON) give the
//! same bytes: every path this CPU runs, forced one after the other, on random merges (odd
//! shapes, ranks up to 1024 across the k blocking, every float dtype, both layouts, DoRA on
//! rows and columns, several steps, band splits) in process, and on every merge case of the
//! PEFT fixtures (`fixtures/peft`, `peft_matrix`, `peft_combos`, `dora_sequences`) through
//! the CLI with `LORASTREAM_CPU`. Plain LoRA cases are also checked against the
//! written-down reduction order computed here with plain loops. How close the default path
//! is to PEFT is checked by `fixtures_merge.rs` and `tests/compat/`; identical bytes carry
//! that to every path.
//!
//! Across machines: every fixture merge's sha256 is committed (`fixtures/merge_digests.json`)
//! and each path's output must have it, so an x86 run (scalar, AVX2, AVX-512) and an aarch64
//! run (scalar, NEON; `scripts/test-aarch64.sh` runs this file under qemu) check the same
//! bytes. A change that means to change merged bytes re-blesses the file with
//! `LORASTREAM_BLESS_DIGESTS=1 cargo test --release --test cpu_paths` and says why in its
//! commit. `LORASTREAM_TEST_RUNNER` (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`) runs the
//! CLI through an emulator when the tests are cross-compiled.

use lorastream::Dtype;
use lorastream::compute::cpu::CpuBackend;
use lorastream::compute::gemm::Isa;
use lorastream::compute::{DeltaBackend, Source, Task, WorkItem};
use lorastream::dtype::{decode_f32, encode_f32};
use lorastream::plan::checked::CheckedMerge;
use lorastream::plan::merge_types::{DeltaLayout, LoraStep, Step};
use lorastream::sink::{MemorySink, OutTensor, sha256_file};
use lorastream::source::{MappedFile, TensorData, TensorEntry};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn merge(be: &dyn DeltaBackend, w: &TensorEntry, steps: &[Step], out: Dtype) -> Vec<u8> {
    let out = OutTensor {
        name: w.name.clone(),
        dtype: out,
        shape: w.shape.clone(),
    };
    let item = WorkItem {
        out: &out,
        task: Task::Write {
            from: Source::Merge(CheckedMerge::new(w, steps, &out).unwrap()),
            rows: None,
        },
    };
    let mut sink = MemorySink::default();
    be.run(&[item], &mut sink, &mut |_, _| {}).unwrap();
    sink.0
}

struct Store {
    _dir: tempfile::TempDir,
    entries: Vec<TensorEntry>,
}

/// Tensors written to one file and mapped, as the readers hand them over.
fn store(tensors: &[(String, Dtype, Vec<usize>, Vec<f32>)]) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bin");
    let mut bytes = Vec::new();
    let mut spans = Vec::new();
    for (_, dt, _, vals) in tensors {
        while bytes.len() % 8 != 0 {
            bytes.push(0);
        }
        let mut b = vec![0u8; vals.len() * dt.size()];
        encode_f32(*dt, vals, &mut b);
        spans.push((bytes.len(), b.len()));
        bytes.extend_from_slice(&b);
    }
    std::fs::write(&path, &bytes).unwrap();
    let file = MappedFile::open(&path).unwrap();
    let entries = tensors
        .iter()
        .zip(spans)
        .map(|((name, dt, shape, _), (start, len))| TensorEntry {
            name: name.clone(),
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
    /// Mixed signs and magnitudes over a few binades: reassociation would change bits.
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        u * 2f32.powi((self.0 % 7) as i32 - 3)
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

struct Case {
    wd: Dtype,
    fd: Dtype,
    out: Dtype,
    rows: usize,
    cols: usize,
    r: usize,
    layout: DeltaLayout,
    dora: bool,
    round_delta_first: bool,
    steps: usize,
}

fn case(wd: Dtype, fd: Dtype, rows: usize, cols: usize, r: usize) -> Case {
    Case {
        wd,
        fd,
        out: wd,
        rows,
        cols,
        r,
        layout: DeltaLayout::Normal,
        dora: false,
        round_delta_first: false,
        steps: 1,
    }
}

fn cases() -> Vec<Case> {
    use Dtype::*;
    let t = DeltaLayout::Transposed;
    vec![
        case(F32, F32, 1, 1, 1),
        case(BF16, BF16, 37, 53, 5),
        case(F16, F16, 101, 77, 17),
        case(F32, BF16, 29, 131, 255),
        case(BF16, F32, 41, 67, 256),
        case(F16, F32, 23, 45, 257),
        case(F64, F64, 19, 33, 600),
        case(BF16, BF16, 13, 301, 1024),
        case(F32, F16, 61, 1000, 1024),
        // Several bands (2 workers): band splits do not change a byte either.
        case(BF16, BF16, 4500, 1003, 8),
        // Several row sub-blocks of the fused band (192 rows each, the last one short)
        // across two k blocks, f16 in and out (the one-pass vector add-encode).
        case(F16, F16, 700, 300, 300),
        Case {
            out: F32,
            ..case(BF16, BF16, 31, 90, 64)
        },
        Case {
            layout: t,
            ..case(F32, F32, 97, 51, 300)
        },
        Case {
            layout: t,
            round_delta_first: true,
            ..case(BF16, BF16, 257, 40, 8)
        },
        Case {
            dora: true,
            ..case(F16, F16, 45, 129, 33)
        },
        Case {
            dora: true,
            ..case(BF16, F32, 30, 70, 700)
        },
        Case {
            dora: true,
            layout: t,
            ..case(F32, BF16, 66, 39, 12)
        },
        Case {
            dora: true,
            layout: t,
            ..case(BF16, BF16, 2200, 1001, 20)
        },
        Case {
            steps: 2,
            ..case(F16, BF16, 59, 83, 300)
        },
        Case {
            steps: 2,
            dora: true,
            ..case(BF16, F16, 34, 95, 9)
        },
    ]
}

fn build(c: &Case, seed: u64) -> (Store, Vec<Step>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (rows, cols, r) = (c.rows, c.cols, c.r);
    let mut t = vec![(
        "w".to_string(),
        c.wd,
        vec![rows, cols],
        rng.vec(rows * cols),
    )];
    let (a_shape, b_shape, mag) = match c.layout {
        DeltaLayout::Normal => (vec![r, cols], vec![rows, r], rows),
        DeltaLayout::Transposed => (vec![r, rows], vec![cols, r], cols),
    };
    for s in 0..c.steps {
        let an = a_shape.iter().product();
        let bn = b_shape.iter().product();
        t.push((format!("a{s}"), c.fd, a_shape.clone(), rng.vec(an)));
        t.push((format!("b{s}"), c.fd, b_shape.clone(), rng.vec(bn)));
        let m = rng.vec(mag).iter().map(|x| x.abs() + 0.5).collect();
        t.push((format!("m{s}"), c.fd, vec![mag], m));
    }
    let st = store(&t);
    let get = |n: String| st.entries.iter().find(|e| e.name == n).unwrap().clone();
    let steps = (0..c.steps)
        .map(|s| {
            Step::Lora(Box::new(LoraStep {
                a: get(format!("a{s}")),
                b: get(format!("b{s}")),
                r,
                scale: [0.7, 2.0][s % 2],
                layout: c.layout,
                round_delta_first: c.round_delta_first && !c.dora,
                magnitude: (c.dora && s == 0).then(|| get(format!("m{s}"))),
            }))
        })
        .collect();
    (st, steps)
}

fn decoded(t: &TensorEntry) -> Vec<f32> {
    let mut v = vec![0f32; t.numel()];
    decode_f32(t.dtype, &t.bytes(), &mut v);
    v
}

fn round(dt: Dtype, x: f32) -> f32 {
    let mut b = vec![0u8; dt.size()];
    encode_f32(dt, &[x], &mut b);
    let mut y = [0f32];
    decode_f32(dt, &b, &mut y);
    y[0]
}

/// One plain LoRA step by the contract, with plain loops: d = fma chain over k from +0,
/// times scale; rounded into the weight dtype if asked; x = W + d in the weight dtype.
fn reference(c: &Case, st: &Store) -> Vec<u8> {
    let w = decoded(&st.entries[0]);
    let (a, b) = (decoded(&st.entries[1]), decoded(&st.entries[2]));
    let (rows, cols, r) = (c.rows, c.cols, c.r);
    let mut x = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut acc = 0f32;
            for k in 0..r {
                let (l, rr) = match c.layout {
                    DeltaLayout::Normal => (b[i * r + k], a[k * cols + j]),
                    DeltaLayout::Transposed => (a[k * rows + i], b[j * r + k]),
                };
                acc = l.mul_add(rr, acc);
            }
            let mut d = acc * 0.7;
            if c.round_delta_first {
                d = round(c.wd, d);
            }
            x[i * cols + j] = w[i * cols + j] + d;
        }
    }
    let mut out = vec![0u8; x.len() * c.out.size()];
    encode_f32(c.out, &x, &mut out);
    out
}

#[test]
fn random_merges_are_byte_identical_on_every_cpu_path() {
    let paths = Isa::available();
    eprintln!(
        "CPU paths here: {:?}",
        paths.iter().map(|i| i.name()).collect::<Vec<_>>()
    );
    assert!(paths.contains(&Isa::Scalar));
    for (n, c) in cases().iter().enumerate() {
        let (st, steps) = build(c, n as u64 + 1);
        let label = format!(
            "case {n}: {}x{} r={} {:?}/{:?}->{:?} {:?} dora={} steps={}",
            c.rows, c.cols, c.r, c.wd, c.fd, c.out, c.layout, c.dora, c.steps
        );
        let outs: Vec<Vec<u8>> = paths
            .iter()
            .map(|&isa| {
                let be = CpuBackend::with_isa(Some(2), isa).unwrap();
                assert!(be.describe().contains(isa.name()));
                merge(&be, &st.entries[0], &steps, c.out)
            })
            .collect();
        for (isa, o) in paths.iter().zip(&outs) {
            assert!(o == &outs[0], "{label}: {} differs from scalar", isa.name());
        }
        if !c.dora && c.steps == 1 && c.out == c.wd {
            assert!(
                outs[0] == reference(c, &st),
                "{label}: not the written-down reduction order"
            );
        }
    }
}

// The fixture cases through the CLI, one run per path.

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The CLI, through `LORASTREAM_TEST_RUNNER` when set (an emulator for a cross-compiled
/// binary).
fn cli() -> Command {
    let bin = env!("CARGO_BIN_EXE_lorastream");
    let runner = std::env::var("LORASTREAM_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(prog) => {
            let mut cmd = Command::new(prog);
            cmd.args(words).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

fn run(dir: &Path, case: &Value, isa: &str, out: &Path) -> std::process::Output {
    let fx = |p: &Value| dir.join(p.as_str().unwrap());
    let mut cmd = cli();
    cmd.env("LORASTREAM_CPU", isa)
        .args(["merge", "--device", "cpu", "--base"])
        .arg(fx(&case["base"]))
        .arg("--out")
        .arg(out);
    let weights = case.get("weights").and_then(|w| w.as_array());
    for (i, l) in case["loras"].as_array().unwrap().iter().enumerate() {
        let mut lora = fx(l).into_os_string();
        // A weighted combination: `--lora PATH:WEIGHT` (`peft_combos`).
        if let Some(w) = weights {
            lora.push(format!(":{}", w[i].as_f64().unwrap()));
        }
        cmd.arg("--lora").arg(lora);
    }
    if let Some(a) = case.get("args").and_then(|a| a.as_array()) {
        cmd.args(a.iter().map(|x| x.as_str().unwrap()));
    }
    if let Some(order) = case.get("module_order") {
        cmd.arg("--module-order").arg(fx(order));
    }
    cmd.output().unwrap()
}

const FIXTURE_SETS: [&str; 4] = [
    "fixtures/peft",
    "fixtures/peft_matrix",
    "fixtures/peft_combos",
    "fixtures/dora_sequences",
];

const DIGESTS: &str = "fixtures/merge_digests.json";

#[test]
fn fixture_merges_are_byte_identical_on_every_cpu_path() {
    let paths: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
    let bless = std::env::var_os("LORASTREAM_BLESS_DIGESTS").is_some();
    let committed: serde_json::Map<String, Value> = if bless {
        serde_json::Map::new()
    } else {
        let text = std::fs::read_to_string(repo().join(DIGESTS)).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["sha256"]
            .as_object()
            .unwrap()
            .clone()
    };
    let mut seen = serde_json::Map::new();
    let tmp = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for set in FIXTURE_SETS {
        let dir = repo().join(set);
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        for case in manifest["cases"].as_array().unwrap() {
            if case["refuse"] == true || !case["expected"].is_string() {
                continue;
            }
            let key = format!(
                "{}/{}",
                set.trim_start_matches("fixtures/"),
                case["name"].as_str().unwrap()
            );
            cases.push((dir.clone(), case.clone(), key));
        }
    }
    // Cases run side by side (under an emulator each CLI start is slow); the checks
    // below go in manifest order.
    use rayon::prelude::*;
    let digests: Vec<String> = cases
        .par_iter()
        .enumerate()
        .map(|(n, (dir, case, key))| {
            let mut first: Option<String> = None;
            for isa in &paths {
                let out = tmp.path().join(format!("{n}.{isa}.safetensors"));
                let o = run(dir, case, isa, &out);
                assert!(
                    o.status.success(),
                    "{key} ({isa}): {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                let (_, digest) = sha256_file(&out).unwrap();
                std::fs::remove_file(&out).unwrap();
                match &first {
                    None => first = Some(digest),
                    Some(f) => assert!(f == &digest, "{key}: {isa} differs from scalar"),
                }
            }
            first.unwrap()
        })
        .collect();
    for ((_, _, key), digest) in cases.into_iter().zip(digests) {
        if !bless {
            let want = committed.get(&key).and_then(|v| v.as_str());
            assert!(
                want == Some(digest.as_str()),
                "{key}: sha256 {digest} on {paths:?}, {DIGESTS} has {want:?}: the merged \
                 bytes differ from the ones committed (another machine's, or before a \
                 change); if the change means to change them, re-bless (module comment)"
            );
        }
        seen.insert(key, Value::String(digest));
    }
    let n = seen.len();
    assert!(n >= 300, "only {n} fixture merge cases");
    if bless {
        let doc = serde_json::json!({
            "about": "sha256 of lorastream's output for every fixture merge case; the same on \
                      every CPU path and machine (tests/cpu_paths.rs)",
            "sha256": Value::Object(seen),
        });
        let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
        std::fs::write(repo().join(DIGESTS), text).unwrap();
        eprintln!("{n} digests written to {DIGESTS}");
    } else {
        let stale: Vec<&String> = committed
            .keys()
            .filter(|k| !seen.contains_key(*k))
            .collect();
        assert!(
            stale.is_empty(),
            "{DIGESTS} names cases that are gone: {stale:?}"
        );
    }
    eprintln!("{n} fixture merges, byte-identical on {paths:?} and to {DIGESTS}");
}

#[test]
fn lorastream_cpu_refuses_a_path_this_cpu_lacks_or_does_not_know() {
    let dir = repo().join("fixtures/peft");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let case = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["expected"].is_string())
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = run(&dir, case, "sse9", &out);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("LORASTREAM_CPU=sse9"));
    assert!(!out.exists());
    let lacking = [Isa::Neon, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .find(|i| !i.supported());
    if let Some(isa) = lacking {
        let o = run(&dir, case, isa.name(), &out);
        assert_eq!(o.status.code(), Some(1), "{}", isa.name());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("cannot run"), "{err}");
        assert!(!out.exists());
    }
}
