//! End-to-end tests of what `lorastream merge` checks and refuses ("never silently
//! wrong"): `--expect-keys-from` in both directions, adapter coverage, duplicate adapters
//! and adapters given as `--base`, non-finite values created by a merge, and the planning
//! checks `--dry-run` shares with a real run. Runs the binary for exit codes and messages;
//! uses the PEFT fixtures (`fixtures/peft/`) and small checkpoints written here.

use lorastream::Dtype;
use lorastream::dtype::{decode_f32, encode_f32};
use lorastream::sink::{OutTensor, SafetensorsWriter, TensorSink};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn peft(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/peft")
        .join(p)
}

fn base() -> PathBuf {
    peft("bases/llama_f32")
}

fn adapter() -> PathBuf {
    peft("cases/llama_f32/adapter")
}

/// Runs the binary; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes a safetensors file; floating tensors from f32 values, others from raw bytes.
fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let plan: Vec<OutTensor> = tensors
        .iter()
        .map(|(n, d, s, _)| OutTensor {
            name: n.to_string(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    let mut w = Box::new(SafetensorsWriter::create(path, &plan, false).unwrap());
    for (t, (_, d, _, vals)) in plan.iter().zip(tensors) {
        w.begin(t).unwrap();
        let n: usize = t.shape.iter().product();
        assert_eq!(vals.len(), n, "{}", t.name);
        let mut bytes = vec![0u8; n * d.size()];
        if d.is_float() {
            encode_f32(*d, vals, &mut bytes);
        } else {
            for (b, v) in bytes.chunks_mut(d.size()).zip(vals) {
                b[0] = *v as u8;
            }
        }
        w.write(&bytes).unwrap();
        w.end().unwrap();
    }
    w.finish().unwrap();
}

fn write_adapter(dir: &Path, config: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    write_st(&dir.join("adapter_model.safetensors"), tensors);
}

fn base_keys() -> Vec<String> {
    lorastream::source::open(&base())
        .unwrap()
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .collect()
}

// ---------------------------------------------------------------- --expect-keys-from

#[test]
fn expected_keys_pass_when_they_match_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let reference = base().join("model.safetensors");
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--lora",
        &s(&adapter()),
        "--out",
        &s(&out),
        "--expect-keys-from",
        &s(&reference),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_file());
}

#[test]
fn reference_keys_missing_from_the_output_fail_and_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    // A misspelt component: the reference expects visual_encoder.*, the user typed visual_encodr.
    let reference = dir.path().join("keys.txt");
    let mut keys: Vec<String> = base_keys().iter().map(|k| format!("llm.{k}")).collect();
    keys.push("visual_encoder.patch_embed.weight".into());
    std::fs::write(&reference, keys.join("\n")).unwrap();
    let vis = dir.path().join("vis.safetensors");
    write_st(
        &vis,
        &[("patch_embed.weight", Dtype::F32, vec![2], vec![1.0, 2.0])],
    );
    let args = [
        "merge",
        "--base",
        &format!("llm={}", s(&base())),
        "--lora",
        &format!("llm={}", s(&adapter())),
        "--base",
        &format!("visual_encodr={}", s(&vis)),
        "--out",
        &s(&out),
        "--expect-keys-from",
        &s(&reference),
    ];
    let (code, _, err) = run(&args);
    assert_eq!(code, 1, "{err}");
    for want in [
        "visual_encoder.patch_embed.weight (in the reference, not in the output)",
        "visual_encodr.patch_embed.weight (not in the reference)",
        "--allow-missing-keys",
        "Nothing was written",
        reference.to_str().unwrap(),
    ] {
        assert!(err.contains(want), "'{want}' not in: {err}");
    }
    assert_eq!(entries(dir.path()), ["keys.txt", "vis.safetensors"]);

    // --allow-missing-keys: only the missing direction is allowed; the extra key still fails.
    let mut allowed = args.to_vec();
    allowed.push("--allow-missing-keys");
    let (code, _, err) = run(&allowed);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("visual_encodr.patch_embed.weight (not in the reference)"),
        "{err}"
    );
    assert!(
        !err.contains("in the reference, not in the output"),
        "{err}"
    );

    // Without the misspelt component, the partial output is written with a note.
    let partial = [
        "merge",
        "--base",
        &format!("llm={}", s(&base())),
        "--lora",
        &format!("llm={}", s(&adapter())),
        "--out",
        &s(&out),
        "--expect-keys-from",
        &s(&reference),
        "--allow-missing-keys",
        "--json",
    ];
    let (code, stdout, err) = run(&partial);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("visual_encoder.patch_embed.weight"),
        "{notes}"
    );
    assert!(
        err.contains("note: --allow-missing-keys: 1 key(s)"),
        "{err}"
    );
    assert!(out.is_file());
}

