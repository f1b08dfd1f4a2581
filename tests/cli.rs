//! End-to-end tests of the command line as scripts and people meet it: the one JSON object
//! of every `--json` outcome (failures and usage errors included), exit codes, a stdout
//! closed early, -q/-v, `convert -o`, the help texts, `inspect`'s table and adapter
//! summary, and the errors and notes that say what to do. Each test spawns the real
//! binary on the PEFT fixtures (or files it writes itself).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lorastream")
}

fn peft() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft")
}

fn base() -> PathBuf {
    peft().join("bases/llama_f32")
}

fn adapter() -> PathBuf {
    peft().join("cases/llama_f32/adapter")
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(bin());
    for a in args {
        c.arg(a);
    }
    c.output().expect("run lorastream")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as exactly one JSON object (serde_json refuses trailing content).
fn json(o: &Output) -> Value {
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    });
    assert!(v.is_object(), "{v}");
    v
}

/// Checks a failure object and the exit status; returns the error part.
fn failure(o: &Output, kind: &str, code: i32) -> Value {
    let v = json(o);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["exit_code"], code, "{v}");
    assert_eq!(o.status.code(), Some(code), "{v}");
    let e = v["error"].clone();
    assert_eq!(e["kind"], kind, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    for k in ["file", "tensor"] {
        assert!(e.get(k).is_some(), "error lacks '{k}': {v}");
    }
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
    e
}

/// A safetensors file of `names` (one f32 each), in the given order.
fn write_safetensors(path: &Path, names: &[String]) {
    let mut header = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}),
        );
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(std::iter::repeat_n(0u8, 4 * names.len()));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_json_failure_is_one_object_with_a_kind_and_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.safetensors");
    // A missing input: not_found, naming the file.
    let o = run(&[&"inspect", &gone, &"--json"]);
    let e = failure(&o, "not_found", 1);
    assert_eq!(e["file"], gone.display().to_string());
    assert!(e["message"].as_str().unwrap().contains("does not exist"));
    // A malformed tensor: input, naming file and tensor.
    let bad =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/io/bad/st_out_of_range.safetensors");
    let o = run(&[&"convert", &bad, &dir.path().join("o.pth"), &"--json"]);
    let e = failure(&o, "input", 1);
    assert_eq!(e["tensor"], "oob_tensor", "{e}");
    // The library's usage errors, and clap's own, with --json anywhere on the line.
    let o = run(&[
        &"convert",
        &base(),
        &dir.path().join("o.unknown"),
        &"--json",
    ]);
    failure(&o, "usage", 2);
    let o = run(&[&"merge", &"--json", &"--no-such-flag"]);
    failure(&o, "usage", 2);
    let o = run(&[&"diff", &"--json", &"only-one"]);
    failure(&o, "usage", 2);
    // Arguments that contradict each other are usage errors (2), not runtime errors.
    let out = dir.path().join("m.safetensors");
    let o = run(&[&"merge", &"--lora", &adapter(), &"-o", &out, &"--json"]);
    let e = failure(&o, "usage", 2);
    assert!(e["message"].as_str().unwrap().contains("--base"), "{e}");
    let two = peft().join("cases/two_adapters_f32");
    let o = run(&[
        &"merge",
        &"--lora",
        &two.join("adapter_x"),
        &"--lora",
        &two.join("adapter_y"),
        &"--keep-lora",
        &"-o",
        &out,
        &"--json",
    ]);
    failure(&o, "usage", 2);
    let o = run(&[
        &"merge",
        &"--base",
        &base(),
        &"--lora",
        &adapter(),
        &"--fan-in-fan-out",
        &"proj$",
        &"--no-fan-in-fan-out",
        &".",
        &"-o",
        &out,
        &"--json",
    ]);
    let e = failure(&o, "usage", 2);
    assert!(e["message"].as_str().unwrap().contains("both match"), "{e}");
    assert!(!out.exists());
    // --shard-size shapes folder outputs only.
    let o = run(&[
        &"convert",
        &base(),
        &out,
        &"--shard-size",
        &"1GB",
        &"--json",
    ]);
    let e = failure(&o, "usage", 2);
    assert!(
        e["message"].as_str().unwrap().contains("--shard-size"),
        "{e}"
    );
    assert!(!out.exists());
    // verify and diff: anything that stops the check is 2.
    let o = run(&[&"verify", &gone, &"--base", &base(), &"--json"]);
    failure(&o, "not_found", 2);
    let o = run(&[&"diff", &base(), &gone, &"--json"]);
    failure(&o, "not_found", 2);
    // Without --json: the same exit codes, nothing on stdout, one error line.
    let o = run(&[&"inspect", &gone]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
}

