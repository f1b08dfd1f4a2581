//! `ShardedSafetensorsWriter`: an HF-style folder of `model-0000i-of-0000n.safetensors`
//! shards plus `model.safetensors.index.json`, as `save_pretrained` writes it, and the
//! files the job asks to put beside them (config, tokenizer). Shards are filled greedily
//! in plan order up to the shard size; a tensor larger than the limit gets a shard of its
//! own. Every file is fsynced before it gets its final name, and the folder after.
//!
//! Where the output goes:
//! - a new folder is written under a temp name beside it and renamed whole at the end;
//! - an existing folder (a mount point, a volume, an HF repo clone with a README) is kept,
//!   with its mode, owner and mount: files are written inside it under temp names and
//!   renamed at the end, the index last. If it already holds checkpoint files it is
//!   refused before any work unless `overwrite`; then the old checkpoint files the new
//!   output does not replace are removed only after the new ones are in place, so a run
//!   that fails leaves the old checkpoint whole.

use super::atomic::{TempOutput, creating, remove_stale, sync_dir, sync_file};
use super::safetensors::{Hashing, SafetensorsWriter};
use super::shard_stream::{ShardFiles, ShardStream};
use super::{OutTensor, SideFile};
use crate::checkpoint_files::is_weight_file;
use crate::error::{Error, Result};
use sha2::Digest;
use std::path::{Path, PathBuf};

pub(crate) const INDEX: &str = "model.safetensors.index.json";

/// Where the files go.
enum Place {
    /// A new folder, under a temp name until the end.
    New(TempOutput),
    /// An existing folder: files under temp names inside it (`pending`, in the order they
    /// are renamed at the end), and the old checkpoint files found there (`overwrite`).
    Existing {
        dir: PathBuf,
        pending: Vec<TempOutput>,
        old_checkpoint: Vec<String>,
    },
}

/// The folder writer: the plan's tensors streamed into the shards of `FolderShards`.
pub type ShardedSafetensorsWriter = ShardStream<FolderShards>;

/// The shards of a single run's folder, the files beside them and the index.
pub struct FolderShards {
    place: Place,
    dest: PathBuf,
    shards: Vec<(String, Vec<OutTensor>)>,
    direct: bool,
    /// Tensor bytes of the whole output (the index's `total_size`).
    total: u64,
}

