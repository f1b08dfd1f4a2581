//! `inspect`: what a checkpoint holds, for people (a table) and scripts (`--json`).

use crate::error::Result;
use crate::source;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: u64,
    pub file: String,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub format: &'static str,
    pub files: Vec<String>,
    pub tensors: Vec<TensorSummary>,
    pub total_tensors: usize,
    pub total_bytes: u64,
    /// Non-tensor entries that were skipped (e.g. `epoch`).
    pub skipped: Vec<String>,
    /// For a PEFT adapter folder: the config fields that matter for a merge.
    pub adapter: Option<serde_json::Value>,
}

/// The config fields shown for an adapter.
const ADAPTER_FIELDS: [&str; 14] = [
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "target_modules",
    "modules_to_save",
    "bias",
    "rank_pattern",
    "alpha_pattern",
    "init_lora_weights",
    "base_model_name_or_path",
];

pub fn inspect(path: &Path) -> Result<InspectReport> {
    let (ckpt, adapter) = if path.is_dir() && path.join("adapter_config.json").is_file() {
        let a = source::open_adapter(path)?;
        let summary: serde_json::Map<String, serde_json::Value> = ADAPTER_FIELDS
            .iter()
            .filter_map(|k| a.config.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        (a.weights, Some(serde_json::Value::Object(summary)))
    } else {
        (source::open(path)?, None)
    };
    let tensors: Vec<TensorSummary> = ckpt
        .tensors
        .iter()
        .map(|t| TensorSummary {
            name: t.name.clone(),
            dtype: t.dtype.name(),
            shape: t.shape.clone(),
            bytes: t.nbytes() as u64,
            file: t.file.path().display().to_string(),
        })
        .collect();
    Ok(InspectReport {
        path: path.display().to_string(),
        format: ckpt.format.name(),
        files: ckpt
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect(),
        total_tensors: tensors.len(),
        total_bytes: ckpt.total_bytes(),
        tensors,
        skipped: ckpt.skipped.clone(),
        adapter,
    })
}

impl InspectReport {
    /// A plain-text table for terminals.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let w = self
            .tensors
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            s,
            "{:<w$}  {:<11}  {:<20}  {:>14}",
            "name", "dtype", "shape", "bytes"
        );
        for t in &self.tensors {
            let shape = format!("{:?}", t.shape);
            let _ = writeln!(
                s,
                "{:<w$}  {:<11}  {:<20}  {:>14}",
                t.name, t.dtype, shape, t.bytes
            );
        }
        let _ = writeln!(
            s,
            "{} tensors, {} bytes, {} ({} file{})",
            self.total_tensors,
            self.total_bytes,
            self.format,
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" }
        );
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "skipped non-tensor entries: {}", self.skipped.join(", "));
        }
        if let Some(a) = &self.adapter {
            let _ = writeln!(s, "adapter: {a}");
        }
        s
    }
}
