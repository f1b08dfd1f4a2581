//! End-to-end tests of quantized bases (fixtures/quant, made by transformers and
//! bitsandbytes): what `inspect` shows, that convert and merge write dequantized weights
//! and a config.json without `quantization_config`, and that quantizations lorastream does
//! not decode are refused by name with nothing written. Value checks against the
//! libraries' own dequantization are in tests/compat/test_quant.py.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lorastream")
}

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/quant")
        .join(name)
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(bin());
    for a in args {
        c.arg(a);
    }
    c.output().expect("run lorastream")
}

fn inspect(path: &Path) -> Value {
    let o = run(&[&"inspect", &"--json", &path]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

fn tensor<'a>(rep: &'a Value, name: &str) -> &'a Value {
    rep["tensors"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("{name} not listed"))
}

#[test]
fn inspect_lists_dequantized_tensors_with_their_stored_form() {
    let rep = inspect(&fx("bnb_nf4"));
    let q = tensor(&rep, "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(q["dtype"], "BF16");
    assert_eq!(q["shape"], serde_json::json!([96, 96]));
    assert!(q["stored"].as_str().unwrap().contains("nf4"), "{q}");
    // Packed bytes + uint8 absmax + f32 nested absmax + both code maps + JSON state.
    assert!(q["bytes"].as_u64().unwrap() > 96 * 96 / 2);
    let names: Vec<&str> = rep["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("absmax") || n.contains("quant_state"))
    );
    let rep = inspect(&fx("mxfp4_experts"));
    let e = tensor(&rep, "model.layers.0.mlp.experts.gate_up_proj");
    assert_eq!(e["shape"], serde_json::json!([2, 96, 24]));
    assert_eq!(e["bytes"], 2 * 24 * 3 * 16 + 2 * 24 * 3);
}

#[test]
fn folder_outputs_drop_quantization_config() {
    let dir = tempfile::tempdir().unwrap();
    for (base, lora, dtype) in [
        ("fp8_block", Some("lora_llama128"), "bfloat16"),
        // LLM.int8 dequantizes to f32, but quantized bases are written bf16 unless
        // --dtype says otherwise: the config says so.
        ("bnb_int8", None, "bfloat16"),
    ] {
        let out = dir.path().join(base);
        let out_s = format!("{}/", out.display());
        let o = match lora {
            Some(l) => run(&[
                &"merge",
                &"--base",
                &fx(base),
                &"--lora",
                &fx(l),
                &"--out",
                &out_s,
            ]),
            None => run(&[&"convert", &fx(base), &out_s]),
        };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none(), "{base}: {cfg}");
        assert_eq!(cfg["dtype"], dtype, "{base}");
        let rep = inspect(&out);
        let q = tensor(&rep, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(q["dtype"], "BF16", "{base}");
        assert!(q.get("stored").is_none());
        assert!(
            rep["tensors"].as_array().unwrap().iter().all(|t| !t["name"]
                .as_str()
                .unwrap()
                .ends_with("_scale_inv")
                && !t["name"].as_str().unwrap().ends_with("SCB"))
        );
    }
}

/// `--dtype f32` still gives the int8 weights' own f32 decoding (and says so).
#[test]
fn dtype_overrides_the_bf16_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f32");
    let out_s = format!("{}/", out.display());
    let o = run(&[&"convert", &fx("bnb_int8"), &out_s, &"--dtype", &"f32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");
    let rep = inspect(&out);
    assert_eq!(
        tensor(&rep, "model.layers.0.self_attn.q_proj.weight")["dtype"],
        "F32"
    );
}

#[test]
fn undecoded_quantizations_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("awq");
    std::fs::create_dir(&src).unwrap();
    std::fs::copy(
        fx("fp8_block/model.safetensors"),
        src.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        src.join("config.json"),
        r#"{"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4}}"#,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let o = run(&[&"convert", &src, &out]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("quant_method = \"awq\"") && e.contains("config.json"),
        "{e}"
    );
    assert!(!out.exists());
    // Merging into it is refused the same way.
    let o = run(&[
        &"merge",
        &"--base",
        &src,
        &"--lora",
        &fx("lora_llama128"),
        &"--out",
        &out,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!out.exists());
}
