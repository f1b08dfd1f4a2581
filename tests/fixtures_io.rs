//! Readers and writers against the committed fixtures in `fixtures/io/` (made by real
//! torch / safetensors with `fixtures/make_io_fixtures.py`): every tensor's dtype, shape and
//! bytes (sha256) as recorded by the generator, writer round trips, and every malformed
//! input in `fixtures/io/bad/` refused by the CLI with exit 1, a message naming the file,
//! and nothing left behind.

use lorastream::pipeline::{ConvertOptions, convert};
use lorastream::source;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

fn io_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/io")
}

fn load_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Checks a checkpoint's tensors against the generator's record for it.
fn check_against(path: &Path, want: &Value, label: &str, check_skipped: bool) {
    let ckpt = source::open(path).unwrap_or_else(|e| panic!("{label}: {e}"));
    let want_tensors = want["tensors"].as_object().unwrap();
    assert_eq!(
        ckpt.tensors.len(),
        want_tensors.len(),
        "{label}: tensor count"
    );
    for t in &ckpt.tensors {
        let w = want_tensors
            .get(&t.name)
            .unwrap_or_else(|| panic!("{label}: unexpected tensor {}", t.name));
        assert_eq!(t.dtype.name(), w["dtype"], "{label}: {} dtype", t.name);
        let shape: Vec<usize> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, shape, "{label}: {} shape", t.name);
        assert_eq!(sha256(&t.bytes()), w["sha256"], "{label}: {} bytes", t.name);
    }
    if let Some(skipped) = want
        .get("skipped")
        .and_then(|s| s.as_array())
        .filter(|_| check_skipped)
    {
        let mut got = ckpt.skipped.clone();
        got.sort();
        let mut exp: Vec<String> = skipped
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        exp.sort();
        assert_eq!(got, exp, "{label}: skipped entries");
    }
}

/// A file's bytes, or a folder's files (name, bytes) in name order.
fn read_output(p: &Path) -> Vec<(String, Vec<u8>)> {
    if p.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(f).unwrap())
            })
            .collect()
    } else {
        vec![(String::new(), std::fs::read(p).unwrap())]
    }
}

#[test]
fn readers_match_what_torch_wrote() {
    let expected = load_json(&io_dir().join("expected.json"));
    let inputs = expected["inputs"].as_object().unwrap();
    assert!(inputs.len() >= 10, "fixture manifest looks empty");
    for (input, want) in inputs {
        check_against(&io_dir().join(input), want, input, true);
    }
}

#[test]
fn writers_round_trip_every_fixture() {
    let expected = load_json(&io_dir().join("expected.json"));
    let dir = tempfile::tempdir().unwrap();
    for (i, (input, want)) in expected["inputs"].as_object().unwrap().iter().enumerate() {
        for ext in ["pth", "safetensors", "shards/"] {
            // complex128 cannot be stored in safetensors; that refusal is tested elsewhere.
            let has_c128 = want["tensors"]
                .as_object()
                .unwrap()
                .values()
                .any(|t| t["dtype"] == "C128");
            if has_c128 && ext != "pth" {
                continue;
            }
            let out = dir.path().join(format!("out{i}.{ext}"));
            // Direct reads (the fixtures are cached, so the default would read buffered).
            let opts = ConvertOptions {
                reads: lorastream::direct_io::ReadMode::Direct,
                ..Default::default()
            };
            convert(&io_dir().join(input), &out, &opts)
                .unwrap_or_else(|e| panic!("{input} -> {ext}: {e}"));
            // Through the page cache: the same bytes.
            let buffered = dir.path().join(format!("buffered{i}.{ext}"));
            let mut opts = ConvertOptions {
                reads: lorastream::direct_io::ReadMode::Buffered,
                ..Default::default()
            };
            opts.sink.direct_io = false;
            convert(&io_dir().join(input), &buffered, &opts)
                .unwrap_or_else(|e| panic!("{input} -> {ext} (buffered): {e}"));
            assert_eq!(
                read_output(&out),
                read_output(&buffered),
                "{input} -> {ext}: direct and buffered outputs differ"
            );
            let reread = if ext.ends_with('/') {
                out.join("model.safetensors.index.json")
            } else {
                out
            };
            // Outputs hold only tensors: the input's non-tensor entries are gone.
            check_against(&reread, want, &format!("{input} -> {ext}"), false);
        }
    }
}

#[test]
fn bad_inputs_fail_cleanly() {
    let cases = load_json(&io_dir().join("bad/cases.json"));
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let file = io_dir().join(case["file"].as_str().unwrap());
        for cmd in ["inspect", "convert"] {
            let out_dir = tempfile::tempdir().unwrap();
            let mut c = Command::new(env!("CARGO_BIN_EXE_lorastream"));
            c.arg(cmd).arg(&file);
            if cmd == "convert" {
                c.arg(out_dir.path().join("out.pth"));
            }
            let res = c.output().unwrap();
            let err = String::from_utf8_lossy(&res.stderr).to_lowercase();
            // Files whose only content is opaque objects (never run) can be listed; they
            // still convert to nothing, which is an error.
            if cmd == "inspect" && case["inspect_ok"].as_bool() == Some(true) {
                assert_eq!(
                    res.status.code(),
                    Some(0),
                    "{} inspect: {err}",
                    case["file"]
                );
                continue;
            }
            assert_eq!(
                res.status.code(),
                Some(1),
                "{} {cmd}: exit code; stderr: {err}",
                case["file"]
            );
            assert!(
                !err.contains("panicked"),
                "{} panicked: {err}",
                case["file"]
            );
            for m in case["must_mention"].as_array().unwrap() {
                let m = m.as_str().unwrap().to_lowercase();
                assert!(
                    err.contains(&m),
                    "{} {cmd}: error does not mention '{m}': {err}",
                    case["file"]
                );
            }
            let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
            assert!(
                left.is_empty(),
                "{} {cmd}: output left behind",
                case["file"]
            );
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    let res = Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(["convert", "in.pth", "out.unknown"])
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
    let res = Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(["convert", "a", "b.pth", "--dtype", "int4"])
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2));
}

#[test]
fn exclude_drops_matching_final_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let res = Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .arg("convert")
        .arg(io_dir().join("hf_model"))
        .arg(&out)
        .args([
            "--rename",
            r"^model\.=llm.",
            "--exclude",
            r"^llm\.layers\.",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        res.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let before = source::open(&io_dir().join("hf_model")).unwrap();
    let after = source::open(&out).unwrap();
    let kept: Vec<&str> = after.tensors.iter().map(|t| t.name.as_str()).collect();
    assert!(
        kept.iter().all(|n| !n.starts_with("llm.layers.")),
        "{kept:?}"
    );
    let expect = before
        .tensors
        .iter()
        .filter(|t| !t.name.starts_with("model.layers."))
        .count();
    assert_eq!(kept.len(), expect);
    assert!(kept.iter().any(|n| n.starts_with("llm.")));
    let report: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(report["tensors"].as_u64(), Some(expect as u64));
}
