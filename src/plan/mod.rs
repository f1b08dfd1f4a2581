//! Plan: decides what the output holds before anything is written — final names (after
//! component prefixes and `--rename` rules), dtypes, shapes, and for each output tensor
//! where its data comes from. Collisions and missing keys are found here, so a bad
//! request fails before the first byte is written.

pub mod checked;
pub mod component;
pub mod coverage;
mod dare_order;
pub mod dora_sequence;
pub mod gguf_names;
pub mod keep_tuned;
pub mod layout;
pub mod merge;
pub mod merge_types;
pub mod rename;
pub mod report;
pub mod requantize;
mod transformers_models;

pub use rename::RenameRule;

use crate::dtype::Dtype;

/// What `--dtype` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DtypeChoice {
    /// Keep each tensor's stored dtype.
    #[default]
    Keep,
    /// Cast floating tensors (F64/F32/F16/BF16) to this dtype; others pass through.
    To(Dtype),
}

impl DtypeChoice {
    /// The output dtype of a tensor stored as `stored`.
    pub fn apply(self, stored: Dtype) -> Dtype {
        match self {
            DtypeChoice::To(d) if stored.is_float() => d,
            _ => stored,
        }
    }

    /// The output dtype of entry `t`: as [`DtypeChoice::apply`], except that under `keep`
    /// a decoded quantized weight whose decoder names a default (bitsandbytes: bf16, the
    /// quantized bases' default output dtype, whatever the quant state's dtype) takes it.
    pub fn apply_to(self, t: &crate::source::TensorEntry) -> Dtype {
        match (self, &t.data) {
            (DtypeChoice::Keep, crate::source::TensorData::Decoded { decoder, .. }) => {
                decoder.default_output_dtype().unwrap_or(t.dtype)
            }
            _ => self.apply(t.dtype),
        }
    }

    /// Parses `keep|bf16|f16|f32` (also `fp16`, `bfloat16`, `float32`, …).
    pub fn parse(s: &str) -> Option<DtypeChoice> {
        Some(match s.to_ascii_lowercase().as_str() {
            "keep" => DtypeChoice::Keep,
            "bf16" | "bfloat16" => DtypeChoice::To(Dtype::BF16),
            "f16" | "fp16" | "float16" | "half" => DtypeChoice::To(Dtype::F16),
            "f32" | "fp32" | "float32" | "float" => DtypeChoice::To(Dtype::F32),
            _ => return None,
        })
    }
}
