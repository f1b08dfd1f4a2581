//! Partitioned outputs through the real binary: N parts (`--part K/N`) run concurrently as
//! processes into one folder, and `stitch` joins them into exactly the bytes of a single
//! run (merge and convert, N = 1..4); a part killed with SIGKILL leaves no partial shard
//! under a final name and its rerun completes the same output; `stitch` refuses missing,
//! disagreeing or altered parts (exit 1, naming them) and changes nothing then; `--part
//! auto` reads Slurm's and Kubernetes' variables (neither: exit 2); a dry run tells each
//! part's shards and bytes.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lorastream");
/// The scheduler variables `--part auto` reads: cleared for every run so the test's own
/// environment (a CI job inside Slurm) cannot leak in.
const SCHED_VARS: [&str; 6] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "JOB_COMPLETION_INDEX",
    "LORASTREAM_PARTS",
];

fn fx(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/peft")
        .join(rel)
}

fn cmd(args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null());
    for v in SCHED_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(args: &[String]) -> Output {
    cmd(args, &[]).output().unwrap()
}

fn ok(o: &Output) -> &Output {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The llama fixture merge into `out` with small shards (several per part).
fn merge_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = s(&[
        "merge",
        "--base",
        fx("bases/llama_f32").to_str().unwrap(),
        "--lora",
        fx("cases/llama_f32/adapter").to_str().unwrap(),
        "--device",
        "cpu",
        "--shard-size",
        "5000",
        "-q",
        "--out",
    ]);
    a.push(format!("{}/", out.display()));
    a.extend(s(extra));
    a
}

fn convert_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = s(&[
        "convert",
        fx("bases/llama_f32").to_str().unwrap(),
        "--dtype",
        "bf16",
        "--shard-size",
        "3000",
        "-q",
    ]);
    a.push(format!("{}/", out.display()));
    a.extend(s(extra));
    a
}

/// Every file under `dir` (relative path → bytes), dot files included.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    fn walk(root: &Path, at: &Path, m: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(at).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, m);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                m.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    walk(dir, dir, &mut m);
    m
}

