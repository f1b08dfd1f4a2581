//! End-to-end tests of the SHiRA, DeLoRA, MiSS, FourierFT, C3A and WaveFT merges through the
//! binary, on the real-PEFT fixtures (`fixtures/tuner_matrix/`): bf16 merges equal to PEFT's
//! bits (`lorastream diff --exact`), and the layout refusal of the spectral tuners on a bare
//! base, which the `--no-fan-in-fan-out` flag settles. The full matrix (every row and dtype)
//! is tests/compat/test_tuners.py.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fx(tuner: &str, rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tuner_matrix")
        .join(tuner)
        .join(rel)
        .display()
        .to_string()
}

fn run(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lorastream-tuners-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Merges `row` of `tuner` into the bf16 MLP base and checks PEFT's bits.
fn merges_like_peft(tuner: &str, row: &str, extra: &[&str]) {
    let d = tmp(&format!("{tuner}-{row}"));
    let out = d.join("out.safetensors").display().to_string();
    let (base, lora) = (
        fx(tuner, "bases/mlp_bf16"),
        fx(tuner, &format!("adapters/{row}")),
    );
    let mut args = vec!["merge", "--base", &base, "--lora", &lora, "--out", &out];
    args.extend_from_slice(extra);
    let (rc, err) = run(&args);
    assert_eq!(rc, 0, "{tuner}/{row}: {err}");
    let expected = fx(tuner, &format!("expected/{row}__bf16.safetensors"));
    let (rc, err) = run(&["diff", "--exact", &out, &expected]);
    assert_eq!(rc, 0, "{tuner}/{row} differs from PEFT: {err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bf16_merges_equal_peft() {
    merges_like_peft("shira", "vanilla_mlp_4_shira", &[]);
    merges_like_peft("delora", "vanilla_mlp_4_delora", &[]);
    merges_like_peft("miss", "vanilla_mlp_3_miss", &[]);
    merges_like_peft("miss", "vanilla_mlp_3_miss_with_bat", &[]);
    merges_like_peft("c3a", "vanilla_mlp_7_c3a", &[]);
    let linear = ["--no-fan-in-fan-out", "."];
    merges_like_peft("fourierft", "vanilla_mlp_7_fourierft", &linear);
    merges_like_peft("waveft", "vanilla_mlp_8_waveft", &linear);
    merges_like_peft("waveft", "vanilla_mlp_9_waveft", &linear);
}

#[test]
fn spectral_tuners_on_a_bare_base_need_the_layout_settled() {
    for (tuner, row) in [
        ("fourierft", "vanilla_mlp_1_fourierft"),
        ("waveft", "vanilla_mlp_1_waveft"),
    ] {
        let d = tmp(tuner);
        let out = d.join("out.safetensors");
        let (rc, err) = run(&[
            "merge",
            "--base",
            &fx(tuner, "bases/mlp_f32"),
            "--lora",
            &fx(tuner, &format!("adapters/{row}")),
            "--out",
            &out.display().to_string(),
        ]);
        assert_eq!(rc, 1, "{tuner}: {err}");
        assert!(
            err.contains("lin0") && err.contains("fan-in-fan-out"),
            "{err}"
        );
        assert!(!out.exists(), "{tuner}: output left behind");
        std::fs::remove_dir_all(d).unwrap();
    }
}
