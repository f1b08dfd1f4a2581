//! DEFT (`peft_type: "DEFT"`, PEFT 0.21 `tuners/deft/layer.py`): the weight's projection
//! onto a trained rank-`r` subspace is replaced, `W' = (I − Q_P·rightᵀ)·W + Q_P·R`.
//!
//! Saved per module: `deft_P` `[out, r]` and, unless PaRa (`para: true`), `deft_R`
//! `[r, in]`. With `decomposition_method: "relu"` PEFT takes `Q_P = P`, `right = relu(P)`.
//! Its merge, reproduced in its order and dtypes (`_merge_factor`, `_delta_from_factor`):
//! 1. `M = relu(P)ᵀ @ W.to(f32)` `[r, in]`: a whole-tensor statistic (each element sums a
//!    column of W over the rows), so for a weight stored `[out, in]` it is summed in
//!    [`TensorChange::prepare`] over the streamed bands, row after row; for a Conv1D weight
//!    (stored `[in, out]`, `fan_in_fan_out`) each stored row holds one column of PEFT's W
//!    and its `M` is summed inside the band;
//! 2. `delta = P @ (R·s − M)` (PaRa: `−(P @ M)`), `s = alpha / r` when `alpha` is set (and
//!    not 0), else 1; transposed back for Conv1D;
//! 3. `delta.to(W.dtype)`, then `W = W + delta` in the weight's dtype.
//!
//! The products are f32 and summed as torch's CPU matmul (MKL sgemm) sums an inner
//! dimension of at most 256: one fused multiply-add after another from 0. That matches
//! PEFT's bits for `r ≤ 256` and, for `M`, `out ≤ 256` rows; for taller weights MKL sums
//! `M` in blocks and the sequential sum differs by round-off in `M` (which `R·s − M`
//! can amplify, as PEFT's own f32 rounding does).
//!
//! `decomposition_method: "qr"` (`Q_P` from `torch.linalg.qr(P)`, LAPACK Householder QR
//! whose round-off the difference `R·s − Qᵀ·W` amplifies) is refused by name.

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
    peft_type: "DEFT",
    open,
};

#[derive(Debug)]
struct Deft {
    para: bool,
    /// `alpha` when set and non-zero (PEFT: `alpha / r if alpha else 1.0`).
    alpha: Option<f64>,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    match v.get("decomposition_method").and_then(Value::as_str) {
        None | Some("relu") => {}
        Some("qr") => {
            return Err(Error::format(
                path,
                "DEFT with decomposition_method \"qr\" is not merged: PEFT orthonormalises deft_P with \
                 torch.linalg.qr (LAPACK's Householder QR, whose round-off is the library's own) and \
                 the merge R·s − Qᵀ·W cancels, amplifying it, so the result cannot be reproduced bit for \
                 bit. decomposition_method \"relu\" merges. Nothing was written.",
            ));
        }
        Some(other) => {
            return Err(Error::format(
                path,
                format!("DEFT decomposition_method \"{other}\" is not one PEFT knows (relu, qr)"),
            ));
        }
    }
    let para = v.get("para").and_then(Value::as_bool).unwrap_or(false);
    let alpha = match v.get("alpha") {
        None | Some(Value::Null) => None,
        Some(a) => match a.as_f64() {
            // Python's `if alpha`: 0 (and -0.0) mean no alpha.
            Some(a) => Some(a).filter(|&a| a != 0.0),
            None => {
                return Err(Error::format(
                    path,
                    format!("DEFT alpha is {a}, not a number"),
                ));
            }
        },
    };
    Ok(Box::new(Deft { para, alpha }))
}

