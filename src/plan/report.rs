//! The plan as a person reads it (`merge --dry-run --json`): one record per output tensor
//! with where its bytes come from and what is applied to them, in the order they would be
//! written.

use super::merge_types::{DeltaLayout, Job, JobSource, Step};
use crate::source::TensorEntry;
use serde::Serialize;

/// One planned output tensor.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedTensor {
    pub name: String,
    pub source_file: String,
    pub source_tensor: String,
    pub source_dtype: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
    /// `copy` (bytes as stored), `cast` (stored bytes converted to `dtype`) or `merge`;
    /// with `--requantize fp8-block` also `merge+requantize` and `requantize` (its scales).
    pub apply: &'static str,
    /// The merge steps, in order (empty for copy and cast).
    pub steps: Vec<PlannedStep>,
}

/// One merge step: its kind and the adapter tensors it reads.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedStep {
    /// `replace`, `lora`, `dora`, `lora_bias`, or another tuner's name (`IA3`, `LoHa`…).
    pub kind: &'static str,
    pub file: String,
    pub tensors: Vec<String>,
    /// s of s·ΔW (lora, dora, lora_bias).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f32>,
    /// `normal` (W = [out, in]) or `transposed` (Conv1D, Embedding) for lora and dora.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<&'static str>,
}

fn file_of(t: &TensorEntry) -> String {
    t.file.path().display().to_string()
}

fn step(s: &Step) -> PlannedStep {
    match s {
        Step::Replace(t) => PlannedStep {
            kind: "replace",
            file: file_of(t),
            tensors: vec![t.name.clone()],
            scale: None,
            layout: None,
        },
        Step::AddBias { bias, scale } => PlannedStep {
            kind: "lora_bias",
            file: file_of(bias),
            tensors: vec![bias.name.clone()],
            scale: Some(*scale),
            layout: None,
        },
        Step::Tuned(c) => {
            let inputs = c.inputs();
            PlannedStep {
                kind: c.tuner(),
                file: inputs.first().map(|t| file_of(t)).unwrap_or_default(),
                tensors: inputs.iter().map(|t| t.name.clone()).collect(),
                scale: None,
                layout: None,
            }
        }
        Step::Lora(l) => {
            let mut tensors = vec![l.a.name.clone(), l.b.name.clone()];
            tensors.extend(l.magnitude.as_ref().map(|m| m.name.clone()));
            PlannedStep {
                kind: if l.magnitude.is_some() {
                    "dora"
                } else {
                    "lora"
                },
                file: file_of(&l.a),
                tensors,
                scale: Some(l.scale),
                layout: Some(match l.layout {
                    DeltaLayout::Normal => "normal",
                    DeltaLayout::Transposed => "transposed",
                }),
            }
        }
    }
}

/// The records of every job, in plan order.
pub fn describe(jobs: &[Job]) -> Vec<PlannedTensor> {
    jobs.iter()
        .map(|j| {
            let src = j.source_tensor();
            let (apply, steps) = match &j.source {
                JobSource::Copy(t) if t.dtype == j.out.dtype => ("copy", Vec::new()),
                JobSource::Copy(_) => ("cast", Vec::new()),
                JobSource::Merge { steps, .. } => ("merge", steps.iter().map(step).collect()),
            };
            PlannedTensor {
                name: j.out.name.clone(),
                source_file: file_of(src),
                source_tensor: src.name.clone(),
                source_dtype: src.dtype.to_string(),
                dtype: j.out.dtype.to_string(),
                shape: j.out.shape.clone(),
                bytes: j.out.nbytes(),
                apply,
                steps,
            }
        })
        .collect()
}