/// The checkpoint files (by name, see `is_weight_file`) directly in folder `dir`.
fn checkpoint_files_in(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir && !name.starts_with('.') && is_weight_file(&name) {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Refuses an existing output folder that holds checkpoint files unless `overwrite`, and
/// a path that exists but is not a folder. A missing folder, or one with other files only
/// (README.md, .gitattributes, a config), is fine.
pub fn check_output_folder(dest: &Path, overwrite: bool) -> Result<()> {
    if !dest.exists() {
        return Ok(());
    }
    if !dest.is_dir() {
        return Err(Error::format(
            dest,
            "exists and is not a folder; a sharded output (a path ending in '/') is a folder",
        ));
    }
    let found = checkpoint_files_in(dest)?;
    if found.is_empty() || overwrite {
        return Ok(());
    }
    let mut list = found.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if found.len() > 5 {
        list += &format!(", … ({} in all)", found.len());
    }
    Err(Error::format(
        dest,
        format!(
            "output folder already holds checkpoint files ({list}); pass --overwrite to replace \
             them (they are removed only once the new output is in place), or name another folder"
        ),
    ))
}

/// The text of side file `f` when the job replaces JSON keys in it (None: a plain copy).
fn edited_side_file(f: &SideFile, shown: &Path) -> Result<Option<Vec<u8>>> {
    if f.set.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f.source).map_err(|e| Error::io(&f.source, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&f.source, format!("not valid JSON: {e}")))?;
    let obj = json
        .as_object_mut()
        .ok_or_else(|| Error::format(&f.source, "not a JSON object"))?;
    for (k, v) in &f.set {
        // A null removes the key (quantization_config of a dequantized base).
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    // Two-space indent and a final newline, as transformers writes config.json.
    let out =
        serde_json::to_string_pretty(&json).map_err(|e| Error::format(shown, e.to_string()))?;
    Ok(Some((out + "\n").into_bytes()))
}

/// Writes side file `f` at `path` (JSON keys replaced when asked) and fsyncs it.
pub(super) fn write_side_file(f: &SideFile, path: &Path, shown: &Path) -> Result<()> {
    match edited_side_file(f, shown)? {
        None => {
            std::fs::copy(&f.source, path).map_err(|e| Error::io(&f.source, e))?;
        }
        Some(text) => std::fs::write(path, text).map_err(|e| Error::io(shown, e))?,
    }
    sync_file(path)
}

/// `write_side_file`, giving the size and hex SHA-256 of the bytes written: a copy goes
/// through memory (read once, hashed, written with the source's permissions, as
/// `std::fs::copy` gives them), so nothing is read back.
pub(super) fn write_side_file_hashed(
    f: &SideFile,
    path: &Path,
    shown: &Path,
) -> Result<(u64, String)> {
    let bytes = match edited_side_file(f, shown)? {
        Some(text) => text,
        None => std::fs::read(&f.source).map_err(|e| Error::io(&f.source, e))?,
    };
    std::fs::write(path, &bytes).map_err(|e| Error::io(shown, e))?;
    if f.set.is_empty() {
        let mode = std::fs::metadata(&f.source)
            .map_err(|e| Error::io(&f.source, e))?
            .permissions();
        std::fs::set_permissions(path, mode).map_err(|e| Error::io(shown, e))?;
    }
    sync_file(path)?;
    let sha = sha2::Sha256::digest(&bytes);
    Ok((bytes.len() as u64, super::part_plan::hex(&sha)))
}

/// The text of `model.safetensors.index.json` for tensors `entries` (tensor, shard) in
/// plan order and `total` tensor bytes, as `save_pretrained` lays it out. One function for
/// the single run and `stitch`, so a stitched folder is byte for byte a single run's.
pub(crate) fn index_text<'a>(
    entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    total: u64,
    shown: &Path,
) -> Result<String> {
    let mut weight_map = serde_json::Map::new();
    for (tensor, shard) in entries {
        weight_map.insert(tensor.to_string(), shard.into());
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let text =
        serde_json::to_string_pretty(&index).map_err(|e| Error::format(shown, e.to_string()))?;
    Ok(text + "\n")
}

/// Splits `plan` into shards of at most `limit` bytes each (a tensor over the limit alone).
pub fn split(plan: &[OutTensor], limit: u64) -> Vec<Vec<OutTensor>> {
    let mut shards: Vec<Vec<OutTensor>> = Vec::new();
    let mut size = 0u64;
    for t in plan {
        let n = t.nbytes();
        if shards.is_empty() || (size + n > limit && !shards.last().is_none_or(|s| s.is_empty())) {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(t.clone());
        }
        size += n;
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

impl ShardedSafetensorsWriter {
    /// Opens the folder output `dest` (existing or not, see the module comment) and writes
    /// `side_files` into it at once (under temp names), so a bad one fails before any work.
    pub fn create(
        dest: &Path,
        plan: &[OutTensor],
        opts: &super::SinkOptions,
        side_files: &[SideFile],
    ) -> Result<ShardedSafetensorsWriter> {
        if opts.shard_size == 0 {
            return Err(Error::Usage("--shard-size must be at least 1 byte".into()));
        }
        check_output_folder(dest, opts.overwrite)?;
        let place = if dest.is_dir() {
            remove_stale(dest, None);
            Place::Existing {
                dir: dest.to_path_buf(),
                pending: Vec::new(),
                old_checkpoint: checkpoint_files_in(dest)?,
            }
        } else {
            let (temp, ()) = TempOutput::create(dest, |p| {
                std::fs::create_dir(p).map_err(|e| Error::io(dest, e))
            })?;
            Place::New(temp)
        };
        let parts = split(plan, opts.shard_size);
        let n = parts.len();
        let mut shard_of = Vec::with_capacity(plan.len());
        let shards = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                shard_of.extend(std::iter::repeat_n(i, p.len()));
                (super::part_plan::shard_name(i, n), p)
            })
            .collect();
        let mut w = FolderShards {
            place,
            dest: dest.to_path_buf(),
            shards,
            direct: opts.direct_io,
            total: plan.iter().map(OutTensor::nbytes).sum(),
        };
        for f in side_files {
            if is_weight_file(&f.name) || f.name == INDEX || f.name.contains('/') {
                return Err(Error::Plan(format!(
                    "internal: '{}' cannot be copied beside the shards",
                    f.name
                )));
            }
            let shown = dest.join(&f.name);
            w.create_file(&f.name, |p| write_side_file(f, p, &shown))?;
        }
        Ok(ShardStream::new(w, plan, shard_of, n))
    }
}

impl FolderShards {
    /// Creates the file that will be called `name` in the output folder with `make`
    /// (given where to create it), where the signal handler cannot interleave.
    fn create_file<T>(&mut self, name: &str, make: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
        match &mut self.place {
            Place::New(temp) => {
                let path = temp.path().join(name);
                creating(|| make(&path))
            }
            Place::Existing { dir, pending, .. } => {
                let (t, v) = TempOutput::create(&dir.join(name), make)?;
                pending.push(t);
                Ok(v)
            }
        }
    }

    /// Gives every file its final name (the index last), fsyncs the folder, then removes
    /// the old checkpoint files the new output did not replace.
    fn put_in_place(self) -> Result<()> {
        match self.place {
            Place::New(temp) => {
                sync_dir(temp.path())?;
                temp.commit()
            }
            Place::Existing {
                dir,
                pending,
                old_checkpoint,
            } => {
                for t in pending {
                    t.rename_into_place()?;
                }
                sync_dir(&dir)?;
                let new: Vec<&str> = self
                    .shards
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .chain([INDEX])
                    .collect();
                let old: Vec<&String> = old_checkpoint
                    .iter()
                    .filter(|n| !new.contains(&n.as_str()))
                    .collect();
                for name in &old {
                    let p = dir.join(name);
                    std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
                }
                if !old.is_empty() {
                    sync_dir(&dir)?;
                }
                Ok(())
            }
        }
    }
}

impl ShardFiles for FolderShards {
    fn open(&mut self, at: usize) -> Result<SafetensorsWriter> {
        let (name, plan) = self.shards[at].clone();
        let shown = self.dest.join(&name);
        let direct = self.direct;
        self.create_file(&name, |p| {
            SafetensorsWriter::create_in(p, &shown, &plan, direct, Hashing::Off)
        })
    }
    fn close(&mut self, _: usize, writer: SafetensorsWriter) -> Result<()> {
        writer.close()
    }
    fn finish(mut self) -> Result<()> {
        let entries = self
            .shards
            .iter()
            .flat_map(|(name, plan)| plan.iter().map(move |t| (t.name.as_str(), name.as_str())));
        let shown = self.dest.join(INDEX);
        let text = index_text(entries, self.total, &shown)?;
        self.create_file(INDEX, |p| {
            std::fs::write(p, text).map_err(|e| Error::io(&shown, e))?;
            sync_file(p)
        })?;
        self.put_in_place()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![n],
        }
    }

    #[test]
    fn greedy_split_gives_big_tensors_their_own_shard() {
        let plan = [t("a", 4), t("b", 4), t("c", 20), t("d", 1)];
        let s = split(&plan, 10);
        let names: Vec<Vec<&str>> = s
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
    }
}