impl Tuner for Deft {
    fn name(&self) -> &'static str {
        "DEFT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in ["deft_P", "deft_R"] {
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
        let Some(p) = m.parts.get("deft_P") else {
            return false;
        };
        let p_fits = p.shape.len() == 2 && p.shape[0] == out_in[0];
        match m.parts.get("deft_R") {
            Some(r) => p_fits && r.shape.len() == 2 && r.shape[1] == out_in[1],
            None => p_fits,
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let p = m.part(weights, "deft_P")?;
        let w = &base.weight;
        let shape = w.out_in_shape();
        let (&[out, inn], &[p_out, r]) = (shape.as_slice(), p.shape.as_slice()) else {
            return Err(bad_part(
                weights,
                p,
                format!(
                    "deft_P {:?} and base '{}' {:?}: DEFT adapts 2-D (Linear, Conv1D) weights with a \
                     2-D deft_P [out, r]",
                    p.shape, w.entry.name, w.entry.shape
                ),
            ));
        };
        if p_out != out || r == 0 {
            return Err(bad_part(
                weights,
                p,
                format!(
                    "deft_P {:?} does not fit base '{}' {:?} ({out} outputs)",
                    p.shape, w.entry.name, w.entry.shape
                ),
            ));
        }
        let rr = if self.para {
            if let Some(extra) = m.parts.get("deft_R") {
                return Err(bad_part(
                    weights,
                    extra,
                    "is saved but adapter_config.json has para = true (PaRa has no deft_R)",
                ));
            }
            None
        } else {
            let rr = m.part(weights, "deft_R")?;
            if rr.shape != [r, inn] {
                return Err(bad_part(
                    weights,
                    rr,
                    format!(
                        "deft_R {:?} does not fit deft_P {:?} and base '{}' {:?} (want [{r}, {inn}])",
                        rr.shape, p.shape, w.entry.name, w.entry.shape
                    ),
                ));
            }
            Some(rr.clone())
        };
        let mut float = vec![p];
        float.extend(rr.as_ref());
        check_float(weights, &float)?;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(DeftChange {
                p: p.clone(),
                rr,
                r,
                // `R * self.deft_scaling`: a python float times an f32 tensor, in f32.
                scaling: self.alpha.map_or(1.0, |a| (a / r as f64) as f32),
                transposed: w.transposed,
            }),
        }])
    }
}

#[derive(Debug)]
struct DeftChange {
    p: TensorEntry,
    rr: Option<TensorEntry>,
    r: usize,
    scaling: f32,
    transposed: bool,
}

struct Prepared {
    /// `P` `[out, r]` and `relu(P)`.
    p: Vec<f32>,
    relu: Vec<f32>,
    /// `R·s` `[r, in]` (None: PaRa).
    rs: Option<Vec<f32>>,
    /// For a weight stored `[out, in]`: `R·s − M` (PaRa: `M`), `[r, in]`.
    d: Option<Vec<f32>>,
    r: usize,
    cols: usize,
    /// PEFT's `in` (the columns of `R`).
    inn: usize,
    dtype: Dtype,
}

impl TensorChange for DeftChange {
    fn tuner(&self) -> &'static str {
        "DEFT"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = vec![&self.p];
        v.extend(self.rr.as_ref());
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let r = self.r;
        let p = decode(&self.p);
        let relu: Vec<f32> = p.iter().map(|&x| if x > 0.0 { x } else { 0.0 }).collect();
        let rs = self.rr.as_ref().map(|t| {
            let mut v = decode(t);
            v.iter_mut().for_each(|x| *x *= self.scaling);
            v
        });
        let (out, inn) = if self.transposed {
            (base.cols, base.rows)
        } else {
            (base.rows, base.cols)
        };
        if p.len() != out * r || rs.as_ref().is_some_and(|v| v.len() != r * inn) {
            return Err(Error::Internal(format!(
                "DEFT deft_P/deft_R of {}/{:?} values for '{}' ({} x {})",
                p.len(),
                rs.as_ref().map(Vec::len),
                base.base.name,
                base.rows,
                base.cols
            )));
        }
        let d = if self.transposed {
            None
        } else {
            // M = relu(P)ᵀ @ W, its inner dimension (the rows of W) summed in row order.
            let cols = base.cols;
            let mut m = vec![0f32; r * cols];
            base.for_each_band(&mut |row0, band| {
                for (i, row) in band.chunks(cols).enumerate() {
                    let rl = &relu[(row0 + i) * r..(row0 + i + 1) * r];
                    for (k, &a) in rl.iter().enumerate() {
                        let mk = &mut m[k * cols..(k + 1) * cols];
                        for (acc, &w) in mk.iter_mut().zip(row) {
                            *acc = a.mul_add(w, *acc);
                        }
                    }
                }
            });
            if let Some(rs) = &rs {
                m.iter_mut().zip(rs).for_each(|(x, &y)| *x = y - *x);
            }
            Some(m)
        };
        Ok(Box::new(Prepared {
            p,
            relu,
            rs,
            d,
            r,
            cols: base.cols,
            inn: if self.transposed {
                base.rows
            } else {
                base.cols
            },
            dtype: base.dtype(),
        }))
    }
}

