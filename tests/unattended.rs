//! Unattended runs, through the real binary: the signals a scheduler, `timeout` or a
//! dropped ssh session send remove every temp file and exit 128 + the signal; a run
//! killed with SIGKILL leaves a temp file the next run of the same output removes; outputs
//! are fsynced before they get their names (strace); sharded outputs go inside an
//! existing folder (its mode, its mount, its README kept), refuse one with a checkpoint
//! unless --overwrite, and leave nothing half-written when the disk is full (tmpfs);
//! folder outputs of an HF model folder get its config and tokenizer files.

use serde_json::Value;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lorastream");

/// `--shard-size N` for a folder output (`.../`); a single-file output takes none (a usage
/// error there).
fn shard_size<'a>(out: &str, n: &'a str) -> Vec<&'a str> {
    if out.ends_with('/') {
        vec!["--shard-size", n]
    } else {
        Vec::new()
    }
}

fn fx(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/peft")
        .join(rel)
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a safetensors file of F32 tensors `[rows, cols]`; `data`: real values (small
/// files), else a sparse file of zeros (big inputs that cost no disk).
fn write_st(path: &Path, tensors: &[(&str, usize, usize)], data: bool) {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, r, c) in tensors {
        let n = (r * c * 4) as u64;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": [r, c], "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(&h);
    if data {
        let total = off as usize / 4;
        bytes.extend((0..total).flat_map(|i| ((i % 1000) as f32 * 0.5).to_le_bytes()));
        std::fs::write(path, bytes).unwrap();
    } else {
        std::fs::write(path, &bytes).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(bytes.len() as u64 + off).unwrap();
    }
}

/// A 1 GiB (sparse) F32 input of four `layers.I.proj` Linear weights [65536, 1024]:
/// converting it to bf16, or merging an adapter into it, takes long enough to be stopped.
fn big_input(dir: &Path) -> PathBuf {
    let p = dir.join("big.safetensors");
    let t: Vec<(String, usize, usize)> = (0..4)
        .map(|i| (format!("layers.{i}.proj.weight"), 65536, 1024))
        .collect();
    let t: Vec<(&str, usize, usize)> = t.iter().map(|(n, r, c)| (n.as_str(), *r, *c)).collect();
    write_st(&p, &t, false);
    p
}

/// A PEFT LoRA adapter (r=8) for every `proj` of [`big_input`].
fn big_adapter(dir: &Path) -> PathBuf {
    let a = dir.join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["proj"],
        "fan_in_fan_out": false, "bias": "none", "use_dora": false, "use_rslora": false,
    });
    std::fs::write(a.join("adapter_config.json"), config.to_string()).unwrap();
    let t: Vec<(String, usize, usize)> = (0..4)
        .flat_map(|i| {
            let m = format!("base_model.model.layers.{i}.proj");
            [
                (format!("{m}.lora_A.weight"), 8, 1024),
                (format!("{m}.lora_B.weight"), 65536, 8),
            ]
        })
        .collect();
    let t: Vec<(&str, usize, usize)> = t.iter().map(|(n, r, c)| (n.as_str(), *r, *c)).collect();
    write_st(&a.join("adapter_model.safetensors"), &t, true);
    a
}

/// Names under `dir` (recursively) that are temp outputs.
fn temps_in(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(".lorastream-tmp-") {
            found.push(p.clone());
        }
        if p.is_dir() {
            found.extend(temps_in(&p));
        }
    }
    found
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Starts `lorastream args…` and waits until a temp output exists under `watch`: the run
/// is then writing.
fn start_writing(args: &[&str], watch: &Path) -> Child {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while temps_in(watch).is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it started writing");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no temp output appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sends a signal to our own child process.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0);
}