/// Runs parts 0..n of `args(out, ["--part", "K/N"])` at once, as separate processes.
fn run_parts(n: usize, args: impl Fn(&[&str]) -> Vec<String>) {
    let children: Vec<Child> = (0..n)
        .map(|k| {
            let part = format!("{k}/{n}");
            cmd(&args(&["--part", &part]), &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        ok(&c.wait_with_output().unwrap());
    }
}

fn stitch(out: &Path) -> Output {
    run(&s(&["stitch", &format!("{}/", out.display()), "--json"]))
}

#[test]
fn stitched_parts_are_byte_identical_to_the_single_run_for_any_n() {
    let dir = tempfile::tempdir().unwrap();
    for (what, args) in [
        ("merge", merge_args as fn(&Path, &[&str]) -> Vec<String>),
        ("convert", convert_args),
    ] {
        let single = dir.path().join(format!("{what}-single"));
        ok(&run(&args(&single, &[])));
        let expected = tree(&single);
        let shards = expected.keys().filter(|k| k.starts_with("model-")).count();
        assert!(shards >= 5, "{what}: only {shards} shards");
        assert!(
            expected.contains_key("config.json"),
            "{what}: no config copied"
        );
        for n in 1..=4 {
            let out = dir.path().join(format!("{what}-{n}"));
            run_parts(n, |part| args(&out, part));
            // Before the stitch the folder is no model yet: no index, no config.
            assert!(!out.join("model.safetensors.index.json").exists());
            assert!(!out.join("config.json").exists());
            let r = json(ok(&stitch(&out)));
            assert_eq!(r["parts"], n);
            assert_eq!(r["shards"], shards);
            assert!(
                tree(&out) == expected,
                "{what}, {n} parts: not the single run's bytes"
            );
        }
    }
}

/// A sparse F32 input of four [16384, 1024] tensors (256 MiB, costing no disk): converting
/// it to bf16 takes long enough to be killed part way.
fn big_input(dir: &Path) -> PathBuf {
    let p = dir.join("big.safetensors");
    let mut header = serde_json::Map::new();
    let n = 16384u64 * 1024 * 4;
    for i in 0..4u64 {
        header.insert(
            format!("layers.{i}.proj.weight"),
            serde_json::json!({"dtype": "F32", "shape": [16384, 1024], "data_offsets": [i * n, (i + 1) * n]}),
        );
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&h);
    std::fs::write(&p, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(bytes.len() as u64 + 4 * n).unwrap();
    p
}

fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".lorastream-tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_part_killed_mid_way_leaves_no_partial_shard_and_its_rerun_completes_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = big_input(dir.path());
    let args = |out: &Path, extra: &[&str]| {
        let mut a = s(&[
            "convert",
            input.to_str().unwrap(),
            "--dtype",
            "bf16",
            "--shard-size",
            "40MB",
            "-q",
        ]);
        a.push(format!("{}/", out.display()));
        a.extend(s(extra));
        a
    };
    let single = dir.path().join("single");
    ok(&run(&args(&single, &[])));
    let expected = tree(&single);
    let out = dir.path().join("parts");
    ok(&run(&args(&out, &["--part", "1/2"])));
    // Part 0, killed as soon as it is writing a shard.
    let mut child = cmd(&args(&out, &["--part", "0/2"]), &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while temps_in(&out).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "part 0 ended first");
        assert!(t0.elapsed() < Duration::from_secs(60), "part 0 never wrote");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let manifest0 = out.join(".lorastream/part-00000-of-00002.json");
    assert!(!manifest0.exists(), "part 0 finished before it was killed");
    // Under a final name there is only ever a whole shard: the single run's bytes.
    for (name, bytes) in tree(&out) {
        if name.starts_with("model-") {
            assert!(expected.get(&name) == Some(&bytes), "{name} is partial");
        }
    }
    let left = temps_in(&out);
    assert!(!left.is_empty(), "a killed run leaves its temp file");
    // Stitching now names the part that is missing and changes nothing.
    let before = tree(&out);
    let o = stitch(&out);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("0/2"),
        "{v}"
    );
    assert!(tree(&out) == before, "a failed stitch changed the folder");
    // The rerun removes the dead run's temp file and writes the same bytes.
    ok(&run(&args(&out, &["--part", "0/2"])));
    assert!(temps_in(&out).is_empty(), "{:?}", temps_in(&out));
    ok(&stitch(&out));
    assert!(
        tree(&out) == expected,
        "not the single run's bytes after the rerun"
    );
    // Rerunning a finished part rewrites identical bytes.
    let again = dir.path().join("again");
    run_parts(2, |p| args(&again, p));
    let shards = tree(&again);
    ok(&run(&args(&again, &["--part", "1/2"])));
    assert!(tree(&again) == shards, "a rerun part wrote other bytes");
}

#[test]
fn stitch_refuses_missing_disagreeing_and_altered_parts_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for k in [0, 2] {
        ok(&run(&merge_args(&out, &["--part", &format!("{k}/4")])));
    }
    let before = tree(&out);
    let o = stitch(&out);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "plan");
    assert_eq!(v["exit_code"], 1);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("1/4, 3/4") && msg.contains("not finished"),
        "{msg}"
    );
    assert!(tree(&out) == before, "a refused stitch changed the folder");
    // A part whose options give other shards refuses the folder before any work.
    let o = run(&merge_args(&out, &["--part", "1/4", "--dtype", "bf16"]));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not shards of this plan"));
    // A part run with other options but the same shards (another plan) is named.
    ok(&run(&merge_args(
        &out,
        &["--part", "1/4", "--rename", r"^model\.=net."],
    )));
    ok(&run(&merge_args(&out, &["--part", "3/4"])));
    let o = stitch(&out);
    assert_eq!(o.status.code(), Some(1));
    let msg = json(&o)["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("different plans") && msg.contains("part-00001-of-00004.json"),
        "{msg}"
    );
    ok(&run(&merge_args(&out, &["--part", "1/4"])));
    // A shard changed after its part finished.
    let m: Value = serde_json::from_slice(
        &std::fs::read(out.join(".lorastream/part-00002-of-00004.json")).unwrap(),
    )
    .unwrap();
    let shard = m["shards"][0]["name"].as_str().unwrap().to_string();
    let mut bytes = std::fs::read(out.join(&shard)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(out.join(&shard), &bytes).unwrap();
    let o = stitch(&out);
    assert_eq!(o.status.code(), Some(1));
    let msg = json(&o)["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("part 2/4") && msg.contains(&shard) && msg.contains("SHA-256"),
        "{msg}"
    );
    ok(&run(&merge_args(&out, &["--part", "2/4"])));
    let r = json(ok(&stitch(&out)));
    assert_eq!(r["parts"], 4);
    assert!(!out.join(".lorastream").exists());
    // Stitched already / never partitioned.
    let o = stitch(&out);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already stitched"));
}

