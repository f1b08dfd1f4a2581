//! End-to-end tests of `lorastream run RECIPE.toml` on the fixtures: variables and
//! defaults give the same bytes as the same options on the command line; `--jobs 2` runs
//! two jobs at once; a failing job with and without `--keep-going` and the exit codes;
//! a batch killed mid-way (SIGKILL, and SIGTERM forwarded to the job) resumes with the
//! finished jobs skipped and their outputs untouched; a changed option or input reruns
//! that job only; bad recipes exit 2 naming the job and key; the README's example
//! recipes run. Every stdout line with `--json` is parsed as JSON.
//!
//! A job is held "in progress" by giving it a named pipe as input: lorastream blocks
//! opening it until the test opens the other end, so the test decides when it ends.

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lorastream")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fx(rel: &str) -> String {
    root().join("fixtures").join(rel).display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run lorastream")
}

fn spawn(args: &[&str]) -> Child {
    Command::new(bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lorastream")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every stdout line as JSON: the job lines by name, and the summary (the last line).
fn json_lines(o: &Output) -> (BTreeMap<String, Value>, Value) {
    let text = String::from_utf8_lossy(&o.stdout);
    let mut jobs = BTreeMap::new();
    let mut last = Value::Null;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{e}: line {line:?}; stderr {}", stderr(o)));
        if let Some(name) = v["job"].as_str() {
            jobs.insert(name.to_string(), v.clone());
        }
        last = v;
    }
    assert!(
        last["jobs"].is_u64(),
        "the last line is the summary: {last}"
    );
    (jobs, last)
}

fn status(jobs: &BTreeMap<String, Value>, name: &str) -> String {
    jobs.get(name)
        .unwrap_or_else(|| panic!("no line for job {name}: {jobs:?}"))["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// sha256 of a file, or of every file of a folder (by name).
fn digest(p: &Path) -> String {
    let mut h = Sha256::new();
    if p.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            h.update(n.to_string_lossy().as_bytes());
            h.update(std::fs::read(p.join(&n)).unwrap());
        }
    } else {
        h.update(std::fs::read(p).unwrap());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Whether the job held on the named pipe `held.safetensors` in `dir` is alive: a process
/// of that folder with the pipe among its arguments (Linux /proc). The pipe itself is not
/// probed: opening its other end, even for a moment, would let the job go on.
fn held_job_alive(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let p = e.path();
        let Ok(cmd) = std::fs::read(p.join("cmdline")) else {
            return false;
        };
        cmd.split(|&b| b == 0).any(|a| a == b"held.safetensors")
            && std::fs::read_link(p.join("cwd")).is_ok_and(|c| c == dir)
    })
}

/// Lets the job blocked on the pipe go on: it reads an empty input and fails.
fn release(p: &Path) {
    drop(std::fs::OpenOptions::new().write(true).open(p).unwrap());
}

fn record_state(output: &Path) -> Option<String> {
    let name = output.file_name()?.to_string_lossy().into_owned();
    let rec = output.with_file_name(format!("{name}.lorastream-job.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(rec).ok()?).ok()?;
    v["state"].as_str().map(String::from)
}

fn write(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
}

#[test]
fn vars_and_defaults_give_the_bytes_of_the_same_command_line() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("out")).unwrap();
    let recipe = d.path().join("r.toml");
    write(
        &recipe,
        &format!(
            r#"
[vars]
fx = "{}"
adapter = "llama_f32"          # replaced by --var
lora_dir = "${{fx}}/peft/cases/${{adapter}}/adapter"

[defaults]
dtype = "bf16"

[defaults.merge]
base = "${{fx}}/peft/bases/llama_f32"
# `$1` is the regex replacement's, not a variable.
rename = ['^model\.(.*)$=base.$1']
exclude = ["lm_head"]

[[job]]
name = "m"
command = "merge"
lora = "${{lora_dir}}"
out = "out/m/"

[[job]]
name = "c"
command = "convert"
input = "${{env.LORASTREAM_RECIPE_TEST_INPUT}}"
output = "out/c.safetensors"
dtype = "keep"                 # the job's own value wins over [defaults]
"#,
            root().join("fixtures").display()
        ),
    );
    let o = Command::new(bin())
        .args(["run", recipe.to_str().unwrap(), "--json"])
        .args(["--var", "adapter=llama_rslora"])
        .env(
            "LORASTREAM_RECIPE_TEST_INPUT",
            fx("io/hf_model/model.safetensors"),
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(status(&jobs, "m"), "ok");
    assert_eq!(status(&jobs, "c"), "ok");
    assert_eq!(jobs["m"]["report"]["tensors"], 20, "lm_head excluded");
    assert_eq!(summary["succeeded"], 2);
    assert_eq!(summary["exit_code"], 0);

    let direct = d.path().join("direct");
    std::fs::create_dir(&direct).unwrap();
    let m = run(&[
        "merge",
        "--base",
        &fx("peft/bases/llama_f32"),
        "--lora",
        &fx("peft/cases/llama_rslora/adapter"),
        "--dtype",
        "bf16",
        "--rename",
        r"^model\.(.*)$=base.$1",
        "--exclude",
        "lm_head",
        "--out",
        direct.join("m/").to_str().unwrap(),
        "-q",
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    let c = run(&[
        "convert",
        &fx("io/hf_model/model.safetensors"),
        direct.join("c.safetensors").to_str().unwrap(),
        "-q",
    ]);
    assert!(c.status.success(), "{}", stderr(&c));
    assert_eq!(digest(&d.path().join("out/m")), digest(&direct.join("m")));
    assert_eq!(
        digest(&d.path().join("out/c.safetensors")),
        digest(&direct.join("c.safetensors"))
    );
}

#[test]
fn two_jobs_run_at_once_and_keep_going_runs_the_rest_after_a_failure() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("held.safetensors");
    mkfifo(&fifo);
    let recipe = d.path().join("r.toml");
    write(
        &recipe,
        &format!(
            r#"
[[job]]
name = "held"
command = "convert"
input = "held.safetensors"
output = "held-out.safetensors"

[[job]]
name = "quick"
command = "convert"
input = "{}"
output = "quick.safetensors"

[[job]]
name = "third"
command = "convert"
input = "{}"
output = "third.pth"
"#,
            fx("io/hf_model/model.safetensors"),
            fx("io/dtypes.safetensors")
        ),
    );
    let r = recipe.to_str().unwrap();
    // --jobs 2: "quick" starts and finishes while "held" is still running.
    let child = spawn(&["run", r, "--jobs", "2", "--keep-going", "--json"]);
    let quick = d.path().join("quick.safetensors");
    wait_for("the second job to finish", Duration::from_secs(60), || {
        record_state(&quick).as_deref() == Some("complete")
    });
    assert!(held_job_alive(d.path()), "the first job is still running");
    release(&fifo);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "a job failed: {}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(status(&jobs, "held"), "failed");
    assert_eq!(jobs["held"]["exit_code"], 1);
    assert_eq!(jobs["held"]["report"]["ok"], false);
    assert!(jobs["held"]["report"]["error"]["message"].is_string());
    assert_eq!(status(&jobs, "quick"), "ok");
    assert_eq!(status(&jobs, "third"), "ok", "--keep-going ran it");
    assert_eq!(summary["failed_jobs"], serde_json::json!(["held"]));
    assert!(!d.path().join("held-out.safetensors").exists());
    assert!(record_state(&d.path().join("held-out.safetensors")).is_none());

    // Without --keep-going no job starts after the failure.
    for f in ["quick.safetensors", "third.pth"] {
        std::fs::remove_file(d.path().join(f)).unwrap();
    }
    std::fs::remove_file(&fifo).unwrap(); // now a missing input: fails at once
    let o = run(&["run", r, "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(status(&jobs, "held"), "failed");
    assert!(!jobs.contains_key("quick") && !jobs.contains_key("third"));
    assert_eq!(
        summary["not_run_jobs"],
        serde_json::json!(["quick", "third"])
    );
    assert!(!quick.exists());
    // Text mode says what stopped.
    let o = run(&["run", r]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--keep-going runs the rest"),
        "{}",
        stderr(&o)
    );
}

/// Jobs 1-3 finish, job 4 is held, jobs 5-6 wait behind it (`--jobs 1`).
fn six_job_recipe(d: &Path) -> (PathBuf, Vec<PathBuf>) {
    let inputs = [
        "io/hf_model/model.safetensors",
        "io/dtypes.safetensors",
        "io/hf_model/pytorch_model.bin",
        "",
        "io/nested.pth",
        "io/module_params.pth",
    ];
    let mut text = String::new();
    let mut outputs = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let input = if input.is_empty() {
            "held.safetensors".to_string()
        } else {
            fx(input)
        };
        let out = format!("out/j{}.safetensors", i + 1);
        text += &format!(
            "[[job]]\nname = \"j{}\"\ncommand = \"convert\"\ninput = \"{input}\"\noutput = \"{out}\"\n\n",
            i + 1
        );
        outputs.push(d.join(out));
    }
    std::fs::create_dir_all(d.join("out")).unwrap();
    let recipe = d.join("r.toml");
    write(&recipe, &text);
    mkfifo(&d.join("held.safetensors"));
    (recipe, outputs)
}

#[test]
fn a_batch_killed_mid_way_resumes_at_the_first_unfinished_job() {
    let d = tempfile::tempdir().unwrap();
    let (recipe, outs) = six_job_recipe(d.path());
    let r = recipe.to_str().unwrap();
    let fifo = d.path().join("held.safetensors");
    let mut child = spawn(&["run", r, "--json"]);
    wait_for("job 4 to start", Duration::from_secs(60), || {
        record_state(&outs[3]).as_deref() == Some("started") && held_job_alive(d.path())
    });
    child.kill().unwrap(); // SIGKILL: the runner cannot clean up or forward anything
    let _ = child.wait();
    // The held job dies with its runner (it gets SIGTERM), so nothing keeps writing.
    wait_for("the held job to end", Duration::from_secs(10), || {
        !held_job_alive(d.path())
    });
    let before: Vec<(String, std::time::SystemTime)> =
        outs[..3].iter().map(|p| (digest(p), mtime(p))).collect();
    for p in &outs[3..] {
        assert!(!p.exists(), "{} not written", p.display());
    }

    // Rerun with the held input replaced by a real one: 1-3 skipped, 4-6 run.
    std::fs::remove_file(&fifo).unwrap();
    std::fs::copy(fx("io/sharded_st/model-00001-of-00002.safetensors"), &fifo).unwrap();
    let o = run(&["run", r, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    for j in ["j1", "j2", "j3"] {
        assert_eq!(status(&jobs, j), "skipped", "{j}");
        assert_eq!(jobs[j]["report"]["ok"], true, "the record keeps the report");
    }
    for j in ["j4", "j5", "j6"] {
        assert_eq!(status(&jobs, j), "ok", "{j}");
    }
    assert_eq!(
        (summary["skipped"].clone(), summary["succeeded"].clone()),
        (3.into(), 3.into())
    );
    for (p, (h, t)) in outs[..3].iter().zip(&before) {
        assert_eq!(&digest(p), h, "{} untouched", p.display());
        assert_eq!(&mtime(p), t, "{} not rewritten", p.display());
    }
    // Once complete, everything is skipped; --force runs everything again, same bytes.
    let all: Vec<String> = outs.iter().map(|p| digest(p)).collect();
    let o = run(&["run", r, "--json"]);
    let (_, summary) = json_lines(&o);
    assert_eq!(summary["skipped"], 6);
    let o = run(&["run", r, "--json", "--force"]);
    let (_, summary) = json_lines(&o);
    assert_eq!(summary["succeeded"], 6, "{}", stderr(&o));
    assert_eq!(outs.iter().map(|p| digest(p)).collect::<Vec<_>>(), all);
}

#[test]
fn sigterm_is_forwarded_to_the_running_job_and_ends_the_batch() {
    let d = tempfile::tempdir().unwrap();
    let (recipe, outs) = six_job_recipe(d.path());
    let child = spawn(&["run", recipe.to_str().unwrap(), "--json"]);
    wait_for("job 4 to start", Duration::from_secs(60), || {
        held_job_alive(d.path()) && record_state(&outs[2]).as_deref() == Some("complete")
    });
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(status(&jobs, "j3"), "ok");
    assert_eq!(status(&jobs, "j4"), "interrupted");
    assert_eq!(jobs["j4"]["exit_code"], 143);
    assert_eq!(summary["interrupted"], "SIGTERM");
    assert_eq!(summary["not_run_jobs"], serde_json::json!(["j5", "j6"]));
    assert_eq!(summary["exit_code"], 143);
    assert!(!held_job_alive(d.path()), "the job is gone");
    assert!(!outs[3].exists());
}

#[test]
fn a_changed_option_or_input_reruns_that_job_only() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.safetensors");
    std::fs::copy(fx("io/hf_model/model.safetensors"), &input).unwrap();
    // A folder the user already had, with a checkpoint in it: never replaced unasked.
    let theirs = d.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    write(&theirs.join("model.safetensors"), "precious");
    let recipe = d.path().join("r.toml");
    write(
        &recipe,
        &format!(
            r#"
[vars]
dt = "bf16"

[[job]]
name = "m"
command = "merge"
base = "{base}"
lora = "{lora}"
dtype = "${{dt}}"
out = "m/"

[[job]]
name = "a"
command = "convert"
input = "in.safetensors"
output = "a.safetensors"

[[job]]
name = "b"
command = "convert"
input = "{other}"
output = "b.safetensors"
"#,
            base = fx("peft/bases/llama_f32"),
            lora = fx("peft/cases/llama_f32/adapter"),
            other = fx("io/dtypes.safetensors"),
        ),
    );
    let r = recipe.to_str().unwrap();
    let o = run(&["run", r, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let m_bf16 = digest(&d.path().join("m"));

    // Another option value: only m reruns, and replaces its own folder output.
    let o = run(&["run", r, "--json", "--dry-run", "--var", "dt=f16"]);
    let (jobs, summary) = json_lines(&o);
    assert_eq!(status(&jobs, "m"), "would_run");
    assert_eq!(jobs["m"]["reason"], "its options changed");
    assert_eq!(status(&jobs, "a"), "would_skip");
    assert_eq!(summary["would_run"], 1);
    let o = run(&["run", r, "--json", "--var", "dt=f16"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (jobs, _) = json_lines(&o);
    assert_eq!(
        [status(&jobs, "m"), status(&jobs, "a"), status(&jobs, "b")],
        ["ok", "skipped", "skipped"]
    );
    assert_ne!(digest(&d.path().join("m")), m_bf16);
    let direct = d.path().join("direct/");
    let m = run(&[
        "merge",
        "--base",
        &fx("peft/bases/llama_f32"),
        "--lora",
        &fx("peft/cases/llama_f32/adapter"),
        "--dtype",
        "f16",
        "--out",
        direct.to_str().unwrap(),
        "-q",
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    assert_eq!(digest(&d.path().join("m")), digest(&direct));

    // The same bytes rewritten (a new modification time): a reruns, m and b do not.
    std::fs::write(&input, std::fs::read(&input).unwrap()).unwrap();
    let o = run(&["run", r, "--json", "--var", "dt=f16"]);
    let (jobs, _) = json_lines(&o);
    assert_eq!(
        [status(&jobs, "m"), status(&jobs, "a"), status(&jobs, "b")],
        ["skipped", "ok", "skipped"]
    );
    // A deleted output is not complete.
    std::fs::remove_file(d.path().join("b.safetensors")).unwrap();
    let o = run(&["run", r, "--dry-run", "--var", "dt=f16"]);
    assert!(
        stderr(&o).contains("run   b: its output is missing"),
        "{}",
        stderr(&o)
    );

    // A job into the user's folder fails as the command line does, and leaves it whole.
    let mut text = std::fs::read_to_string(&recipe).unwrap();
    text += &format!(
        "\n[[job]]\nname = \"t\"\ncommand = \"convert\"\ninput = \"{}\"\noutput = \"theirs/\"\n",
        fx("io/dtypes.safetensors")
    );
    write(&recipe, &text);
    let o = run(&["run", r, "--json", "--keep-going"]);
    assert_eq!(o.status.code(), Some(1));
    let (jobs, _) = json_lines(&o);
    assert_eq!(status(&jobs, "t"), "failed");
    assert!(
        jobs["t"]["report"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--overwrite"),
        "{}",
        jobs["t"]
    );
    assert_eq!(
        std::fs::read(theirs.join("model.safetensors")).unwrap(),
        b"precious"
    );
    let o = run(&["run", r, "--json", "--keep-going"]);
    let (jobs, _) = json_lines(&o);
    assert_eq!(status(&jobs, "t"), "failed", "still not ours to replace");
}

#[test]
fn bad_recipes_are_usage_errors_naming_the_job_and_key() {
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft/bases/llama_f32");
    let job = |extra: &str| {
        format!(
            "[[job]]\nname = \"x\"\ncommand = \"merge\"\nbase = \"{base}\"\nout = \"o/\"\n{extra}\n"
        )
    };
    let cases: Vec<(String, &[&str])> = vec![
        (
            job("lorra = \"a\""),
            &["'x'", "unknown key 'lorra'", "lora"],
        ),
        (
            job("dtype = \"${typo}\""),
            &["'x'", "key 'dtype'", "unknown variable 'typo'"],
        ),
        (job("dtype = \"bf17\""), &["'x'", "'bf17'", "--dtype"]),
        (
            job("keep_lora = \"yes\""),
            &["'x'", "keep_lora", "true or false"],
        ),
        (job("threads = [1, 2]"), &["'x'", "threads", "not a list"]),
        (job("json = true"), &["'x'", "'json'", "run --json"]),
        (
            format!("[default]\n{}", job("")),
            &["unknown top-level key 'default'"],
        ),
        (job("[job.each]\nv = []"), &["each.v has no values"]),
        ("[vars]\na = 1\n".into(), &["no jobs"]),
        (format!("{}{}", job(""), job("")), &["both named 'x'"]),
        (
            "[[job]]\ncommand = \"stitch\"\n".into(),
            &["#1", "merge, convert"],
        ),
        ("[[job]\n".into(), &["not valid TOML"]),
    ];
    for (i, (text, wants)) in cases.iter().enumerate() {
        let recipe = d.path().join(format!("bad{i}.toml"));
        write(&recipe, text);
        let o = run(&["run", recipe.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "case {i}: {}", stderr(&o));
        let err = stderr(&o);
        for w in *wants {
            assert!(err.contains(w), "case {i}: {w:?} not in {err}");
        }
        assert!(
            err.contains(&format!("bad{i}.toml")),
            "names the recipe: {err}"
        );
        // With --json: one failure object, kind usage.
        let o = run(&["run", recipe.to_str().unwrap(), "--json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            (v["ok"].clone(), v["error"]["kind"].clone()),
            (false.into(), "usage".into())
        );
        assert_eq!(v["exit_code"], 2);
    }
    assert!(!d.path().join("o").exists(), "nothing ran");
    // A --var that is not NAME=VALUE.
    let recipe = d.path().join("ok.toml");
    write(&recipe, &job(""));
    let o = run(&["run", recipe.to_str().unwrap(), "--var", "novalue"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("NAME=VALUE"));
    let o = run(&["run", d.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no such recipe file"));
}

#[test]
fn the_readme_example_recipes_run_on_the_fixtures() {
    let examples = root().join("examples/recipes");
    let mut seen = 0;
    for (file, expect) in [
        (
            "many-adapters-one-base.toml",
            &[
                "llama_f32",
                "llama_rslora",
                "llama_rank_alpha_pattern",
                "dora_linear",
                "stacked",
            ][..],
        ),
        (
            "one-adapter-many-checkpoints.toml",
            &["llama_bf16", "llama_f16", "llama_f32"],
        ),
        (
            "bin-folder-to-safetensors.toml",
            &[
                "pytorch_model-00001-of-00002",
                "pytorch_model-00002-of-00002",
            ],
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let out = format!("out={}", d.path().display());
        let recipe = examples.join(file);
        let r = recipe.to_str().unwrap();
        let o = run(&["run", r, "--var", &out, "--jobs", "2", "--json"]);
        assert_eq!(o.status.code(), Some(0), "{file}: {}", stderr(&o));
        let (jobs, summary) = json_lines(&o);
        assert_eq!(
            jobs.keys().cloned().collect::<Vec<_>>().len(),
            expect.len(),
            "{file}"
        );
        for j in expect {
            assert_eq!(status(&jobs, j), "ok", "{file} {j}");
        }
        assert_eq!(summary["succeeded"], expect.len());
        let o = run(&["run", r, "--var", &out, "--json"]);
        let (_, summary) = json_lines(&o);
        assert_eq!(summary["skipped"], expect.len(), "{file}: all complete");
        seen += 1;
    }
    assert_eq!(seen, 3);

    // One job of an example, byte for byte the command line's.
    let d = tempfile::tempdir().unwrap();
    let out = format!("out={}", d.path().display());
    let o = run(&[
        "run",
        examples
            .join("bin-folder-to-safetensors.toml")
            .to_str()
            .unwrap(),
        "--var",
        &out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let direct = d.path().join("direct.safetensors");
    let c = run(&[
        "convert",
        &fx("io/sharded_bin/pytorch_model-00001-of-00002.bin"),
        direct.to_str().unwrap(),
        "-q",
    ]);
    assert!(c.status.success());
    assert_eq!(
        digest(&d.path().join("pytorch_model-00001-of-00002.safetensors")),
        digest(&direct)
    );
}

#[test]
fn a_job_reading_an_earlier_jobs_output_waits_for_it_and_skips_when_it_failed() {
    let d = tempfile::tempdir().unwrap();
    let recipe = d.path().join("r.toml");
    let text = |lora: &str| {
        format!(
            r#"
[[job]]
name = "merge"
command = "merge"
base = "{}"
lora = "{lora}"
out = "m/"

[[job]]
name = "to-pth"
command = "convert"
input = "m/"
output = "m.pth"
"#,
            fx("peft/bases/llama_f32")
        )
    };
    write(&recipe, &text(&fx("peft/cases/llama_f32/adapter")));
    let r = recipe.to_str().unwrap();
    // --jobs 2, yet the convert starts only once the merged folder is there.
    let o = run(&["run", r, "--jobs", "2", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (jobs, _) = json_lines(&o);
    assert_eq!(
        (status(&jobs, "merge"), status(&jobs, "to-pth")),
        ("ok".into(), "ok".into())
    );
    assert_eq!(jobs["to-pth"]["report"]["tensors"], 21);
    // The dry run of a changed first job says the second runs after it.
    write(&recipe, &text(&fx("peft/cases/llama_rslora/adapter")));
    let o = run(&["run", r, "--dry-run", "--json"]);
    let (jobs, _) = json_lines(&o);
    assert_eq!(status(&jobs, "to-pth"), "would_run");
    assert!(
        jobs["to-pth"]["reason"]
            .as_str()
            .unwrap()
            .contains("'merge'")
    );
    // A failed first job: the second is not run, even with --keep-going.
    write(
        &recipe,
        &text(&d.path().join("no-such-adapter").display().to_string()),
    );
    let o = run(&["run", r, "--jobs", "2", "--keep-going", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(status(&jobs, "merge"), "failed");
    assert!(!jobs.contains_key("to-pth"));
    assert_eq!(summary["not_run_jobs"], serde_json::json!(["to-pth"]));
}

/// Every file under `dir` (relative path → bytes), dot files included: a partitioned
/// output's `.lorastream/` manifests count until the stitch removes them.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
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
    let mut m = BTreeMap::new();
    walk(dir, dir, &mut m);
    m
}

/// `--part` inside a recipe: the example recipe's four jobs (`each.k = [0, 1, 2, 3]`,
/// `part = "${k}/4"`) run at once into one folder, `stitch` joins them, and the folder is
/// byte for byte a single `merge --out` run's with the same options. A re-run skips all
/// four (one record each, beside the output) and leaves the stitched folder as it was; a
/// changed option is refused on the finished folder unless the job says `overwrite = true`,
/// and then stitches into the new single run's bytes.
#[test]
fn parts_of_one_output_in_a_recipe_stitch_into_the_single_runs_bytes() {
    let d = tempfile::tempdir().unwrap();
    let recipe = root().join("examples/recipes/partitioned-merge.toml");
    let r = recipe.to_str().unwrap();
    let out_var = format!("out={}", d.path().display());
    let merged = d.path().join("merged");

    let o = run(&["run", r, "--var", &out_var, "--jobs", "4", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    for k in 0..4 {
        let name = format!("part-{k}");
        assert_eq!(status(&jobs, &name), "ok", "{name}");
        // The job ran as part k of 4 and wrote shards of its own.
        let part = &jobs[&name]["report"]["part"];
        assert_eq!(part["part"], k, "{name}: {}", jobs[&name]);
        assert_eq!(part["parts"], 4, "{name}");
        assert!(
            !part["shards"].as_array().unwrap().is_empty(),
            "{name} wrote no shard: {part}"
        );
        assert!(
            d.path()
                .join(format!("merged.{name}.lorastream-job.json"))
                .is_file(),
            "{name}: no record of its own"
        );
    }
    assert_eq!(summary["succeeded"], 4);
    // Before the stitch: four manifests, no index, no config.
    let before = tree(&merged);
    let manifests = before
        .keys()
        .filter(|k| k.starts_with(".lorastream/part-"))
        .count();
    assert_eq!(manifests, 4, "{:?}", before.keys().collect::<Vec<_>>());
    assert!(!merged.join("model.safetensors.index.json").exists());

    let st = run(&["stitch", &format!("{}/", merged.display()), "--json"]);
    assert_eq!(st.status.code(), Some(0), "{}", stderr(&st));
    let sr: Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(sr["parts"], 4);
    let shards = sr["shards"].as_u64().unwrap();
    assert!(shards >= 4, "only {shards} shards for 4 parts");

    let single = d.path().join("single");
    let m = run(&[
        "merge",
        "--base",
        &fx("peft/bases/llama_f32"),
        "--lora",
        &fx("peft/cases/llama_f32/adapter"),
        "--shard-size",
        "5000",
        "--out",
        &format!("{}/", single.display()),
        "-q",
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    let expected = tree(&single);
    let got = tree(&merged);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the stitched folder's files"
    );
    assert!(
        got == expected,
        "4 parts from a recipe: not the single run's bytes"
    );
    assert_eq!(
        expected.keys().filter(|k| k.starts_with("model-")).count() as u64,
        shards
    );

    // Re-run: every part complete for the same inputs and options, nothing rewritten.
    let o = run(&["run", r, "--var", &out_var, "--jobs", "4", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(summary["skipped"], 4, "{summary}");
    for k in 0..4 {
        assert_eq!(status(&jobs, &format!("part-{k}")), "skipped");
    }
    assert!(tree(&merged) == expected, "the re-run changed the folder");

    // A changed option reruns the parts, which find the finished output there: refused,
    // naming --overwrite, folder unchanged. The runner adds no --overwrite of its own to
    // jobs sharing an output (the parts would disagree on it, and stitch would refuse).
    let o = run(&[
        "run",
        r,
        "--var",
        &out_var,
        "--var",
        "shard_size=8000",
        "--jobs",
        "4",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let (jobs, summary) = json_lines(&o);
    assert_eq!(summary["failed"], 4, "{summary}");
    for k in 0..4 {
        let j = &jobs[&format!("part-{k}")];
        assert_eq!(j["status"], "failed");
        let msg = j["report"]["error"].to_string();
        assert!(msg.contains("--overwrite"), "part-{k}: {msg}");
    }
    assert!(
        tree(&merged) == expected,
        "a refused part changed the folder"
    );

    // `overwrite = true` in the job gives every part --overwrite: the new plan's parts
    // replace the old output at the stitch, again the single run's bytes.
    let text = std::fs::read_to_string(&recipe).unwrap();
    let text = text.replace(
        "out = \"${out}/merged/\"",
        "out = \"${out}/merged/\"\noverwrite = true",
    );
    assert!(text.contains("overwrite = true"));
    let recipe2 = d.path().join("overwrite.toml");
    write(&recipe2, &text);
    let base_var = format!("base={}", fx("peft/bases/llama_f32"));
    let adapter_var = format!("adapter={}", fx("peft/cases/llama_f32/adapter"));
    let o = run(&[
        "run",
        recipe2.to_str().unwrap(),
        "--var",
        &out_var,
        "--var",
        &base_var,
        "--var",
        &adapter_var,
        "--var",
        "shard_size=8000",
        "--jobs",
        "4",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let st = run(&["stitch", &format!("{}/", merged.display()), "--json"]);
    assert_eq!(st.status.code(), Some(0), "{}", stderr(&st));
    let single8 = d.path().join("single8");
    let m = run(&[
        "merge",
        "--base",
        &fx("peft/bases/llama_f32"),
        "--lora",
        &fx("peft/cases/llama_f32/adapter"),
        "--shard-size",
        "8000",
        "--out",
        &format!("{}/", single8.display()),
        "-q",
    ]);
    assert!(m.status.success(), "{}", stderr(&m));
    let expected8 = tree(&single8);
    assert_ne!(expected8, expected, "the new shard size changes the output");
    assert!(
        tree(&merged) == expected8,
        "the overwritten output is not the new single run's bytes: {:?}",
        tree(&merged).keys().collect::<Vec<_>>()
    );
}
