//! UniLoRA (`peft_type: "UNILORA"`): every entry of every module's LoRA factors is one value
//! of a single shared trained vector `θ_d`, picked by a fixed random index and scaled (PEFT
//! 0.21 `tuners/unilora/layer.py`).
//!
//! Saved: `base_model.unilora_theta_d` `[theta_d_length]` (shared, outside
//! `base_model.model.`) and, only with `save_indices: true`, per module
//! `<module>.unilora_indices_A` `[r, in]` / `_B` `[out, r]` (int64) and `unilora_scales_A` /
//! `_B` (same shapes). PEFT's merge (θ and the loaded scales are f32 whatever the base dtype):
//! `A = θ[idx_A] · scales_A`, `B = θ[idx_B] · scales_B` in f32, `ΔW = B @ A`
//! (transposed for Conv1D / `fan_in_fan_out`), `W += ΔW`; the product summed as torch's CPU
//! matmul sums it ([`super::torch_mm`]).
//!
//! Refused by name: `save_indices: false` (PEFT's default): the indices are not in the file and
//! PEFT regenerates them with torch's global random generator (`torch.randint`, seeded from
//! `proj_seed`), module by module in model order, which lorastream does not reproduce.

use super::torch_mm::LowRank;
use super::vera::{AddLowRank, check_band_shape};
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "UNILORA",
    open,
};

const THETA: &str = "unilora_theta_d";
const PARTS: [&str; 4] = [
    "unilora_indices_A",
    "unilora_indices_B",
    "unilora_scales_A",
    "unilora_scales_B",
];

#[derive(Debug)]
struct UniLora;

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    if v.get("save_indices").and_then(Value::as_bool) != Some(true) {
        return Err(Error::format(
            path,
            "UniLoRA adapter with save_indices: false (PEFT's default): the index and scale buffers are not in the \
             adapter file; PEFT regenerates them at load with torch's global generator (torch.randint after \
             seeding from proj_seed), module by module in the model's order, which lorastream does not \
             reproduce. Save the adapter with save_indices=True. Nothing was written.",
        ));
    }
    Ok(Box::new(UniLora))
}

impl Tuner for UniLora {
    fn name(&self) -> &'static str {
        "UniLoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        if rel == THETA {
            return SavedKey::Shared(rel);
        }
        for part in PARTS {
            if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        match (m.parts.get(PARTS[0]), m.parts.get(PARTS[1])) {
            (Some(a), Some(b)) => {
                a.shape.len() == 2
                    && b.shape.len() == 2
                    && b.shape[0] == out_in[0]
                    && a.shape[1] == out_in[1]
            }
            _ => false,
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let ia = m.part(weights, PARTS[0])?;
        let ib = m.part(weights, PARTS[1])?;
        let sa = m.part(weights, PARTS[2])?;
        let sb = m.part(weights, PARTS[3])?;
        let theta = shared.get(THETA).ok_or_else(|| {
            Error::format(
                weights,
                format!("UniLoRA adapter has no shared 'base_model.{THETA}' (incomplete adapter)"),
            )
        })?;
        check_float(weights, &[sa, sb, theta])?;
        for t in [ia, ib] {
            if t.dtype != Dtype::I64 {
                return Err(bad_part(
                    weights,
                    t,
                    format!("is {}, not PEFT's int64 indices", t.dtype),
                ));
            }
        }
        let w = &base.weight;
        let &[out, inn] = w.out_in_shape().as_slice() else {
            return Err(bad_part(
                weights,
                ia,
                format!(
                    "UniLoRA adapts Linear / Conv1D layers; base '{}' has shape {:?}",
                    w.entry.name, w.entry.shape
                ),
            ));
        };
        let ok = match (
            ia.shape.as_slice(),
            ib.shape.as_slice(),
            theta.shape.as_slice(),
        ) {
            (&[r, ai], &[bo, br], &[_]) => {
                r > 0
                    && ai == inn
                    && bo == out
                    && br == r
                    && sa.shape == ia.shape
                    && sb.shape == ib.shape
            }
            _ => false,
        };
        if !ok {
            return Err(bad_part(
                weights,
                ia,
                format!(
                    "UniLoRA parts do not fit base '{}' (PEFT [out, in] = [{out}, {inn}]): indices_A {:?} (needs [r, \
                     in]), indices_B {:?} (needs [out, r]), scales_A {:?}, scales_B {:?} (as the indices), theta_d {:?}",
                    w.entry.name, ia.shape, ib.shape, sa.shape, sb.shape, theta.shape
                ),
            ));
        }
        // Every index must pick a value of θ (checked here, before anything is written).
        let n = theta.numel();
        for t in [ia, ib] {
            if let Some(bad) = indices(t).into_iter().find(|&i| i < 0 || i as usize >= n) {
                return Err(bad_part(
                    weights,
                    t,
                    format!("holds index {bad}, outside unilora_theta_d's {n} values"),
                ));
            }
        }
        if n > 1 << 24 {
            return Err(bad_part(
                weights,
                theta,
                format!(
                    "has {n} values; lorastream carries UniLoRA indices as exact f32, up to 2^24"
                ),
            ));
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(UniDelta {
                ia: as_f32(ia)?,
                ib: as_f32(ib)?,
                sa: sa.clone(),
                sb: sb.clone(),
                theta: theta.clone(),
                out,
                inn,
                transposed: w.transposed,
            }),
        }])
    }
}

