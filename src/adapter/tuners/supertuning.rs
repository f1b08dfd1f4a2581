//! Super-Tuning (`peft_type: "SUPERTUNING"`, PEFT 0.21 `tuners/supertuning/layer.py`): a
//! sparse set of trained values added at saved flat positions of an nn.Linear weight, plus,
//! in its "Supra" mode (`r` set), a LoRA pair `supertuning_lora_B @ supertuning_lora_A`.
//!
//! Saved per module: `supertuning_indices` (int32 flat positions into the `[out, in]`
//! weight, chosen by PEFT from the base's magnitudes), `supertuning_values` (f32), and in
//! Supra mode `supertuning_lora_A.weight` `[r, in]` / `supertuning_lora_B.weight` `[out, r]`.
//! PEFT's merge, reproduced step for step:
//! 1. `W.reshape(-1).scatter_add_(0, indices, values.to(W.dtype))`: the values rounded to
//!    the weight's dtype, each added to its element in the weight's dtype (duplicate
//!    positions, which PEFT's top-k never makes, are added one after another in saved order);
//! 2. Supra: `W.add_(((alpha / r) * (B @ A)).to(W.dtype))`: the f32 product (sum over the
//!    rank in order, fused multiply-adds, like the CPU GEMM) scaled in f32, rounded to the
//!    weight's dtype, then added (a second change, so the engine rounds in between).
//!
//! When `save_precomputed_indices` was false the positions are not saved and PEFT picks them
//! again from the base weight's magnitudes at load time (`torch.topk`, whose choice among
//! equal magnitudes is its own); that is refused, naming the module and the option.
//! PEFT wraps nn.Linear only, so a weight stored `[in, out]` (Conv1D) is refused.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, factor_pair_fits,
};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "SUPERTUNING",
    open,
};

const PARTS: &[&str] = &[
    "supertuning_indices",
    "supertuning_values",
    "supertuning_lora_A.weight",
    "supertuning_lora_B.weight",
];

#[derive(Debug)]
struct Supertuning {
    /// `r` and `lora_alpha` of Supra mode.
    lora: Option<(usize, f64)>,
    save_precomputed_indices: bool,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let lora = match v.get("r") {
        None | Some(Value::Null) => None,
        Some(r) => {
            let r = r
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| Error::format(path, format!("r is {r}, not a positive integer")))?;
            let alpha = match v.get("lora_alpha") {
                Some(a) if a.is_number() => a.as_f64().unwrap_or(f64::NAN),
                other => {
                    return Err(Error::format(
                        path,
                        format!(
                            "r is {r} (Supra mode) but lora_alpha is {}, not a number",
                            other.map_or("missing".to_string(), |a| a.to_string())
                        ),
                    ));
                }
            };
            Some((r as usize, alpha))
        }
    };
    let save_precomputed_indices = v
        .get("save_precomputed_indices")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    Ok(Box::new(Supertuning {
        lora,
        save_precomputed_indices,
    }))
}

/// Saved flat positions (int32 as PEFT saves them, or int64), as indices.
fn positions(weights: &Path, t: &TensorEntry, numel: usize, base: &str) -> Result<Vec<usize>> {
    let bytes = t.bytes();
    let raw: Vec<i64> = match t.dtype {
        Dtype::I32 => bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        other => {
            return Err(bad_part(
                weights,
                t,
                format!("is {other}; Super-Tuning's indices are int32 (or int64)"),
            ));
        }
    };
    raw.iter()
        .map(|&i| {
            usize::try_from(i)
                .ok()
                .filter(|&i| i < numel)
                .ok_or_else(|| {
                    bad_part(
                        weights,
                        t,
                        format!("holds position {i}, outside base '{base}' ({numel} elements)"),
                    )
                })
        })
        .collect()
}

