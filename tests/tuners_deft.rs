//! End-to-end merges of the DEFT, PEANuT, OSF, PSOFT and FRoD rows of the real-PEFT tuner
//! fixtures (`fixtures/tuner_matrix/<tuner>/`, made by `fixtures/make_tuner_matrix.py`)
//! through the library's `merge`, without Python: every case lorastream merges within the
//! case's ulp tolerance of PEFT's `merge_and_unload()`, every refused case an error that
//! names the reason and leaves no output. (Super-Tuning's cases run in
//! `tests/compat/test_tuners.py`; they need int32 indices past the plan's dtype check.)

use lorastream::merge::{MergeOptions, merge};
use lorastream::source::{self, TensorEntry};
use lorastream::{Dtype, dtype::decode_f32};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir(tuner: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/tuner_matrix/{tuner}"))
}

fn cases(tuner: &str) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir(tuner).join("cases.json")).unwrap())
            .unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn options(tuner: &str, case: &Value) -> MergeOptions {
    let mut o = MergeOptions::default();
    o.bases
        .push((None, dir(tuner).join(case["base"].as_str().unwrap())));
    for l in case["loras"].as_array().unwrap() {
        o.loras.push((None, dir(tuner).join(l.as_str().unwrap())));
    }
    o
}

/// Largest distance in ulps of `dtype` between two tensors' values.
fn ulps(dtype: Dtype, a: &[u8], b: &[u8]) -> u64 {
    let n = a.len() / dtype.size();
    let (mut x, mut y) = (vec![0f32; n], vec![0f32; n]);
    decode_f32(dtype, a, &mut x);
    decode_f32(dtype, b, &mut y);
    let ordered = |v: f32| -> i64 {
        let (bits, sign) = match dtype {
            Dtype::F16 => (half::f16::from_f32(v).to_bits() as i64, 0x8000),
            Dtype::BF16 => (half::bf16::from_f32(v).to_bits() as i64, 0x8000),
            _ => (v.to_bits() as i64, 0x8000_0000),
        };
        if bits & sign != 0 { sign - bits } else { bits }
    };
    x.iter()
        .zip(&y)
        .map(|(p, q)| ordered(*p).abs_diff(ordered(*q)))
        .max()
        .unwrap_or(0)
}

fn run(tuner: &str) -> (usize, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let (mut merged, mut refused) = (0, 0);
    for case in cases(tuner) {
        let name = case["name"].as_str().unwrap();
        let out = tmp.path().join(format!("{name}.safetensors"));
        let result = merge(&out, &options(tuner, &case));
        if case["lorastream"] == "merge" && case.get("refuse").is_none() {
            result.unwrap_or_else(|e| panic!("{name}: {e}"));
            let ours = source::open(&out).unwrap();
            let exp = source::open(&dir(tuner).join(case["expected"].as_str().unwrap())).unwrap();
            let o: HashMap<&str, &TensorEntry> =
                ours.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
            assert_eq!(o.len(), exp.tensors.len(), "{name}: key sets");
            let tol = case["ulp_tolerance"].as_u64().unwrap();
            for et in &exp.tensors {
                let ot = o[et.name.as_str()];
                assert_eq!((ot.dtype, &ot.shape), (et.dtype, &et.shape), "{name}");
                let d = ulps(et.dtype, &ot.bytes(), &et.bytes());
                assert!(
                    d <= tol,
                    "{name}: {} is {d} ulp from PEFT (allowed {tol})",
                    et.name
                );
            }
            merged += 1;
        } else {
            let e = result
                .err()
                .unwrap_or_else(|| panic!("{name}: merged, expected a refusal"));
            let msg = e.to_string();
            let names: Vec<String> = case
                .get("stderr_one_of")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_else(|| vec![case["peft_type"].as_str().unwrap().to_string()]);
            assert!(
                names
                    .iter()
                    .any(|n| msg.to_lowercase().contains(&n.to_lowercase())),
                "{name}: {msg}"
            );
            assert!(!out.exists(), "{name}: output left behind");
            refused += 1;
        }
    }
    (merged, refused)
}

#[test]
fn deft_relu_and_para_merge_like_peft_and_qr_is_refused() {
    assert_eq!(run("deft"), (18, 9));
}

#[test]
fn peanut_merges_like_peft() {
    assert_eq!(run("peanut"), (15, 0));
}

#[test]
fn osf_psoft_frod_are_refused_with_the_reason() {
    assert_eq!(run("osf"), (0, 6));
    assert_eq!(run("psoft"), (0, 30));
    assert_eq!(run("frod"), (0, 15));
}