#[test]
fn allow_missing_keys_needs_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--out",
        &s(&dir.path().join("o.pth")),
        "--allow-missing-keys",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--expect-keys-from"), "{err}");
}

#[test]
fn reference_lists_the_first_50_keys() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("keys.txt");
    let mut keys = base_keys();
    keys.extend((0..70).map(|i| format!("extra.{i:03}")));
    std::fs::write(&reference, keys.join("\n")).unwrap();
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--out",
        &s(&dir.path().join("o.pth")),
        "--expect-keys-from",
        &s(&reference),
        "--dry-run",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("70 key(s) of"), "{err}");
    assert!(
        err.contains("extra.049") && !err.contains("extra.050"),
        "{err}"
    );
    assert!(err.contains("… and 20 more"), "{err}");
}

// ---------------------------------------------------------------- coverage

#[test]
fn report_counts_adapter_tensors_per_component_and_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let (code, stdout, err) = run(&[
        "merge",
        "--base",
        &format!("llm={}", s(&base())),
        "--lora",
        &format!("llm={}", s(&adapter())),
        "--out",
        &s(&out),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    let a = &r["components"][0]["adapters"][0];
    assert_eq!(a["path"], s(&adapter()));
    assert_eq!(
        (a["tensors"].as_u64(), a["used"].as_u64()),
        (Some(28), Some(28))
    );
    // The text summary says the same.
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--lora",
        &s(&adapter()),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("adapter tensors used 28/28"), "{err}");
}

#[test]
fn lora_bias_and_magnitude_count_under_keep_lora_too() {
    let dir = tempfile::tempdir().unwrap();
    for (case, b) in [("lora_bias", "gpt2_f32"), ("dora_linear", "llama_f32")] {
        let ad = peft(&format!("cases/{case}/adapter"));
        let n = lorastream::source::open(&ad.join("adapter_model.safetensors"))
            .unwrap()
            .tensors
            .len() as u64;
        for keep in [false, true] {
            let out = dir.path().join(format!("{case}{keep}.safetensors"));
            let mut args = vec![
                "merge".to_string(),
                "--base".into(),
                s(&peft(&format!("bases/{b}"))),
                "--lora".into(),
                s(&ad),
                "--out".into(),
                s(&out),
                "--json".into(),
            ];
            if keep {
                args.push("--keep-lora".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, stdout, err) = run(&args);
            assert_eq!(code, 0, "{case} keep={keep}: {err}");
            let r: Value = serde_json::from_str(&stdout).unwrap();
            let a = &r["components"][0]["adapters"][0];
            assert_eq!(a["tensors"].as_u64(), Some(n), "{case}");
            assert_eq!(a["used"].as_u64(), Some(n), "{case} keep={keep}");
        }
    }
}

#[test]
fn adapter_tensor_whose_target_is_excluded_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // modules_to_save=['lm_head']: the adapter's lm_head.weight replaces the base one.
    let ad = peft("cases/modules_to_save/adapter");
    for keep in [false, true] {
        let (b, ad_s, out) = (s(&base()), s(&ad), s(&dir.path().join("o.safetensors")));
        let mut args = vec![
            "merge",
            "--base",
            &b,
            "--lora",
            &ad_s,
            "--out",
            &out,
            "--exclude",
            "lm_head",
        ];
        if keep {
            args.push("--keep-lora");
        }
        let (code, _, err) = run(&args);
        assert_eq!(code, 1, "keep={keep}: {err}");
        assert!(err.contains("base_model.model.lm_head"), "{err}");
        assert!(err.contains("used by no output tensor"), "{err}");
        assert!(
            err.contains("--exclude 'lm_head'") && err.contains(&ad_s),
            "{err}"
        );
        assert!(entries(dir.path()).is_empty(), "output left");
    }
    // The same for a LoRA module: its A and B would be dropped with the weight.
    let out = dir.path().join("o.safetensors");
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--lora",
        &s(&adapter()),
        "--out",
        &s(&out),
        "--exclude",
        r"layers\.1\.mlp\.up_proj",
        "--dry-run",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("2 of its 28 tensors"), "{err}");
    assert!(err.contains("model.layers.1.mlp.up_proj.lora_"), "{err}");
}

