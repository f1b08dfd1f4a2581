//! Merges against the committed PEFT fixtures (`fixtures/peft/`, made and checked with real
//! PEFT 0.21 `merge_and_unload()` by `fixtures/make_peft_fixtures.py`): every merge case
//! within the manifest's ulp tolerance of PEFT's result, `--keep-lora` bit-exact against
//! `PeftModel.state_dict()`, and every refusal with the expected words in its message.
//! The same cases also run through the CLI with real torch in `tests/compat/`.

use lorastream::merge::{MergeOptions, merge};
use lorastream::plan::merge::MergeSettings;
use lorastream::source::{self, Checkpoint};
use lorastream::{Dtype, dtype::decode_f32};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn peft_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft")
}

fn cases() -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir().join("cases.json")).unwrap())
            .unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn options(case: &Value, keep_lora: bool, with_base: bool) -> MergeOptions {
    let mut o = MergeOptions {
        settings: MergeSettings {
            keep_lora,
            ..Default::default()
        },
        ..Default::default()
    };
    if with_base {
        o.bases
            .push((None, peft_dir().join(case["base"].as_str().unwrap())));
    }
    for l in case["loras"].as_array().unwrap() {
        o.loras.push((None, peft_dir().join(l.as_str().unwrap())));
    }
    o
}

/// Distance in units of the last place between two values of `dtype`, via their ordered bits.
fn ulps(dtype: Dtype, a: &[u8], b: &[u8]) -> u64 {
    let n = a.len() / dtype.size();
    let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
    decode_f32(dtype, a, &mut x);
    decode_f32(dtype, b, &mut y);
    let ordered = |v: f32| -> i64 {
        // Map to the dtype's own bit pattern so one step is one ulp of that dtype.
        let bits = match dtype {
            Dtype::F16 => half::f16::from_f32(v).to_bits() as i64,
            Dtype::BF16 => half::bf16::from_f32(v).to_bits() as i64,
            _ => v.to_bits() as i64,
        };
        let sign = match dtype {
            Dtype::F16 | Dtype::BF16 => 0x8000,
            _ => 0x8000_0000,
        };
        if bits & sign != 0 { sign - bits } else { bits }
    };
    x.iter()
        .zip(&y)
        .map(|(p, q)| ordered(*p).abs_diff(ordered(*q)))
        .max()
        .unwrap_or(0)
}

fn by_name(c: &Checkpoint) -> HashMap<String, &source::TensorEntry> {
    c.tensors.iter().map(|t| (t.name.clone(), t)).collect()
}

/// `dtype_free`: keys whose dtype may differ (adapter tensors written without a base to
/// take the dtype from); their values must round to the expected ones.
fn compare(ours: &Path, expected: &Path, tol: u64, label: &str, dtype_free: &[String]) {
    let ours = source::open(ours).unwrap();
    let exp = source::open(expected).unwrap();
    let (o, e) = (by_name(&ours), by_name(&exp));
    let mut ok: Vec<&String> = o.keys().collect();
    let mut ek: Vec<&String> = e.keys().collect();
    ok.sort();
    ek.sort();
    assert_eq!(ok, ek, "{label}: key sets");
    for (k, et) in &e {
        let ot = o[k];
        if dtype_free.contains(k) && ot.dtype != et.dtype {
            let mut rounded = Vec::new();
            lorastream::dtype::cast_float(ot.dtype, et.dtype, &ot.bytes(), &mut rounded);
            assert_eq!(rounded, et.bytes().as_ref(), "{label}: {k} values");
            continue;
        }
        assert_eq!((ot.dtype, &ot.shape), (et.dtype, &et.shape), "{label}: {k}");
        if ot.bytes() == et.bytes() {
            continue;
        }
        assert!(et.dtype.is_float(), "{label}: {k} differs");
        let d = ulps(et.dtype, &ot.bytes(), &et.bytes());
        assert!(
            d <= tol,
            "{label}: {k} is {d} ulp from PEFT (allowed {tol})"
        );
    }
}

#[test]
fn merges_match_peft() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for case in cases().iter().filter(|c| c["expected"].is_string()) {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.safetensors"));
        merge(&out, &options(case, false, true)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tol = case["ulp_tolerance"].as_u64().unwrap_or(1);
        compare(
            &out,
            &peft_dir().join(case["expected"].as_str().unwrap()),
            tol,
            name,
            &[],
        );
        n += 1;
    }
    assert!(n >= 25, "only {n} merge cases");
}

#[test]
fn keep_lora_matches_peft_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    for case in cases()
        .iter()
        .filter(|c| c["expected_keep_lora"].is_string())
    {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.keep.safetensors"));
        merge(&out, &options(case, true, true)).unwrap_or_else(|e| panic!("{name}: {e}"));
        compare(
            &out,
            &peft_dir().join(case["expected_keep_lora"].as_str().unwrap()),
            0,
            name,
            &[],
        );
        if let Some(only) = case
            .get("expected_keep_lora_adapter_only")
            .and_then(|v| v.as_str())
        {
            let out = dir.path().join(format!("{name}.only.safetensors"));
            merge(&out, &options(case, true, false)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let free: Vec<String> = case
                .get("adapter_only_dtype_from_base")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            compare(
                &out,
                &peft_dir().join(only),
                0,
                &format!("{name} (adapter only)"),
                &free,
            );
        }
    }
}