#[test]
fn json_success_is_ok_true_with_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let v = json(&run(&[&"inspect", &base(), &"--json"]));
    assert_eq!(
        (v["ok"].clone(), v["exit_code"].clone()),
        (true.into(), 0.into())
    );
    assert!(v["tensors"].as_array().is_some_and(|t| !t.is_empty()));
    let out = dir.path().join("m.safetensors");
    let o = run(&[
        &"merge",
        &"--base",
        &base(),
        &"--lora",
        &adapter(),
        &"-o",
        &out,
        &"--json",
    ]);
    let v = json(&o);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["merged"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["bytes"].is_u64() && v["notes"].is_array(), "{v}");
    // diff: the report of two different files is a success of the command, exit code 1.
    let o = run(&[&"diff", &base(), &out, &"--json"]);
    let v = json(&o);
    assert_eq!(
        (v["ok"].clone(), v["exit_code"].clone()),
        (true.into(), 1.into())
    );
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let many = dir.path().join("many.safetensors");
    // Far more text than a pipe buffer holds, so the writer meets the closed pipe.
    let names: Vec<String> = (0..6000)
        .map(|i| format!("model.layers.{i}.self_attn.some_long_projection_name.weight"))
        .collect();
    write_safetensors(&many, &names);
    for json in [false, true] {
        let mut c = Command::new(bin());
        c.arg("inspect").arg(&many);
        if json {
            c.arg("--json");
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        if json {
            let mut buf = [0u8; 16];
            reader.read_exact(&mut buf).unwrap();
        } else {
            reader.read_line(&mut first).unwrap();
            assert!(first.starts_with("name"), "{first}");
        }
        drop(reader);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "json {json}: {}", stderr(&o));
        assert!(o.stderr.is_empty(), "json {json}: {}", stderr(&o));
    }
    // As a shell pipeline with pipefail: head's early exit is no failure of ours.
    let o = Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; \"$0\" inspect \"$1\" | head -1",
            bin(),
        ])
        .arg(&many)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
}