// ---------------------------------------------------------------- usage errors

#[test]
fn the_same_adapter_twice_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let same = format!("{}/../adapter/", s(&adapter()));
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--lora",
        &s(&adapter()),
        "--lora",
        &same,
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("given twice"), "{err}");
    assert!(entries(dir.path()).is_empty());
    // For two components it is two merges, not a mistake.
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &format!("a={}", s(&base())),
        "--lora",
        &format!("a={}", s(&adapter())),
        "--base",
        &format!("b={}", s(&base())),
        "--lora",
        &format!("b={same}"),
        "--out",
        &s(&out),
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn an_adapter_given_as_base_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.pth");
    for b in [adapter(), adapter().join("adapter_model.safetensors")] {
        let (code, _, err) = run(&[
            "merge",
            "--base",
            &format!("llm={}", s(&b)),
            "--out",
            &s(&out),
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("is a PEFT adapter") && err.contains("--lora llm="),
            "{err}"
        );
    }
    assert!(entries(dir.path()).is_empty());
}

// ---------------------------------------------------------------- non-finite values

const CONFIG_R1: &str = r#"{"peft_type":"LORA","r":1,"lora_alpha":1}"#;

/// An f16 base `w.weight` [rows, cols] (ones, with `base_inf` elements set to inf) and an
/// r=1 adapter whose delta is `a·b` on the rows listed in `big_rows`, 0.001 elsewhere.
fn overflow_case(
    dir: &Path,
    rows: usize,
    cols: usize,
    base_inf: &[usize],
    big_rows: &[usize],
    ab: f32,
) -> (PathBuf, PathBuf) {
    let basef = dir.join("base.safetensors");
    let mut w = vec![1.0f32; rows * cols];
    for &i in base_inf {
        w[i] = f32::INFINITY;
    }
    write_st(&basef, &[("w.weight", Dtype::F16, vec![rows, cols], w)]);
    let b: Vec<f32> = (0..rows)
        .map(|i| if big_rows.contains(&i) { ab } else { 0.001 })
        .collect();
    let ad = dir.join("adapter");
    write_adapter(
        &ad,
        CONFIG_R1,
        &[
            (
                "base_model.model.w.lora_A.weight",
                Dtype::F32,
                vec![1, cols],
                vec![ab; cols],
            ),
            (
                "base_model.model.w.lora_B.weight",
                Dtype::F32,
                vec![rows, 1],
                b,
            ),
        ],
    );
    (basef, ad)
}

#[test]
fn a_merge_that_overflows_f16_fails_naming_tensor_count_and_first_element() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (8, 16);
    // 300 · 300 = 90000 > 65504 on rows 2 and 5.
    let (b, ad) = overflow_case(dir.path(), rows, cols, &[], &[2, 5], 300.0);
    let out = dir.path().join("o.safetensors");
    let args = [
        "merge",
        "--base",
        &s(&b),
        "--lora",
        &s(&ad),
        "--out",
        &s(&out),
        "--device",
        "cpu",
    ];
    let (code, _, err) = run(&args);
    assert_eq!(code, 1, "{err}");
    for want in [
        "'w.weight'",
        "base.safetensors",
        "created 32 non-finite value(s)",
        "element 32 (row 2, column 0",
        "--allow-non-finite",
        "Nothing was written",
    ] {
        assert!(err.contains(want), "'{want}' not in: {err}");
    }
    assert_eq!(entries(dir.path()), ["adapter", "base.safetensors"]);
    // The dry run cannot see values: it passes (it promises planning, not arithmetic).
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    assert_eq!(run(&dry).0, 0);
    // --allow-non-finite writes them.
    let mut allow = args.to_vec();
    allow.push("--allow-non-finite");
    let (code, _, err) = run(&allow);
    assert_eq!(code, 0, "{err}");
    let ck = lorastream::source::open(&out).unwrap();
    let mut v = vec![0f32; rows * cols];
    decode_f32(Dtype::F16, &ck.tensors[0].bytes(), &mut v);
    assert_eq!(v.iter().filter(|x| x.is_infinite()).count(), 32);
    assert!(v[2 * cols].is_infinite() && v[0].is_finite());
}

