//! `PartWriter`: one part (`--part K/N`) of a sharded folder output. It is told only the
//! tensors of its own shards (the caller skips the rest without computing them) and
//! writes each shard exactly as the single run would (same `SafetensorsWriter`, same
//! header, same bytes) under a temp name in the shared folder, hashing the bytes as it
//! hands them to the file (it never reads back what it wrote: `stitch` does, once), fsyncs
//! it and renames it to its final `model-0000i-of-0000n.safetensors` name: a part killed even
//! with SIGKILL leaves at most a temp file (removed by the next run on that host, or by
//! `stitch`), never a partial shard under a final name, and a rerun rewrites the same
//! bytes. Last, it writes its manifest, `DIR/.lorastream/part-K-of-N.json`: the plan's
//! fingerprint and layout, and the name, size, SHA-256 and tensors of every shard it wrote.
//! Part 0 also stages the config and tokenizer files under `DIR/.lorastream/files/`;
//! `stitch` moves them beside the shards and writes the index, so a folder looks like a
//! model only once every part is in.

use super::atomic::{TempOutput, sync_dir, sync_file};
use super::part_plan::{PartPlan, ShardSpec, hex};
use super::safetensors::{Hashing, SafetensorsWriter};
use super::shard_stream::{ShardFiles, ShardStream};
use super::sharded::{INDEX, write_side_file_hashed};
use super::{OutTensor, SideFile, SinkOptions};
use crate::checkpoint_files::is_weight_file;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The folder, inside the output, that holds the parts' manifests until `stitch`.
pub const PARTS_DIR: &str = ".lorastream";
/// Where part 0 stages the files that go beside the shards.
pub const STAGED_FILES: &str = "files";
/// The manifest format (bumped when its meaning changes).
pub const MANIFEST_FORMAT: u32 = 1;

/// The manifest file of part `k` of `n`.
pub fn manifest_name(k: usize, n: usize) -> String {
    format!("part-{k:05}-of-{n:05}.json")
}

