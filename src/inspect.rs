//! `inspect`: what a checkpoint holds, for people (a table) and scripts (`--json`):
//! every tensor in natural order (`layers.2` before `layers.10`) with its dtype, shape,
//! bytes and file, and for a PEFT adapter folder what the adapter is (type, r, alpha,
//! scale, targets, parameter count).

use crate::error::Result;
use crate::natural::natural_cmp;
use crate::source;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    /// Bytes as stored (for a tensor decoded from a quantized form: the quantized size).
    pub bytes: u64,
    pub file: String,
    /// How the tensor is stored when that is not its dtype, or (GGUF) its ggml type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub format: &'static str,
    pub files: Vec<String>,
    /// In natural order of their names.
    pub tensors: Vec<TensorSummary>,
    pub total_tensors: usize,
    pub total_bytes: u64,
    /// Non-tensor entries that were skipped (e.g. `epoch`).
    pub skipped: Vec<String>,
    /// For a PEFT adapter folder: the config fields that matter for a merge, plus `type`,
    /// `alpha`, `scale`, `targets` and `parameters` (see [`adapter_summary`]).
    pub adapter: Option<serde_json::Value>,
    /// For a GGUF file: its metadata key/values in file order (arrays cut after 16 items,
    /// with a count of the rest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
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

/// What an adapter is, from its `adapter_config.json` and saved tensors: the config
/// fields of [`ADAPTER_FIELDS`] as saved, plus `type` (LoRA, DoRA or the peft_type),
/// `alpha`, `scale` (alpha/r, or alpha/√r with rsLoRA; rank_pattern/alpha_pattern may set
/// others per module), `targets` (target_modules and target_parameters) and `parameters`
/// (elements of every saved tensor).
pub fn adapter_summary(config: &serde_json::Value, parameters: u64) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut out: serde_json::Map<String, Value> = ADAPTER_FIELDS
        .iter()
        .filter_map(|k| config.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("LORA");
    let flag = |k: &str| config.get(k).and_then(Value::as_bool).unwrap_or(false);
    let kind = if !peft_type.eq_ignore_ascii_case("LORA") {
        peft_type.to_string()
    } else if flag("use_dora") {
        "DoRA".into()
    } else {
        "LoRA".into()
    };
    let r = config.get("r").and_then(Value::as_f64);
    let alpha = config.get("lora_alpha").and_then(Value::as_f64);
    let scale = match (r, alpha) {
        (Some(r), Some(a)) if r > 0.0 => Some(if flag("use_rslora") {
            a / r.sqrt()
        } else {
            a / r
        }),
        _ => None,
    };
    let mut targets: Vec<Value> = match config.get("target_modules") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::String(s)) => vec![Value::String(s.clone())],
        _ => Vec::new(),
    };
    if let Some(Value::Array(p)) = config.get("target_parameters") {
        targets.extend(p.iter().cloned());
    }
    out.insert("type".into(), json!(kind));
    out.insert(
        "alpha".into(),
        config.get("lora_alpha").cloned().unwrap_or(Value::Null),
    );
    out.insert("scale".into(), json!(scale));
    out.insert("targets".into(), Value::Array(targets));
    out.insert("parameters".into(), json!(parameters));
    Value::Object(out)
}

