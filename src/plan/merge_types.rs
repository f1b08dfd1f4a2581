//! What the merge plan hands to compute: for each output tensor, where its data comes from
//! and which steps (replacements, LoRA deltas, bias additions) apply to it, in order.

use crate::adapter::tuners::TensorChange;
use crate::sink::OutTensor;
use crate::source::TensorEntry;
use std::sync::Arc;

/// How a LoRA delta lines up with the stored weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaLayout {
    /// W stored [out, in…]: ΔW = s·(B @ A) (Linear, Conv). DoRA norms run over rows.
    Normal,
    /// W stored [in, out]: ΔW = s·(B @ A)ᵀ (transformers Conv1D, Embedding). DoRA norms run
    /// over columns.
    Transposed,
}

/// One LoRA (or DoRA) delta on a weight.
#[derive(Clone, Debug)]
pub struct LoraStep {
    /// [r, …]; for Normal its trailing dims flatten to the weight's columns, for Transposed
    /// its second dim is the weight's rows.
    pub a: TensorEntry,
    /// [out, r, 1…] (Normal) or [cols, r] (Transposed).
    pub b: TensorEntry,
    pub r: usize,
    pub scale: f32,
    pub layout: DeltaLayout,
    /// PEFT's plain Embedding merge rounds ΔW to the weight's dtype before adding it.
    pub round_delta_first: bool,
    /// DoRA magnitude (one value per output row for Normal, per column for Transposed).
    pub magnitude: Option<TensorEntry>,
}

/// A change applied to a base tensor, in order.
#[derive(Clone, Debug)]
pub enum Step {
    /// The adapter carries a full copy that replaces the current value (cast to the base dtype).
    Replace(TensorEntry),
    Lora(Box<LoraStep>),
    /// `bias += scale · lora_B.bias` (lora_bias=True).
    AddBias {
        bias: TensorEntry,
        scale: f32,
    },
    /// A change made by a non-LoRA tuner (`adapter/tuners/`), checked by the plan; the
    /// tuner's own file says how it turns a band of the weight into the merged band.
    Tuned(Arc<dyn TensorChange>),
}

impl Step {
    /// Every stored tensor the step reads (the base excluded).
    pub fn inputs(&self) -> Vec<&TensorEntry> {
        match self {
            Step::Replace(t) | Step::AddBias { bias: t, .. } => vec![t],
            Step::Lora(l) => [Some(&l.a), Some(&l.b), l.magnitude.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            Step::Tuned(c) => c.inputs(),
        }
    }
}

/// Where an output tensor's bytes come from.
#[derive(Clone, Debug)]
pub enum JobSource {
    /// A stored tensor, copied (cast when the output dtype differs).
    Copy(TensorEntry),
    /// A base tensor with steps applied in f32, rounded into the base dtype after each step
    /// (as PEFT's in-place merges do), then cast to the output dtype.
    Merge { base: TensorEntry, steps: Vec<Step> },
}

/// One output tensor and how to produce it.
#[derive(Clone, Debug)]
pub struct Job {
    pub out: OutTensor,
    pub source: JobSource,
    /// Index of the component it belongs to.
    pub component: usize,
    /// An earlier job (index into the job list) that produces the very same bytes from the
    /// same stored tensor: tied weights, one storage in the input. A sink that can share
    /// storage (PyTorch zip) stores this one as a view of it; others write the bytes again.
    pub tied_to: Option<usize>,
}

impl Job {
    /// The stored tensor the job reads first.
    pub fn source_tensor(&self) -> &TensorEntry {
        match &self.source {
            JobSource::Copy(t) => t,
            JobSource::Merge { base, .. } => base,
        }
    }

    /// Whether a LoRA delta or bias addition applies (counted as "merged").
    pub fn is_merged(&self) -> bool {
        matches!(&self.source, JobSource::Merge { steps, .. }
            if steps.iter().any(|s| !matches!(s, Step::Replace(_))))
    }
}
