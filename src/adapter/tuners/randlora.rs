//! RandLoRA (`peft_type: "RANDLORA"`): full-rank updates from a sum of `num_bases` frozen random
//! low-rank bases shared by every module, each scaled by trained `λ` and `γ` (PEFT 0.21
//! `tuners/randlora/layer.py`).
//!
//! Saved: `base_model.randlora_A` `[r, 1, min_dim_max]` and `base_model.randlora_B`
//! `[max_dim_max, num_bases_max, r]` once (shared, outside `base_model.model.`; PEFT saves the
//! same buffers again under each module, which must then be the same values), and per module
//! `<module>.randlora_lambda` `[r, num_bases]`, `<module>.randlora_gamma` `[num_bases, min_dim]`
//! with `min_dim = min(in, out)`, `max_dim = max(in, out)`, `num_bases = ceil(min_dim / r)`.
//! PEFT's merge, f32 (the parts stay f32 whatever the base dtype):
//! `UA = (λ[:, :, None] · A[:, :nb, :min_dim]) · γ[None]` flattened to `[r·nb, min_dim]`,
//! `UB = B[:max_dim, :nb, :]` flattened to `[max_dim, nb·r]`;
//! `ΔW = UB @ UA` `[out, in]` when `in ≤ out`, else `(UB @ UA)ᵀ`; `ΔW · (randlora_alpha / r)`,
//! **rounded to the weight's dtype**, then added (`weight += delta.to(orig_dtype)`).
//! The product is summed as torch's CPU matmul sums it ([`super::torch_mm`]; exact for an inner
//! dimension `r·nb ≤ 256`). `sparse` / `very_sparse` only change how the saved bases were drawn.
//!
//! Layout: a non-square weight's delta is the same in its stored orientation whether it is an
//! nn.Linear or a Conv1D (see [`RandLora::fits`]), so only square weights need layout evidence;
//! a non-square Conv1D with in > out whose layout transformers' code states is refused as a
//! disagreement with the shapes (safe; the trait cannot say "either layout gives these bits").
//!
//! Refused by name: `save_projection: false` (the bases are regenerated from
//! `projection_prng_key` by PEFT, sized over all targeted modules).

use super::torch_mm::LowRank;
use super::vera::{check_band_shape, refuse_unsaved_projection};
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "RANDLORA",
    open,
};

const A: &str = "randlora_A";
const B: &str = "randlora_B";
const LAMBDA: &str = "randlora_lambda";
const GAMMA: &str = "randlora_gamma";

#[derive(Debug)]
struct RandLora {
    r: usize,
    /// `randlora_alpha / r` as PEFT's Python float, applied as an f32 scalar.
    scaling: f32,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    refuse_unsaved_projection(v, path, "RandLoRA")?;
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| {
            Error::format(
                path,
                "RandLoRA adapter_config.json has no positive integer 'r'",
            )
        })? as usize;
    let alpha = match v.get("randlora_alpha") {
        None => 640.0, // PEFT's default
        Some(a) => a.as_f64().ok_or_else(|| {
            Error::format(
                path,
                format!("RandLoRA randlora_alpha is {a}, not a number"),
            )
        })?,
    };
    Ok(Box::new(RandLora {
        r,
        scaling: (alpha / r as f64) as f32,
    }))
}