/// A GGUF file, listed from its own tensor infos: every tensor with its ggml type, also
/// those of a type lorastream cannot dequantize (their dtype column says so).
fn inspect_gguf(path: &Path, file: &source::MappedFile) -> Result<InspectReport> {
    let g = source::gguf::parse(file.bytes(), path)?;
    let mut tensors: Vec<TensorSummary> = g
        .tensors
        .iter()
        .map(|t| TensorSummary {
            name: t.name.clone(),
            dtype: source::gguf::reads_as(t.ty).map_or("not decoded", |d| d.name()),
            shape: t.shape(),
            bytes: t.nbytes as u64,
            file: file.path().display().to_string(),
            stored: Some(t.ty.name().to_string()),
        })
        .collect();
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    Ok(InspectReport {
        path: path.display().to_string(),
        format: source::SourceFormat::Gguf.name(),
        files: vec![file.path().display().to_string()],
        total_tensors: tensors.len(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
        skipped: Vec::new(),
        adapter: None,
        metadata: Some(g.metadata_json(16)),
    })
}

pub fn inspect(path: &Path) -> Result<InspectReport> {
    if path.is_file() {
        let file = source::MappedFile::open(path)?;
        if source::gguf::looks_gguf(file.bytes()) {
            return inspect_gguf(path, &file);
        }
    }
    let (ckpt, adapter) = if path.is_dir() && path.join("adapter_config.json").is_file() {
        let a = source::open_adapter(path)?;
        let params = a.weights.tensors.iter().map(|t| t.numel() as u64).sum();
        let summary = adapter_summary(&a.config, params);
        (a.weights, Some(summary))
    } else {
        (source::open(path)?, None)
    };
    let mut tensors: Vec<TensorSummary> = ckpt
        .tensors
        .iter()
        .map(|t| {
            let (bytes, stored) = match &t.data {
                source::TensorData::Decoded { decoder, .. } => {
                    (decoder.stored_bytes(), Some(decoder.stored_form()))
                }
                _ => (t.nbytes() as u64, None),
            };
            TensorSummary {
                name: t.name.clone(),
                dtype: t.dtype.name(),
                shape: t.shape.clone(),
                bytes,
                file: t.file.path().display().to_string(),
                stored,
            }
        })
        .collect();
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    Ok(InspectReport {
        path: path.display().to_string(),
        format: ckpt.format.name(),
        files: ckpt
            .files
            .iter()
            .map(|f| f.path().display().to_string())
            .collect(),
        total_tensors: tensors.len(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        tensors,
        skipped: ckpt.skipped.clone(),
        adapter,
        metadata: None,
    })
}

impl InspectReport {
    /// A plain-text table for terminals: name, dtype, shape, bytes, file (the file's name;
    /// the full paths are in the summary's file list and in `--json`).
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
        let short = |f: &str| {
            Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| f.to_string())
        };
        // A "stored" column only when some tensor is stored in another form (GGUF types,
        // quantized blocks).
        let stored = self.tensors.iter().any(|t| t.stored.is_some());
        let col = |v: Option<&str>| {
            if stored {
                format!("{:<11}  ", v.unwrap_or("-"))
            } else {
                String::new()
            }
        };
        let _ = writeln!(
            s,
            "{:<w$}  {:<11}  {}{:<20}  {:>14}  file",
            "name",
            "dtype",
            col(Some("stored")),
            "shape",
            "bytes"
        );
        for t in &self.tensors {
            let shape = format!("{:?}", t.shape);
            let _ = writeln!(
                s,
                "{:<w$}  {:<11}  {}{:<20}  {:>14}  {}",
                t.name,
                t.dtype,
                col(t.stored.as_deref()),
                shape,
                t.bytes,
                short(&t.file)
            );
        }
        let _ = writeln!(
            s,
            "{} tensors, {} bytes ({}), {} ({} file{})",
            self.total_tensors,
            self.total_bytes,
            indicatif::HumanBytes(self.total_bytes),
            self.format,
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" }
        );
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "skipped non-tensor entries: {}", self.skipped.join(", "));
        }
        if let Some(a) = &self.adapter {
            let _ = write!(s, "{}", adapter_text(a));
        }
        if let Some(serde_json::Value::Object(m)) = &self.metadata {
            let _ = writeln!(s, "metadata ({} keys):", m.len());
            for (k, v) in m {
                let _ = writeln!(s, "  {k} = {v}");
            }
        }
        s
    }
}

/// The adapter summary as lines: what it is, then its targets and size, then the raw
/// config fields that matter for a merge.
fn adapter_text(a: &serde_json::Value) -> String {
    use serde_json::Value;
    let get = |k: &str| a.get(k).filter(|v| !v.is_null());
    let show = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "?".into(),
    };
    let patterns = ["rank_pattern", "alpha_pattern"].iter().any(|k| {
        get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
    });
    let targets: Vec<String> = match get("targets") {
        Some(Value::Array(t)) => t.iter().map(|v| show(Some(v))).collect(),
        _ => Vec::new(),
    };
    let rslora = get("use_rslora").and_then(Value::as_bool) == Some(true);
    let mut s = format!(
        "adapter: {}{}, r {}, alpha {}, scale {}{}\n",
        show(get("type")),
        if rslora {
            " (rsLoRA: alpha/sqrt(r))"
        } else {
            ""
        },
        show(get("r")),
        show(get("alpha")),
        show(get("scale")),
        if patterns {
            " (rank_pattern/alpha_pattern set other values for some modules)"
        } else {
            ""
        }
    );
    s.push_str(&format!(
        "targets: {}\n",
        if targets.is_empty() {
            "(none listed)".into()
        } else {
            targets.join(", ")
        }
    ));
    s.push_str(&format!(
        "parameters: {} (elements of every saved tensor)\n",
        show(get("parameters"))
    ));
    let rest: serde_json::Map<String, Value> = ADAPTER_FIELDS
        .iter()
        .filter_map(|k| get(k).map(|v| (k.to_string(), v.clone())))
        .collect();
    s.push_str(&format!("config: {}\n", Value::Object(rest)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_reads_numbers_as_numbers() {
        let mut v = vec![
            "layers.10.w",
            "layers.2.w",
            "layers.1.w",
            "embed",
            "layers.02.x",
            "layers.2.b",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "embed",
                "layers.1.w",
                "layers.2.b",
                "layers.2.w",
                "layers.02.x",
                "layers.10.w"
            ]
        );
    }

    #[test]
    fn adapter_summary_scales_like_peft() {
        let c = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "use_rslora": true, "target_modules": ["q_proj", "v_proj"]});
        let s = adapter_summary(&c, 123);
        assert_eq!(s["type"], "LoRA");
        assert_eq!(s["scale"], 4.0); // 8 / sqrt(4)
        assert_eq!(s["targets"], serde_json::json!(["q_proj", "v_proj"]));
        assert_eq!(s["parameters"], 123);
        let d = adapter_summary(
            &serde_json::json!({"r": 8, "lora_alpha": 16, "use_dora": true,
            "target_modules": ".*proj"}),
            1,
        );
        assert_eq!(
            (d["type"].as_str(), d["scale"].as_f64()),
            (Some("DoRA"), Some(2.0))
        );
        assert!(
            adapter_text(&d).contains("targets: .*proj"),
            "{}",
            adapter_text(&d)
        );
    }
}