#[test]
fn stop_signals_remove_temp_files_and_exit_128_plus_signal() {
    let dir = tempfile::tempdir().unwrap();
    let input = big_input(dir.path());
    let adapter = big_adapter(dir.path());
    let (input, adapter) = (input.to_str().unwrap(), adapter.to_str().unwrap());
    let cases = [
        (libc::SIGINT, "SIGINT", 130),
        (libc::SIGTERM, "SIGTERM", 143),
        (libc::SIGHUP, "SIGHUP", 129),
        (libc::SIGQUIT, "SIGQUIT", 131),
    ];
    for (i, (sig, name, code)) in cases.into_iter().enumerate() {
        let work = dir.path().join(format!("w{i}"));
        std::fs::create_dir(&work).unwrap();
        // A single file, a new folder and an existing folder (written in place).
        let out = match i % 3 {
            0 => work.join("out.safetensors").display().to_string(),
            1 => format!("{}/new/", work.display()),
            _ => {
                std::fs::create_dir(work.join("repo")).unwrap();
                std::fs::write(work.join("repo/README.md"), "# model\n").unwrap();
                format!("{}/repo/", work.display())
            }
        };
        // Odd cases merge the adapter (the merge's compute threads are running), even
        // ones convert with a cast.
        let args: Vec<&str> = if i % 2 == 1 {
            let merge = [
                "merge", "--base", input, "--lora", adapter, "--device", "cpu",
            ];
            [&merge[..], &["--out", &out], &shard_size(&out, "100MB")[..]].concat()
        } else {
            [
                &["convert", input, &out, "--dtype", "bf16"][..],
                &shard_size(&out, "100MB"),
            ]
            .concat()
        };
        let child = start_writing(&args, &work);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{name}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.last().copied(),
            Some(format!("error: interrupted by {name}; unfinished output removed").as_str()),
            "{name}: {err}"
        );
        assert_eq!(temps_in(&work), Vec::<PathBuf>::new(), "{name}");
        let left = names_in(&work);
        if i % 3 == 2 {
            assert_eq!(left, ["repo"]);
            assert_eq!(names_in(&work.join("repo")), ["README.md"]);
        } else {
            assert!(left.is_empty(), "{name}: {left:?}");
        }
    }
}

/// A script that asked for --json still reads exactly one object when the run is stopped.
#[test]
fn a_stopped_json_run_prints_one_failure_object() {
    let dir = tempfile::tempdir().unwrap();
    let input = big_input(dir.path());
    let out = dir.path().join("out.safetensors");
    let args = [
        "convert",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--json",
    ];
    let child = start_writing(&args, dir.path());
    signal(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit_code"], 143);
    assert_eq!(v["error"]["kind"], "interrupted");
    assert!(temps_in(dir.path()).is_empty());
}

#[test]
fn a_killed_runs_temp_files_are_removed_by_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let big = big_input(dir.path());
    let small = dir.path().join("small.safetensors");
    write_st(&small, &[("a", 8, 4), ("b", 4, 4)], true);
    let (big, small) = (big.to_str().unwrap(), small.to_str().unwrap());
    for out in ["out.safetensors", "out.pth", "folder/", "existing/"] {
        let work = dir.path().join(out.trim_end_matches('/'));
        let out = format!("{}/{out}", dir.path().display());
        let watch = if out.contains("existing") {
            std::fs::create_dir_all(&work).unwrap();
            work.clone()
        } else {
            dir.path().to_path_buf()
        };
        let child = start_writing(&["convert", big, &out, "--dtype", "bf16"], &watch);
        signal(&child, libc::SIGKILL);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), None, "killed");
        let stale = temps_in(&watch);
        assert!(!stale.is_empty(), "SIGKILL cannot clean up");
        let o = run(&["convert", small, &out]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(temps_in(dir.path()), Vec::<PathBuf>::new(), "{out}");
        let r = run(&["inspect", &out, "--json"]);
        assert!(r.status.success(), "{}", stderr(&r));
    }
}

/// The syscalls of one run, with paths (`strace -f -y`), or None where strace cannot run.
fn strace(args: &[&str], log: &Path) -> Option<Output> {
    let o = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(log)
        .arg(BIN)
        .args(args)
        .output()
        .ok()?;
    if !log.exists() {
        return None;
    }
    Some(o)
}

