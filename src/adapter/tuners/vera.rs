//! VeRA (`peft_type: "VERA"`): one pair of frozen random projections shared by every adapted
//! module, and per module two trained vectors that scale them (PEFT 0.21
//! `tuners/vera/layer.py`, `model.py`).
//!
//! Saved: `base_model.vera_A` `[r, in_max]` and `base_model.vera_B` `[out_max, r]` once (shared,
//! outside `base_model.model.`), and per module `<module>.vera_lambda_b` `[out]` and
//! `<module>.vera_lambda_d` `[r]`. PEFT's merge (`Linear.get_delta_weight`, all f32 here since
//! PEFT keeps the factors in f32 whatever the base dtype):
//! `ΔW = (λ_b[:, None] · B[:out, :]) @ (λ_d[:, None] · A[:, :in])`, transposed for a Conv1D /
//! `fan_in_fan_out` weight, then `W += ΔW` (an f32 delta added to the weight, one rounding into
//! its dtype). The two scaled factors are formed exactly as PEFT forms them (one f32 product
//! per element); the product is summed as torch's CPU matmul sums it ([`super::torch_mm`]:
//! bit-identical for r ≤ 256, PEFT's default).
//!
//! Refused by name: `save_projection: false` (the projections are not in the file; PEFT
//! regenerates them from `projection_prng_key` with torch's CPU generator, sized by the
//! largest in/out features over *all* targeted modules, which a per-module change cannot
//! see), and a factor in another dtype than PEFT would hold it in is merged in f32 as PEFT
//! does (it casts half factors to f32 on CPU).

use super::torch_mm::LowRank;
use super::{
    BandChange, BandSource, BaseTensor, Change, Effect, ModuleBase, SavedKey, SavedModule,
    TensorChange, Tuner, TunerType, bad_part, check_float, decode,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "VERA",
    open,
};

/// The parts of one VeRA-like tuner: its name, its per-module vectors and shared projections.
#[derive(Debug)]
pub(crate) struct Names {
    pub tuner: &'static str,
    pub lambda_b: &'static str,
    pub lambda_d: &'static str,
    pub a: &'static str,
    pub b: &'static str,
}

const NAMES: Names = Names {
    tuner: "VeRA",
    lambda_b: "vera_lambda_b",
    lambda_d: "vera_lambda_d",
    a: "vera_A",
    b: "vera_B",
};

/// VeRA: A `[r, in_max]`, B `[out_max, r]`, λ_d `[r]`, λ_b `[out]`.
const VERA: VeraLike = VeraLike {
    names: NAMES,
    rank: vera_rank,
};

/// A VeRA-like tuner (VeRA, PVeRA): the same saved layout under its own `names`, and the
/// same merge ([`VeraDelta`]) of the first `r` rows of A, where `rank` checks the parts'
/// shapes against the base and says `r`.
#[derive(Debug)]
pub(crate) struct VeraLike {
    pub names: Names,
    pub rank: fn(&Path, &VeraParts<'_>) -> Result<usize>,
}

/// The tensors of one module of a VeRA-like tuner: its two vectors, the shared projections,
/// and the base weight they change, of PEFT shape `[out, inn]`.
pub(crate) struct VeraParts<'t> {
    pub base: &'t BaseTensor,
    pub out: usize,
    pub inn: usize,
    pub lambda_b: &'t TensorEntry,
    pub lambda_d: &'t TensorEntry,
    pub a: &'t TensorEntry,
    pub b: &'t TensorEntry,
}

/// Refuses `save_projection: false` (shared by VeRA and PVeRA): the projections are not saved.
pub(crate) fn refuse_unsaved_projection(v: &Value, path: &Path, tuner: &str) -> Result<()> {
    if v.get("save_projection").and_then(Value::as_bool) == Some(false) {
        let key = v
            .get("projection_prng_key")
            .map_or_else(|| "absent".to_string(), |k| k.to_string());
        return Err(Error::format(
            path,
            format!(
                "{tuner} adapter with save_projection: false: the shared random projections are not in the \
                 adapter file. PEFT regenerates them at load from projection_prng_key ({key}) with torch's CPU \
                 generator, sized by the largest in/out features over all targeted modules of the base model; \
                 lorastream does not reproduce that. Save the adapter with save_projection=True (the default). \
                 Nothing was written."
            ),
        ));
    }
    Ok(())
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    refuse_unsaved_projection(v, path, "VeRA")?;
    Ok(Box::new(VERA))
}