impl Tuner for Supertuning {
    fn name(&self) -> &'static str {
        "Super-Tuning"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in PARTS {
            if let Some(module) = rel
                .strip_suffix(part)
                .and_then(|m| m.strip_suffix('.'))
                .filter(|m| !m.is_empty())
            {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        // Without the LoRA pair nothing in the adapter says which way round the weight is,
        // and nothing needs to: PEFT wraps nn.Linear only and the positions address the
        // stored weight as it is. Fitting neither orientation skips the layout decision;
        // `changes` checks the positions against the weight.
        factor_pair_fits(
            m,
            "supertuning_lora_B.weight",
            "supertuning_lora_A.weight",
            out_in,
        )
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let values = m.part(weights, "supertuning_values")?;
        let w = &base.weight;
        let Some(indices) = m.parts.get("supertuning_indices") else {
            return Err(Error::format(
                weights,
                format!(
                    "Super-Tuning module '{}' has no saved supertuning_indices (saved with \
                     save_precomputed_indices = {}): PEFT picks the positions again from base '{}' \
                     by magnitude (torch.topk, whose order among equal magnitudes lorastream cannot \
                     promise to repeat); save the adapter with save_precomputed_indices=True",
                    m.name, self.save_precomputed_indices, w.entry.name
                ),
            ));
        };
        check_float(weights, &[values])?;
        if w.transposed || w.entry.shape.len() != 2 {
            return Err(bad_part(
                weights,
                values,
                format!(
                    "base '{}' {:?} is not an nn.Linear weight stored [out, in]; PEFT's Super-Tuning \
                     adapts nn.Linear only",
                    w.entry.name, w.entry.shape
                ),
            ));
        }
        let numel = w.entry.numel();
        // Checked now (nothing is written before every position is known to fit), decoded
        // again per tensor in `prepare`: there are as many as half the weight's elements.
        let n = positions(weights, indices, numel, &w.entry.name)?.len();
        if values.shape.len() != 1 || values.numel() != n {
            return Err(bad_part(
                weights,
                values,
                format!(
                    "has shape {:?} but '{}' holds {} positions",
                    values.shape, indices.name, n
                ),
            ));
        }
        let mut out = vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Sparse {
                indices: indices.clone(),
                values: values.clone(),
                weights: weights.to_path_buf(),
            }),
        }];
        let a = m.parts.get("supertuning_lora_A.weight");
        let b = m.parts.get("supertuning_lora_B.weight");
        match (self.lora, a, b) {
            (None, None, None) => {}
            (Some((r, alpha)), Some(a), Some(b)) => {
                check_float(weights, &[a, b])?;
                let [o, i] = [w.entry.shape[0], w.entry.shape[1]];
                if a.shape != [r, i] || b.shape != [o, r] {
                    return Err(bad_part(
                        weights,
                        a,
                        format!(
                            "Supra factors A {:?} and B {:?} do not fit base '{}' {:?} at r = {r} \
                             (want A [{r}, {i}], B [{o}, {r}])",
                            a.shape, b.shape, w.entry.name, w.entry.shape
                        ),
                    ));
                }
                out.push(Change {
                    target: w.entry.name.clone(),
                    change: Arc::new(Supra {
                        a: a.clone(),
                        b: b.clone(),
                        r,
                        scale: (alpha / r as f64) as f32,
                    }),
                });
            }
            (lora, a, b) => {
                return Err(Error::format(
                    weights,
                    format!(
                        "Super-Tuning module '{}': adapter_config.json has r = {} but the module \
                         has {} of supertuning_lora_A/B; they must agree",
                        m.name,
                        lora.map_or("null".into(), |(r, _)| r.to_string()),
                        match (a, b) {
                            (Some(_), Some(_)) => "both",
                            (None, None) => "neither",
                            _ => "only one",
                        }
                    ),
                ));
            }
        }
        Ok(out)
    }
}

/// The sparse values added at their flat positions.
#[derive(Debug)]
struct Sparse {
    indices: TensorEntry,
    values: TensorEntry,
    /// The adapter's weights file (for messages).
    weights: std::path::PathBuf,
}

struct PreparedSparse {
    /// (flat position, value in the weight's dtype), sorted by position; equal positions
    /// keep their saved order (scatter_add adds them one after another).
    adds: Vec<(usize, f32)>,
    cols: usize,
    dtype: Dtype,
}

impl TensorChange for Sparse {
    fn tuner(&self) -> &'static str {
        "SUPERTUNING"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.indices, &self.values]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let mut v = decode(&self.values);
        // values.to(weight.dtype)
        round_through(base.dtype(), &mut v);
        let pos = positions(
            &self.weights,
            &self.indices,
            base.rows * base.cols,
            &base.base.name,
        )?;
        let mut adds: Vec<(usize, f32)> = pos.into_iter().zip(v).collect();
        adds.sort_by_key(|&(p, _)| p);
        Ok(Box::new(PreparedSparse {
            adds,
            cols: base.cols,
            dtype: base.dtype(),
        }))
    }
}

impl BandChange for PreparedSparse {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let start = row0 * self.cols;
        let end = start + band.len();
        let from = self.adds.partition_point(|&(p, _)| p < start);
        let to = self.adds.partition_point(|&(p, _)| p < end);
        for &(p, v) in &self.adds[from..to] {
            let x = &mut band[p - start];
            // Each add is one op in the weight's dtype.
            let mut s = [*x + v];
            round_through(self.dtype, &mut s);
            *x = s[0];
        }
    }
}

