//! End-to-end tests of `--requantize fp8-block` on the committed FP8 fixture
//! (fixtures/quant/fp8_block + lora_llama128, made by fixtures/make_quant_fixtures.py):
//! the output's layout (fp8 weights + f32 scales, as the base), unmerged weights byte for
//! byte, merged ones within the documented error of the dequantized merge, config.json's
//! quantization_config kept, .pth outputs, convert, and the refusals with nothing written.
//! Bit-exactness against transformers' own quantizer is in tests/compat/test_quant.py.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/quant")
        .join(name)
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorastream"));
    for a in args {
        c.arg(a);
    }
    c.output().expect("run lorastream")
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A safetensors file's tensors: name → (dtype, shape, bytes), read without decoding.
fn raw(path: &Path) -> BTreeMap<String, (String, Vec<u64>, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data = &b[8 + n..];
    h.as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (s, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (
                k.clone(),
                (
                    v["dtype"].as_str().unwrap().to_string(),
                    shape,
                    data[s..e].to_vec(),
                ),
            )
        })
        .collect()
}

fn shard(dir: &Path) -> PathBuf {
    dir.join("model-00001-of-00001.safetensors")
}

/// Every tensor of a checkpoint as lorastream reads it (FP8 dequantized), as f32.
fn values(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let ck = lorastream::source::open(path).unwrap();
    ck.tensors
        .iter()
        .map(|t| {
            let b = t.bytes();
            let v = match t.dtype {
                lorastream::dtype::Dtype::BF16 => b
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                    .collect(),
                lorastream::dtype::Dtype::F32 => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                d => panic!("{}: unexpected {d}", t.name),
            };
            (t.name.clone(), v)
        })
        .collect()
}

fn merge(out: &str, extra: &[&str]) -> Output {
    let base = fx("fp8_block");
    let lora = fx("lora_llama128");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"merge", &"--base", &base, &"--lora", &lora, &"--out", &out];
    for e in extra {
        args.push(e);
    }
    run(&args)
}

#[test]
fn merge_writes_the_base_layout_again() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q");
    let plain = dir.path().join("plain");
    ok(&merge(
        &format!("{}/", q.display()),
        &["--requantize", "fp8-block"],
    ));
    ok(&merge(&format!("{}/", plain.display()), &[]));
    let stored = raw(&fx("fp8_block/model.safetensors"));
    let got = raw(&shard(&q));
    // The same tensors, dtypes and shapes as the base.
    let layout =
        |m: &BTreeMap<String, (String, Vec<u64>, Vec<u8>)>| -> Vec<(String, String, Vec<u64>)> {
            m.iter()
                .map(|(k, (d, s, _))| (k.clone(), d.clone(), s.clone()))
                .collect()
        };
    assert_eq!(layout(&got), layout(&stored));
    // A dry run plans exactly that layout.
    let o = merge(
        &format!("{}/", dir.path().join("dry").display()),
        &["--requantize", "fp8-block", "--dry-run", "--json"],
    );
    ok(&o);
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut planned: Vec<(String, String, Vec<u64>)> = rep["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let shape = p["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            (
                p["name"].as_str().unwrap().to_string(),
                p["dtype"].as_str().unwrap().to_string(),
                shape,
            )
        })
        .collect();
    planned.sort();
    assert_eq!(planned, layout(&stored));
    // The adapter targets q_proj, v_proj and down_proj: those change, the rest is as stored.
    let merged = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"];
    for (k, (_, _, bytes)) in &stored {
        let is_merged = merged.iter().any(|m| k.contains(m));
        assert_eq!(got[k].2 == *bytes, !is_merged, "{k}");
    }
    // Read back (dequantized), the merged weights are within the documented error of the
    // dequantized merge: amax/28 per block (e4m3's half ulp at 448) + bf16 rounding.
    let requant = values(&q);
    let exact = values(&plain);
    assert_eq!(
        requant.keys().collect::<Vec<_>>(),
        exact.keys().collect::<Vec<_>>()
    );
    for m in merged {
        let name = format!("model.layers.0.{m}.weight");
        let (a, b) = (&requant[&name], &exact[&name]);
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            err > 0.0 && err <= amax * (1.0 / 28.0 + 1.0 / 512.0),
            "{name}: {err} vs {amax}"
        );
    }
    let cfg = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(
        cfg(&q)["quantization_config"],
        cfg(&fx("fp8_block"))["quantization_config"]
    );
    assert!(cfg(&plain).get("quantization_config").is_none());
}

#[test]
fn pth_outputs_hold_float8() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("m.pth");
    let st = dir.path().join("m.safetensors");
    for out in [&pth, &st] {
        ok(&merge(
            out.to_str().unwrap(),
            &["--requantize", "fp8-block"],
        ));
    }
    // Without the model's config.json beside it, the scales are refused, never copied.
    let o = run(&[&"inspect", &pth]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("weight_scale_inv"));
    std::fs::copy(fx("fp8_block/config.json"), dir.path().join("config.json")).unwrap();
    let o = run(&[&"inspect", &"--json", &pth]);
    ok(&o);
    let rep: Value = serde_json::from_slice(&o.stdout).unwrap();
    let q = rep["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert!(
        q["stored"].as_str().unwrap().contains("float8_e4m3fn"),
        "{q}"
    );
    assert_eq!(q["bytes"], 128 * 128 + 4);
    // The torch zip holds the same fp8 codes and scales as the safetensors output.
    assert_eq!(values(&pth), values(&st));
}

