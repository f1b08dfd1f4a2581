//! PEANuT (`peft_type: "PEANUT"`, PEFT 0.21 `tuners/peanut/layer.py`): a small network fed
//! with the base weight itself, whose output is the delta, so the delta depends on W.
//!
//! Saved per module: `peanut_A.weight` `[r, out]`, `peanut_B.weight` `[out, r]` and `depth`
//! pairs `peanut_encoders.<i>.weight` / `peanut_decoders.<i>.weight` `[r, r]`. PEFT's merge
//! (`_compute_delta_weight` on the weight before the merge), reproduced in its order:
//! 1. `h = act(Wᵀ.to(f32) @ Aᵀ)` `[in, r]`: row `i` of `h` sums column `i` of W over the rows,
//!    a whole-tensor statistic, so [`TensorChange::prepare`] sums it over the streamed bands;
//! 2. `depth` times: keep `h` as a residual, `h = act(h @ Eᵢᵀ)`; then `depth` times
//!    `h = act(h @ Dᵢᵀ) + residual[depth − 1 − i]`;
//! 3. `ΔW = ((h @ Bᵀ) · scaling)ᵀ`, rounded to the weight's dtype, then added in it.
//!
//! Products are f32 and summed as torch's CPU matmul (MKL sgemm) mostly sums an inner
//! dimension of at most 256: fused multiply-adds one after another from 0. That gives PEFT's
//! bits for every depth-0 row of the fixtures; MKL's small-matrix dispatch sums some shapes
//! otherwise (the `[in=10, r=2] @ [2, 2]` encoder/decoder products without FMA), which the
//! depth-1 fixture row shows as 2 ulp in f32 (ULP_OVERRIDE in the rows file); above 256 rows
//! MKL sums step 1 in blocks, again a round-off difference. `act_fn` `relu` is exact; `gelu`
//! (exact erf form, `x·0.5·(1 + erf(x·√½))` in f32) calls the C library's `erff`, as ATen's
//! scalar kernel does; torch runs its vector kernel (a polynomial erf with SLEEF's `expf`)
//! on all but the last `< 2·width` elements of each activation, so for `in·r` above 32
//! (AVX-512) a gelu delta differs from PEFT's by round-off. Other activations are refused
//! by name.
//! PEFT wraps nn.Linear only, so a weight stored `[in, out]` (Conv1D) is refused.

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
    peft_type: "PEANUT",
    open,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Act {
    Relu,
    Gelu,
}

impl Act {
    fn apply(self, v: &mut [f32]) {
        match self {
            // torch.relu keeps NaN.
            Act::Relu => v.iter_mut().for_each(|x| {
                if *x < 0.0 {
                    *x = 0.0
                }
            }),
            // ATen's scalar GELU: x * 0.5 * (1 + erf(x * M_SQRT1_2)), in f32.
            Act::Gelu => v
                .iter_mut()
                .for_each(|x| *x = *x * 0.5 * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2))),
        }
    }
}

/// The C library's `erff`: the one ATen's scalar kernel calls (`std::erf(float)`).
fn erf(x: f32) -> f32 {
    unsafe extern "C" {
        fn erff(x: f32) -> f32;
    }
    // SAFETY: erff is a pure function of its argument in the C math library std links.
    unsafe { erff(x) }
}

#[derive(Debug)]
struct Peanut {
    act: Act,
    depth: usize,
    scaling: f32,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let act = match v.get("act_fn").and_then(Value::as_str).unwrap_or("relu") {
        "relu" => Act::Relu,
        "gelu" => Act::Gelu,
        other => {
            return Err(Error::format(
                path,
                format!(
                    "PEANuT act_fn \"{other}\" is not merged: lorastream reproduces torch's relu and \
                     (exact) gelu only. Nothing was written."
                ),
            ));
        }
    };
    let depth = match v.get("depth") {
        None | Some(Value::Null) => 0,
        Some(d) => d.as_u64().ok_or_else(|| {
            Error::format(path, format!("depth is {d}, not a non-negative integer"))
        })? as usize,
    };
    let scaling = match v.get("scaling") {
        None | Some(Value::Null) => 1.0,
        Some(s) => s
            .as_f64()
            .ok_or_else(|| Error::format(path, format!("scaling is {s}, not a number")))?
            as f32,
    };
    Ok(Box::new(Peanut {
        act,
        depth,
        scaling,
    }))
}

