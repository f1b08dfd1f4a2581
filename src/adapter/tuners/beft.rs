//! BEFT (`peft_type: "BEFT"`): bias-only fine-tuning, one learned vector added to a Linear
//! layer's bias, PEFT 0.21 `tuners/beft/layer.py`.
//!
//! Saved: `<module>.beft_bias`, `[1, out]`, f32. Merge, as PEFT does it:
//! `bias.add_(beft_bias.squeeze())` in place (one rounding into the bias dtype of the f32
//! sum, which is the engine's rounding after the step); the weight is untouched. PEFT
//! refuses the merge when the base layer has no bias, and so does lorastream.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, split_part,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "BEFT",
    open,
};

#[derive(Debug)]
struct Beft;

fn open(_v: &Value, _path: &Path) -> Result<Box<dyn Tuner>> {
    // init_weights only decides the (zero or random) start; the saved vector is what merges.
    Ok(Box::new(Beft))
}

impl Tuner for Beft {
    fn name(&self) -> &'static str {
        "BEFT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &["beft_bias"])
    }

    /// Only the bias changes, which has no layout: the weight's orientation is never needed.
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
        let v = m.part(weights, "beft_bias")?;
        check_float(weights, &[v])?;
        if !matches!(v.shape.as_slice(), [1, _] | [_]) {
            return Err(bad_part(
                weights,
                v,
                format!("has shape {:?}, not PEFT's [1, out]", v.shape),
            ));
        }
        let Some(b) = &base.bias else {
            return Err(bad_part(
                weights,
                v,
                format!(
                    "base module '{}' has no bias ('{}.bias') to add it to; PEFT cannot merge this either",
                    m.name, m.name
                ),
            ));
        };
        if b.numel() != v.numel() || b.shape.len() != 1 {
            return Err(bad_part(
                weights,
                v,
                format!(
                    "has {} values but base bias '{}' has shape {:?}",
                    v.numel(),
                    b.name,
                    b.shape
                ),
            ));
        }
        Ok(vec![Change {
            target: b.name.clone(),
            change: Arc::new(AddBias { v: v.clone() }),
        }])
    }
}

/// `bias + v`, element by element.
#[derive(Debug)]
struct AddBias {
    v: TensorEntry,
}

struct PreparedAdd {
    v: Vec<f32>,
}

impl TensorChange for AddBias {
    fn tuner(&self) -> &'static str {
        "BEFT"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.v]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let v = decode(&self.v);
        if v.len() != base.rows * base.cols {
            return Err(Error::Internal(format!(
                "BEFT bias of {} values for '{}' ({} x {})",
                v.len(),
                base.base.name,
                base.rows,
                base.cols
            )));
        }
        Ok(Box::new(PreparedAdd { v }))
    }
}

impl BandChange for PreparedAdd {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        // A 1-D bias: each stored row is one value.
        for (x, d) in band.iter_mut().zip(&self.v[row0..]) {
            *x += d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;

    fn entry(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        TensorEntry::in_memory(
            Path::new("t"),
            name,
            Dtype::F32,
            shape.to_vec(),
            bytemuck::cast_slice(v),
        )
        .unwrap()
    }

    #[test]
    fn adds_to_the_bias_only_and_needs_one() {
        let w = entry("lin0.weight", &[3, 2], &[1.; 6]);
        let b = entry("lin0.bias", &[3], &[1., 2., 3.]);
        let mut base = ModuleBase {
            weight: BaseTensor {
                entry: w,
                transposed: false,
            },
            bias: Some(b.clone()),
        };
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(
                "beft_bias".to_string(),
                entry("lin0.beft_bias", &[1, 3], &[0.5, -2., 0.]),
            )]
            .into(),
        };
        let ch = Beft
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].target, "lin0.bias");
        assert_eq!(run_in_memory(&*ch[0].change, &b, 2).unwrap(), [1.5, 0., 3.]);
        base.bias = None;
        let e = Beft
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin0.beft_bias") && e.contains("no bias"), "{e}");
    }
}