#[test]
fn values_already_non_finite_in_the_base_are_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (8, 16);
    // Small delta everywhere; the base has inf at elements 3 and 40: the merge keeps them.
    let (b, ad) = overflow_case(dir.path(), rows, cols, &[3, 40], &[], 1.0);
    let out = dir.path().join("o.safetensors");
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&b),
        "--lora",
        &s(&ad),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    // An overflow elsewhere is still found, and the base's own inf is not counted.
    let dir2 = tempfile::tempdir().unwrap();
    let (b, ad) = overflow_case(dir2.path(), rows, cols, &[3, 40], &[0, 2], 300.0);
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&b),
        "--lora",
        &s(&ad),
        "--out",
        &s(&dir2.path().join("o.pth")),
    ]);
    assert_eq!(code, 1, "{err}");
    // Rows 0 and 2 overflow (32 elements); elements 3 (row 0) and 40 (row 2) were inf already.
    assert!(
        err.contains("created 30 non-finite") && err.contains("element 0 (row 0"),
        "{err}"
    );
}

#[test]
fn nan_in_an_adapter_is_found_in_a_tensor_of_many_bands() {
    // 3000 × 1024 f32 is two bands of 2 Mi elements and more than one group at 1 thread:
    // the first index is found in the last band, across read-ahead groups.
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (3000, 1024);
    let basef = dir.path().join("base.safetensors");
    write_st(
        &basef,
        &[(
            "w.weight",
            Dtype::F32,
            vec![rows, cols],
            vec![0.5; rows * cols],
        )],
    );
    let mut bvals = vec![0.01f32; rows];
    bvals[2999] = f32::NAN;
    bvals[2500] = f32::NAN;
    let ad = dir.path().join("adapter");
    write_adapter(
        &ad,
        CONFIG_R1,
        &[
            (
                "base_model.model.w.lora_A.weight",
                Dtype::F32,
                vec![1, cols],
                vec![1.0; cols],
            ),
            (
                "base_model.model.w.lora_B.weight",
                Dtype::F32,
                vec![rows, 1],
                bvals,
            ),
        ],
    );
    for threads in ["1", "3"] {
        let (code, _, err) = run(&[
            "merge",
            "--base",
            &s(&basef),
            "--lora",
            &s(&ad),
            "--threads",
            threads,
            "--device",
            "cpu",
            "--out",
            &s(&dir.path().join("o.safetensors")),
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("created 2048 non-finite") && err.contains("(row 2500, column 0"),
            "threads {threads}: {err}"
        );
    }
    assert_eq!(entries(dir.path()), ["adapter", "base.safetensors"]);
}

#[test]
fn casting_a_merged_tensor_to_f16_that_overflows_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let basef = dir.path().join("base.safetensors");
    write_st(
        &basef,
        &[("w.weight", Dtype::F32, vec![2, 4], vec![60000.0; 8])],
    );
    let ad = dir.path().join("adapter");
    write_adapter(
        &ad,
        CONFIG_R1,
        &[
            (
                "base_model.model.w.lora_A.weight",
                Dtype::F32,
                vec![1, 4],
                vec![100.0; 4],
            ),
            (
                "base_model.model.w.lora_B.weight",
                Dtype::F32,
                vec![2, 1],
                vec![0.0, 100.0],
            ),
        ],
    );
    let out = dir.path().join("o.safetensors");
    let args = [
        "merge",
        "--base",
        &s(&basef),
        "--lora",
        &s(&ad),
        "--out",
        &s(&out),
        "--dtype",
        "f16",
    ];
    let (code, _, err) = run(&args);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("created 4 non-finite value(s) (inf/NaN) in F16"),
        "{err}"
    );
    assert!(err.contains("element 4 (row 1, column 0"), "{err}");
}