/// Supra's `((alpha / r) * (B @ A)).to(W.dtype)`, added.
#[derive(Debug)]
struct Supra {
    a: TensorEntry,
    b: TensorEntry,
    r: usize,
    scale: f32,
}

struct PreparedSupra {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scale: f32,
    cols: usize,
    dtype: Dtype,
}

impl TensorChange for Supra {
    fn tuner(&self) -> &'static str {
        "SUPERTUNING"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.a, &self.b]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        Ok(Box::new(PreparedSupra {
            a: decode(&self.a),
            b: decode(&self.b),
            r: self.r,
            scale: self.scale,
            cols: base.cols,
            dtype: base.dtype(),
        }))
    }
}

impl BandChange for PreparedSupra {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let mut delta = vec![0f32; self.cols];
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let b = &self.b[(row0 + i) * self.r..(row0 + i + 1) * self.r];
            for (j, d) in delta.iter_mut().enumerate() {
                let mut acc = 0f32;
                for (k, bk) in b.iter().enumerate() {
                    acc = bk.mul_add(self.a[k * self.cols + j], acc);
                }
                *d = self.scale * acc;
            }
            round_through(self.dtype, &mut delta);
            row.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};

    fn entry(name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> TensorEntry {
        TensorEntry::in_memory(Path::new("t"), name, dtype, shape.to_vec(), bytes).unwrap()
    }
    fn f32s(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        entry(name, Dtype::F32, shape, bytemuck::cast_slice(v))
    }

    #[test]
    fn adds_values_at_positions_then_the_lora_pair() {
        let w: Vec<f32> = (0..6).map(|i| i as f32).collect(); // [2, 3]
        let base = ModuleBase {
            weight: BaseTensor {
                entry: f32s("lin0.weight", &[2, 3], &w),
                transposed: false,
            },
            bias: None,
        };
        let idx: Vec<i32> = vec![5, 1];
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    "supertuning_indices".to_string(),
                    entry(
                        "lin0.supertuning_indices",
                        Dtype::I32,
                        &[2],
                        bytemuck::cast_slice(&idx),
                    ),
                ),
                (
                    "supertuning_values".to_string(),
                    f32s("lin0.supertuning_values", &[2], &[10.0, -1.0]),
                ),
                (
                    "supertuning_lora_A.weight".to_string(),
                    f32s("lin0.supertuning_lora_A.weight", &[1, 3], &[1.0, 2.0, 3.0]),
                ),
                (
                    "supertuning_lora_B.weight".to_string(),
                    f32s("lin0.supertuning_lora_B.weight", &[2, 1], &[1.0, 0.5]),
                ),
            ]
            .into(),
        };
        let t = Supertuning {
            lora: Some((1, 2.0)),
            save_precomputed_indices: true,
        };
        assert!(t.fits(&m, [2, 3]) && !t.fits(&m, [3, 2]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 2);
        // Band of one row: the sparse adds land in their rows.
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [0., 0., 2., 3., 4., 15.]);
        let got = run_in_memory(&*ch[1].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [2., 5., 8., 4., 6., 8.]);
        // Without saved positions it is refused by the option's name.
        let mut m2 = m.clone();
        m2.parts.remove("supertuning_indices");
        let e = t
            .changes(Path::new("a"), &m2, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("save_precomputed_indices"), "{e}");
        // A position outside the weight names the tensor.
        let mut m3 = m.clone();
        let bad: Vec<i32> = vec![6, 0];
        m3.parts.insert(
            "supertuning_indices".into(),
            entry(
                "lin0.supertuning_indices",
                Dtype::I32,
                &[2],
                bytemuck::cast_slice(&bad),
            ),
        );
        let e = t
            .changes(Path::new("a"), &m3, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.supertuning_indices") && e.contains("6"),
            "{e}"
        );
    }

    #[test]
    fn rounds_values_to_the_weight_dtype_before_adding() {
        // bf16 weight 1.0, value 2^-8 + 2^-20: added exactly it is past half an ulp of 1
        // (2^-8) and would round up to 1 + 2^-7; rounded to bf16 first (PEFT's
        // `values.to(W.dtype)`) it is 2^-8, a tie that rounds to even, 1.0.
        let w = [half::bf16::from_f32(1.0)];
        let base = entry(
            "lin0.weight",
            Dtype::BF16,
            &[1, 1],
            bytemuck::cast_slice(&w.map(|x| x.to_bits())),
        );
        let s = Sparse {
            indices: entry("i", Dtype::I32, &[1], &[0; 4]),
            values: f32s("v", &[1], &[1.0 / 256.0 + 1.0 / 1048576.0]),
            weights: "a".into(),
        };
        assert_eq!(run_in_memory(&s, &base, 1).unwrap(), [1.0]);
    }
}