/// What a saved key is, for a VeRA-like tuner.
pub(crate) fn classify<'k>(names: &Names, rel: &'k str) -> SavedKey<'k> {
    if rel == names.a || rel == names.b {
        return SavedKey::Shared(rel);
    }
    for part in [names.lambda_b, names.lambda_d] {
        if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
            return SavedKey::Part { module, part };
        }
    }
    SavedKey::Full
}

/// A shared projection, or an error naming it.
pub(crate) fn shared<'s>(
    weights: &Path,
    shared: &'s BTreeMap<String, TensorEntry>,
    name: &str,
    tuner: &str,
) -> Result<&'s TensorEntry> {
    shared.get(name).ok_or_else(|| {
        Error::format(
            weights,
            format!(
                "{tuner} adapter has no shared 'base_model.{name}' (saved with save_projection=False, or \
                 incomplete); lorastream needs the saved projections"
            ),
        )
    })
}

/// VeRA's shapes: A `[r, >= in]`, B `[>= out, r]`, λ_d `[r]`, λ_b `[out]`.
fn vera_rank(weights: &Path, p: &VeraParts<'_>) -> Result<usize> {
    let (lb, ld, a, b, out, inn) = (p.lambda_b, p.lambda_d, p.a, p.b, p.out, p.inn);
    let &[r, a_in] = a.shape.as_slice() else {
        return Err(bad_part(
            weights,
            a,
            format!("vera_A has shape {:?}, not [r, in]", a.shape),
        ));
    };
    let &[b_out, b_r] = b.shape.as_slice() else {
        return Err(bad_part(
            weights,
            b,
            format!("vera_B has shape {:?}, not [out, r]", b.shape),
        ));
    };
    if b_r != r || ld.shape != [r] || lb.shape != [out] || a_in < inn || b_out < out {
        return Err(bad_part(
            weights,
            lb,
            format!(
                "VeRA parts do not fit base '{}' (PEFT [out, in] = [{out}, {inn}]): {} {:?}, {} {:?}, \
                 shared vera_A {:?} (needs [r, >= in]), vera_B {:?} (needs [>= out, r])",
                p.base.entry.name, lb.name, lb.shape, ld.name, ld.shape, a.shape, b.shape
            ),
        ));
    }
    Ok(r)
}

impl Tuner for VeraLike {
    fn name(&self) -> &'static str {
        self.names.tuner
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        classify(&self.names, rel)
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        m.parts
            .get(self.names.lambda_b)
            .is_some_and(|b| b.numel() == out_in[0])
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        shared_t: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let names = &self.names;
        let lb = m.part(weights, names.lambda_b)?;
        let ld = m.part(weights, names.lambda_d)?;
        let a = shared(weights, shared_t, names.a, names.tuner)?;
        let b = shared(weights, shared_t, names.b, names.tuner)?;
        check_float(weights, &[lb, ld, a, b])?;
        let w = &base.weight;
        let &[out, inn] = w.out_in_shape().as_slice() else {
            return Err(bad_part(
                weights,
                lb,
                format!(
                    "{} adapts Linear / Conv1D layers; base '{}' has shape {:?}",
                    names.tuner, w.entry.name, w.entry.shape
                ),
            ));
        };
        let parts = VeraParts {
            base: w,
            out,
            inn,
            lambda_b: lb,
            lambda_d: ld,
            a,
            b,
        };
        let r = (self.rank)(weights, &parts)?;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(VeraDelta {
                tuner: names.tuner,
                lambda_b: lb.clone(),
                lambda_d: ld.clone(),
                a: a.clone(),
                b: b.clone(),
                out,
                inn,
                r,
                transposed: w.transposed,
            }),
        }])
    }
}

/// `ΔW = (λ_b · B[:out]) @ (λ_d · A[:, :in])` (VeRA's merge; PVeRA's with its own A slice).
#[derive(Debug)]
pub(crate) struct VeraDelta {
    pub tuner: &'static str,
    pub lambda_b: TensorEntry,
    pub lambda_d: TensorEntry,
    /// `[r_a, a_in]`: the first `r` rows and `inn` columns are used.
    pub a: TensorEntry,
    /// `[b_out, r]`: the first `out` rows are used.
    pub b: TensorEntry,
    pub out: usize,
    pub inn: usize,
    pub r: usize,
    pub transposed: bool,
}

