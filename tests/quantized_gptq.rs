//! End-to-end tests of GPTQ and AWQ bases (fixtures/gptq_awq, packed by GPTQModel's and
//! AutoAWQ's own code, see fixtures/make_gptq_awq_fixtures.py), with no Python: convert
//! writes `X.weight` only (f16, `[out, in]`) equal to the formats' dequantization formula
//! decoded independently here, v1 and v2 zeros give the same weights, merge writes a
//! plain f16 model, and broken checkpoints are refused by name with nothing written.
//! Bit-exactness against the reference code itself is in tests/compat/test_gptq_awq.py.

use half::f16;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lorastream")
}

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/gptq_awq")
        .join(name)
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(bin());
    for a in args {
        c.arg(a);
    }
    c.output().expect("run lorastream")
}

/// name → (dtype, shape, bytes) of a safetensors file.
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn load(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn halves(b: &[u8]) -> Vec<f16> {
    b.chunks_exact(2)
        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

fn qconfig(dir: &Path) -> Value {
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    c["quantization_config"].clone()
}

/// The `[out, in]` f16 weight of linear `p`, from the format's description: GPTQ
/// `scales[g_idx[i], o] · (q - z)` (v1 zero words + Σ 1 << bits·k first), AWQ
/// `scales[i / gs, o] · (q - z)` with fields in `[0, 4, 1, 5, 2, 6, 3, 7]` order.
fn by_formula(sd: &Tensors, q: &Value, p: &str) -> Vec<u16> {
    let t = |s: &str| &sd[&format!("{p}.{s}")];
    let (qw, qz, sc) = (
        words(&t("qweight").2),
        words(&t("qzeros").2),
        halves(&t("scales").2),
    );
    let mut out = Vec::new();
    if q["quant_method"] == "awq" {
        let (inn, cols) = (t("qweight").1[0], t("qweight").1[1]);
        let out_f = cols * 8;
        let gs = q["group_size"].as_u64().unwrap() as usize;
        let rev = [0u32, 4, 1, 5, 2, 6, 3, 7];
        for o in 0..out_f {
            for i in 0..inn {
                let sh = 4 * rev[o % 8];
                let g = i / gs;
                let d = ((qw[i * cols + o / 8] >> sh) & 15) as f32
                    - ((qz[g * cols + o / 8] >> sh) & 15) as f32;
                out.push(f16::from_f32(sc[g * out_f + o].to_f32() * d).to_bits());
            }
        }
    } else {
        let bits = q["bits"].as_u64().unwrap() as u32;
        let pf = (32 / bits) as usize;
        let maxq = (1u32 << bits) - 1;
        let g_idx = words(&t("g_idx").2);
        let out_f = t("qweight").1[1];
        let add = if q["checkpoint_format"] == "gptq" {
            (0..pf as u32).fold(0u32, |a, k| a | 1 << (bits * k))
        } else {
            0
        };
        for o in 0..out_f {
            for (i, &g) in g_idx.iter().enumerate() {
                let g = g as usize;
                let c = (qw[(i / pf) * out_f + o] >> (bits * (i % pf) as u32)) & maxq;
                let z = (qz[g * (out_f / pf) + o / pf].wrapping_add(add)
                    >> (bits * (o % pf) as u32))
                    & maxq;
                let d = c as f32 - z as f32;
                out.push(f16::from_f32(sc[g * out_f + o].to_f32() * d).to_bits());
            }
        }
    }
    out
}

const ALL: [&str; 6] = [
    "gptq_v1_4bit",
    "gptq_v1_4bit_asym_act",
    "gptq_v2_4bit_asym_act",
    "gptq_v1_8bit",
    "gptq_v2_2bit",
    "awq_gemm",
];

#[test]
fn convert_writes_dequantized_weights_only() {
    let dir = tempfile::tempdir().unwrap();
    for name in ALL {
        let out = dir.path().join(format!("{name}.safetensors"));
        let o = run(&[&"convert", &fx(name), &out]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got = load(&out);
        let sd = load(&fx(name).join("model.safetensors"));
        let q = qconfig(&fx(name));
        let mut linears = 0;
        for (k, (dt, shape, bytes)) in &sd {
            if let Some(p) = k.strip_suffix(".qweight") {
                linears += 1;
                let (gdt, gshape, gbytes) = &got[&format!("{p}.weight")];
                assert_eq!(gdt, "F16", "{name} {p}");
                let out_f = sd[&format!("{p}.scales")].1[1];
                let in_f = gbytes.len() / 2 / out_f;
                assert_eq!(gshape, &vec![out_f, in_f], "{name} {p}");
                let want = by_formula(&sd, &q, p);
                let gotw: Vec<u16> = gbytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                assert_eq!(gotw, want, "{name} {p}");
            } else if [".qzeros", ".scales", ".g_idx"]
                .iter()
                .any(|s| k.ends_with(s))
            {
                assert!(!got.contains_key(k), "{name}: {k} copied");
            } else {
                // Unquantized tensors pass through as stored.
                assert_eq!(
                    &got[k],
                    &(dt.clone(), shape.clone(), bytes.clone()),
                    "{name} {k}"
                );
            }
        }
        assert_eq!(linears, 7, "{name}");
        assert_eq!(
            got.len(),
            sd.len() - linears * if name.starts_with("awq") { 2 } else { 3 }
        );
    }
    // The same grid stored with v1 and v2 zeros decodes to the same bytes.
    let a = load(&dir.path().join("gptq_v1_4bit_asym_act.safetensors"));
    let b = load(&dir.path().join("gptq_v2_4bit_asym_act.safetensors"));
    assert_eq!(a, b);
}

#[test]
fn merge_writes_a_plain_f16_model() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["gptq_v1_4bit_asym_act", "awq_gemm"] {
        let conv = dir.path().join(format!("{name}.safetensors"));
        assert!(run(&[&"convert", &fx(name), &conv]).status.success());
        let out = dir.path().join(name);
        let out_s = format!("{}/", out.display());
        let o = run(&[
            &"merge",
            &"--base",
            &fx(name),
            &"--lora",
            &fx("lora_llama64"),
            &"--out",
            &out_s,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none(), "{cfg}");
        assert_eq!(cfg["dtype"], "float16");
        let mut merged = Tensors::new();
        for e in std::fs::read_dir(&out).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                merged.extend(load(&p));
            }
        }
        let plain = load(&conv);
        assert_eq!(
            merged.keys().collect::<Vec<_>>(),
            plain.keys().collect::<Vec<_>>()
        );
        for (k, v) in &plain {
            let changed = merged[k] != *v;
            // Every one of the seven LoRA targets changes; nothing else does.
            assert_eq!(changed, k.contains("_proj."), "{name}: {k}");
            assert_eq!(merged[k].0, "F16");
        }
    }
}

#[test]
fn inspect_lists_the_stored_form() {
    let o = run(&[&"inspect", &"--json", &fx("gptq_v2_2bit")]);
    assert!(o.status.success());
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = rep["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.mlp.down_proj.weight")
        .unwrap();
    assert_eq!(t["dtype"], "F16");
    assert_eq!(t["shape"], serde_json::json!([64, 128]));
    let s = t["stored"].as_str().unwrap();
    assert!(
        s.contains("GPTQ 2-bit") && s.contains("v2") && s.contains("group 16"),
        "{s}"
    );
}

#[test]
fn broken_checkpoints_are_refused_by_name_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("gptq");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(fx("gptq_v1_4bit/config.json"), src.join("config.json")).unwrap();
    // Drop one g_idx: rewrite the file without it.
    let bytes = std::fs::read(fx("gptq_v1_4bit/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let drop = "model.layers.0.mlp.up_proj.g_idx";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != drop)
        .collect();
    safetensors::serialize_to_file(kept, None, &src.join("model.safetensors")).unwrap();
    let out = dir.path().join("out.safetensors");
    let o = run(&[&"convert", &src, &out]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("model.layers.0.mlp.up_proj.qweight") && e.contains(drop),
        "{e}"
    );
    assert!(!out.exists());
    // An AWQ GEMV config on GEMM tensors: refused by its version.
    let src = dir.path().join("awq");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(
        fx("awq_gemm/model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(fx("awq_gemm/config.json")).unwrap())
            .unwrap();
    cfg["quantization_config"]["version"] = "gemv".into();
    cfg["quantization_config"]["format"] = "gemv".into();
    std::fs::write(src.join("config.json"), cfg.to_string()).unwrap();
    let o = run(&[
        &"merge",
        &"--base",
        &src,
        &"--lora",
        &fx("lora_llama64"),
        &"--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("\"gemv\"") && e.contains("config.json"), "{e}");
    assert!(!out.exists());
}
