//! HRA (`peft_type: "HRA"`): a chain of `r` Householder reflections applied to the input
//! side of each weight row (PEFT 0.21 `tuners/hra/layer.py`).
//!
//! Saved: `<module>.hra_u`, `[in, r]` (Linear) or `[in·k·k, r]` (Conv2d): the reflection
//! vectors as columns. Merge, as PEFT does it, all in f32 (PEFT upcasts the adapter and casts
//! the weight to f32): `R = I`, then for each column `uᵢ / ‖uᵢ‖` (norms over `dim=0`)
//! `R ← R - ((2R)·uᵢ)·uᵢᵀ`; with `apply_GS` the columns are first made orthonormal by
//! Gram-Schmidt and `R = I - (2U)·Uᵀ`. Then `W ← W · R` (a Conv2d weight viewed
//! `[out, in·k·k]`), rounded once into the weight's dtype. No bias change.
//!
//! `R` (`[in, in]`, f32) is built once per tensor; each band is one f32 GEMM with it
//! (sequential FMA over `k`, as MKL's sgemm runs at these sizes). Where we differ: PEFT's
//! matrix-vector products `(2R)·uᵢ` run through MKL's sgemv, whose lane-parallel sums we do
//! not reproduce bit for bit (we sum in order with FMA), and the reflections' cancellation
//! magnifies those ulps in `W · R`: see the ULP_OVERRIDE entries in fixtures/tuner_rows/hra.py.
//! Grouped convolutions, non-square kernels and transformers Conv1D are refused (PEFT
//! refuses or cannot merge them).

use super::oft::cfg_bool;
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
    peft_type: "HRA",
    open,
};

const PART: &str = "hra_u";

#[derive(Debug)]
struct Hra {
    apply_gs: bool,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    Ok(Box::new(Hra {
        apply_gs: cfg_bool(v, "apply_GS", false, path)?,
    }))
}

impl Tuner for Hra {
    // PEFT wraps nn.Linear / Conv / Embedding only: a 2-D weight is stored [out, in].
    fn adapts_conv1d(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "HRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &[PART])
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        m.parts
            .get(PART)
            .is_some_and(|u| u.shape.len() == 2 && u.shape[0] == out_in[1])
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let u = m.part(weights, PART)?;
        check_float(weights, &[u])?;
        let w = &base.weight;
        let s = w.entry.shape.as_slice();
        let refuse = |why: String| bad_part(weights, u, why);
        if w.transposed {
            return Err(refuse(format!(
                "base '{}' {s:?} is stored [in, out] (a transformers Conv1D / fan_in_fan_out); \
                 PEFT's HRA adapts only Linear and Conv2d layers",
                w.entry.name
            )));
        }
        let cols = match s {
            [_, c] => *c,
            [_, c, kh, kw] if kh == kw => c * kh * kw,
            _ => {
                return Err(refuse(format!(
                    "base '{}' has shape {s:?}; HRA merges Linear [out, in] and Conv2d \
                     [out, in, k, k] (square kernel) weights",
                    w.entry.name
                )));
            }
        };
        match u.shape.as_slice() {
            [n, r] if *n == cols && *r > 0 => {}
            other => {
                return Err(refuse(format!(
                    "has shape {other:?}, but base '{}' {s:?} needs [{cols}, r] with r > 0 \
                     (a grouped convolution does not fit: PEFT refuses HRA on it too)",
                    w.entry.name
                )));
            }
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Reflect {
                u: u.clone(),
                apply_gs: self.apply_gs,
            }),
        }])
    }
}

#[derive(Debug)]
struct Reflect {
    u: TensorEntry,
    apply_gs: bool,
}

/// Sequential f32 dot product with FMA (a BLAS-style sum in order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |acc, (x, y)| x.mul_add(*y, acc))
}