#[test]
fn convert_takes_its_output_positionally_or_with_o_but_not_both() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    let o = run(&[&"convert", &base(), &"-o", &a]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[&"convert", &base(), &b]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let c = dir.path().join("c.safetensors");
    let o = run(&[&"convert", &base(), &c, &"--out", &a]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!c.exists());
    let o = run(&[&"convert", &base()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn help_texts_say_what_each_command_does() {
    let help = |args: &[&str]| {
        let o = Command::new(bin()).args(args).output().unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let convert = help(&["convert", "--help"]).to_lowercase();
    for word in ["merg", "component", "adapter", "peft", "--lora", "--base"] {
        assert!(
            !convert.contains(word),
            "convert --help speaks of '{word}':\n{convert}"
        );
    }
    assert!(convert.contains("-o, --out"), "{convert}");
    // inspect's table has the columns its help promises, in that order.
    let inspect = help(&["inspect", "--help"]);
    let promise = inspect
        .lines()
        .next()
        .and_then(|l| l.split_once(": "))
        .map(|(_, cols)| cols.trim_end_matches('.').to_string())
        .unwrap_or_default();
    let columns: Vec<&str> = promise.split(", ").collect();
    assert_eq!(columns, ["name", "dtype", "shape", "bytes", "file"]);
    let o = run(&[&"inspect", &base()]);
    let text = String::from_utf8_lossy(&o.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, columns);
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row.last(), Some(&"model.safetensors"), "{text}");
    // Every exit code is listed in the top-level help.
    let top = help(&["--help"]);
    for s in ["0 success", "1 runtime", "2 usage", "128+N"] {
        assert!(top.contains(s), "{top}");
    }
}

#[test]
fn inspect_describes_an_adapter_and_lists_tensors_in_natural_order() {
    let o = run(&[&"inspect", &adapter()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        text.contains("adapter: LoRA, r 4, alpha 8, scale 2"),
        "{text}"
    );
    assert!(
        text.contains("targets: down_proj, gate_proj, k_proj"),
        "{text}"
    );
    assert!(text.contains("parameters: 2048"), "{text}");
    let v = json(&run(&[&"inspect", &adapter(), &"--json"]));
    let a = &v["adapter"];
    assert_eq!(a["type"], "LoRA");
    assert_eq!((a["r"].as_u64(), a["scale"].as_f64()), (Some(4), Some(2.0)));
    assert_eq!(a["alpha"], 8);
    assert_eq!(a["targets"].as_array().map(Vec::len), Some(7));
    let sum: u64 = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert_eq!(a["parameters"], sum);
    // Natural order: layers.2 before layers.10 (safetensors stores them sorted as strings).
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("n.safetensors");
    let names: Vec<String> = ["layers.10.w", "layers.2.w", "layers.1.w", "embed"]
        .map(String::from)
        .to_vec();
    write_safetensors(&f, &names);
    let v = json(&run(&[&"inspect", &f, &"--json"]));
    let got: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["embed", "layers.1.w", "layers.2.w", "layers.10.w"]);
}

#[test]
fn quiet_prints_nothing_and_verbose_prints_each_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.safetensors");
    let merge = |extra: &[&str], out: &Path| {
        let mut c = Command::new(bin());
        c.arg("merge")
            .arg("--base")
            .arg(base())
            .arg("--lora")
            .arg(adapter());
        c.arg("-o").arg(out).args(extra);
        c.output().unwrap()
    };
    // A note would be due (an --exclude that matches nothing): -q still says nothing.
    let o = merge(&["-q", "--exclude", "nothing-matches"], &out);
    assert!(o.status.success());
    assert!(o.stderr.is_empty() && o.stdout.is_empty(), "{}", stderr(&o));
    assert!(out.exists());
    let out = dir.path().join("v.safetensors");
    let o = merge(&["-v"], &out);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.lines().any(|l| l
            .starts_with("merge model.layers.0.self_attn.q_proj.weight (F32, [16, 16]")
            && l.ends_with(" ms")),
        "{err}"
    );
    assert!(
        err.lines().any(|l| l.starts_with("copy model.norm.weight")),
        "{err}"
    );
    // A dry run with -v lists the plan.
    let o = merge(&["-v", "--dry-run"], &dir.path().join("d.safetensors"));
    assert!(
        stderr(&o).contains("would merge model.layers.1.mlp.down_proj.weight"),
        "{}",
        stderr(&o)
    );
    let o = merge(&["-q", "-v"], &dir.path().join("x.safetensors"));
    assert_eq!(o.status.code(), Some(2));
    let c = dir.path().join("c.safetensors");
    let o = run(&[&"convert", &base(), &c, &"--verbose"]);
    assert!(
        stderr(&o)
            .lines()
            .any(|l| l.starts_with("copy model.embed_tokens.weight")),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        &"convert",
        &base(),
        &dir.path().join("c2.safetensors"),
        &"--quiet",
    ]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
}

#[test]
fn no_gpu_note_when_nothing_is_computed() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [&[&str]; 3] = [
        &["--lora", "A", "--keep-lora"],
        &["--lora", "A", "--dry-run"],
        &[],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let out = dir.path().join(format!("o{i}.safetensors"));
        let mut c = Command::new(bin());
        c.arg("merge")
            .arg("--base")
            .arg(base())
            .arg("-o")
            .arg(&out)
            .arg("--json");
        for a in *extra {
            c.arg(if *a == "A" {
                adapter().into_os_string()
            } else {
                a.into()
            });
        }
        let o = c.output().unwrap();
        let v = json(&o);
        assert_eq!(v["ok"], true, "{extra:?}: {v}");
        assert!(!stderr(&o).contains("GPU"), "{extra:?}: {}", stderr(&o));
        let notes = v["notes"].as_array().unwrap();
        assert!(
            notes.iter().all(|n| !n.as_str().unwrap().contains("GPU")),
            "{v}"
        );
    }
}