#[test]
fn convert_copies_fp8_weights_and_scales_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c");
    let o = run(&[
        &"convert",
        &fx("fp8_block"),
        &format!("{}/", out.display()),
        &"--requantize",
        &"fp8-block",
        &"--dtype",
        &"f16",
    ]);
    ok(&o);
    let stored = raw(&fx("fp8_block/model.safetensors"));
    let got = raw(&shard(&out));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        stored.keys().collect::<Vec<_>>()
    );
    for (k, (d, _, bytes)) in &stored {
        if d == "F8_E4M3" || k.ends_with("_scale_inv") {
            assert_eq!(got[k].0, *d, "{k}");
            assert!(got[k].2 == *bytes, "{k}: not as stored");
        } else {
            // Everything else follows --dtype.
            assert_eq!(got[k].0, "F16", "{k}");
        }
    }
}

/// An FP8 base whose one weight is 200×300 (partial edge blocks) and a LoRA on it.
fn edge_model(dir: &Path) -> (PathBuf, PathBuf) {
    fn st(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (n, d, s, b) in tensors {
            let begin = data.len();
            data.extend_from_slice(b);
            header.insert(
                n.to_string(),
                serde_json::json!({"dtype": d, "shape": s, "data_offsets": [begin, data.len()]}),
            );
        }
        let h = serde_json::to_string(&Value::Object(header)).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }
    let f32s = |n: usize, k: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (k * ((i % 7) as f32 - 3.0)).to_le_bytes())
            .collect()
    };
    let base = dir.join("edge");
    std::fs::create_dir(&base).unwrap();
    std::fs::write(
        base.join("config.json"),
        r#"{"model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}"#,
    )
    .unwrap();
    let codes: Vec<u8> = (0..200 * 300).map(|i| (i % 100) as u8).collect();
    st(
        &base.join("model.safetensors"),
        &[
            ("l.weight", "F8_E4M3", vec![200, 300], codes),
            ("l.weight_scale_inv", "F32", vec![2, 3], f32s(6, 0.01)),
        ],
    );
    let lora = dir.join("lora");
    std::fs::create_dir(&lora).unwrap();
    std::fs::write(
        lora.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["l"]}"#,
    )
    .unwrap();
    st(
        &lora.join("adapter_model.safetensors"),
        &[
            (
                "base_model.model.l.lora_A.weight",
                "F32",
                vec![1, 300],
                f32s(300, 0.1),
            ),
            (
                "base_model.model.l.lora_B.weight",
                "F32",
                vec![200, 1],
                f32s(200, 0.1),
            ),
        ],
    );
    (base, lora)
}

#[test]
fn refusals_name_the_cause_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (edge, edge_lora) = edge_model(dir.path());
    let (nf4, lora96, fp8, lora128) = (
        fx("bnb_nf4"),
        fx("lora_llama96"),
        fx("fp8_block"),
        fx("lora_llama128"),
    );
    let cases: Vec<(Vec<&dyn AsRef<std::ffi::OsStr>>, i32, &str)> = vec![
        // Not an FP8 base.
        (
            vec![&"merge", &"--base", &nf4, &"--lora", &lora96],
            2,
            "no --base holds FP8 block-scaled weights",
        ),
        (vec![&"convert", &nf4], 2, "no FP8 block-scaled weights"),
        // A merged weight that is not whole blocks.
        (
            vec![&"merge", &"--base", &edge, &"--lora", &edge_lora],
            1,
            "not whole 128x128 blocks",
        ),
        (
            vec![
                &"merge",
                &"--base",
                &fp8,
                &"--lora",
                &lora128,
                &"--keep-lora",
            ],
            2,
            "--keep-lora",
        ),
    ];
    for (mut args, code, want) in cases {
        let is_convert = args[0].as_ref() == "convert";
        if is_convert {
            args.push(&out);
        } else {
            args.push(&"--out");
            args.push(&out);
        }
        args.push(&"--requantize");
        args.push(&"fp8-block");
        let o = run(&args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{e}");
        assert!(e.contains(want), "{e}");
        assert!(!out.exists());
    }
    // The edge model's shape names the tensor; without --requantize it merges.
    let o = run(&[
        &"merge",
        &"--base",
        &edge,
        &"--lora",
        &edge_lora,
        &"--out",
        &out,
        &"--requantize",
        &"fp8-block",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("l.weight"));
    ok(&run(&[
        &"merge", &"--base", &edge, &"--lora", &edge_lora, &"--out", &out,
    ]));
    // --part and an unknown name are usage errors.
    let part = dir.path().join("p");
    let o = run(&[
        &"merge",
        &"--base",
        &fx("fp8_block"),
        &"--lora",
        &fx("lora_llama128"),
        &"--out",
        &format!("{}/", part.display()),
        &"--part",
        &"0/2",
        &"--requantize",
        &"fp8-block",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--part"));
    let o = run(&[&"convert", &fx("fp8_block"), &out, &"--requantize", &"int4"]);
    assert_eq!(o.status.code(), Some(2));
}
