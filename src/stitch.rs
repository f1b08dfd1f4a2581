//! `stitch DIR/`: joins the parts of a partitioned output (`--part K/N`, see
//! src/partition.rs and src/sink/parts.rs) into the folder a single run writes. It trusts
//! nothing it has not checked: every one of the N manifests must be there, all must
//! describe the same plan (fingerprint, number of parts, shard layout, total size), each
//! part must have written exactly the shards the plan deals it, and every shard and staged
//! file must have the size and SHA-256 its manifest records. Only then does it move the
//! staged config/tokenizer files beside the shards, write `model.safetensors.index.json`
//! (the same text a single run writes: `sink::index_text`), remove `DIR/.lorastream/` and
//! fsync the folder. Anything missing or inconsistent fails (exit 1) naming the parts and
//! files, with the folder left as it was, so the named parts can be rerun and stitched.

use crate::error::{Error, Result};
use crate::sink::{
    self, INDEX, MANIFEST_FORMAT, Manifest, PARTS_DIR, STAGED_FILES, manifest_name, sha256_file,
};
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `stitch` reports (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct StitchReport {
    pub output: String,
    pub parts: usize,
    pub shards: usize,
    pub tensors: usize,
    /// Tensor bytes (the index's total_size).
    pub bytes: u64,
    pub fingerprint: String,
    /// Files moved beside the shards (config, tokenizer).
    pub files: Vec<String>,
    /// Checkpoint files of an older output removed (the parts ran with --overwrite).
    pub removed: Vec<String>,
    pub seconds: f64,
}

/// Reads every manifest in `meta` (temp files of parts still writing are skipped).
fn read_manifests(meta: &Path) -> Result<Vec<(String, Manifest)>> {
    let rd = std::fs::read_dir(meta).map_err(|e| Error::io(meta, e))?;
    let mut found = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(meta, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.starts_with("part-") || !name.ends_with(".json") {
            continue;
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::format(&path, format!("not a part manifest: {e}; rerun that part"))
        })?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::format(
                &path,
                format!(
                    "manifest format {} (this lorastream reads {MANIFEST_FORMAT}); stitch with \
                     the lorastream that wrote the parts",
                    m.format
                ),
            ));
        }
        if name != manifest_name(m.part, m.parts) {
            return Err(Error::format(
                &path,
                format!(
                    "says it is part {}/{}, not what its name says",
                    m.part, m.parts
                ),
            ));
        }
        found.push((name, m));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// The shard and staged-file checks, all at once (in parallel: each is a full read).
fn check_files(dir: &Path, meta: &Path, parts: &[Manifest]) -> Vec<String> {
    let mut jobs: Vec<(usize, PathBuf, u64, &str)> = Vec::new();
    for m in parts {
        for s in &m.shards {
            jobs.push((m.part, dir.join(&s.name), s.bytes, &s.sha256));
        }
        for f in &m.files {
            let p = meta.join(STAGED_FILES).join(&f.name);
            jobs.push((m.part, p, f.bytes, &f.sha256));
        }
    }
    let mut problems: Vec<String> = jobs
        .par_iter()
        .filter_map(|(k, path, bytes, sha)| {
            let n = parts.first().map_or(0, |m| m.parts);
            match sha256_file(path) {
                Err(e) => Some(format!("part {k}/{n}: {e}")),
                Ok((b, _)) if b != *bytes => Some(format!(
                    "part {k}/{n}: {} has {b} bytes, its manifest says {bytes}",
                    path.display()
                )),
                Ok((_, s)) if s != *sha => Some(format!(
                    "part {k}/{n}: {} does not have the SHA-256 its manifest records (changed \
                     or rewritten since)",
                    path.display()
                )),
                Ok(_) => None,
            }
        })
        .collect();
    problems.sort();
    problems
}