/// int64 little-endian indices.
fn indices(t: &TensorEntry) -> Vec<i64> {
    t.bytes()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// The int64 indices as an f32 copy under the same file and name (the engine takes floating
/// inputs only; every index is below 2^24, so exact), read back by [`f32_indices`].
fn as_f32(t: &TensorEntry) -> Result<TensorEntry> {
    let v: Vec<f32> = indices(t).into_iter().map(|i| i as f32).collect();
    TensorEntry::in_memory(
        t.file.path(),
        &t.name,
        Dtype::F32,
        t.shape.clone(),
        bytemuck::cast_slice(&v),
    )
}

/// Indices carried as f32 (see [`as_f32`]).
fn f32_indices(t: &TensorEntry) -> Vec<i64> {
    decode(t).into_iter().map(|x| x as i64).collect()
}

#[derive(Debug)]
struct UniDelta {
    ia: TensorEntry,
    ib: TensorEntry,
    sa: TensorEntry,
    sb: TensorEntry,
    theta: TensorEntry,
    out: usize,
    inn: usize,
    transposed: bool,
}

/// `θ[idx] · scale` in f32 (after loading, PEFT holds θ and the saved scales in f32).
fn gather(theta: &[f32], idx: &[i64], scales: &TensorEntry) -> Vec<f32> {
    let s = decode(scales);
    idx.iter()
        .zip(&s)
        .map(|(&i, &s)| theta[i as usize] * s)
        .collect()
}

impl TensorChange for UniDelta {
    fn tuner(&self) -> &'static str {
        "UniLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.ia, &self.ib, &self.sa, &self.sb, &self.theta]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let theta = decode(&self.theta);
        let a = gather(&theta, &f32_indices(&self.ia), &self.sa);
        let b = gather(&theta, &f32_indices(&self.ib), &self.sb);
        let r = self.ia.shape[0];
        let lr = LowRank::new(&b, &a, self.out, r, self.inn, self.transposed);
        check_band_shape("UniLoRA", base, &lr)?;
        Ok(Box::new(AddLowRank(lr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};

    fn entry(name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> TensorEntry {
        TensorEntry::in_memory(Path::new("t"), name, dtype, shape.to_vec(), bytes).unwrap()
    }

    #[test]
    fn gathers_the_factors_from_theta() {
        let f = |name: &str, shape: &[usize], v: &[f32]| {
            entry(name, Dtype::F32, shape, bytemuck::cast_slice(v))
        };
        let i = |name: &str, shape: &[usize], v: &[i64]| {
            entry(name, Dtype::I64, shape, bytemuck::cast_slice(v))
        };
        let shared: BTreeMap<String, TensorEntry> = [(
            THETA.to_string(),
            f("base_model.unilora_theta_d", &[3], &[1.0, 2.0, 4.0]),
        )]
        .into();
        let mut m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    PARTS[0].to_string(),
                    i("lin0.unilora_indices_A", &[1, 2], &[0, 2]),
                ),
                (
                    PARTS[1].to_string(),
                    i("lin0.unilora_indices_B", &[2, 1], &[1, 1]),
                ),
                (
                    PARTS[2].to_string(),
                    f("lin0.unilora_scales_A", &[1, 2], &[1.0, 0.5]),
                ),
                (
                    PARTS[3].to_string(),
                    f("lin0.unilora_scales_B", &[2, 1], &[1.0, -1.0]),
                ),
            ]
            .into(),
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: f("lin0.weight", &[2, 2], &[0.0; 4]),
                transposed: false,
            },
            bias: None,
        };
        let ch = UniLora.changes(Path::new("a"), &m, &shared, &base).unwrap();
        // A = [1, 2], B = [2, -2] -> ΔW = [[2, 4], [-2, -4]]
        assert_eq!(
            run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap(),
            [2.0, 4.0, -2.0, -4.0]
        );
        // An index outside θ is refused, naming the tensor.
        m.parts.insert(
            PARTS[0].to_string(),
            i("lin0.unilora_indices_A", &[1, 2], &[0, 3]),
        );
        let e = UniLora
            .changes(Path::new("a"), &m, &shared, &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.unilora_indices_A") && e.contains("outside"),
            "{e}"
        );
        let e = open(&serde_json::json!({"save_indices": false}), Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("save_indices"), "{e}");
    }
}
