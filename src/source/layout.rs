//! What a path is: one checkpoint file (sniffed by content), a sharded `*.index.json`, an
//! HF model folder, or a PEFT adapter folder. Turns it into a [`Checkpoint`].

use super::{
    Checkpoint, MappedFile, SourceFormat, TensorEntry, gguf, legacy, safetensors, torch_zip,
};
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The files of a PEFT adapter folder.
#[derive(Debug)]
pub struct AdapterFiles {
    pub dir: PathBuf,
    /// `adapter_config.json`, parsed.
    pub config: serde_json::Value,
    pub config_path: PathBuf,
    /// The adapter's tensors (`adapter_model.safetensors`, else `adapter_model.bin`).
    pub weights: Checkpoint,
}

/// Opens any supported checkpoint path. For a PEFT adapter folder this returns the
/// adapter's tensors; use [`open_adapter`] to get its config too.
pub fn open(path: &Path) -> Result<Checkpoint> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.is_dir() {
        if path.join("adapter_config.json").is_file() {
            return Ok(open_adapter(path)?.weights);
        }
        let file = model_file_in(path)?;
        let mut ckpt = open_file(&file, path)?;
        super::quantized::apply(&mut ckpt)?;
        return Ok(ckpt);
    }
    let mut ckpt = open_file(path, path)?;
    // A quantized model's weights read as the tensors they stand for (or are refused).
    super::quantized::apply(&mut ckpt)?;
    Ok(ckpt)
}

/// Opens a PEFT adapter folder.
pub fn open_adapter(dir: &Path) -> Result<AdapterFiles> {
    let config_path = dir.join("adapter_config.json");
    if !dir.exists() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
        });
    }
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is a file, not a PEFT adapter folder: give the folder holding adapter_config.json",
        ));
    }
    if !config_path.is_file() {
        return Err(match training_checkpoints(dir)?.as_slice() {
            [] => Error::format(
                dir,
                "not a PEFT adapter folder (expected adapter_config.json and adapter_model.safetensors or .bin)",
            ),
            found => Error::format(dir, checkpoints_message(dir, "adapter", found)),
        });
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;
    let weights_path = ["adapter_model.safetensors", "adapter_model.bin"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::format(
                dir,
                "adapter folder has no adapter_model.safetensors or adapter_model.bin",
            )
        })?;
    let weights = open_file(&weights_path, &weights_path)?;
    Ok(AdapterFiles {
        dir: dir.to_path_buf(),
        config,
        config_path,
        weights,
    })
}

/// What `--lora PATH` names: the adapter folder itself, or (a file inside one, such as
/// `adapter_model.safetensors`) the folder holding it, with a note saying so.
pub fn adapter_dir(path: &Path) -> (PathBuf, Option<String>) {
    let parent = path
        .parent()
        .filter(|p| p.join("adapter_config.json").is_file());
    match parent {
        Some(dir) if path.is_file() => {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let note = format!(
                "{} is a file inside the adapter folder {}: reading the folder (its adapter_config.json \
                 says how to merge)",
                path.display(),
                dir.display()
            );
            (dir.to_path_buf(), Some(note))
        }
        _ => (path.to_path_buf(), None),
    }
}

/// The `checkpoint-N` subfolders of a training output folder, in step order (natural
/// order, so checkpoint-900 comes before checkpoint-1000).
fn training_checkpoints(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") && ent.path().is_dir() {
            found.push(name);
        }
    }
    found.sort_by(|a, b| crate::natural::natural_cmp(a, b));
    Ok(found)
}

/// Refuses a training output folder, naming its checkpoints so the user can pick one.
fn checkpoints_message(dir: &Path, what: &str, found: &[String]) -> String {
    let latest = found.last().map(String::as_str).unwrap_or("");
    let shown: Vec<&str> = found
        .iter()
        .rev()
        .take(10)
        .rev()
        .map(String::as_str)
        .collect();
    format!(
        "a training output folder with no {what} at its top level, but {} checkpoint folder(s): {}{}; \
         name the one to use, e.g. the latest: {}",
        found.len(),
        if found.len() > shown.len() {
            "…, "
        } else {
            ""
        },
        shown.join(", "),
        dir.join(latest).display()
    )
}