#[test]
fn outputs_are_fsynced_before_their_final_name_and_the_folder_after() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write_st(&input, &[("a", 64, 64), ("b", 64, 64)], true);
    let input = input.to_str().unwrap();
    for (out, files) in [
        ("out.safetensors", vec!["out.safetensors"]),
        ("out.pth", vec!["out.pth"]),
        (
            "shards/",
            vec![
                "model-00001-of-00002.safetensors",
                "model.safetensors.index.json",
            ],
        ),
    ] {
        let log = dir
            .path()
            .join(format!("{}.strace", out.trim_end_matches('/')));
        let out_path = format!("{}/{out}", dir.path().display());
        let args = [
            &["convert", input, &out_path][..],
            &shard_size(&out_path, "20000"),
        ]
        .concat();
        let Some(o) = strace(&args, &log) else {
            eprintln!("skipped: strace cannot run here");
            return;
        };
        assert!(o.status.success(), "{}", stderr(&o));
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
        let rename = if out.ends_with('/') {
            // The whole new folder is renamed once.
            pos(&|l: &str| l.contains("rename") && l.contains("/shards\""))
        } else {
            pos(&|l: &str| l.contains("rename") && l.contains(&format!("/{out}\"")))
        }
        .unwrap_or_else(|| panic!("no rename into place:\n{text}"));
        for f in files {
            let synced = pos(&|l: &str| {
                l.contains("fsync(")
                    && l.contains(".lorastream-tmp-")
                    && (l.contains(&format!("/{f}>")) || l.contains(&format!(".{f}.lorastream")))
            })
            .unwrap_or_else(|| panic!("{f} not fsynced:\n{text}"));
            assert!(synced < rename, "{f} fsynced after its rename:\n{text}");
        }
        let dir_name = format!("<{}>", dir.path().display());
        let dir_synced = lines[rename..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&dir_name));
        assert!(dir_synced, "folder not fsynced after the rename:\n{text}");
    }

    // An existing folder: every file fsynced under its temp name, renamed one by one (the
    // index last), then the folder fsynced.
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let log = dir.path().join("repo.strace");
    let out_path = format!("{}/", repo.display());
    let Some(o) = strace(
        &["convert", input, &out_path, "--shard-size", "20000"],
        &log,
    ) else {
        return;
    };
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let renames: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("rename"))
        .collect();
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ];
    assert_eq!(renames.len(), names.len(), "{text}");
    for (f, &r) in names.iter().zip(&renames) {
        assert!(
            lines[r].ends_with(&format!("/repo/{f}\") = 0")),
            "{}",
            lines[r]
        );
        let synced = (0..r).any(|i| {
            lines[i].contains("fsync(") && lines[i].contains(&format!("/repo/.{f}.lorastream-tmp-"))
        });
        assert!(synced, "{f} not fsynced before its rename:\n{text}");
    }
    let last = renames[renames.len() - 1];
    let repo_name = format!("<{}>", repo.display());
    assert!(
        lines[last..]
            .iter()
            .any(|l| l.contains("fsync(") && l.contains(&repo_name)),
        "folder not fsynced after the renames:\n{text}"
    );
}

/// A merge of the llama_f32 fixture into `out` (extra arguments appended).
fn merge_llama(out: &str, extra: &[&str]) -> Output {
    let base = fx("bases/llama_f32");
    let lora = fx("cases/llama_f32/adapter");
    let mut a = vec![
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--lora",
        lora.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out,
    ];
    a.extend(extra);
    run(&a)
}

