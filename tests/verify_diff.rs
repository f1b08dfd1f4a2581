//! `verify` and `diff` end to end, through the binary, on the PEFT fixtures
//! (`fixtures/peft/`): a fresh merge verifies (exit 0) in every output format; one
//! perturbed element makes verify exit 1 naming the tensor (or not, within the
//! tolerance, or outside the sampled rows); missing, extra, dtype-changed and tied keys
//! are reported as such; anything that prevents the check exits 2; `diff` reports the
//! same facts about two checkpoints.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lorastream");

fn fx(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/peft")
        .join(rel)
        .display()
        .to_string()
}

/// The merge of the llama_f32 case: `--base … --lora …`.
fn llama_args() -> Vec<String> {
    vec![
        "--base".into(),
        fx("bases/llama_f32"),
        "--lora".into(),
        fx("cases/llama_f32/adapter"),
        "--device".into(),
        "cpu".into(),
    ]
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn verify(out: &Path, merge: &[String], extra: &[&str]) -> Output {
    let mut a: Vec<&str> = vec!["verify", out.to_str().unwrap()];
    a.extend(merge.iter().map(String::as_str));
    a.extend(extra);
    run(&a)
}

fn merge_to(out: &Path, merge: &[String], extra: &[&str]) {
    let mut a: Vec<&str> = vec!["merge", "--out", out.to_str().unwrap()];
    a.extend(merge.iter().map(String::as_str));
    a.extend(extra);
    let o = run(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Byte offset and dtype of tensor `name`'s data in a safetensors file.
fn locate(path: &Path, name: &str) -> (usize, String) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let start = h[name]["data_offsets"][0].as_u64().unwrap() as usize;
    (
        8 + n + start,
        h[name]["dtype"].as_str().unwrap().to_string(),
    )
}

/// Changes f32 element `index` of tensor `name` in a safetensors file with `f`.
fn perturb(path: &Path, name: &str, index: usize, f: impl Fn(f32) -> f32) {
    let (at, dtype) = locate(path, name);
    assert_eq!(dtype, "F32");
    let mut b = std::fs::read(path).unwrap();
    let p = at + 4 * index;
    let v = f32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    b[p..p + 4].copy_from_slice(&f(v).to_le_bytes());
    std::fs::write(path, b).unwrap();
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn a_fresh_merge_verifies_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for out in ["m.safetensors", "m.pth", "sharded/"] {
        let path: PathBuf = dir.path().join(out);
        let mut a = llama_args();
        if out.ends_with('/') {
            a.extend(["--shard-size".into(), "8000".into()]);
        }
        merge_to(&path, &a, &[]);
        let o = verify(&path, &llama_args(), &["--exact", "--json"]);
        assert_eq!(o.status.code(), Some(0), "{out}: {}", stdout(&o));
        let r = json(&o);
        assert_eq!(r["matches"], true);
        assert_eq!(r["planned"], 21);
        assert_eq!(r["compared"], 21);
        assert_eq!(r["elements_compared"], 6736);
    }
    // PEFT's own merge_and_unload output, saved like save_pretrained.
    let o = verify(
        Path::new(&fx("cases/llama_f32/expected.safetensors")),
        &llama_args(),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("OK: "), "{}", stdout(&o));
}

#[test]
fn one_perturbed_element_is_found_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    merge_to(&out, &llama_args(), &[]);
    // 1 ulp: inside the default tolerance, not bit-exact.
    perturb(&out, Q, 17, |v| f32::from_bits(v.to_bits() + 1));
    assert_eq!(verify(&out, &llama_args(), &[]).status.code(), Some(0));
    let o = verify(&out, &llama_args(), &["--exact", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r = json(&o);
    let d = &r["differing"];
    assert_eq!(d.as_array().unwrap().len(), 1, "{r}");
    assert_eq!(d[0]["name"], Q);
    assert_eq!(d[0]["differing"], 1);
    assert_eq!(d[0]["max_ulp"], 1);
    assert_eq!(d[0]["first_differing"], 17);
    // --max-ulp 0 is values: the same finding.
    assert_eq!(
        verify(&out, &llama_args(), &["--max-ulp", "0"])
            .status
            .code(),
        Some(1)
    );
    // A real error: outside the tolerance, in the text report too.
    perturb(&out, Q, 17, |v| v + 0.25);
    let o = verify(&out, &llama_args(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.starts_with(Q))
        .expect("a row naming the tensor");
    assert!(line.contains("1/256"), "{line}");
    assert!(text.contains("DIFFERENT: "), "{text}");
    // q_proj is [16, 16]: element 17 is in row 1. Two sampled rows (0 and 15) miss it; 16
    // rows (all) find it; element 3 (row 0) is always found.
    let s = json(&verify(&out, &llama_args(), &["--sample", "2", "--json"]));
    assert_eq!(s["matches"], true, "{s}");
    assert!(s["elements_compared"].as_u64().unwrap() < 6736);
    let o = verify(&out, &llama_args(), &["--sample", "16"]);
    assert_eq!(o.status.code(), Some(1));
    perturb(&out, Q, 17, |v| v - 0.25);
    perturb(&out, Q, 3, |v| v * 2.0 + 1.0);
    let o = verify(&out, &llama_args(), &["--sample", "2", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r = json(&o);
    assert_eq!(r["differing"][0]["name"], Q);
    assert_eq!(
        r["differing"][0]["rows_compared"],
        serde_json::json!([0, 15])
    );
    assert_eq!(r["differing"][0]["compared"], 32);
}

#[test]
fn keys_and_dtypes_that_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.safetensors");
    merge_to(&full, &llama_args(), &[]);
    // OUT lacks lm_head.weight (and it is not a tied copy of embed_tokens here).
    let cut = dir.path().join("cut.safetensors");
    merge_to(&cut, &llama_args(), &["--exclude", "^lm_head"]);
    let r = json(&verify(&cut, &llama_args(), &["--json"]));
    assert_eq!(r["matches"], false);
    assert_eq!(r["missing"], serde_json::json!(["lm_head.weight"]));
    assert!(r["tied"].as_array().unwrap().is_empty());
    assert_eq!(verify(&cut, &llama_args(), &[]).status.code(), Some(1));
    // OUT has a key the merge does not produce.
    let mut fewer = llama_args();
    fewer.extend(["--exclude".into(), "^model\\.norm".into()]);
    let o = verify(&full, &fewer, &["--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json(&o)["extra"], serde_json::json!(["model.norm.weight"]));
    // OUT in another dtype: every tensor differs by dtype, values compared as values.
    let bf = dir.path().join("bf16.safetensors");
    merge_to(&bf, &llama_args(), &["--dtype", "bf16"]);
    let r = json(&verify(&bf, &llama_args(), &["--json"]));
    let d = r["differing"].as_array().unwrap();
    assert_eq!(d.len(), 21);
    assert!(
        d.iter()
            .all(|t| t["dtype_a"] == "F32" && t["dtype_b"] == "BF16")
    );
    assert!(d.iter().all(|t| t["max_ulp"].is_null()));
    // …and with the same --dtype it matches.
    let mut as_bf = llama_args();
    as_bf.extend(["--dtype".into(), "bf16".into()]);
    assert_eq!(verify(&bf, &as_bf, &["--exact"]).status.code(), Some(0));
}

/// save_pretrained drops one of a pair of tied weights: a missing lm_head.weight whose
/// recomputed values equal OUT's embed_tokens.weight is reported as tied, not missing.
#[test]
fn a_dropped_tied_lm_head_is_reported_as_tied() {
    let dir = tempfile::tempdir().unwrap();
    // A base whose lm_head is a copy of embed_tokens (a tied model saved in full).
    let src = std::fs::read(fx("bases/llama_f32/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&src).unwrap();
    let embed = st.tensor("model.embed_tokens.weight").unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (name, view) in st.tensors() {
        let v = if name == "lm_head.weight" {
            embed.clone()
        } else {
            view
        };
        tensors.push((name, v));
    }
    let base = dir.path().join("tied.safetensors");
    safetensors::serialize_to_file(tensors, None, &base).unwrap();
    // A llama's config.json beside the base settles its square weights' layout.
    std::fs::copy(
        fx("bases/llama_f32/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let args = vec![
        "--base".to_string(),
        base.display().to_string(),
        "--lora".into(),
        fx("cases/llama_f32/adapter"),
    ];
    let out = dir.path().join("out.safetensors");
    merge_to(&out, &args, &["--exclude", "^lm_head"]);
    let o = verify(&out, &args, &["--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let r = json(&o);
    assert_eq!(
        r["tied"],
        serde_json::json!([{"name": "lm_head.weight", "equals": "model.embed_tokens.weight"}])
    );
    let o = verify(&out, &args, &[]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("lm_head.weight is not in OUT"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn what_cannot_be_checked_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    merge_to(&out, &llama_args(), &[]);
    let o = verify(&dir.path().join("absent.safetensors"), &llama_args(), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("absent.safetensors"));
    // A bad input of the merge (an adapter that matches nothing).
    let bad = vec![
        "--base".to_string(),
        fx("bases/llama_f32"),
        "--lora".into(),
        fx("cases/refuse/matches_nothing"),
    ];
    assert_eq!(verify(&out, &bad, &[]).status.code(), Some(2));
    assert_eq!(
        verify(&out, &llama_args(), &["--sample", "1"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(verify(&out, &[], &[]).status.code(), Some(2));
    // A file that is not a checkpoint.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    assert_eq!(verify(&junk, &llama_args(), &[]).status.code(), Some(2));
    assert_eq!(
        run(&["diff", junk.to_str().unwrap(), out.to_str().unwrap()])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn diff_reports_keys_dtypes_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("m.safetensors");
    let pth = dir.path().join("m.pth");
    merge_to(&st, &llama_args(), &[]);
    merge_to(&pth, &llama_args(), &[]);
    let d = |a: &Path, b: &str, extra: &[&str]| {
        let mut v = vec!["diff", a.to_str().unwrap(), b];
        v.extend(extra);
        run(&v)
    };
    // Same tensors in two formats.
    let o = d(&st, pth.to_str().unwrap(), &["--exact"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("identical: 21 tensors, 6736 elements"));
    // Base against merge: the 14 targeted weights changed, nothing else.
    let o = d(&st, &fx("bases/llama_f32"), &["--json"]);
    assert_eq!(o.status.code(), Some(1));
    let r = json(&o);
    let changed = r["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 14);
    assert!(
        changed
            .iter()
            .all(|t| t["name"].as_str().unwrap().ends_with("_proj.weight"))
    );
    // Keys on one side only, and a dtype change.
    let cut = dir.path().join("cut.safetensors");
    merge_to(
        &cut,
        &llama_args(),
        &["--exclude", "^lm_head", "--dtype", "f16"],
    );
    let r = json(&d(&st, cut.to_str().unwrap(), &["--json"]));
    assert_eq!(r["only_in_a"], serde_json::json!(["lm_head.weight"]));
    assert_eq!(r["only_in_b"], serde_json::json!([]));
    let c = r["changed"].as_array().unwrap();
    assert_eq!(c.len(), 20);
    assert!(
        c.iter()
            .all(|t| t["dtype_a"] == "F32" && t["dtype_b"] == "F16")
    );
    let text = stdout(&d(&st, cut.to_str().unwrap(), &[]));
    assert!(text.contains("F32->F16"), "{text}");
    assert!(text.contains("only in A: 1\n  lm_head.weight"), "{text}");
}

/// A 128 MiB tensor is compared in pieces: verify's peak RSS stays far below its size.
#[test]
fn verify_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let n = 32 << 20; // f32 elements: 128 MiB
    let data: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let shape = vec![8192usize, n / 8192];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &data).unwrap();
    let base = dir.path().join("big.safetensors");
    safetensors::serialize_to_file([("w", view)], None, &base).unwrap();
    drop(data);
    let args = vec!["--base".to_string(), base.display().to_string()];
    let o = verify(&base, &args, &["--json", "--exact"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let r = json(&o);
    assert_eq!(r["elements_compared"], n as u64);
    let rss = r["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        rss > 0 && rss < 80 << 20,
        "peak RSS {rss} for a 128 MiB tensor"
    );
}