/// The weights file of an HF model folder, safetensors preferred.
fn model_file_in(dir: &Path) -> Result<PathBuf> {
    const NAMES: [&str; 4] = [
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ];
    if let Some(p) = NAMES.iter().map(|n| dir.join(n)).find(|p| p.is_file()) {
        return Ok(p);
    }
    // Otherwise accept a folder holding exactly one checkpoint-looking file or index.
    let mut found = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for ent in rd {
        let p = ent.map_err(|e| Error::io(dir, e))?.path();
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if n.ends_with(".index.json")
            || [".safetensors", ".pth", ".pt", ".bin"]
                .iter()
                .any(|e| n.ends_with(e))
        {
            found.push(p);
        }
    }
    let indexes: Vec<_> = found
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(".index.json"))
        .collect();
    match (indexes.len(), found.len()) {
        (1, _) => Ok(indexes[0].clone()),
        (0, 1) => Ok(found.remove(0)),
        (_, 0) if !training_checkpoints(dir)?.is_empty() => Err(Error::format(
            dir,
            checkpoints_message(dir, "checkpoint", &training_checkpoints(dir)?),
        )),
        _ => Err(Error::format(
            dir,
            format!(
                "cannot tell which checkpoint to read in this folder (looked for {}; found {} candidate files)",
                NAMES.join(", "),
                found.len()
            ),
        )),
    }
}

/// Opens one file (or an index of shards). `given` is what the user named, for reports.
fn open_file(path: &Path, given: &Path) -> Result<Checkpoint> {
    if path.to_string_lossy().ends_with(".index.json") {
        return open_index(path, given);
    }
    let file = MappedFile::open(path)?;
    let (format, tensors, skipped) = read_one(&file)?;
    Ok(Checkpoint {
        path: given.to_path_buf(),
        format,
        files: vec![file],
        tensors,
        skipped,
    })
}

type ReadOne = (SourceFormat, Vec<TensorEntry>, Vec<String>);

/// What one file is, decided by its content (the extension only breaks the tie between
/// safetensors and an unknown format): a torch zip, a legacy torch file, or safetensors.
fn read_one(file: &std::sync::Arc<MappedFile>) -> Result<ReadOne> {
    let b = file.bytes();
    let path = file.path();
    if b.starts_with(b"PK\x03\x04") || b.starts_with(b"PK\x05\x06") {
        let (t, s) = torch_zip::read(file)?;
        return Ok((SourceFormat::TorchZip, t, s));
    }
    if gguf::looks_gguf(b) {
        return Ok((SourceFormat::Gguf, gguf::read(file)?, Vec::new()));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "gguf" {
        return Err(Error::format(
            path,
            "not a GGUF file (no GGUF magic; truncated or another format?)",
        ));
    }
    if ext != "safetensors" && legacy::looks_legacy(b) {
        let (t, s) = legacy::read(file)?;
        return Ok((SourceFormat::TorchLegacy, t, s));
    }
    if matches!(ext, "pth" | "pt" | "bin" | "ckpt") {
        return Err(Error::format(
            path,
            "not a PyTorch zip checkpoint (no zip signature; truncated or another format?)",
        ));
    }
    Ok((
        SourceFormat::Safetensors,
        safetensors::read(file)?,
        Vec::new(),
    ))
}

fn open_index(index: &Path, given: &Path) -> Result<Checkpoint> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(index, "index has no \"weight_map\" object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shard_names: Vec<&str> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| Error::tensor(index, tensor, "weight_map value is not a file name"))?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(Error::tensor(
                index,
                tensor,
                format!("shard name '{shard}' is not a plain file name"),
            ));
        }
        if !shard_names.contains(&shard) {
            shard_names.push(shard);
        }
    }
    shard_names.sort();
    let mut files = Vec::new();
    let mut tensors: Vec<TensorEntry> = Vec::new();
    let mut skipped = Vec::new();
    let mut format = None;
    for shard in &shard_names {
        let p = dir.join(shard);
        if !p.is_file() {
            return Err(Error::format(
                index,
                format!("names shard '{shard}', which is missing"),
            ));
        }
        let file = MappedFile::open(&p)?;
        let (f, t, s) = read_one(&file)?;
        format.get_or_insert(f);
        tensors.extend(t);
        skipped.extend(s);
        files.push(file);
    }
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::tensor(
                index,
                &t.name,
                "appears in more than one shard",
            ));
        }
    }
    for name in map.keys() {
        if !seen.contains(name.as_str()) {
            let shard = map[name].as_str().unwrap_or("?");
            return Err(Error::tensor(
                index,
                name,
                format!("is listed for shard '{shard}' but not found in it"),
            ));
        }
    }
    Ok(Checkpoint {
        path: given.to_path_buf(),
        format: format.unwrap_or(SourceFormat::Safetensors),
        files,
        tensors,
        skipped,
    })
}