#[test]
fn an_existing_folder_is_written_in_place_and_keeps_its_mode_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("README.md"), "# my merge\n").unwrap();
    std::fs::write(repo.join(".gitattributes"), "*.safetensors filter=lfs\n").unwrap();
    std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o750)).unwrap();
    let ino = std::fs::metadata(&repo).unwrap().ino();
    let out = format!("{}/", repo.display());
    let o = merge_llama(&out, &["--no-copy-files"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::metadata(&repo).unwrap();
    assert_eq!(meta.ino(), ino, "the folder itself is kept");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!(
        names_in(&repo),
        [
            ".gitattributes",
            "README.md",
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("README.md")).unwrap(),
        "# my merge\n"
    );
}

#[test]
fn a_folder_with_a_checkpoint_is_refused_before_any_work_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("model.safetensors"), b"old weights").unwrap();
    std::fs::write(repo.join("pytorch_model.bin"), b"older weights").unwrap();
    std::fs::write(repo.join("notes.txt"), b"keep me").unwrap();
    let out = format!("{}/", repo.display());
    // A base that does not exist: the refusal comes before the inputs are even opened.
    let o = run(&["convert", "/nonexistent/model.safetensors", &out]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("already holds checkpoint files (model.safetensors, pytorch_model.bin)")
            && err.contains("--overwrite"),
        "{err}"
    );
    let o = merge_llama(&out, &["--dry-run"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        names_in(&repo),
        ["model.safetensors", "notes.txt", "pytorch_model.bin"]
    );
    let o = merge_llama(&out, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        names_in(&repo),
        [
            "config.json",
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json",
            "notes.txt"
        ]
    );
    // The in-place output equals a fresh one.
    let fresh = dir.path().join("fresh.safetensors");
    let o = merge_llama(fresh.to_str().unwrap(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let d = run(&["diff", "--exact", fresh.to_str().unwrap(), &out]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stdout));
}

/// A tmpfs of `size` mounted at `at`, unmounted on drop; None (with a message) where this
/// process may not mount.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    // 4 MiB of f32: more than the 2 MiB filesystem holds.
    write_st(&input, &[("a", 512, 1024), ("b", 512, 1024)], true);
    let input = input.to_str().unwrap();
    let mnt = dir.path().join("small");
    let Some(_fs) = Tmpfs::mount(&mnt, "2m") else {
        return;
    };
    // An old checkpoint that --overwrite would replace: a failed run keeps it whole.
    std::fs::create_dir(mnt.join("repo")).unwrap();
    std::fs::write(mnt.join("repo/model.safetensors"), b"old").unwrap();
    let repo = format!("{}/repo/", mnt.display());
    let file = mnt.join("out.safetensors").display().to_string();
    let pth = mnt.join("out.pth").display().to_string();
    let new = format!("{}/new/", mnt.display());
    for (out, extra) in [
        (file.as_str(), None),
        (pth.as_str(), None),
        (new.as_str(), None),
        (repo.as_str(), Some("--overwrite")),
    ] {
        let mut args = [&["convert", input, out][..], &shard_size(out, "1MB")].concat();
        args.extend(extra);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{out}");
        let err = stderr(&o);
        assert!(err.contains("No space left on device"), "{out}: {err}");
        assert!(
            !err.contains("lorastream-tmp"),
            "names the output, not the temp: {err}"
        );
        assert_eq!(temps_in(&mnt), Vec::<PathBuf>::new(), "{out}");
        assert_eq!(names_in(&mnt), ["repo"], "{out}");
        assert_eq!(names_in(&mnt.join("repo")), ["model.safetensors"]);
        assert_eq!(
            std::fs::read(mnt.join("repo/model.safetensors")).unwrap(),
            b"old"
        );
    }
}

#[test]
fn a_mount_point_output_folder_is_written_into_and_stays_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("volume");
    let Some(_fs) = Tmpfs::mount(&mnt, "64m") else {
        return;
    };
    let dev = std::fs::metadata(&mnt).unwrap().dev();
    assert_ne!(dev, std::fs::metadata(dir.path()).unwrap().dev());
    let out = format!("{}/", mnt.display());
    let o = merge_llama(&out, &["--shard-size", "10000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&mnt).unwrap().dev(),
        dev,
        "still the mount"
    );
    let names = names_in(&mnt);
    assert!(
        names.contains(&"model.safetensors.index.json".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"config.json".to_string()), "{names:?}");
    assert!(
        names.iter().filter(|n| n.starts_with("model-")).count() > 1,
        "{names:?}"
    );
    let fresh = dir.path().join("fresh.safetensors");
    assert!(merge_llama(fresh.to_str().unwrap(), &[]).status.success());
    let d = run(&["diff", "--exact", fresh.to_str().unwrap(), &out]);
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stdout));
}