/// Checks the parts in `out` and joins them into the finished folder (see the module
/// comment). Errors name the parts to rerun; nothing is changed then.
pub fn stitch(out: &Path) -> Result<StitchReport> {
    let start = Instant::now();
    let dir = sink::folder_of(out);
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
        ));
    }
    let meta = dir.join(PARTS_DIR);
    if !meta.is_dir() {
        let what = if dir.join(INDEX).is_file() {
            "is already stitched (it has model.safetensors.index.json and no .lorastream/)"
        } else {
            "holds no partitioned output (no .lorastream/ folder): run the parts with --part K/N first"
        };
        return Err(Error::format(dir, what));
    }
    let found = read_manifests(&meta)?;
    let Some(first) = found.first().map(|(_, m)| m.clone()) else {
        return Err(Error::Plan(format!(
            "{}: no part has finished (no manifest in {PARTS_DIR}/); run the parts with --part \
             K/N, then stitch",
            dir.display()
        )));
    };
    // All parts must be of one plan.
    let agree = |m: &Manifest| {
        m.fingerprint == first.fingerprint
            && m.parts == first.parts
            && m.layout == first.layout
            && m.total_size == first.total_size
    };
    if found.iter().any(|(_, m)| !agree(m)) {
        let list: Vec<String> = found
            .iter()
            .map(|(name, m)| {
                format!(
                    "  {name}: part {}/{}, plan {}",
                    m.part,
                    m.parts,
                    &m.fingerprint[..m.fingerprint.len().min(16)]
                )
            })
            .collect();
        return Err(Error::Plan(format!(
            "{}: the parts were written for different plans (other inputs, options, --shard-size, \
             number of parts or lorastream version):\n{}\nRerun every part with the same command \
             line (the parts of one plan have the same plan id), then stitch",
            dir.display(),
            list.join("\n")
        )));
    }
    let n = first.parts;
    let parts: Vec<Manifest> = found.into_iter().map(|(_, m)| m).collect();
    let first = &first;
    let missing: Vec<String> = (0..n)
        .filter(|k| !parts.iter().any(|m| m.part == *k))
        .map(|k| format!("{k}/{n}"))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Plan(format!(
            "{}: part{} {} {} not finished (no manifest in {PARTS_DIR}/); run {} with \
             --part K/N and the same options, then stitch",
            dir.display(),
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if missing.len() == 1 { "has" } else { "have" },
            if missing.len() == 1 { "it" } else { "them" },
        )));
    }
    // Each part wrote exactly the shards the plan deals it.
    let mut problems = Vec::new();
    for m in &parts {
        let expected: Vec<&str> = m
            .layout
            .iter()
            .filter(|l| l.part == m.part)
            .map(|l| l.name.as_str())
            .collect();
        let wrote: Vec<&str> = m.shards.iter().map(|s| s.name.as_str()).collect();
        if expected != wrote {
            problems.push(format!(
                "part {}/{n}: wrote {wrote:?}, the plan deals it {expected:?}",
                m.part
            ));
        }
        if m.part != 0 && !m.files.is_empty() {
            problems.push(format!(
                "part {}/{n}: staged files only part 0 stages",
                m.part
            ));
        }
    }
    if problems.is_empty() {
        problems = check_files(dir, &meta, &parts);
    }
    if !problems.is_empty() {
        return Err(Error::Plan(format!(
            "{}: the parts do not match their manifests:\n  {}\nRerun the parts named, then stitch",
            dir.display(),
            problems.join("\n  ")
        )));
    }
    let shard_names: Vec<&str> = first.layout.iter().map(|l| l.name.as_str()).collect();
    let foreign = sink::foreign_weight_files(dir, &shard_names)?;
    let overwrite = parts.iter().all(|m| m.overwrite);
    if !foreign.is_empty() && !overwrite {
        return Err(Error::format(
            dir,
            format!(
                "holds checkpoint files that are not shards of this output ({}); rerun the parts \
                 with --overwrite to replace them, or move them away, then stitch",
                foreign.join(", ")
            ),
        ));
    }
    // The index in shard order, each shard's tensors in plan order: a single run's text.
    let mut shards: Vec<&sink::WrittenShard> = parts.iter().flat_map(|m| &m.shards).collect();
    shards.sort_by_key(|s| shard_names.iter().position(|n| *n == s.name));
    let entries = shards
        .iter()
        .flat_map(|s| s.tensors.iter().map(move |t| (t.as_str(), s.name.as_str())));
    let tensors: usize = shards.iter().map(|s| s.tensors.len()).sum();
    let text = sink::index_text(entries, first.total_size, &dir.join(INDEX))?;
    let mut files = Vec::new();
    for f in parts.iter().flat_map(|m| &m.files) {
        let from = meta.join(STAGED_FILES).join(&f.name);
        let to = dir.join(&f.name);
        std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
        files.push(f.name.clone());
    }
    // Temp files of killed runs of these shards (on any host: every part has finished).
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = shard_names.iter().chain([&INDEX]).any(|s| {
                name.strip_prefix('.')
                    .and_then(|r| r.strip_prefix(s))
                    .is_some_and(|r| r.starts_with(".lorastream-tmp-"))
            });
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    sink::sync_dir(dir)?;
    let index = dir.join(INDEX);
    let (temp, ()) = sink::TempOutput::create(&index, |p| {
        std::fs::write(p, &text).map_err(|e| Error::io(&index, e))?;
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&index, e))
    })?;
    temp.commit()?;
    let mut removed = Vec::new();
    for name in foreign {
        let p = dir.join(&name);
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
        removed.push(name);
    }
    std::fs::remove_dir_all(&meta).map_err(|e| Error::io(&meta, e))?;
    sink::sync_dir(dir)?;
    Ok(StitchReport {
        output: out.display().to_string(),
        parts: n,
        shards: shard_names.len(),
        tensors,
        bytes: first.total_size,
        fingerprint: first.fingerprint.clone(),
        files,
        removed,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;
    use crate::partition::{Part, PartPlan};
    use crate::sink::{OutTensor, PartWriter, SinkOptions, TensorSink};

    fn plan() -> Vec<OutTensor> {
        (0..4)
            .map(|i| OutTensor {
                name: format!("w{i}"),
                dtype: Dtype::U8,
                shape: vec![64],
            })
            .collect()
    }

    /// Writes part `k` of `n` of `plan()` in shards of `shard` bytes into `dir`.
    fn write_part(dir: &Path, shard: u64, k: usize, n: usize) {
        let full = plan();
        let p = PartPlan::new(&full, shard, Part { index: k, count: n }, "t").unwrap();
        let writes = p.writes(full.len());
        let opts = SinkOptions {
            shard_size: shard,
            direct_io: false,
            overwrite: false,
        };
        let mut w = Box::new(PartWriter::create(dir, &full, &opts, &[], p).unwrap());
        for (i, t) in full.iter().enumerate().filter(|(i, _)| writes[*i]) {
            w.begin(t).unwrap();
            w.write(&[i as u8; 64]).unwrap();
            w.end().unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn parts_without_shards_still_count_and_a_missing_one_is_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        // One shard, three parts: parts 1 and 2 write only their manifests.
        write_part(&dir, 1 << 20, 0, 3);
        write_part(&dir, 1 << 20, 2, 3);
        let e = stitch(&dir).unwrap_err().to_string();
        assert!(e.contains("part 1/3 has not finished"), "{e}");
        write_part(&dir, 1 << 20, 1, 3);
        let r = stitch(&dir).unwrap();
        assert_eq!((r.parts, r.shards, r.tensors, r.bytes), (3, 1, 4, 256));
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(INDEX)).unwrap()).unwrap();
        let shard = "model-00001-of-00001.safetensors";
        assert_eq!(index["weight_map"]["w3"], shard);
        assert!(!dir.join(PARTS_DIR).exists());
    }

    #[test]
    fn a_manifest_that_is_not_what_its_name_says_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        write_part(&dir, 100, 0, 2);
        write_part(&dir, 100, 1, 2);
        let meta = dir.join(PARTS_DIR);
        std::fs::rename(
            meta.join(manifest_name(1, 2)),
            meta.join(manifest_name(0, 2)),
        )
        .unwrap();
        let e = stitch(&dir).unwrap_err().to_string();
        assert!(e.contains("says it is part 1/2"), "{e}");
    }
}
