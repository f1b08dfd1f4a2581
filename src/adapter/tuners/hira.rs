//! HiRA (`peft_type: "HIRA"`): a Hadamard high-rank update, `W' = W + W ⊙ (B @ A)`, PEFT
//! 0.21 `tuners/hira/layer.py`.
//!
//! Saved per module: `hira_A` `[r, in]` and `hira_B` `[out, r]` (Linear, transformers
//! Conv1D), `hira_embedding_A` `[r, num_embeddings]` and `hira_embedding_B` `[dim, r]`
//! (Embedding), or `hira_A` `[r, in, k…]` and `hira_B` `[out, r, 1…]` (Conv1d/2d/3d).
//! Merge, as PEFT does it: `delta = B @ A` in f32 (PEFT's f32 factors; for a conv
//! `Σ_r B[o, r] · A[r, i, k…]`, PEFT's 1×1 matmul or its kernel-1 convolution), transposed
//! to the stored layout for Conv1D (`fan_in_fan_out`) and Embedding, rounded into the
//! weight's dtype (`.to(weight.dtype)`); then, in that dtype, `W + (W * delta)` (the product
//! rounded, then the sum). `delta` is formed per band (the band's rows of `B @ A` by sgemm),
//! never whole. Where torch's GEMM sums the `r` products in another order the f32 delta may
//! differ by an ulp, which the Hadamard product scales down by `|W|`.
//!
//! Refused by name: factors that do not fit the weight (including grouped convolutions,
//! which PEFT refuses too), and a Conv3d whose first two kernel dims are 1 but not the
//! third (PEFT's 1×1 branch then multiplies mis-shaped factors).

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
    peft_type: "HIRA",
    open,
};

#[derive(Debug)]
struct Hira;

fn open(_v: &Value, _path: &Path) -> Result<Box<dyn Tuner>> {
    // r is the factors' shape and hira_dropout is training-only: the saved tensors say all.
    Ok(Box::new(Hira))
}

const PARTS: [&str; 4] = ["hira_embedding_A", "hira_embedding_B", "hira_A", "hira_B"];

impl Tuner for Hira {
    fn name(&self) -> &'static str {
        "HiRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for p in PARTS {
            if let Some(module) = rel.strip_suffix(p).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part: p };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        // An Embedding's layout is fixed ([num, dim], PEFT transposes B @ A onto it): it
        // never needs the plan's evidence, so it reports no fit and `changes` checks it.
        match (m.parts.get("hira_A"), m.parts.get("hira_B")) {
            (Some(a), Some(b)) if a.shape.len() == 2 && b.shape.len() == 2 => {
                b.shape[0] == out_in[0] && a.shape[1] == out_in[1] && a.shape[0] == b.shape[1]
            }
            _ => false,
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let w = &base.weight;
        let stored = &w.entry.shape;
        let embedding =
            m.parts.contains_key("hira_embedding_A") || m.parts.contains_key("hira_embedding_B");
        let (a, b) = if embedding {
            (
                m.part(weights, "hira_embedding_A")?,
                m.part(weights, "hira_embedding_B")?,
            )
        } else {
            (m.part(weights, "hira_A")?, m.part(weights, "hira_B")?)
        };
        check_float(weights, &[a, b])?;
        let misfit = |want: String| {
            bad_part(
                weights,
                a,
                format!(
                    "with {} {:?} does not fit base '{}' {:?}: {want}",
                    b.name, b.shape, w.entry.name, stored
                ),
            )
        };
        let r = a.shape.first().copied().unwrap_or(0);
        let layout = if embedding {
            // A [r, num], B [dim, r]; stored [num, dim] = (B @ A)ᵀ.
            match (a.shape.as_slice(), b.shape.as_slice(), stored.as_slice()) {
                (&[_, num], &[dim, r2], &[n, d]) if r2 == r && num == n && dim == d => {
                    Layout::Transposed
                }
                _ => {
                    return Err(misfit(
                        "an Embedding needs A [r, num] and B [dim, r]".into(),
                    ));
                }
            }
        } else if stored.len() == 2 {
            let [o, i] = match w.out_in_shape().as_slice() {
                &[o, i] => [o, i],
                _ => return Err(misfit("a 2-D weight".into())),
            };
            if a.shape != [r, i] || b.shape != [o, r] {
                return Err(misfit(format!("A [r, {i}] and B [{o}, r]")));
            }
            if w.transposed {
                Layout::Transposed
            } else {
                Layout::Normal
            }
        } else {
            // Conv [out, in, k…]: A [r, in, k…], B [out, r, 1…].
            let (o, i, k) = (stored[0], stored.get(1).copied().unwrap_or(0), &stored[2..]);
            let a_ok = a.shape.len() == stored.len() && a.shape[1] == i && a.shape[2..] == *k;
            let b_ok = b.shape.len() == stored.len()
                && b.shape[0] == o
                && b.shape[1] == r
                && b.shape[2..].iter().all(|&d| d == 1);
            if !a_ok || !b_ok {
                return Err(misfit(format!(
                    "a convolution needs A [r, {i}, {k:?}…] and B [{o}, r, 1…] (grouped convolutions \
                     are refused by PEFT too)"
                )));
            }
            if k.len() == 3 && k[0] == 1 && k[1] == 1 && k[2] != 1 {
                return Err(misfit(
                    "a Conv3d kernel (1, 1, k) with k > 1: PEFT 0.21's 1×1 branch multiplies mis-shaped \
                     factors there"
                        .into(),
                ));
            }
            Layout::Normal
        };
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Hadamard {
                a: a.clone(),
                b: b.clone(),
                layout,
            }),
        }])
    }
}

