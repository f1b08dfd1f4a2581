//! What the merge plan takes: components (a NAME with a base and/or adapters) and the
//! settings that shape the output. Below both the plan and its checks (`coverage.rs`).

use super::layout::LayoutFlags;
use super::{DtypeChoice, RenameRule};
use crate::adapter::Adapter;
use crate::source::{Checkpoint, ModelConfig};

/// One component: its name (the output key prefix), base weights and adapters (in order).
pub struct Component {
    pub name: Option<String>,
    pub base: Option<Checkpoint>,
    pub adapters: Vec<Adapter>,
    /// The base's `config.json` (architecture, tying), when it has one.
    pub model_config: Option<ModelConfig>,
}

impl Component {
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| "(unnamed)".into())
    }
    /// `k` under the component's prefix.
    pub(crate) fn key(&self, k: &str) -> String {
        match &self.name {
            Some(n) => format!("{n}.{k}"),
            None => k.to_string(),
        }
    }
}

/// How the output is laid out.
#[derive(Clone, Debug, Default)]
pub struct MergeSettings {
    /// Keep the adapters unmerged, in `PeftModel.state_dict()` form.
    pub keep_lora: bool,
    /// A GGUF base: the adapters' HF module names are renamed to its tensors (and q/k rows
    /// permuted) before planning (see `gguf_names`).
    pub gguf: Option<super::gguf_names::GgufNaming>,
    pub dtype: DtypeChoice,
    pub renames: Vec<RenameRule>,
    /// `--exclude`: final keys to leave out.
    pub exclude: Vec<regex::Regex>,
    /// `--fan-in-fan-out` / `--no-fan-in-fan-out`: layouts of square 2-D weights.
    pub layout: LayoutFlags,
    /// `--combine`: each component's adapters become one weighted combination (PEFT's
    /// `add_weighted_adapter`), merged alone.
    pub combine: Option<crate::adapter::combine::Combine>,
    /// `--requantize fp8-block`: FP8 weights written FP8 block-scaled again (see
    /// `plan/requantize.rs`).
    pub requantize: Option<super::requantize::Requantize>,
}
