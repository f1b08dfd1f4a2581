//! LN Tuning (`peft_type: "LN_TUNING"`): a full trained copy of each targeted layer (meant
//! for norm layers, but any targeted module), PEFT 0.21 `tuners/ln_tuning/layer.py`.
//!
//! Saved: `<module>.ln_tuning_layers.<param>` for each parameter of the copied layer
//! (`weight`, and `bias` when the layer has one). PEFT's merge swaps the copy in for the base
//! layer, so each saved parameter replaces the base's `<module>.<param>`; the copy holds the
//! base's dtype (LN Tuning skips PEFT's adapter autocast), so loading the saved f32 values
//! rounds them once into it, which is what the engine's rounding after the step does.
//!
//! Refused by name: a saved parameter other than `weight`/`bias` (e.g. a norm's running
//! statistics, which the plan cannot check against the base here), a parameter the base
//! layer lacks, and a copy whose shape differs from the base tensor.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float,
};
use crate::dtype::decode_f32;
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "LN_TUNING",
    open,
};

#[derive(Debug)]
struct LnTuning;

fn open(_v: &Value, _path: &Path) -> Result<Box<dyn Tuner>> {
    // The config holds only which modules are copied; the saved tensors say the rest.
    Ok(Box::new(LnTuning))
}

impl Tuner for LnTuning {
    fn name(&self) -> &'static str {
        "LN Tuning"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        match rel.rsplit_once(".ln_tuning_layers.") {
            Some((module, part)) => SavedKey::Part { module, part },
            None => SavedKey::Full,
        }
    }

    /// A full copy replaces the tensor as stored, whatever its layout: the plan's layout
    /// question never arises (shapes are compared as stored in `changes`).
    fn fits(&self, _m: &SavedModule, _out_in: [usize; 2]) -> bool {
        false
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let mut out = Vec::new();
        for (part, copy) in &m.parts {
            check_float(weights, &[copy])?;
            let target = match part.as_str() {
                "weight" => Some(&base.weight.entry),
                "bias" => base.bias.as_ref(),
                _ => {
                    return Err(bad_part(
                        weights,
                        copy,
                        format!(
                            "is a copy of '{}.{part}'; lorastream merges LN Tuning copies of a layer's weight \
                             and bias only",
                            m.name
                        ),
                    ));
                }
            };
            let Some(target) = target else {
                return Err(bad_part(
                    weights,
                    copy,
                    format!(
                        "is a copy of '{}.{part}', which the base does not hold",
                        m.name
                    ),
                ));
            };
            if copy.shape != target.shape {
                return Err(bad_part(
                    weights,
                    copy,
                    format!(
                        "has shape {:?} but base '{}' has shape {:?}",
                        copy.shape, target.name, target.shape
                    ),
                ));
            }
            out.push(Change {
                target: target.name.clone(),
                change: Arc::new(Replace { copy: copy.clone() }),
            });
        }
        Ok(out)
    }
}

/// The whole tensor replaced by `copy` (same shape), decoded band by band.
#[derive(Debug)]
struct Replace {
    copy: TensorEntry,
}

struct PreparedReplace<'a> {
    copy: &'a TensorEntry,
    cols: usize,
}

impl TensorChange for Replace {
    fn tuner(&self) -> &'static str {
        "LN Tuning"
    }
    fn effect(&self) -> Effect {
        Effect::Rows
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.copy]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        if self.copy.numel() != base.rows * base.cols {
            return Err(Error::Internal(format!(
                "LN Tuning copy {:?} for '{}' ({} x {})",
                self.copy.shape, base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(PreparedReplace {
            copy: &self.copy,
            cols: base.cols,
        }))
    }
}

impl BandChange for PreparedReplace<'_> {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let mut bytes = Vec::with_capacity(band.len() * self.copy.dtype.size());
        self.copy.gather(row0 * self.cols, band.len(), &mut bytes);
        decode_f32(self.copy.dtype, &bytes, band);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;

    fn entry(name: &str, dtype: Dtype, shape: &[usize], v: &[f32]) -> TensorEntry {
        let mut bytes = Vec::new();
        for &x in v {
            match dtype {
                Dtype::F16 => bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                _ => bytes.extend_from_slice(&x.to_le_bytes()),
            }
        }
        TensorEntry::in_memory(Path::new("t"), name, dtype, shape.to_vec(), &bytes).unwrap()
    }

    #[test]
    fn copies_replace_weight_and_bias_band_by_band() {
        let w = entry("lin0.weight", Dtype::F16, &[3, 2], &[0.; 6]);
        let b = entry("lin0.bias", Dtype::F16, &[3], &[0.; 3]);
        let base = ModuleBase {
            weight: BaseTensor {
                entry: w.clone(),
                transposed: false,
            },
            bias: Some(b.clone()),
        };
        let x = 1.0 + 1.0 / 4096.0; // rounds to 1.0 in f16
        let new_w = [1., 2., 3., 4., 5., x];
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    "weight".to_string(),
                    entry("lin0.ln_tuning_layers.weight", Dtype::F32, &[3, 2], &new_w),
                ),
                (
                    "bias".to_string(),
                    entry(
                        "lin0.ln_tuning_layers.bias",
                        Dtype::F32,
                        &[3],
                        &[7., 8., 9.],
                    ),
                ),
            ]
            .into(),
        };
        let ch = LnTuning
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        let by: BTreeMap<_, _> = ch.iter().map(|c| (c.target.as_str(), c)).collect();
        let got = run_in_memory(&*by["lin0.weight"].change, &w, 2).unwrap();
        assert_eq!(got, [1., 2., 3., 4., 5., 1.]);
        let got = run_in_memory(&*by["lin0.bias"].change, &b, 1).unwrap();
        assert_eq!(got, [7., 8., 9.]);
        // A bias copy for a base without bias, and a copy of another shape, are refused.
        let no_bias = ModuleBase {
            bias: None,
            ..base.clone()
        };
        let e = LnTuning
            .changes(Path::new("a"), &m, &BTreeMap::new(), &no_bias)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.ln_tuning_layers.bias") && e.contains("does not hold"),
            "{e}"
        );
        let mut m2 = m.clone();
        m2.parts.insert(
            "weight".into(),
            entry("lin0.ln_tuning_layers.weight", Dtype::F32, &[2, 3], &new_w),
        );
        let e = LnTuning
            .changes(Path::new("a"), &m2, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 3]") && e.contains("lin0.weight"), "{e}");
        assert_eq!(
            LnTuning.classify("a.norm.ln_tuning_layers.weight"),
            SavedKey::Part {
                module: "a.norm",
                part: "weight"
            }
        );
    }
}