impl Tuner for RandLora {
    fn name(&self) -> &'static str {
        "RandLoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        if rel == A || rel == B {
            return SavedKey::Shared(rel);
        }
        for part in [LAMBDA, GAMMA, A, B] {
            if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        // The parts are symmetric in in/out (γ is [num_bases, min(in, out)]), and so is the
        // delta of a non-square weight in its *stored* orientation: for stored [max, min] PEFT's
        // two branches (in ≤ out: UB @ UA; in > out: (UB @ UA)ᵀ in [out, in]) both come to
        // UB @ UA, the same products summed in the same order, whether the weight is an
        // nn.Linear or a Conv1D. So a non-square weight is said to fit the one orientation with
        // out ≥ in (the plan then needs no layout evidence); a square one fits both and its
        // layout is settled by the evidence, as it changes the result.
        m.parts.get(GAMMA).is_some_and(|g| {
            g.shape.len() == 2 && g.shape[1] == out_in[0].min(out_in[1]) && out_in[0] >= out_in[1]
        })
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let lambda = m.part(weights, LAMBDA)?;
        let gamma = m.part(weights, GAMMA)?;
        let missing = |name: &str| {
            Error::format(
                weights,
                format!("RandLoRA adapter has no shared 'base_model.{name}' (incomplete adapter)"),
            )
        };
        let a = shared.get(A).ok_or_else(|| missing(A))?;
        let b = shared.get(B).ok_or_else(|| missing(B))?;
        check_float(weights, &[lambda, gamma, a, b])?;
        // The copies PEFT saves under the module are the same buffers: equal, or refused.
        let mut own = Vec::new();
        for (name, sh) in [(A, a), (B, b)] {
            if let Some(t) = m.parts.get(name) {
                if t.shape != sh.shape || t.dtype != sh.dtype || t.bytes() != sh.bytes() {
                    return Err(bad_part(
                        weights,
                        t,
                        format!(
                            "differs from the shared 'base_model.{name}'; PEFT saves one buffer under both names, \
                             so which one it would load is not defined"
                        ),
                    ));
                }
                own.push(t.clone());
            }
        }
        let w = &base.weight;
        let &[out, inn] = w.out_in_shape().as_slice() else {
            return Err(bad_part(
                weights,
                lambda,
                format!(
                    "RandLoRA adapts Linear / Conv1D layers; base '{}' has shape {:?}",
                    w.entry.name, w.entry.shape
                ),
            ));
        };
        let r = self.r;
        let (min_dim, max_dim) = (out.min(inn), out.max(inn));
        let nb = min_dim.div_ceil(r);
        let ok = lambda.shape == [r, nb]
            && gamma.shape == [nb, min_dim]
            && matches!(a.shape.as_slice(), &[ar, a1, am] if ar == r && (a1 == 1 || a1 >= nb) && am >= min_dim)
            && matches!(b.shape.as_slice(), &[bm, bn, br] if br == r && bn >= nb && bm >= max_dim);
        if !ok {
            return Err(bad_part(
                weights,
                lambda,
                format!(
                    "RandLoRA parts do not fit base '{}' (PEFT [out, in] = [{out}, {inn}], r = {r}, num_bases = \
                     {nb}): {} {:?} (needs [r, num_bases]), {} {:?} (needs [num_bases, min(in, out)]), shared \
                     randlora_A {:?} (needs [r, 1, >= min]), randlora_B {:?} (needs [>= max, >= num_bases, r])",
                    w.entry.name,
                    lambda.name,
                    lambda.shape,
                    gamma.name,
                    gamma.shape,
                    a.shape,
                    b.shape
                ),
            ));
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(RandDelta {
                lambda: lambda.clone(),
                gamma: gamma.clone(),
                a: a.clone(),
                b: b.clone(),
                own,
                out,
                inn,
                r,
                nb,
                scaling: self.scaling,
                transposed: w.transposed,
            }),
        }])
    }
}

#[derive(Debug)]
struct RandDelta {
    lambda: TensorEntry,
    gamma: TensorEntry,
    a: TensorEntry,
    b: TensorEntry,
    /// The module's own copies of the bases (equal to the shared ones), for coverage.
    own: Vec<TensorEntry>,
    out: usize,
    inn: usize,
    r: usize,
    nb: usize,
    scaling: f32,
    transposed: bool,
}

impl RandDelta {
    /// `UA` `[r·nb, min_dim]` and `UB` `[max_dim, nb·r]` as PEFT builds them.
    fn bases(&self) -> (Vec<f32>, Vec<f32>) {
        let (r, nb) = (self.r, self.nb);
        let (min_dim, max_dim) = (self.out.min(self.inn), self.out.max(self.inn));
        let (lambda, gamma) = (decode(&self.lambda), decode(&self.gamma));
        let (a, b) = (decode(&self.a), decode(&self.b));
        let (a1, am) = (self.a.shape[1], self.a.shape[2]);
        let (bn, br) = (self.b.shape[1], self.b.shape[2]);
        let mut ua = Vec::with_capacity(r * nb * min_dim);
        for k in 0..r {
            for j in 0..nb {
                let l = lambda[k * nb + j];
                // A's second dim is 1 (broadcast over the bases) or sliced to nb.
                let row = k * a1 + if a1 == 1 { 0 } else { j };
                for (c, &x) in a[row * am..row * am + min_dim].iter().enumerate() {
                    // (λ · A) · γ, left to right as torch evaluates it.
                    ua.push(l * x * gamma[j * min_dim + c]);
                }
            }
        }
        let mut ub = Vec::with_capacity(max_dim * nb * r);
        for i in 0..max_dim {
            for j in 0..nb {
                let at = (i * bn + j) * br;
                ub.extend_from_slice(&b[at..at + r]);
            }
        }
        (ua, ub)
    }
}