#[test]
fn part_auto_reads_slurm_and_kubernetes_variables() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    ok(&run(&merge_args(&single, &[])));
    let out = dir.path().join("auto");
    let auto = merge_args(&out, &["--part", "auto", "--json"]);
    // Slurm: --array=10-12, task 11 is part 1 of 3.
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "11"),
        ("SLURM_ARRAY_TASK_MIN", "10"),
        ("SLURM_ARRAY_TASK_COUNT", "3"),
        ("SLURM_ARRAY_TASK_STEP", "1"),
    ];
    let v = json(ok(&cmd(&auto, &slurm).output().unwrap()));
    assert_eq!(
        (v["part"]["part"].clone(), v["part"]["parts"].clone()),
        (1.into(), 3.into())
    );
    assert!(out.join(".lorastream/part-00001-of-00003.json").is_file());
    // Kubernetes Indexed Job: JOB_COMPLETION_INDEX of LORASTREAM_PARTS.
    for k in ["0", "2"] {
        let env = [("JOB_COMPLETION_INDEX", k), ("LORASTREAM_PARTS", "3")];
        let v = json(ok(&cmd(&auto, &env).output().unwrap()));
        assert_eq!(v["part"]["part"].as_str().map(String::from), None);
        assert_eq!(v["part"]["part"], k.parse::<u64>().unwrap());
    }
    ok(&stitch(&out));
    assert!(
        tree(&out) == tree(&single),
        "auto parts: not the single run's bytes"
    );
    // Neither scheduler: a usage error, exit 2, one JSON failure; nothing written.
    let none = dir.path().join("none");
    for env in [
        vec![],
        vec![("JOB_COMPLETION_INDEX", "1")],
        vec![
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ],
    ] {
        let o = cmd(&merge_args(&none, &["--part", "auto", "--json"]), &env)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{env:?}");
        let v = json(&o);
        assert_eq!(v["error"]["kind"], "usage", "{env:?}");
    }
    assert!(!none.exists());
    // --part writes a folder: a single-file output is a usage error.
    let mut a = merge_args(&none, &["--part", "0/2"]);
    let at = a.iter().position(|x| x == "--shard-size").unwrap();
    a.drain(at..at + 2);
    *a.iter_mut().find(|x| x.ends_with("none/")).unwrap() =
        dir.path().join("one.safetensors").display().to_string();
    assert_eq!(run(&a).status.code(), Some(2));
}

#[test]
fn a_dry_run_tells_each_parts_shards_and_bytes_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    let r = json(ok(&run(&merge_args(&single, &["--json"]))));
    let total = r["bytes"].as_u64().unwrap();
    let out = dir.path().join("dry");
    let mut names = Vec::new();
    let mut bytes = 0;
    let mut fingerprints = Vec::new();
    for k in 0..3 {
        let part = format!("{k}/3");
        let v = json(ok(&run(&merge_args(
            &out,
            &["--part", &part, "--dry-run", "--json"],
        ))));
        let p = &v["part"];
        assert_eq!(p["part"], k);
        bytes += p["bytes"].as_u64().unwrap();
        fingerprints.push(p["fingerprint"].clone());
        for s in p["shards"].as_array().unwrap() {
            names.push(s["name"].as_str().unwrap().to_string());
        }
    }
    assert!(!out.exists(), "a dry run wrote something");
    assert_eq!(bytes, total);
    assert!(fingerprints.iter().all(|f| *f == fingerprints[0]));
    names.sort();
    let mut single_names: Vec<String> = tree(&single)
        .into_keys()
        .filter(|k| k.starts_with("model-"))
        .collect();
    single_names.sort();
    assert_eq!(names, single_names);
}
