//! The resume record: a small JSON file beside a job's output (`OUT.lorastream-job.json`
//! for `OUT` or `OUT/`) saying which lorastream, which options and which inputs produced
//! the output, and what the output's files were when the job finished.
//!
//! A job is complete, and a re-run skips it, when its record says `complete` and every
//! part matches now: the same lorastream version, the same command and argument list
//! (after variables and defaults), every input file with the same path, size and
//! modification time, every output file with the same size and modification time.
//!
//! Why sizes and modification times, not content hashes: deciding to skip a job must
//! cost nothing next to running it, and hashing the inputs of a 70B merge reads 140 GB,
//! as much as the merge itself. Every ordinary way of changing a file (a download, a
//! training save, `cp`, an editor) sets a new modification time (nanoseconds here); what
//! this misses is a rewrite that deliberately restores the old time and size
//! (`touch -r`, `rsync -t` of a same-sized file): `run --force` reruns everything.
//!
//! A record is written in two steps: `started` before the child runs (only for an output
//! that did not exist, or that a record already claims), `complete` after it succeeded.
//! So a batch killed at any point leaves records that say which outputs are the recipe's
//! own: those may be replaced by the re-run (`--overwrite` for a folder output), while a
//! folder the user had there before is never overwritten unless the job says so.
//!
//! Several jobs writing one output (the parts of a partitioned output) each get their own
//! record (`OUT.NAME.lorastream-job.json`) that checks inputs and options; the output's
//! files are not compared there, since the other parts change the folder.

use super::parse::Job;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// What a record file ends with.
pub const SUFFIX: &str = ".lorastream-job.json";
/// The record format; a record of another format is not trusted.
const FORMAT: u32 = 1;

/// One file as the record knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: String,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Started,
    Complete,
}

/// The record file's contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub state: State,
    pub lorastream: String,
    pub job: String,
    pub command: String,
    pub args: Vec<String>,
    pub inputs: Vec<FileId>,
    pub outputs: Vec<FileId>,
    /// The job's own `--json` report, repeated when a re-run skips the job.
    #[serde(default)]
    pub report: serde_json::Value,
}

/// Where job `job`'s record goes (None: a job without an output, which clap refuses).
pub fn path_of(job: &Job) -> Option<PathBuf> {
    let out = job.output_path.as_ref()?;
    let name = out.file_name()?.to_string_lossy().into_owned();
    let file = if job.shared_output {
        format!("{name}.{}{SUFFIX}", sanitize(&job.name))
    } else {
        format!("{name}{SUFFIX}")
    };
    Some(out.with_file_name(file))
}

/// A job name usable inside a file name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads a record; None when there is none or it cannot be read as one.
pub fn read(path: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str::<Record>(&text)
        .ok()
        .filter(|r| r.format == FORMAT)
}

/// Writes `record` at `path` whole or not at all (temp file, fsync, rename).
pub fn write(path: &Path, record: &Record) -> std::io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(record).map_err(std::io::Error::other)? + "\n";
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// A new record for `job` in `state`.
pub fn new(job: &Job, state: State, inputs: Vec<FileId>) -> Record {
    Record {
        format: FORMAT,
        state,
        lorastream: env!("CARGO_PKG_VERSION").to_string(),
        job: job.name.clone(),
        command: job.command.clone(),
        args: job.args(&[]),
        inputs,
        outputs: Vec::new(),
        report: serde_json::Value::Null,
    }
}

/// The files of every input of `job`, sorted; Err names an input that is not there.
pub fn inputs_of(job: &Job) -> Result<Vec<FileId>, String> {
    let mut files = Vec::new();
    for p in &job.inputs {
        let meta = std::fs::metadata(p).map_err(|_| format!("input {} is missing", p.display()))?;
        if meta.is_dir() {
            walk(p, 0, &mut files);
        } else {
            files.push(id_of(p, &meta));
            // A sharded index names the files beside it: they are the input too.
            let is_index = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".index.json"));
            if let (true, Some(parent)) = (is_index, p.parent()) {
                list_files(parent, &mut files);
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup();
    Ok(files)
}

/// The output's files now: the file itself, or the files directly in the folder (hidden
/// ones, temp files of runs in progress among them, left out). Shared outputs: none.
pub fn outputs_of(job: &Job) -> Vec<FileId> {
    let Some(out) = job.output_path.as_deref() else {
        return Vec::new();
    };
    if job.shared_output {
        return Vec::new();
    }
    let mut files = Vec::new();
    match std::fs::metadata(out) {
        Ok(m) if m.is_dir() => list_files(out, &mut files),
        Ok(m) => files.push(id_of(out, &m)),
        Err(_) => {}
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

fn id_of(p: &Path, meta: &std::fs::Metadata) -> FileId {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    FileId {
        path: p.display().to_string(),
        size: meta.len(),
        mtime_ns,
    }
}

/// Regular files directly in `dir`, hidden ones and records left out.
fn list_files(dir: &Path, files: &mut Vec<FileId>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(SUFFIX) {
            continue;
        }
        let p = entry.path();
        if let Ok(m) = std::fs::metadata(&p)
            && m.is_file()
        {
            files.push(id_of(&p, &m));
        }
    }
}

/// Every regular file under `dir` (hidden entries, such as a clone's `.git`, left out),
/// a few levels deep: an HF model folder keeps extra weights in subfolders (`original/`).
fn walk(dir: &Path, depth: usize, files: &mut Vec<FileId>) {
    list_files(dir, files);
    if depth >= 3 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in rd.flatten() {
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), depth + 1, files);
        }
    }
}