#[test]
fn the_summary_shows_sizes_and_no_unnamed_row() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let o = run(&[
        &"merge",
        &"--base",
        &base(),
        &"--lora",
        &adapter(),
        &"-o",
        &out,
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("(unnamed)") && !err.contains(" bytes"),
        "{err}"
    );
    let re = regex::Regex::new(r"\d+(\.\d+)? (B|KiB|MiB|GiB)\)").unwrap();
    assert!(
        err.lines()
            .any(|l| l.starts_with("wrote ") && re.is_match(l)),
        "{err}"
    );
    // Named components each get a row.
    let out = dir.path().join("n.safetensors");
    let o = run(&[
        &"merge",
        &format!("--base=llm={}", base().display()),
        &format!("--lora=llm={}", adapter().display()),
        &format!("--base=copy={}", base().display()),
        &"-o",
        &out,
    ]);
    let err = stderr(&o);
    assert!(err.lines().any(|l| l.starts_with("llm ")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("copy ")), "{err}");
}

#[test]
fn errors_and_notes_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    // A missing adapter path.
    let gone = dir.path().join("no-such-adapter");
    let o = run(&[&"merge", &"--base", &base(), &"--lora", &gone, &"-o", &out]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("does not exist") && !err.contains("PEFT adapter folder"),
        "{err}"
    );
    // A file inside the adapter folder means the folder.
    let o = run(&[
        &"merge",
        &"--base",
        &base(),
        &"--lora",
        &adapter().join("adapter_model.safetensors"),
        &"-o",
        &out,
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("is a file inside the adapter folder"), "{err}");
    let by_folder = dir.path().join("f.safetensors");
    let o = run(&[
        &"merge",
        &"--base",
        &base(),
        &"--lora",
        &adapter(),
        &"-o",
        &by_folder,
    ]);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&by_folder).unwrap()
    );
    // A training output folder: its checkpoints are listed, the latest named.
    let train = dir.path().join("run");
    for step in ["checkpoint-500", "checkpoint-1000", "checkpoint-90"] {
        std::fs::create_dir_all(train.join(step)).unwrap();
    }
    for flag in ["--lora", "--base"] {
        let mut c = Command::new(bin());
        c.arg("merge").arg(flag).arg(&train);
        if flag == "--lora" {
            c.arg("--base").arg(base());
        }
        let o = c
            .arg("-o")
            .arg(dir.path().join("t.safetensors"))
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("checkpoint-90, checkpoint-500, checkpoint-1000"),
            "{flag}: {err}"
        );
        assert!(
            err.contains(&format!(
                "latest: {}",
                train.join("checkpoint-1000").display()
            )),
            "{err}"
        );
    }
    // Rules that match nothing are noted, on stderr and in the JSON notes.
    let o = run(&[
        &"merge",
        &"--base",
        &base(),
        &"--lora",
        &adapter(),
        &"-o",
        &dir.path().join("r.safetensors"),
        &"--rename",
        &"^typo\\.=x.",
        &"--exclude",
        &"^nothing\\.",
        &"--json",
    ]);
    let v = json(&o);
    let notes: Vec<&str> = v["notes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("--rename '^typo\\.=x.' matched no key")),
        "{v}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("--exclude '^nothing\\.' matched no key")),
        "{v}"
    );
    assert!(
        stderr(&o).contains("note: --exclude '^nothing\\.' matched no key"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        &"convert",
        &base(),
        &dir.path().join("c.safetensors"),
        &"--exclude",
        &"^nothing",
        &"--json",
    ]);
    let v = json(&o);
    assert!(
        v["notes"][0]
            .as_str()
            .unwrap_or("")
            .contains("matched no key"),
        "{v}"
    );
    // A folder literally named NAME=PATH is that folder, said in a note.
    let work = dir.path().join("cwd");
    let odd = work.join("llm=adapter");
    std::fs::create_dir_all(&odd).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter().join(f), odd.join(f)).unwrap();
    }
    let o = Command::new(bin())
        .current_dir(&work)
        .arg("merge")
        .arg("--base")
        .arg(base())
        .args(["--lora", "llm=adapter", "-o", "out.safetensors"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("'llm=adapter' is an existing path"), "{err}");
    assert_eq!(
        std::fs::read(work.join("out.safetensors")).unwrap(),
        std::fs::read(&by_folder).unwrap()
    );
}

#[test]
fn the_readme_lists_every_error_kind_and_the_help_names_them() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| kind |"))
        .skip(2)
        .take_while(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .collect();
    let kinds: Vec<&str> = lorastream::error::KINDS.iter().map(|(k, _)| *k).collect();
    assert_eq!(table, kinds);
    let o = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(
        help.contains(&format!("error kinds: {}.", kinds.join(", "))),
        "{help}"
    );
}