impl Tuner for Peanut {
    fn name(&self) -> &'static str {
        "PEANuT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for marker in [
            ".peanut_A.",
            ".peanut_B.",
            ".peanut_encoders.",
            ".peanut_decoders.",
        ] {
            if let Some(at) = rel.find(marker)
                && rel.ends_with(".weight")
                && at > 0
            {
                return SavedKey::Part {
                    module: &rel[..at],
                    part: &rel[at + 1..],
                };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        // A and B are sized by the outputs only.
        match (
            m.parts.get("peanut_A.weight"),
            m.parts.get("peanut_B.weight"),
        ) {
            (Some(a), Some(b)) => {
                a.shape.len() == 2 && a.shape[1] == out_in[0] && b.shape.first() == Some(&out_in[0])
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
        let a = m.part(weights, "peanut_A.weight")?;
        let b = m.part(weights, "peanut_B.weight")?;
        let w = &base.weight;
        let &[out, _] = w.entry.shape.as_slice() else {
            return Err(bad_part(
                weights,
                a,
                format!(
                    "base '{}' {:?} is not a 2-D nn.Linear weight; PEFT's PEANuT adapts nn.Linear",
                    w.entry.name, w.entry.shape
                ),
            ));
        };
        if w.transposed {
            return Err(bad_part(
                weights,
                a,
                format!(
                    "base '{}' {:?} is stored [in, out] (Conv1D); PEFT's PEANuT adapts nn.Linear only",
                    w.entry.name, w.entry.shape
                ),
            ));
        }
        let r = a.shape.first().copied().unwrap_or(0);
        if a.shape != [r, out] || b.shape != [out, r] || r == 0 {
            return Err(bad_part(
                weights,
                a,
                format!(
                    "peanut_A {:?} and peanut_B {:?} do not fit base '{}' {:?} (want [r, {out}] and \
                     [{out}, r])",
                    a.shape, b.shape, w.entry.name, w.entry.shape
                ),
            ));
        }
        let mut layers = Vec::with_capacity(2 * self.depth);
        for side in ["encoders", "decoders"] {
            for i in 0..self.depth {
                let t = m.part(weights, &format!("peanut_{side}.{i}.weight"))?;
                if t.shape != [r, r] {
                    return Err(bad_part(
                        weights,
                        t,
                        format!("has shape {:?}, not [{r}, {r}]", t.shape),
                    ));
                }
                layers.push(t.clone());
            }
        }
        let expected = 2 + 2 * self.depth;
        if m.parts.len() != expected {
            return Err(Error::format(
                weights,
                format!(
                    "PEANuT module '{}' has {} tensors ({:?}) but depth = {} means {expected}: A, B and \
                     {} encoder/decoder pairs",
                    m.name,
                    m.parts.len(),
                    m.parts.keys().collect::<Vec<_>>(),
                    self.depth,
                    self.depth
                ),
            ));
        }
        let mut all = vec![a, b];
        all.extend(layers.iter());
        check_float(weights, &all)?;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(PeanutChange {
                a: a.clone(),
                b: b.clone(),
                layers,
                r,
                depth: self.depth,
                act: self.act,
                scaling: self.scaling,
            }),
        }])
    }
}

#[derive(Debug)]
struct PeanutChange {
    a: TensorEntry,
    b: TensorEntry,
    /// Encoders 0..depth, then decoders 0..depth, each `[r, r]`.
    layers: Vec<TensorEntry>,
    r: usize,
    depth: usize,
    act: Act,
    scaling: f32,
}

struct Prepared {
    /// The network's output `h` `[in, r]`.
    h: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    scaling: f32,
    cols: usize,
    dtype: Dtype,
}

/// `x @ wᵀ` for one row `x` of `r` values (`w` `[r, r]`): fused multiply-adds from 0.
fn linear(x: &[f32], w: &[f32], out: &mut [f32]) {
    let r = x.len();
    for (k, o) in out.iter_mut().enumerate() {
        *o = w[k * r..(k + 1) * r]
            .iter()
            .zip(x)
            .fold(0f32, |acc, (&wk, &xk)| xk.mul_add(wk, acc));
    }
}