/// How `B @ A` ([out, in·k]) lies in the stored tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// Stored [out, in, k…]: a band's rows are `B[rows] @ A`.
    Normal,
    /// Stored [in, out] (Conv1D, Embedding): a band's rows are `Aᵀ[rows] @ Bᵀ`.
    Transposed,
}

/// `W + W ⊙ (B @ A)`.
#[derive(Debug)]
struct Hadamard {
    a: TensorEntry,
    b: TensorEntry,
    layout: Layout,
}

struct PreparedHadamard {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    rows: usize,
    cols: usize,
    layout: Layout,
    dtype: Dtype,
}

impl TensorChange for Hadamard {
    fn tuner(&self) -> &'static str {
        "HiRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.a, &self.b]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let r = self.a.shape.first().copied().unwrap_or(0);
        let (a, b) = (decode(&self.a), decode(&self.b));
        // Normal: A [r, cols], B [rows, r]; Transposed: A [r, rows], B [cols, r].
        let (a_want, b_want) = match self.layout {
            Layout::Normal => (r * base.cols, base.rows * r),
            Layout::Transposed => (r * base.rows, base.cols * r),
        };
        if a.len() != a_want || b.len() != b_want {
            return Err(Error::Internal(format!(
                "HiRA factors {:?} / {:?} for '{}' ({} x {})",
                self.a.shape, self.b.shape, base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(PreparedHadamard {
            a,
            b,
            r,
            rows: base.rows,
            cols: base.cols,
            layout: self.layout,
            dtype: base.dtype(),
        }))
    }
}

impl BandChange for PreparedHadamard {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let n = band.len() / self.cols;
        let mut d = vec![0f32; band.len()];
        let (r, cols) = (self.r, self.cols);
        // SAFETY: Normal: B rows [row0, row0 + n) of [rows, r] times A [r, cols]; Transposed:
        // Aᵀ rows (columns row0… of A [r, rows]) times Bᵀ (B [cols, r] read column-wise);
        // `d` is [n, cols]; every index stays inside the checked lengths.
        unsafe {
            match self.layout {
                Layout::Normal => matrixmultiply::sgemm(
                    n,
                    r,
                    cols,
                    1.0,
                    self.b[row0 * r..].as_ptr(),
                    r as isize,
                    1,
                    self.a.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    d.as_mut_ptr(),
                    cols as isize,
                    1,
                ),
                Layout::Transposed => matrixmultiply::sgemm(
                    n,
                    r,
                    cols,
                    1.0,
                    self.a[row0..].as_ptr(),
                    1,
                    self.rows as isize,
                    self.b.as_ptr(),
                    1,
                    r as isize,
                    0.0,
                    d.as_mut_ptr(),
                    cols as isize,
                    1,
                ),
            }
        }
        // delta.to(W.dtype); W * delta in the dtype; the engine rounds W + that.
        round_through(self.dtype, &mut d);
        for (x, &w) in d.iter_mut().zip(band.iter()) {
            *x *= w;
        }
        round_through(self.dtype, &mut d);
        for (w, &x) in band.iter_mut().zip(&d) {
            *w += x;
        }
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

    fn module(a: (&str, &[usize], &[f32]), b: (&str, &[usize], &[f32])) -> SavedModule {
        SavedModule {
            name: "m".into(),
            parts: [a, b]
                .iter()
                .map(|(p, s, v)| (p.to_string(), entry(&format!("m.{p}"), s, v)))
                .collect(),
        }
    }

    fn run(m: &SavedModule, w: &[f32], shape: &[usize], transposed: bool) -> Result<Vec<f32>> {
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("m.weight", shape, w),
                transposed,
            },
            bias: None,
        };
        let ch = Hira.changes(Path::new("a"), m, &BTreeMap::new(), &base)?;
        run_in_memory(&*ch[0].change, &base.weight.entry, 1)
    }