#[test]
fn folder_outputs_of_a_model_folder_get_its_config_and_tokenizer_files() {
    let dir = tempfile::tempdir().unwrap();
    // A model folder with the files a hub snapshot has.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    std::fs::copy(
        fx("bases/llama_f32/model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fx("bases/llama_f32/config.json")).unwrap())
            .unwrap();
    config["torch_dtype"] = "float32".into();
    config["dtype"] = "float32".into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "modeling_x.py",
        "README.md",
    ] {
        std::fs::write(model.join(f), format!("contents of {f}")).unwrap();
    }
    std::fs::write(model.join(".gitattributes"), "x").unwrap();
    std::fs::create_dir(model.join("original")).unwrap();
    std::fs::write(model.join("original/consolidated.00.pth"), "x").unwrap();
    let side = [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "modeling_x.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    let mut expected: Vec<&str> = side.to_vec();
    expected.extend([
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]);
    expected.sort();
    let lora = fx("cases/llama_f32/adapter");
    let (model_s, lora_s) = (model.to_str().unwrap(), lora.to_str().unwrap());
    let cfg = |out: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
    };

    // convert folder → folder, cast: config says the new dtype; other files byte for byte.
    let out = dir.path().join("conv");
    let o = run(&[
        "convert",
        model_s,
        &format!("{}/", out.display()),
        "--dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("note: copied README.md, chat_template.jinja, config.json"),
        "{}",
        stderr(&o)
    );
    assert_eq!(names_in(&out), expected);
    assert_eq!(cfg(&out)["torch_dtype"], "bfloat16");
    assert_eq!(cfg(&out)["dtype"], "bfloat16");
    assert_eq!(cfg(&out)["hidden_size"], config["hidden_size"]);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"contents of tokenizer.json"
    );

    // merge of one unnamed component from a file inside the folder, no cast: config as is.
    let out = dir.path().join("merged");
    let base_file = model.join("model.safetensors");
    let o = run(&[
        "merge",
        "--base",
        base_file.to_str().unwrap(),
        "--lora",
        lora_s,
        "--device",
        "cpu",
        "--out",
        &format!("{}/", out.display()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(names_in(&out), expected);
    assert_eq!(cfg(&out), config);

    // --no-copy-files: weights only.
    let out = dir.path().join("bare");
    let o = run(&[
        "merge",
        "--base",
        model_s,
        "--lora",
        lora_s,
        "--device",
        "cpu",
        "--no-copy-files",
        "--out",
        &format!("{}/", out.display()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        names_in(&out),
        [
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ]
    );

    // A named component: keys are prefixed, the config would not describe them.
    let out = dir.path().join("named");
    let o = run(&[
        "merge",
        "--base",
        &format!("llm={model_s}"),
        "--lora",
        &format!("llm={lora_s}"),
        "--device",
        "cpu",
        "--out",
        &format!("{}/", out.display()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not copied: the output's keys are prefixed NAME."),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        names_in(&out),
        [
            "model-00001-of-00001.safetensors",
            "model.safetensors.index.json"
        ]
    );

    // An existing clone with its own README and .gitattributes: those are kept (a note
    // says so) unless --overwrite.
    let clone = dir.path().join("clone");
    std::fs::create_dir(&clone).unwrap();
    std::fs::write(clone.join("README.md"), "my card").unwrap();
    std::fs::write(clone.join(".gitattributes"), "lfs").unwrap();
    let clone_out = format!("{}/", clone.display());
    let o = run(&[
        "merge", "--base", model_s, "--lora", lora_s, "--out", &clone_out,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("; kept README.md already in {clone_out}")),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(clone.join("README.md")).unwrap(), b"my card");
    let mut with_git = expected.clone();
    with_git.insert(0, ".gitattributes");
    assert_eq!(names_in(&clone), with_git);
    let args = [
        "merge", "--base", model_s, "--lora", lora_s, "--out", &clone_out,
    ];
    let o = run(&[&args[..], &["--overwrite"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(clone.join("README.md")).unwrap(),
        b"contents of README.md"
    );
    assert_eq!(std::fs::read(clone.join(".gitattributes")).unwrap(), b"lfs");

    // --keep-lora: PeftModel's keys, which the config does not describe either.
    let out = dir.path().join("keep");
    let o = run(&[
        "merge",
        "--base",
        model_s,
        "--lora",
        lora_s,
        "--keep-lora",
        "--out",
        &format!("{}/", out.display()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not copied: --keep-lora"),
        "{}",
        stderr(&o)
    );
    assert!(!out.join("config.json").exists());

    // A single-file output has nowhere to put them.
    let out = dir.path().join("one.safetensors");
    let o = run(&["convert", model_s, out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        names_in(dir.path()),
        [
            "bare",
            "clone",
            "conv",
            "keep",
            "merged",
            "model",
            "named",
            "one.safetensors"
        ]
    );
}