impl TensorChange for RandDelta {
    fn tuner(&self) -> &'static str {
        "RandLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = vec![&self.lambda, &self.gamma, &self.a, &self.b];
        v.extend(self.own.iter());
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (ua, ub) = self.bases();
        let k = self.r * self.nb;
        // ΔW [out, in] = L [out, k] · R [k, in].
        let lr = if self.inn <= self.out {
            // UB [out, k] @ UA [k, in].
            LowRank::new(&ub, &ua, self.out, k, self.inn, self.transposed)
        } else {
            // (UB [in, k] @ UA [k, out])ᵀ: element [o, i] = Σ_j UA[j, o] · UB[i, j].
            let l = super::torch_mm::transpose(&ua, k, self.out);
            let rt = super::torch_mm::transpose(&ub, self.inn, k);
            LowRank::new(&l, &rt, self.out, k, self.inn, self.transposed)
        };
        check_band_shape("RandLoRA", base, &lr)?;
        Ok(Box::new(ScaledRounded {
            lr,
            scaling: self.scaling,
            dtype: base.dtype(),
        }))
    }
}

/// `W += (ΔW · s).to(W.dtype)`.
struct ScaledRounded {
    lr: LowRank,
    scaling: f32,
    dtype: Dtype,
}

impl BandChange for ScaledRounded {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let mut d = vec![0f32; band.len()];
        self.lr.rows_into(row0, &mut d);
        d.iter_mut().for_each(|x| *x *= self.scaling);
        round_through(self.dtype, &mut d);
        band.iter_mut().zip(&d).for_each(|(w, d)| *w += d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};

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
    fn sums_the_scaled_bases_like_peft() {
        // r = 1, base [out 3, in 2]: min 2, max 3, num_bases 2.
        let a = entry("base_model.randlora_A", &[1, 1, 2], &[1.0, 2.0]);
        let b = entry(
            "base_model.randlora_B",
            &[3, 2, 1],
            &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        );
        let shared: BTreeMap<String, TensorEntry> =
            [(A.to_string(), a.clone()), (B.to_string(), b)].into();
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    LAMBDA.to_string(),
                    entry("lin0.randlora_lambda", &[1, 2], &[1.0, 2.0]),
                ),
                (
                    GAMMA.to_string(),
                    entry("lin0.randlora_gamma", &[2, 2], &[1.0, 1.0, 0.5, 0.25]),
                ),
                (A.to_string(), a),
            ]
            .into(),
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[3, 2], &[0.0; 6]),
                transposed: false,
            },
            bias: None,
        };
        let t = RandLora { r: 1, scaling: 2.0 };
        let ch = t.changes(Path::new("a"), &m, &shared, &base).unwrap();
        assert_eq!(ch[0].change.inputs().len(), 5);
        // UA = [[1·1·1, 1·2·1], [2·1·0.5, 2·2·0.25]] = [[1, 2], [1, 1]]; UB = [[1, 0], [0, 1], [1, 1]]
        // ΔW = UB @ UA = [[1, 2], [1, 1], [2, 3]], · 2.
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 2).unwrap();
        assert_eq!(got, [2.0, 4.0, 2.0, 2.0, 4.0, 6.0]);
        // A module copy that differs from the shared basis is refused.
        let mut m2 = m.clone();
        m2.parts.insert(
            A.to_string(),
            entry("lin0.randlora_A", &[1, 1, 2], &[1.0, 3.0]),
        );
        let e = t
            .changes(Path::new("a"), &m2, &shared, &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.randlora_A") && e.contains("differs"),
            "{e}"
        );
    }
}