/// Whether the job must run, and why; or the complete record that lets it be skipped.
pub enum Verdict {
    Run(String),
    Skip(Box<Record>),
}

/// Decides whether `job` is complete: see the module comment.
pub fn check(job: &Job) -> Verdict {
    let Some(path) = path_of(job) else {
        return Verdict::Run("the job names no output".into());
    };
    let Some(rec) = read(&path) else {
        return Verdict::Run(if path.exists() {
            format!("its record {} cannot be read", path.display())
        } else {
            "not run before".into()
        });
    };
    if rec.state != State::Complete {
        return Verdict::Run("its last run did not finish".into());
    }
    if rec.lorastream != env!("CARGO_PKG_VERSION") {
        return Verdict::Run(format!("written by lorastream {}", rec.lorastream));
    }
    if rec.command != job.command || rec.args != job.args(&[]) {
        return Verdict::Run("its options changed".into());
    }
    let now = match inputs_of(job) {
        Ok(files) => files,
        Err(m) => return Verdict::Run(m),
    };
    if let Some(why) = changed(&rec.inputs, &now, "input") {
        return Verdict::Run(why);
    }
    if job.output_path.as_deref().is_none_or(|o| !o.exists()) {
        return Verdict::Run("its output is missing".into());
    }
    let out_now = outputs_of(job);
    for f in &rec.outputs {
        match out_now.iter().find(|g| g.path == f.path) {
            None => return Verdict::Run(format!("output file {} is missing", f.path)),
            Some(g) if g != f => return Verdict::Run(format!("output file {} changed", f.path)),
            Some(_) => {}
        }
    }
    Verdict::Skip(Box::new(rec))
}

/// The first difference between the files a record lists and those there now.
fn changed(then: &[FileId], now: &[FileId], what: &str) -> Option<String> {
    for f in then {
        match now.iter().find(|g| g.path == f.path) {
            None => return Some(format!("{what} file {} is gone", f.path)),
            Some(g) if g != f => return Some(format!("{what} file {} changed", f.path)),
            Some(_) => {}
        }
    }
    now.iter()
        .find(|g| !then.iter().any(|f| f.path == g.path))
        .map(|g| format!("{what} file {} is new", g.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &str, size: u64, mtime_ns: i64) -> FileId {
        FileId {
            path: path.into(),
            size,
            mtime_ns,
        }
    }

    #[test]
    fn any_difference_in_the_inputs_is_named() {
        let then = vec![id("/a", 1, 5), id("/b", 2, 5)];
        assert_eq!(changed(&then, &then.clone(), "input"), None);
        let touched = vec![id("/a", 1, 6), id("/b", 2, 5)];
        assert_eq!(
            changed(&then, &touched, "input").as_deref(),
            Some("input file /a changed")
        );
        let gone = vec![id("/b", 2, 5)];
        assert!(changed(&then, &gone, "input").unwrap().contains("gone"));
        let extra = vec![id("/a", 1, 5), id("/b", 2, 5), id("/c", 0, 0)];
        assert!(
            changed(&then, &extra, "input")
                .unwrap()
                .contains("/c is new")
        );
    }

    #[test]
    fn records_round_trip_and_other_formats_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors.lorastream-job.json");
        let rec = Record {
            format: FORMAT,
            state: State::Complete,
            lorastream: "0".into(),
            job: "j".into(),
            command: "convert".into(),
            args: vec!["--dtype=bf16".into()],
            inputs: vec![id("/a", 1, 2)],
            outputs: vec![],
            report: serde_json::json!({"tensors": 3}),
        };
        write(&p, &rec).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back.args, rec.args);
        assert_eq!(back.inputs, rec.inputs);
        assert_eq!(back.state, State::Complete);
        std::fs::write(&p, r#"{"format": 99}"#).unwrap();
        assert!(read(&p).is_none());
    }
}
