//! Cancelling a run from inside the process (`lorastream::cancel`, what the Python
//! package does on KeyboardInterrupt): a cancelled merge, convert or diff fails with
//! `Interrupted` and leaves no output, not even a temp file; once cleared, the same run
//! succeeds. One test in its own binary: the flag is process-wide, so concurrent tests
//! would see it.

use lorastream::merge::{MergeOptions, merge};
use lorastream::pipeline::{ConvertOptions, convert};
use lorastream::{Error, cancel, diff};
use std::path::{Path, PathBuf};

fn peft() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft")
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn cancelled_runs_fail_interrupted_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = peft().join("bases/llama_f32");
    let opts = MergeOptions {
        bases: vec![(None, base.clone())],
        loras: vec![(None, peft().join("cases/llama_f32/adapter"))],
        ..Default::default()
    };
    let single = dir.path().join("merged.safetensors");
    let sharded = dir.path().join("sharded/");
    let converted = dir.path().join("converted.pth");
    let conv = ConvertOptions::default();

    cancel::request();
    for out in [&single, &sharded] {
        let r = merge(out, &opts);
        assert!(matches!(r, Err(Error::Interrupted)), "{out:?}: {r:?}");
    }
    let r = convert(&base, &converted, &conv);
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    let r = diff::diff(&base, &base, false);
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert_eq!(listing(dir.path()), Vec::<String>::new());
    // Errors name their kind as the CLI's JSON does.
    assert_eq!(Error::Interrupted.kind(), "interrupted");

    cancel::clear();
    merge(&single, &opts).unwrap();
    merge(&sharded, &opts).unwrap();
    convert(&base, &converted, &conv).unwrap();
    assert!(diff::diff(&single, &single, false).unwrap().identical);
    assert_eq!(
        listing(dir.path()),
        ["converted.pth", "merged.safetensors", "sharded"]
    );
}