/// PEFT's HRA matrix `R` (`n x n`, row-major) from `u` (`[n, r]`, row-major).
fn reflection(u: &[f32], n: usize, r: usize, apply_gs: bool) -> Vec<f32> {
    let col = |j: usize| -> Vec<f32> { (0..n).map(|i| u[i * r + j]).collect() };
    // `x.norm()` / `x.norm(dim=0)`: for these strided columns ATen sums the squares in
    // order (a rounded multiply, then add), then takes the square root.
    let norm = |x: &[f32]| x.iter().fold(0f32, |s, v| s + v * v).sqrt();
    let mut rm = vec![0f32; n * n];
    if apply_gs {
        let mut basis: Vec<Vec<f32>> = Vec::with_capacity(r);
        for i in 0..r {
            let mut ui = col(i);
            for wj in &basis {
                let c = dot(wj, &ui);
                ui.iter_mut().zip(wj).for_each(|(x, w)| *x -= c * w);
            }
            let nv = norm(&ui);
            ui.iter_mut().for_each(|x| *x /= nv);
            basis.push(ui);
        }
        // I - (2U)·Uᵀ: the k = r sums in order with FMA.
        for i in 0..n {
            for j in 0..n {
                let s = basis
                    .iter()
                    .fold(0f32, |acc, w| (2.0 * w[i]).mul_add(w[j], acc));
                rm[i * n + j] = if i == j { 1.0 - s } else { 0.0 - s };
            }
        }
        return rm;
    }
    for i in 0..n {
        rm[i * n + i] = 1.0;
    }
    let mut v = vec![0f32; n];
    for j in 0..r {
        let mut uj = col(j);
        let nv = norm(&uj);
        uj.iter_mut().for_each(|x| *x /= nv);
        // v = (2R)·u (2R is exact), then R - v·uᵀ (each entry one rounded product).
        for (i, vi) in v.iter_mut().enumerate() {
            *vi = rm[i * n..(i + 1) * n]
                .iter()
                .zip(&uj)
                .fold(0f32, |acc, (x, u)| (2.0 * x).mul_add(*u, acc));
        }
        for i in 0..n {
            for k in 0..n {
                rm[i * n + k] -= v[i] * uj[k];
            }
        }
    }
    rm
}

impl TensorChange for Reflect {
    fn tuner(&self) -> &'static str {
        "HRA"
    }
    fn effect(&self) -> Effect {
        Effect::Transform
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.u]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (n, r) = match self.u.shape.as_slice() {
            [n, r] => (*n, *r),
            s => {
                return Err(Error::Internal(format!(
                    "HRA hra_u of shape {s:?} for '{}'",
                    base.base.name
                )));
            }
        };
        if n != base.cols {
            return Err(Error::Internal(format!(
                "HRA hra_u of {n} rows for '{}' ({} x {})",
                base.base.name, base.rows, base.cols
            )));
        }
        let u = decode(&self.u);
        Ok(Box::new(DenseRight {
            m: reflection(&u, n, r, self.apply_gs),
            n,
        }))
    }
}

/// Each band row times a dense `n x n` matrix: `W ← W · M`.
struct DenseRight {
    m: Vec<f32>,
    n: usize,
}

impl BandChange for DenseRight {
    fn apply(&self, _row0: usize, band: &mut [f32]) {
        let n = self.n;
        if n == 0 {
            return;
        }
        let rows = band.len() / n;
        let mut out = vec![0f32; rows * n];
        // SAFETY: the band is rows x n, `m` is n x n and `out` rows x n, all row-major.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                n,
                n,
                1.0,
                band.as_ptr(),
                n as isize,
                1,
                self.m.as_ptr(),
                n as isize,
                1,
                0.0,
                out.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        band.copy_from_slice(&out);
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
    fn reflections_match_the_closed_form_and_gram_schmidt_agrees_for_orthogonal_u() {
        // One reflection along e0 + e1 over 3 inputs: R = I - u·uᵀ·2/‖u‖².
        let u = [1.0f32, 1.0, 0.0]; // [3, 1]
        let r = reflection(&u, 3, 1, false);
        let want = [0.0f32, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        for (g, w) in r.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{r:?}");
        }
        // Two orthogonal vectors: the chain and Gram-Schmidt give the same R.
        let u = [1.0f32, 0.0, 0.0, 2.0, 0.0, 0.0]; // [3, 2], columns e0 and 2·e1
        let a = reflection(&u, 3, 2, false);
        let b = reflection(&u, 3, 2, true);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} {b:?}");
        }
    }

    #[test]
    fn merges_w_times_r_and_names_tensors_on_mismatch() {
        let w: Vec<f32> = (0..6).map(|i| i as f32 + 1.0).collect(); // [2, 3]
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 3], &w),
                transposed: false,
            },
            bias: None,
        };
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(
                PART.to_string(),
                entry("lin0.hra_u", &[3, 1], &[1.0, 1.0, 0.0]),
            )]
            .into(),
        };
        let t = Hra { apply_gs: false };
        assert!(t.fits(&m, [2, 3]) && !t.fits(&m, [3, 2]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        // The reflection swaps and negates the first two inputs (1/sqrt(2) is not exact in
        // f32, hence the tolerance).
        for (g, w) in got.iter().zip([-2.0f32, -1.0, 3.0, -5.0, -4.0, 6.0]) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(PART.to_string(), entry("lin0.hra_u", &[2, 1], &[1.0, 1.0]))].into(),
        };
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin0.hra_u") && e.contains("lin0.weight"), "{e}");
    }
}