#[test]
fn refusals_name_the_problem_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for case in cases().iter().filter(|c| c["refuse"] == true) {
        let name = case["name"].as_str().unwrap();
        let out = dir.path().join("out.safetensors");
        let err = merge(&out, &options(case, false, true))
            .expect_err(name)
            .to_string()
            .to_lowercase();
        for m in case["must_mention"].as_array().unwrap() {
            let m = m.as_str().unwrap().to_lowercase();
            assert!(err.contains(&m), "{name}: '{m}' not in: {err}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{name}: output left"
        );
        n += 1;
    }
    // A guard against a truncated list, not a count: refusal cases of non-LoRA tuners
    // turn into merge cases as their tuners land (14 left after LoHa, LoKr, AdaLoRA).
    assert!(n >= 10, "only {n} refusal cases");
}

/// Writes a safetensors file of bf16 tensors filled from a small deterministic generator.
fn write_bf16(path: &Path, tensors: &[(&str, Vec<usize>)], seed: u32) {
    use lorastream::sink::{OutTensor, SafetensorsWriter, TensorSink};
    let plan: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, s)| OutTensor {
            name: n.to_string(),
            dtype: Dtype::BF16,
            shape: s.clone(),
        })
        .collect();
    let mut w = Box::new(SafetensorsWriter::create(path, &plan, true).unwrap());
    let mut x = seed;
    for t in &plan {
        w.begin(t).unwrap();
        let n: usize = t.shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        let mut bytes = vec![0u8; n * 2];
        lorastream::dtype::encode_f32(Dtype::BF16, &vals, &mut bytes);
        w.write(&bytes).unwrap();
        w.end().unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn output_bytes_do_not_depend_on_thread_count() {
    // Tensors larger than one band (2M elements) and one group, with row-norm DoRA
    // (Linear), plain LoRA and column-norm DoRA (Embedding), so several bands and both
    // DoRA passes run in parallel, groups and whole factors are read ahead, and rows and
    // columns do not line up with 4 KiB blocks (direct reads of unaligned ranges).
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    write_bf16(
        &base,
        &[
            ("w.weight", vec![1500, 1024]),
            ("v.weight", vec![2100, 1100]),
            ("e.weight", vec![3000, 512]),
        ],
        1,
    );
    let ad = dir.path().join("adapter");
    std::fs::create_dir(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_dora":true}"#,
    )
    .unwrap();
    write_bf16(
        &ad.join("adapter_model.safetensors"),
        &[
            ("base_model.model.w.lora_A.weight", vec![8, 1024]),
            ("base_model.model.w.lora_B.weight", vec![1500, 8]),
            ("base_model.model.w.lora_magnitude_vector", vec![1500]),
            ("base_model.model.v.lora_A.weight", vec![8, 1100]),
            ("base_model.model.v.lora_B.weight", vec![2100, 8]),
            ("base_model.model.e.lora_embedding_A", vec![8, 3000]),
            ("base_model.model.e.lora_embedding_B", vec![512, 8]),
            ("base_model.model.e.lora_magnitude_vector", vec![512]),
        ],
        2,
    );
    // Every thread count, with direct, automatic (here: cached, so buffered reads) and
    // buffered I/O, in both file formats.
    use lorastream::direct_io::ReadMode;
    let mut outs = Vec::new();
    for ext in ["pth", "safetensors"] {
        let mut same_format = Vec::new();
        for (threads, reads) in [
            (1, ReadMode::Direct),
            (2, ReadMode::Direct),
            (3, ReadMode::Direct),
            (2, ReadMode::Auto),
            (2, ReadMode::Buffered),
        ] {
            let out = dir.path().join(format!("t{threads}-{reads:?}.{ext}"));
            let o = MergeOptions {
                bases: vec![(None, base.clone())],
                loras: vec![(None, ad.clone())],
                threads: Some(threads),
                reads,
                sink: lorastream::sink::SinkOptions {
                    direct_io: reads != ReadMode::Buffered,
                    ..Default::default()
                },
                ..Default::default()
            };
            let r = merge(&out, &o).unwrap();
            assert_eq!(r.merged, 3);
            same_format.push(std::fs::read(&out).unwrap());
        }
        outs.push(same_format);
    }
    let base_bytes = source::open(&base).unwrap().tensors[0].bytes().into_owned();
    let merged = source::open(&dir.path().join("t1-Direct.pth")).unwrap();
    assert_ne!(
        merged.tensors[0].bytes().as_ref(),
        base_bytes.as_slice(),
        "the merge changed nothing"
    );
    for same_format in &outs {
        assert!(
            same_format.windows(2).all(|w| w[0] == w[1]),
            "outputs differ between thread counts or I/O modes"
        );
    }
}