impl VeraDelta {
    /// The two scaled factors, `[out, r]` and `[r, in]`, each element one f32 product.
    pub fn factors(&self) -> (Vec<f32>, Vec<f32>) {
        let (lb, ld) = (decode(&self.lambda_b), decode(&self.lambda_d));
        let (a, b) = (decode(&self.a), decode(&self.b));
        let a_in = self.a.shape[1];
        let b_r = self.b.shape[1];
        let mut left = Vec::with_capacity(self.out * self.r);
        for (i, &s) in lb.iter().enumerate().take(self.out) {
            left.extend(b[i * b_r..i * b_r + self.r].iter().map(|x| s * x));
        }
        let mut right = Vec::with_capacity(self.r * self.inn);
        for (k, &s) in ld.iter().enumerate().take(self.r) {
            right.extend(a[k * a_in..k * a_in + self.inn].iter().map(|x| s * x));
        }
        (left, right)
    }
}

impl TensorChange for VeraDelta {
    fn tuner(&self) -> &'static str {
        self.tuner
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.lambda_b, &self.lambda_d, &self.a, &self.b]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (left, right) = self.factors();
        let lr = LowRank::new(&left, &right, self.out, self.r, self.inn, self.transposed);
        check_band_shape(self.tuner, base, &lr)?;
        Ok(Box::new(AddLowRank(lr)))
    }
}

/// Errors (internal) when the prepared ΔW does not have the stored tensor's shape.
pub(crate) fn check_band_shape(tuner: &str, base: &BandSource<'_>, lr: &LowRank) -> Result<()> {
    if lr.rows() != base.rows || lr.cols() != base.cols {
        return Err(Error::Internal(format!(
            "{tuner} delta {} x {} for '{}' ({} x {})",
            lr.rows(),
            lr.cols(),
            base.base.name,
            base.rows,
            base.cols
        )));
    }
    Ok(())
}

/// `W += ΔW` with ΔW in f32 (PEFT adds the f32 delta to the weight, one rounding).
pub(crate) struct AddLowRank(pub LowRank);

impl BandChange for AddLowRank {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        self.0.add_into(row0, band);
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
    fn merges_the_scaled_slices_of_the_shared_projections() {
        // Base [out 2, in 2]; shared A [r 2, in_max 3], B [out_max 3, r 2].
        let w = [1.0f32, 2.0, 3.0, 4.0];
        let a = [1.0f32, 0.0, 9.0, 0.0, 1.0, 9.0];
        let b = [1.0f32, 2.0, 3.0, 4.0, 9.0, 9.0];
        let shared: BTreeMap<String, TensorEntry> = [
            (
                "vera_A".to_string(),
                entry("base_model.vera_A", &[2, 3], &a),
            ),
            (
                "vera_B".to_string(),
                entry("base_model.vera_B", &[3, 2], &b),
            ),
        ]
        .into();
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    "vera_lambda_b".to_string(),
                    entry("lin0.vera_lambda_b", &[2], &[1.0, 0.5]),
                ),
                (
                    "vera_lambda_d".to_string(),
                    entry("lin0.vera_lambda_d", &[2], &[2.0, -1.0]),
                ),
            ]
            .into(),
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 2], &w),
                transposed: false,
            },
            bias: None,
        };
        let ch = VERA.changes(Path::new("a"), &m, &shared, &base).unwrap();
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        // (λb·B[:2]) = [[1,2],[1.5,2]], (λd·A[:, :2]) = [[2,0],[0,-1]] -> ΔW = [[2,-2],[3,-2]]
        assert_eq!(got, [3.0, 0.0, 6.0, 2.0]);
        // Conv1D: stored [in, out]; ΔWᵀ added.
        let base_t = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 2], &w),
                transposed: true,
            },
            bias: None,
        };
        let ch = VERA.changes(Path::new("a"), &m, &shared, &base_t).unwrap();
        let got = run_in_memory(&*ch[0].change, &base_t.weight.entry, 1).unwrap();
        assert_eq!(got, [3.0, 5.0, 1.0, 2.0]);
        // A base wider than the shared projection names the parts.
        let wide = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 4], &[0.0; 8]),
                transposed: false,
            },
            bias: None,
        };
        let e = VERA
            .changes(Path::new("a"), &m, &shared, &wide)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin0.weight") && e.contains("vera_A"), "{e}");
        // Projections not saved: refused by name at open.
        let cfg = serde_json::json!({"save_projection": false, "projection_prng_key": 0});
        let e = open(&cfg, Path::new("c")).unwrap_err().to_string();
        assert!(
            e.contains("save_projection") && e.contains("projection_prng_key"),
            "{e}"
        );
    }
}
