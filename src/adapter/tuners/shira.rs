//! SHiRA (`peft_type: "SHIRA"`): a sparse high-rank delta, trained values at fixed saved
//! positions of the weight (PEFT 0.21 `tuners/shira/layer.py`).
//!
//! Saved: `<module>.shira_indices` `[2, nnz]` (int: row and column of each value in
//! `[out, in]`) and `<module>.shira_weight` `[nnz]`. PEFT's merge is
//! `W += sparse_coo(indices, shira_weight · scaling, [out, in])` with `scaling` 1.0 (it is
//! not saved; `set_scale` only changes it at run time). Torch adds a dense tensor and an f32
//! sparse one in the promoted dtype (f32) and rounds once into the weight's dtype, which is
//! what the engine does after this step; repeated positions (an uncoalesced COO tensor) add
//! up in saved order, as here.
//!
//! PEFT's SHiRA layer only wraps `nn.Linear`: its delta is `[out, in]` and is added to the
//! weight as stored, so a weight stored `[in, out]` (Conv1D / `fan_in_fan_out`) is refused
//! rather than guessed.

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
    peft_type: "SHIRA",
    open,
};

const PARTS: [&str; 2] = ["shira_indices", "shira_weight"];

/// Indices below this are exact in f32 (how they travel to the band math).
const EXACT_IN_F32: i64 = 1 << 24;

#[derive(Debug)]
struct Shira;

fn open(_v: &Value, _path: &Path) -> Result<Box<dyn Tuner>> {
    // `r`, `mask_type` and `random_seed` only chose the saved positions; the merge needs
    // nothing from the config.
    Ok(Box::new(Shira))
}

/// A saved integer tensor decoded to i64 (SHiRA's indices are int32; int64 is accepted).
fn decode_ints(weights: &Path, t: &TensorEntry) -> Result<Vec<i64>> {
    let b = t.bytes();
    let v = match t.dtype {
        Dtype::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        Dtype::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        other => {
            return Err(bad_part(
                weights,
                t,
                format!("is {other}; SHiRA saves its indices as int32 (or int64)"),
            ));
        }
    };
    Ok(v)
}

/// The number of saved values, checked against the indices' shape `[2, nnz]`.
fn nnz<'m>(
    weights: &Path,
    m: &'m SavedModule,
) -> Result<(usize, &'m TensorEntry, &'m TensorEntry)> {
    let idx = m.part(weights, "shira_indices")?;
    let val = m.part(weights, "shira_weight")?;
    let n = match (idx.shape.as_slice(), val.shape.as_slice()) {
        ([2, n], [k]) if n == k => *n,
        (i, v) => {
            return Err(bad_part(
                weights,
                idx,
                format!(
                    "shira_indices has shape {i:?} and shira_weight {v:?}; PEFT saves [2, n] and [n]"
                ),
            ));
        }
    };
    Ok((n, idx, val))
}

impl Tuner for Shira {
    fn name(&self) -> &'static str {
        "SHiRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in PARTS {
            if let Some(module) = rel.strip_suffix(part).and_then(|r| r.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        let Ok((_, idx, _)) = nnz(Path::new(""), m) else {
            return false;
        };
        let Ok(v) = decode_ints(Path::new(""), idx) else {
            return false;
        };
        let n = v.len() / 2;
        v[..n].iter().all(|&r| r >= 0 && (r as usize) < out_in[0])
            && v[n..].iter().all(|&c| c >= 0 && (c as usize) < out_in[1])
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let (n, idx, val) = nnz(weights, m)?;
        check_float(weights, &[val])?;
        let w = &base.weight;
        if w.transposed {
            return Err(bad_part(
                weights,
                idx,
                format!(
                    "base '{}' is stored [in, out] (Conv1D / fan_in_fan_out); PEFT's SHiRA only \
                     adapts nn.Linear and adds its [out, in] delta as stored, so lorastream refuses it",
                    w.entry.name
                ),
            ));
        }
        let shape = &w.entry.shape;
        if shape.len() != 2 {
            return Err(bad_part(
                weights,
                idx,
                format!(
                    "base '{}' has shape {shape:?}; PEFT's SHiRA adapts 2-D nn.Linear weights only",
                    w.entry.name
                ),
            ));
        }
        let v = decode_ints(weights, idx)?;
        let (rows, cols) = (&v[..n], &v[n..]);
        if let Some(k) = (0..n).find(|&k| {
            rows[k] < 0
                || rows[k] as usize >= shape[0]
                || cols[k] < 0
                || cols[k] as usize >= shape[1]
        }) {
            return Err(bad_part(
                weights,
                idx,
                format!(
                    "index {k} is ({}, {}), outside base '{}' {shape:?}",
                    rows[k], cols[k], w.entry.name
                ),
            ));
        }
        if let Some(&big) = v.iter().find(|&&i| i >= EXACT_IN_F32) {
            return Err(bad_part(
                weights,
                idx,
                format!("holds index {big}, beyond what lorastream carries exactly (2^24)"),
            ));
        }
        // The plan accepts only floating adapter tensors in a merge step (its dtype check
        // is shared with LoRA), so the indices travel as an exact f32 copy under the saved
        // tensor's own file and name (which is how coverage and reports know it).
        let as_f32: Vec<f32> = v.iter().map(|&i| i as f32).collect();
        let indices = TensorEntry::in_memory(
            idx.file.path(),
            &idx.name,
            Dtype::F32,
            idx.shape.clone(),
            bytemuck::cast_slice(&as_f32),
        )?;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Sparse {
                indices,
                values: val.clone(),
            }),
        }])
    }
}

