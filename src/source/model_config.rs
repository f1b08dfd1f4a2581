//! The model's own description beside its weights: `config.json` (architecture, tying) and
//! the custom modeling code its `auto_map` names. The plan uses it as evidence for questions
//! the tensors cannot settle (how a square weight is laid out, which weights are tied).
//! Also lists the folder's other files, which jobs copy beside a folder output.

use crate::checkpoint_files::is_weight_file;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `config.json` of the folder a checkpoint was read from.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub json: Value,
    /// The Python files `auto_map` names (`modeling_x.Class` → `modeling_x.py`), each with
    /// its path when the file is in the folder.
    pub code: Vec<(String, Option<PathBuf>)>,
}

impl ModelConfig {
    /// `model_type`, when the config has one.
    pub fn model_type(&self) -> Option<&str> {
        self.json.get("model_type").and_then(Value::as_str)
    }

    /// Whether the model comes with its own modeling code (`auto_map`).
    pub fn has_custom_code(&self) -> bool {
        !self.code.is_empty()
    }

    /// `tie_word_embeddings` as transformers reads it (true when absent).
    pub fn ties_word_embeddings(&self) -> bool {
        self.json
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }
}

/// The folder a checkpoint path is in: `given` itself when it is a folder.
fn folder_of(given: &Path) -> PathBuf {
    if given.is_dir() {
        given.to_path_buf()
    } else {
        match given.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// The files of the HF model folder the checkpoint at `given` was read from (a folder, or
/// a file / index inside one) other than weights: config, generation config, tokenizer,
/// chat template, custom code, README, licence. Empty when the folder has no
/// `config.json` (not a model folder). Hidden files and subfolders are left out (`.git`,
/// `original/` with another copy of the weights); symlinks (HF cache snapshots) count as
/// the files they point to.
pub fn model_folder_files(given: &Path) -> Result<Vec<PathBuf>> {
    let dir = folder_of(given);
    if !dir.join("config.json").is_file() {
        return Ok(Vec::new());
    }
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || is_weight_file(&name) || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// Finds `config.json` for the checkpoint at `given` (a folder, or a file / index inside
/// one). None when there is none; an error when it exists but cannot be read.
pub fn model_config(given: &Path) -> Result<Option<ModelConfig>> {
    let dir = folder_of(given);
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let mut code: Vec<(String, Option<PathBuf>)> = Vec::new();
    if let Some(map) = json.get("auto_map").and_then(Value::as_object) {
        let refs = map.values().flat_map(|v| match v {
            Value::String(s) => vec![s.as_str()],
            // AutoTokenizer maps to [slow, fast] (either may be null).
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        });
        for r in refs {
            // "repo--modeling_x.Class" names code in another repository.
            let module = match r.rsplit_once('.') {
                Some((m, _)) => m,
                None => r,
            };
            let file = format!("{module}.py");
            let local = (!module.contains("--") && !module.contains('/'))
                .then(|| dir.join(&file))
                .filter(|p| p.is_file());
            if !code.iter().any(|(f, _)| *f == file) {
                code.push((file, local));
            }
        }
    }
    Ok(Some(ModelConfig { path, json, code }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_config_and_custom_code() {
        let dir = tempfile::tempdir().unwrap();
        assert!(model_config(dir.path()).unwrap().is_none());
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "internlm2", "auto_map": {"AutoConfig": "configuration_internlm2.C",
               "AutoModel": "modeling_internlm2.M", "AutoModelForCausalLM": "modeling_internlm2.M2",
               "AutoTokenizer": ["tokenization_x.T", null]}, "tie_word_embeddings": false}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("modeling_internlm2.py"), "class M: pass\n").unwrap();
        let file = dir.path().join("model.safetensors");
        let c = model_config(&file).unwrap().unwrap();
        assert_eq!(c.model_type(), Some("internlm2"));
        assert!(!c.ties_word_embeddings());
        let names: Vec<_> = c
            .code
            .iter()
            .map(|(f, p)| (f.as_str(), p.is_some()))
            .collect();
        assert_eq!(
            names,
            [
                ("configuration_internlm2.py", false),
                ("modeling_internlm2.py", true),
                ("tokenization_x.py", false)
            ]
        );
        std::fs::write(dir.path().join("config.json"), "{").unwrap();
        assert!(model_config(dir.path()).is_err());
    }
}