/// What one part wrote, and the plan it wrote it for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub lorastream: String,
    pub fingerprint: String,
    pub part: usize,
    pub parts: usize,
    /// Tensor bytes of the whole output (the index's `total_size`).
    pub total_size: u64,
    /// Every shard of the output, in order, with the part that writes it.
    pub layout: Vec<LayoutEntry>,
    /// The shards this part wrote.
    pub shards: Vec<WrittenShard>,
    /// Files staged beside the shards (part 0 only).
    pub files: Vec<WrittenFile>,
    /// `--overwrite`: `stitch` may remove checkpoint files of an older output in the folder.
    pub overwrite: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayoutEntry {
    pub name: String,
    pub part: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WrittenShard {
    pub name: String,
    /// File size (header included).
    pub bytes: u64,
    pub sha256: String,
    /// Its tensors, in order (the index's weight map).
    pub tensors: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WrittenFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The size and hex SHA-256 of the file at `path`, read 8 MiB at a time.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
    Ok((n, hex(&h.finalize())))
}

/// Checkpoint files in folder `dir` (see `is_weight_file`) other than `shards`.
pub(crate) fn foreign_weight_files(dir: &Path, shards: &[&str]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir && !name.starts_with('.') && is_weight_file(&name) && !shards.contains(&&*name) {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Checks, before any work (dry runs too), that a part may write into `dest`: a folder or
/// nothing yet; checkpoint files there other than this plan's shards (another output, or
/// a finished one's index) need `overwrite`. The other parts' shards are expected.
pub fn check_part_folder(dest: &Path, plan: &PartPlan, overwrite: bool) -> Result<()> {
    if !dest.exists() {
        return Ok(());
    }
    if !dest.is_dir() {
        return Err(Error::format(
            dest,
            "exists and is not a folder; a partitioned output (--part) is a folder",
        ));
    }
    let names: Vec<&str> = plan.shards.iter().map(|s| s.name.as_str()).collect();
    let foreign = foreign_weight_files(dest, &names)?;
    if foreign.is_empty() || overwrite {
        return Ok(());
    }
    Err(Error::format(
        dest,
        format!(
            "output folder holds checkpoint files that are not shards of this plan ({}); pass \
             --overwrite to every part to replace them (stitch removes them), or name another \
             folder",
            foreign.join(", ")
        ),
    ))
}

/// A part's writer: the tensors of its shards streamed into the files of `PartShards`.
pub type PartWriter = ShardStream<PartShards>;

/// The shards of one part, what they turned out to be, and its manifest.
pub struct PartShards {
    dir: PathBuf,
    plan: PartPlan,
    /// This part's shards and their tensors.
    mine: Vec<(ShardSpec, Vec<OutTensor>)>,
    /// The temp file of the shard being written.
    temp: Option<TempOutput>,
    written: Vec<Option<WrittenShard>>,
    files: Vec<WrittenFile>,
    direct: bool,
    overwrite: bool,
    total_size: u64,
}

/// Creates folder `p` unless it is there (another part may create it at the same time).
fn ensure_dir(p: &Path) -> Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

impl PartWriter {
    /// Opens part `plan.part` of the folder output `dest` for output tensors `full` (the
    /// whole output's plan: this part is then told only its own tensors). `side_files` are
    /// staged at once (part 0 passes them), so a bad one fails before any work.
    pub fn create(
        dest: &Path,
        full: &[OutTensor],
        opts: &SinkOptions,
        side_files: &[SideFile],
        plan: PartPlan,
    ) -> Result<PartWriter> {
        check_part_folder(dest, &plan, opts.overwrite)?;
        ensure_dir(dest)?;
        let meta = dest.join(PARTS_DIR);
        ensure_dir(&meta)?;
        // An older output's index would describe shards being rewritten now: gone before
        // any of them is, so no loader takes a half-rewritten folder for a model.
        let index = dest.join(INDEX);
        if opts.overwrite && index.is_file() {
            std::fs::remove_file(&index).map_err(|e| Error::io(&index, e))?;
            sync_dir(dest)?;
        }
        // This part's manifest from an earlier run no longer vouches for anything.
        let own = meta.join(manifest_name(plan.part.index, plan.part.count));
        if own.exists() {
            std::fs::remove_file(&own).map_err(|e| Error::io(&own, e))?;
        }
        let mut mine = Vec::new();
        let mut shard_of = Vec::new();
        let mut sub = Vec::new();
        for s in plan.mine() {
            let tensors = full
                .get(s.tensors.clone())
                .ok_or_else(|| Error::Internal(format!("shard {} outside the plan", s.name)))?;
            shard_of.extend(std::iter::repeat_n(mine.len(), tensors.len()));
            sub.extend_from_slice(tensors);
            mine.push((s.clone(), tensors.to_vec()));
        }
        let mut files = Vec::new();
        if !side_files.is_empty() {
            let staged = meta.join(STAGED_FILES);
            ensure_dir(&staged)?;
            for f in side_files {
                if is_weight_file(&f.name) || f.name == INDEX || f.name.contains('/') {
                    return Err(Error::Internal(format!(
                        "'{}' cannot be copied beside the shards",
                        f.name
                    )));
                }
                let shown = dest.join(&f.name);
                let at = staged.join(&f.name);
                let (temp, (bytes, sha256)) =
                    TempOutput::create(&at, |p| write_side_file_hashed(f, p, &shown))?;
                temp.commit()?;
                files.push(WrittenFile {
                    name: f.name.clone(),
                    bytes,
                    sha256,
                });
            }
        }
        let shards = mine.len();
        let files = PartShards {
            dir: dest.to_path_buf(),
            written: vec![None; shards],
            plan,
            mine,
            temp: None,
            files,
            direct: opts.direct_io,
            overwrite: opts.overwrite,
            total_size: full.iter().map(OutTensor::nbytes).sum(),
        };
        Ok(ShardStream::new(files, &sub, shard_of, shards))
    }
}

impl ShardFiles for PartShards {
    fn open(&mut self, at: usize) -> Result<SafetensorsWriter> {
        let (spec, tensors) = &self.mine[at];
        let dest = self.dir.join(&spec.name);
        let direct = self.direct;
        let (temp, writer) = TempOutput::create(&dest, |p| {
            SafetensorsWriter::create_in(p, &dest, tensors, direct, Hashing::AsWritten)
        })?;
        self.temp = Some(temp);
        Ok(writer)
    }

    /// Completes the shard: fsync, final name, and the hash taken while writing.
    fn close(&mut self, at: usize, writer: SafetensorsWriter) -> Result<()> {
        let temp = self.temp.take();
        let (bytes, sha256) = writer
            .close_hashed()?
            .ok_or_else(|| Error::Internal("a part's shard was written unhashed".into()))?;
        temp.ok_or_else(|| Error::Internal("no shard open".into()))?
            .rename_into_place()?;
        let (spec, tensors) = &self.mine[at];
        self.written[at] = Some(WrittenShard {
            name: spec.name.clone(),
            bytes,
            sha256,
            tensors: tensors.iter().map(|t| t.name.clone()).collect(),
        });
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        sync_dir(&self.dir)?;
        let part = self.plan.part;
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            lorastream: env!("CARGO_PKG_VERSION").into(),
            fingerprint: self.plan.fingerprint.clone(),
            part: part.index,
            parts: part.count,
            total_size: self.total_size,
            layout: self
                .plan
                .shards
                .iter()
                .map(|s| LayoutEntry {
                    name: s.name.clone(),
                    part: s.part,
                })
                .collect(),
            shards: self.written.iter().flatten().cloned().collect(),
            files: std::mem::take(&mut self.files),
            overwrite: self.overwrite,
        };
        let at = self
            .dir
            .join(PARTS_DIR)
            .join(manifest_name(part.index, part.count));
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::format(&at, e.to_string()))?;
        let (temp, ()) = TempOutput::create(&at, |p| {
            std::fs::write(p, text + "\n").map_err(|e| Error::io(&at, e))?;
            sync_file(p)
        })?;
        temp.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::super::part_plan::Part;
    use super::*;
    use crate::dtype::Dtype;
    use crate::sink::TensorSink;

    fn plan() -> Vec<OutTensor> {
        (0..6)
            .map(|i| OutTensor {
                name: format!("w{i}"),
                dtype: Dtype::U8,
                shape: vec![100],
            })
            .collect()
    }

    /// Writes part `k` of `n` (shards of 250 bytes: three) of `plan()` into `dir`.
    fn write_part(dir: &Path, k: usize, n: usize) -> PartPlan {
        let full = plan();
        let p = PartPlan::new(&full, 250, Part { index: k, count: n }, "t").unwrap();
        let opts = SinkOptions {
            shard_size: 250,
            direct_io: false,
            overwrite: false,
        };
        let mut w = Box::new(PartWriter::create(dir, &full, &opts, &[], p.clone()).unwrap());
        for (i, t) in full.iter().enumerate() {
            if p.writes(full.len())[i] {
                w.begin(t).unwrap();
                w.write(&[i as u8; 100]).unwrap();
                w.end().unwrap();
            }
        }
        w.finish().unwrap();
        p
    }

    #[test]
    fn a_part_writes_only_its_shards_and_a_manifest_that_describes_them() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("out");
        let p = write_part(&dir, 1, 2);
        let mine: Vec<&str> = p.mine().map(|s| s.name.as_str()).collect();
        assert_eq!(mine, ["model-00002-of-00003.safetensors"]);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".lorastream", "model-00002-of-00003.safetensors"]);
        let text = std::fs::read_to_string(dir.join(PARTS_DIR).join(manifest_name(1, 2))).unwrap();
        let m: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(m.fingerprint, p.fingerprint);
        assert_eq!(m.shards.len(), 1);
        assert_eq!(m.shards[0].tensors, ["w2", "w3"]);
        let (bytes, sha) = sha256_file(&dir.join(mine[0])).unwrap();
        assert_eq!((m.shards[0].bytes, &m.shards[0].sha256), (bytes, &sha));
        assert_eq!(m.total_size, 600);
        // A foreign checkpoint in the folder is refused unless overwriting.
        std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
        let e = check_part_folder(&dir, &p, false).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("--overwrite"),
            "{e}"
        );
        check_part_folder(&dir, &p, true).unwrap();
    }
}