/// `W += ΔW`, ΔW zero except at the saved positions.
#[derive(Debug)]
struct Sparse {
    /// `shira_indices` as exact f32 values (see `changes`).
    indices: TensorEntry,
    values: TensorEntry,
}

/// The saved values grouped by row (CSR), saved order kept within a row.
struct PreparedSparse {
    /// `start[r]..start[r + 1]` are row `r`'s entries in `col` / `val`.
    start: Vec<usize>,
    col: Vec<usize>,
    val: Vec<f32>,
    cols: usize,
}

impl TensorChange for Sparse {
    fn tuner(&self) -> &'static str {
        "SHiRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.indices, &self.values]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        // Exact small integers (checked in `changes`), as f32.
        let v: Vec<i64> = decode(&self.indices).iter().map(|&x| x as i64).collect();
        let vals = decode(&self.values);
        let n = vals.len();
        if v.len() != 2 * n {
            return Err(Error::Internal(format!(
                "SHiRA indices of {} values for {n} weights ('{}')",
                v.len(),
                base.base.name
            )));
        }
        let mut count = vec![0usize; base.rows + 1];
        for k in 0..n {
            let (r, c) = (v[k], v[n + k]);
            if r < 0 || r as usize >= base.rows || c < 0 || c as usize >= base.cols {
                return Err(Error::Internal(format!(
                    "SHiRA index ({r}, {c}) outside '{}' ({} x {})",
                    base.base.name, base.rows, base.cols
                )));
            }
            count[r as usize + 1] += 1;
        }
        for r in 0..base.rows {
            count[r + 1] += count[r];
        }
        let start = count.clone();
        let mut next = count;
        let mut col = vec![0usize; n];
        let mut val = vec![0f32; n];
        for k in 0..n {
            let r = v[k] as usize;
            col[next[r]] = v[n + k] as usize;
            val[next[r]] = vals[k];
            next[r] += 1;
        }
        Ok(Box::new(PreparedSparse {
            start,
            col,
            val,
            cols: base.cols,
        }))
    }
}

impl BandChange for PreparedSparse {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let r = row0 + i;
            for k in self.start[r]..self.start[r + 1] {
                row[self.col[k]] += self.val[k];
            }
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

    fn module(idx: &[i32], val: &[f32]) -> SavedModule {
        SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    "shira_indices".to_string(),
                    entry(
                        "lin0.shira_indices",
                        Dtype::I32,
                        &[2, val.len()],
                        bytemuck::cast_slice(idx),
                    ),
                ),
                (
                    "shira_weight".to_string(),
                    entry(
                        "lin0.shira_weight",
                        Dtype::F32,
                        &[val.len()],
                        bytemuck::cast_slice(val),
                    ),
                ),
            ]
            .into(),
        }
    }

    #[test]
    fn adds_values_at_saved_positions() {
        let w: Vec<f32> = (0..6).map(|i| i as f32).collect(); // [2, 3]
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", Dtype::F32, &[2, 3], bytemuck::cast_slice(&w)),
                transposed: false,
            },
            bias: None,
        };
        // (1, 2) += 10, (0, 0) += 1, and (1, 2) again += 100 (repeated positions add up).
        let m = module(&[1, 0, 1, 2, 0, 2], &[10.0, 1.0, 100.0]);
        assert!(Shira.fits(&m, [2, 3]) && !Shira.fits(&m, [3, 2]));
        let ch = Shira
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        for band in [1, 2] {
            let got = run_in_memory(&*ch[0].change, &base.weight.entry, band).unwrap();
            assert_eq!(got, [1., 1., 2., 3., 4., 115.]);
        }
        // An index outside the weight names the tensor and the base.
        let m = module(&[2, 0], &[1.0]);
        let e = Shira
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.shira_indices") && e.contains("lin0.weight"),
            "{e}"
        );
        // A weight stored [in, out] is refused.
        let mut t = base.clone();
        t.weight.transposed = true;
        let e = Shira
            .changes(
                Path::new("a"),
                &module(&[0, 0], &[1.0]),
                &BTreeMap::new(),
                &t,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("[in, out]"), "{e}");
    }
}