impl TensorChange for PeanutChange {
    fn tuner(&self) -> &'static str {
        "PEANUT"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = vec![&self.a, &self.b];
        v.extend(self.layers.iter());
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (r, rows, cols) = (self.r, base.rows, base.cols);
        let a = decode(&self.a);
        if a.len() != r * rows {
            return Err(Error::Internal(format!(
                "PEANuT peanut_A of {} values for '{}' ({rows} x {cols})",
                a.len(),
                base.base.name
            )));
        }
        // h[i, k] = Σ_o W[o, i]·A[k, o], summed over the rows in order.
        let mut h = vec![0f32; cols * r];
        base.for_each_band(&mut |row0, band| {
            for (i, row) in band.chunks(cols).enumerate() {
                let o = row0 + i;
                for (hi, &wv) in h.chunks_mut(r).zip(row) {
                    for (k, acc) in hi.iter_mut().enumerate() {
                        *acc = wv.mul_add(a[k * rows + o], *acc);
                    }
                }
            }
        });
        self.act.apply(&mut h);
        let layers: Vec<Vec<f32>> = self.layers.iter().map(decode).collect();
        let (enc, dec) = layers.split_at(self.depth);
        let mut residuals = Vec::with_capacity(self.depth);
        let mut tmp = vec![0f32; r];
        for e in enc {
            residuals.push(h.clone());
            for hi in h.chunks_mut(r) {
                linear(hi, e, &mut tmp);
                hi.copy_from_slice(&tmp);
            }
            self.act.apply(&mut h);
        }
        for (d, res) in dec.iter().zip(residuals.iter().rev()) {
            for hi in h.chunks_mut(r) {
                linear(hi, d, &mut tmp);
                hi.copy_from_slice(&tmp);
            }
            self.act.apply(&mut h);
            h.iter_mut().zip(res).for_each(|(x, &y)| *x += y);
        }
        Ok(Box::new(Prepared {
            h,
            b: decode(&self.b),
            r,
            scaling: self.scaling,
            cols,
            dtype: base.dtype(),
        }))
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let r = self.r;
        let mut delta = vec![0f32; self.cols];
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let bo = &self.b[(row0 + i) * r..(row0 + i + 1) * r];
            for (d, hi) in delta.iter_mut().zip(self.h.chunks(r)) {
                let s = hi
                    .iter()
                    .zip(bo)
                    .fold(0f32, |acc, (&x, &y)| x.mul_add(y, acc));
                *d = s * self.scaling;
            }
            round_through(self.dtype, &mut delta);
            row.iter_mut().zip(&delta).for_each(|(w, d)| *w += d);
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

    #[test]
    fn delta_is_the_network_of_the_weight() {
        // W [out=2, in=2], r = 1, depth 1, relu, scaling 2.
        let w = [1., -2., 3., 4.];
        let base = ModuleBase {
            weight: BaseTensor {
                entry: f32s("lin0.weight", &[2, 2], &w),
                transposed: false,
            },
            bias: None,
        };
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                ("peanut_A.weight", f32s("a", &[1, 2], &[1., 1.])),
                ("peanut_B.weight", f32s("b", &[2, 1], &[1., -1.])),
                ("peanut_encoders.0.weight", f32s("e", &[1, 1], &[2.])),
                ("peanut_decoders.0.weight", f32s("d", &[1, 1], &[-1.])),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        let t = Peanut {
            act: Act::Relu,
            depth: 1,
            scaling: 2.0,
        };
        assert!(t.fits(&m, [2, 2]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        // h0 = relu(Wᵀ Aᵀ) = relu([1+3, -2+4]) = [4, 2]; enc: relu(2h) = [8, 4];
        // dec: relu(-h) + h0 = [4, 2]; ΔW[o, i] = 2·B[o]·h[i] = [[8, 4], [-8, -4]].
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [9., 2., -5., 0.]);
        // A missing decoder is named.
        let mut m2 = m.clone();
        m2.parts.remove("peanut_decoders.0.weight");
        let e = t
            .changes(Path::new("a"), &m2, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("peanut_decoders.0.weight"), "{e}");
        assert_eq!(
            t.classify("lin0.peanut_encoders.0.weight"),
            SavedKey::Part {
                module: "lin0",
                part: "peanut_encoders.0.weight"
            }
        );
    }

    #[test]
    fn gelu_is_the_exact_erf_form() {
        let mut v = [-1.0f32, 0.0, 1.0, 3.0];
        Act::Gelu.apply(&mut v);
        let want = [-0.158_655_26f32, 0.0, 0.841_344_7, 2.995_950_5];
        for (g, w) in v.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6, "{v:?}");
        }
    }
}