impl Prepared {
    /// One element of `P @ D`, `D` read with stride: `Σ_k P[o,k]·D[k]` as fused multiply-adds
    /// from 0, negated for PaRa (`−(P @ M)`).
    fn dot(&self, o: usize, d: impl Iterator<Item = f32>) -> f32 {
        let pk = &self.p[o * self.r..(o + 1) * self.r];
        let s = pk
            .iter()
            .zip(d)
            .fold(0f32, |acc, (&a, b)| a.mul_add(b, acc));
        if self.rs.is_some() { s } else { -s }
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let (r, cols) = (self.r, self.cols);
        let mut delta = vec![0f32; cols];
        match &self.d {
            Some(d) => {
                // Stored [out, in]: row o of P @ D.
                for (i, row) in band.chunks_mut(cols).enumerate() {
                    for (j, x) in delta.iter_mut().enumerate() {
                        *x = self.dot(row0 + i, (0..r).map(|k| d[k * cols + j]));
                    }
                    round_through(self.dtype, &mut delta);
                    row.iter_mut().zip(&delta).for_each(|(w, x)| *w += x);
                }
            }
            None => {
                // Stored [in, out]: stored row j is column j of PEFT's W (and of ΔW).
                let mut dj = vec![0f32; r];
                for (i, row) in band.chunks_mut(cols).enumerate() {
                    let j = row0 + i;
                    for (k, x) in dj.iter_mut().enumerate() {
                        let m = row
                            .iter()
                            .enumerate()
                            .fold(0f32, |acc, (o, &w)| self.relu[o * r + k].mul_add(w, acc));
                        *x = match &self.rs {
                            Some(rs) => rs[k * self.inn + j] - m,
                            None => m,
                        };
                    }
                    for (o, x) in delta.iter_mut().enumerate() {
                        *x = self.dot(o, dj.iter().copied());
                    }
                    round_through(self.dtype, &mut delta);
                    row.iter_mut().zip(&delta).for_each(|(w, x)| *w += x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};

    fn f32s(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        TensorEntry::in_memory(
            Path::new("t"),
            name,
            Dtype::F32,
            shape.to_vec(),
            bytemuck::cast_slice(v),
        )
        .unwrap()
    }

    fn merged(t: &Deft, m: &SavedModule, w: TensorEntry, transposed: bool) -> Result<Vec<f32>> {
        let base = ModuleBase {
            weight: BaseTensor {
                entry: w,
                transposed,
            },
            bias: None,
        };
        let ch = t.changes(Path::new("a"), m, &BTreeMap::new(), &base)?;
        assert_eq!(ch.len(), 1);
        run_in_memory(&*ch[0].change, &base.weight.entry, 1)
    }

    #[test]
    fn replaces_the_projection_like_peft_in_both_layouts() {
        // W [out=2, in=3], P [2, 1] = [1, -1] (relu: [1, 0]), R [1, 3], alpha 2 (s = 2).
        let w = [1., 2., 3., 4., 5., 6.];
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    "deft_P".to_string(),
                    f32s("lin0.deft_P", &[2, 1], &[1., -1.]),
                ),
                (
                    "deft_R".to_string(),
                    f32s("lin0.deft_R", &[1, 3], &[0.5, 0., -1.]),
                ),
            ]
            .into(),
        };
        let t = Deft {
            para: false,
            alpha: Some(2.0),
        };
        // M = relu(P)ᵀ W = [1, 2, 3]; R·s − M = [0, -2, -5]; ΔW = P @ that.
        let want = [1., 0., -2., 4., 7., 11.];
        let got = merged(&t, &m, f32s("lin0.weight", &[2, 3], &w), false).unwrap();
        assert_eq!(got, want);
        // The same module on a Conv1D (stored [in, out]) gives the transpose.
        let wt = [1., 4., 2., 5., 3., 6.];
        let got = merged(&t, &m, f32s("lin0.weight", &[3, 2], &wt), true).unwrap();
        assert_eq!(got, [1., 4., 0., 7., -2., 11.]);
        // PaRa: ΔW = −P @ M.
        let mut pm = m.clone();
        pm.parts.remove("deft_R");
        let para = Deft {
            para: true,
            alpha: None,
        };
        let got = merged(&para, &pm, f32s("lin0.weight", &[2, 3], &w), false).unwrap();
        assert_eq!(got, [0., 0., 0., 5., 7., 9.]);
        // A deft_R that does not fit names the tensor.
        let mut bad = m.clone();
        bad.parts
            .insert("deft_R".into(), f32s("lin0.deft_R", &[1, 2], &[0., 0.]));
        let e = merged(&t, &bad, f32s("lin0.weight", &[2, 3], &w), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.deft_R") && e.contains("lin0.weight"),
            "{e}"
        );
    }

    #[test]
    fn qr_is_refused_by_name() {
        let e = open(
            &serde_json::json!({"decomposition_method": "qr"}),
            Path::new("adapter_config.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("qr") && e.contains("decomposition_method"),
            "{e}"
        );
    }
}