    #[test]
    fn hadamard_in_every_layout() {
        // B @ A = [[1, 2, 3], [2, 4, 6]] (out 2, in 3, r 1).
        let a: &[f32] = &[1., 2., 3.];
        let b: &[f32] = &[1., 2.];
        let w = [1., 1., 1., 2., 2., 2.];
        let m = module(("hira_A", &[1, 3], a), ("hira_B", &[2, 1], b));
        // Linear [out, in]: W + W*delta.
        assert_eq!(
            run(&m, &w, &[2, 3], false).unwrap(),
            [2., 3., 4., 6., 10., 14.]
        );
        // Conv1D stored [in, out]: delta transposed.
        let wt = [1., 2., 1., 2., 1., 2.];
        assert_eq!(
            run(&m, &wt, &[3, 2], true).unwrap(),
            [2., 6., 3., 10., 4., 14.]
        );
        // Embedding [num 3, dim 2]: A [r, num], B [dim, r], delta = (B @ A)ᵀ.
        let e = module(
            ("hira_embedding_A", &[1, 3], a),
            ("hira_embedding_B", &[2, 1], b),
        );
        assert_eq!(
            run(&e, &wt, &[3, 2], false).unwrap(),
            [2., 6., 3., 10., 4., 14.]
        );
        // Conv1d [out 2, in 1, k 3]: A [r, in, k], B [out, r, 1].
        let c = module(("hira_A", &[1, 1, 3], a), ("hira_B", &[2, 1, 1], b));
        assert_eq!(
            run(&c, &w, &[2, 1, 3], false).unwrap(),
            [2., 3., 4., 6., 10., 14.]
        );
    }

    #[test]
    fn refuses_factors_that_do_not_fit() {
        let m = module(
            ("hira_A", &[1, 2], &[1., 2.]),
            ("hira_B", &[2, 1], &[1., 2.]),
        );
        let e = run(&m, &[0.; 6], &[2, 3], false).unwrap_err().to_string();
        assert!(e.contains("m.hira_A") && e.contains("m.weight"), "{e}");
        let c = module(
            ("hira_A", &[1, 1, 1, 1, 2], &[1., 2.]),
            ("hira_B", &[2, 1, 1, 1, 1], &[1., 2.]),
        );
        let e = run(&c, &[0.; 4], &[2, 1, 1, 1, 2], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(1, 1, k)"), "{e}");
    }
}