// ---------------------------------------------------------------- dry run and planning

#[test]
fn dry_run_checks_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/o.safetensors");
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--out",
        &s(&missing),
        "--dry-run",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no/such: does not exist"), "{err}");
    let (code, _, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--out",
        "/proc/o.safetensors",
        "--dry-run",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot create a file in the output folder"),
        "{err}"
    );
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    // Non-weight files (an HF repo clone's README) are fine; a checkpoint there is refused
    // unless --overwrite, by a dry run too.
    std::fs::write(shards.join("README.md"), "x").unwrap();
    let dry = |shards: &Path| {
        run(&[
            "merge",
            "--base",
            &s(&base()),
            "--out",
            &format!("{}/", s(shards)),
            "--dry-run",
        ])
    };
    let (code, _, err) = dry(&shards);
    assert_eq!(code, 0, "{err}");
    std::fs::write(shards.join("model.safetensors"), "x").unwrap();
    let (code, _, err) = dry(&shards);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(entries(dir.path()), ["shards"]);
    assert_eq!(entries(&shards), ["README.md", "model.safetensors"]);
}

#[test]
fn lora_on_integer_or_float8_weights_is_refused_in_planning() {
    for dtype in [Dtype::I32, Dtype::F8E4M3] {
        let dir = tempfile::tempdir().unwrap();
        let basef = dir.path().join("base.safetensors");
        write_st(&basef, &[("w.weight", dtype, vec![2, 4], vec![1.0; 8])]);
        let ad = dir.path().join("adapter");
        write_adapter(
            &ad,
            CONFIG_R1,
            &[
                (
                    "base_model.model.w.lora_A.weight",
                    Dtype::F32,
                    vec![1, 4],
                    vec![1.0; 4],
                ),
                (
                    "base_model.model.w.lora_B.weight",
                    Dtype::F32,
                    vec![2, 1],
                    vec![1.0; 2],
                ),
            ],
        );
        let out = dir.path().join("o.safetensors");
        for dry in [true, false] {
            let mut args = vec![
                "merge",
                "--base",
                basef.to_str().unwrap(),
                "--lora",
                ad.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ];
            if dry {
                args.push("--dry-run");
            }
            let (code, _, err) = run(&args);
            assert_eq!(code, 1, "{dtype} dry={dry}: {err}");
            assert!(
                err.contains("'w.weight'") && err.contains(&format!("cannot merge into a {dtype}")),
                "{err}"
            );
            assert!(!err.contains("internal"), "{err}");
        }
        assert_eq!(entries(dir.path()), ["adapter", "base.safetensors"]);
    }
}

#[test]
fn dry_run_json_lists_every_planned_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let (code, stdout, err) = run(&[
        "merge",
        "--base",
        &s(&base()),
        "--lora",
        &s(&adapter()),
        "--out",
        &s(&out),
        "--dry-run",
        "--json",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.exists());
    let r: Value = serde_json::from_str(&stdout).unwrap();
    let plan = r["plan"].as_array().unwrap();
    assert_eq!(plan.len(), 21);
    let total: u64 = plan.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(Some(total), r["bytes"].as_u64());
    let q = plan
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q["apply"], "merge");
    assert_eq!(q["dtype"], "BF16");
    assert_eq!(q["source_dtype"], "F32");
    assert_eq!(q["shape"], serde_json::json!([16, 16]));
    assert_eq!(q["source_tensor"], "model.layers.0.self_attn.q_proj.weight");
    assert!(
        q["source_file"]
            .as_str()
            .unwrap()
            .ends_with("model.safetensors")
    );
    let step = &q["steps"][0];
    assert_eq!(step["kind"], "lora");
    assert_eq!(
        step["tensors"],
        serde_json::json!([
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ])
    );
    let norm = plan
        .iter()
        .find(|t| t["name"] == "model.norm.weight")
        .unwrap();
    assert_eq!(norm["apply"], "cast");
    assert!(norm["steps"].as_array().unwrap().is_empty());
    // A real run reports no plan.
    let (code, stdout, err) = run(&["merge", "--base", &s(&base()), "--out", &s(&out), "--json"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert!(r.get("plan").is_none());
}
