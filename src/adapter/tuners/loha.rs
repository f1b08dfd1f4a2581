//! LoHa (`peft_type: "LOHA"`): the Hadamard product of two low-rank products
//! (PEFT 0.21 `tuners/loha/layer.py`, merge in `tuners/lycoris_utils.py`).
//!
//! Saved per module: `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, and for a
//! convolution with `use_effective_conv2d` (kernel larger than 1) also the Tucker cores
//! `hada_t1`, `hada_t2` (`[r, r, kh, kw]`, Conv1d `[r, r, k, 1]`). PEFT's merge, all in f32
//! (the adapter is f32 after loading, whatever the base dtype):
//!
//! - plain: `ΔW = ((w1_a @ w1_b) * (w2_a @ w2_b)) * s` with `w*_a [out, r]`, `w*_b [r, in·k…]`,
//!   reshaped to the weight's shape;
//! - Tucker: `ΔW = (einsum("ijkl,jr,ip->prkl", t1, w1_b, w1_a) * einsum(… t2, w2_b, w2_a)) * s`
//!   with `w*_a [r, out]`, `w*_b [r, in]`; torch contracts left to right (no opt_einsum),
//!   first over `j` (t with w_b) then over `i` (with w_a), each contraction one `bmm`;
//! - `s = torch.tensor(alpha / r)` (f32 of the f64 quotient), r and alpha after
//!   `rank_pattern` / `alpha_pattern`; then `W += ΔW` in place (one rounding into W's dtype).
//!
//! Here the rows of ΔW are made per band with the same products: `mm` runs on MKL's sgemm,
//! whose per-element sums are sequential fused multiply-adds, as `matrixmultiply`'s are, up
//! to k = 256 (beyond it MKL's own blocking of k is reproduced, measured up to k = 768; past
//! that an element may differ by an ulp of ΔW); a `bmm` of fewer than 400 multiply-adds
//! runs on torch's own loop (separate multiply and add, in order), [`Product::Naive`]. The Tucker intermediate
//! `t1 ×_j w1_b` (`[r, in, kh, kw]`, no output dim) is made once per tensor.
//! `rank_dropout` and `module_dropout` act in training only and do not change the merge.
//! PEFT's LoHa wraps only `nn.Linear`, `nn.Conv1d` and `nn.Conv2d`, so a weight stored
//! `[in, out]` (transformers Conv1D) is refused.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, factor_pair_fits,
};
use crate::adapter::config::patterns;
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use regex::Regex;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "LOHA",
    open,
};

const PARTS: [&str; 6] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
];

/// The fields LyCORIS-style configs (LoHa, LoKr) share: `r`, `alpha`, their patterns and
/// `use_effective_conv2d`.
#[derive(Debug)]
pub(super) struct LycorisConfig {
    pub r: usize,
    pub alpha: f64,
    pub rank_pattern: Vec<(String, Regex, usize)>,
    pub alpha_pattern: Vec<(String, Regex, f64)>,
    pub use_effective_conv2d: bool,
}

impl LycorisConfig {
    /// Reads the shared fields (PEFT's defaults: r 8, alpha 8).
    pub fn from_json(v: &Value, path: &Path) -> Result<LycorisConfig> {
        let r = match v.get("r") {
            None | Some(Value::Null) => 8,
            Some(x) => x.as_u64().filter(|&r| r > 0).ok_or_else(|| {
                Error::format(path, format!("\"r\" is {x}, not a positive integer"))
            })? as usize,
        };
        let alpha = match v.get("alpha") {
            None | Some(Value::Null) => 8.0,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| Error::format(path, format!("\"alpha\" is {x}, not a number")))?,
        };
        Ok(LycorisConfig {
            r,
            alpha,
            rank_pattern: patterns(v.get("rank_pattern"), path, "rank_pattern", |x| {
                x.as_u64().filter(|&r| r > 0).map(|r| r as usize)
            })?,
            alpha_pattern: patterns(v.get("alpha_pattern"), path, "alpha_pattern", |x| {
                x.as_f64()
            })?,
            use_effective_conv2d: v
                .get("use_effective_conv2d")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// r and alpha of a module (PEFT's `get_pattern_key`: the first matching key in file
    /// order, r and alpha looked up independently).
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.r, |(_, _, r)| *r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.alpha, |(_, _, a)| *a);
        (r, alpha)
    }

    /// `self.scaling = alpha / r` (f64) as the f32 PEFT multiplies by.
    pub fn scale(&self, module: &str) -> f32 {
        let (r, alpha) = self.rank_alpha(module);
        (alpha / r as f64) as f32
    }
}

pub(super) use super::split_part;

/// Refuses a weight stored `[in, out]`: PEFT's LyCORIS tuners wrap only nn.Linear/Conv.
pub(super) fn refuse_transposed(
    tuner: &str,
    weights: &Path,
    m: &SavedModule,
    base: &ModuleBase,
) -> Result<()> {
    if !base.weight.transposed {
        return Ok(());
    }
    let t = m.parts.values().next();
    let msg = format!(
        "{tuner} module '{}': base '{}' {:?} is taken as stored [in, out] (transformers Conv1D), \
         which PEFT's {tuner} does not adapt (only nn.Linear, nn.Conv1d, nn.Conv2d); if it is an \
         nn.Linear, say so with --no-fan-in-fan-out REGEX",
        m.name, base.weight.entry.name, base.weight.entry.shape
    );
    Err(match t {
        Some(t) => bad_part(weights, t, msg),
        None => Error::format(weights, msg),
    })
}

/// How torch computes a product, which decides the order of its roundings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Product {
    /// MKL's sgemm (`mm`, and `bmm` of 400 or more multiply-adds): per element, a
    /// sequential fused multiply-add over k from zero (matrixmultiply does the same).
    Fma,
    /// torch's own `bmm` loop for fewer than 400 multiply-adds (`baddbmm_cpu_kernel`):
    /// `acc += a * b` in order, product and sum rounded separately.
    Naive,
}

impl Product {
    /// The kind a torch `bmm` of `[m, k] @ [k, n]` (one batch) uses.
    pub fn bmm(m: usize, k: usize, n: usize) -> Product {
        if m.saturating_mul(k).saturating_mul(n) < 400 {
            Product::Naive
        } else {
            Product::Fma
        }
    }
}

/// Up to this k, matrixmultiply's sums (one block of k) are MKL's.
const MKL_SEQUENTIAL_K: usize = 256;
/// MKL's largest block of k for sgemm (measured on torch 2.15's MKL 2024.2).
const MKL_KC: usize = 384;

/// A strided f32 matrix operand: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Mat<'_> {
    /// Whether every element of an `[rows, cols]` view is inside `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `out[m, n] = a[m, k] @ b[k, n]` (row-major `out`), rounded as `kind` says torch does
/// (PEFT's adapters are f32 after loading, so its products are MKL's sgemm or torch's loop).
pub(super) fn matmul(kind: Product, m: usize, k: usize, n: usize, a: Mat, b: Mat, out: &mut [f32]) {
    // Shapes are checked against the saved tensors before any band runs; a violation
    // here is a bug, not bad input.
    assert!(
        a.fits(m, k) && b.fits(k, n) && out.len() >= m * n,
        "matmul operands do not fit [{m}, {k}] @ [{k}, {n}]"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].iter_mut().for_each(|x| *x = 0.0);
        return;
    }
    match kind {
        Product::Fma if k > MKL_SEQUENTIAL_K => {
            // MKL (measured, one thread): k in ceil(k / 384) near-equal blocks, the first
            // ones a value longer; each block summed from zero, then added to the running
            // sum. Matches torch for k up to 768 (the checked range); matrixmultiply blocks
            // k by 256, which differs from k = 257 on.
            let nb = k.div_ceil(MKL_KC);
            let (base, rem) = (k / nb, k % nb);
            for i in 0..m {
                for j in 0..n {
                    let mut c = 0f32;
                    let mut k0 = 0;
                    for blk in 0..nb {
                        let len = base + usize::from(blk < rem);
                        let mut acc = 0f32;
                        for kk in k0..k0 + len {
                            acc = a.data[i * a.rs + kk * a.cs]
                                .mul_add(b.data[kk * b.rs + j * b.cs], acc);
                        }
                        c = if blk == 0 { acc } else { c + acc };
                        k0 += len;
                    }
                    out[i * n + j] = c;
                }
            }
        }
        Product::Fma => {
            // SAFETY: `fits` checked that every addressed element of a, b and out is
            // inside its slice; strides are positive.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.data.as_ptr(),
                    a.rs as isize,
                    a.cs as isize,
                    b.data.as_ptr(),
                    b.rs as isize,
                    b.cs as isize,
                    0.0,
                    out.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
        Product::Naive => {
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0f32;
                    for kk in 0..k {
                        acc += a.data[i * a.rs + kk * a.cs] * b.data[kk * b.rs + j * b.cs];
                    }
                    out[i * n + j] = acc;
                }
            }
        }
    }
}

/// Checks a saved part's shape, naming the part, the module's base and what PEFT saves.
pub(super) fn expect_shape(
    weights: &Path,
    t: &TensorEntry,
    want: &[usize],
    base: &TensorEntry,
    why: &str,
) -> Result<()> {
    if t.shape == want {
        return Ok(());
    }
    Err(bad_part(
        weights,
        t,
        format!(
            "has shape {:?}, but PEFT saves {want:?} for base '{}' {:?} ({why})",
            t.shape, base.name, base.shape
        ),
    ))
}

#[derive(Debug)]
struct LoHa {
    config: LycorisConfig,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    Ok(Box::new(LoHa {
        config: LycorisConfig::from_json(v, path)?,
    }))
}

/// Whether PEFT builds the Tucker form for a weight of this stored shape (a convolution
/// with a kernel larger than 1, `use_effective_conv2d` set).
pub(super) fn effective_conv(use_effective_conv2d: bool, shape: &[usize]) -> bool {
    use_effective_conv2d && shape.len() > 2 && shape[2..].iter().any(|&k| k != 1)
}

impl Tuner for LoHa {
    // PEFT's LyCORIS layers wrap nn.Linear / Conv only: a 2-D weight is stored [out, in].
    fn adapts_conv1d(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "LoHa"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &PARTS)
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        factor_pair_fits(m, "hada_w1_a", "hada_w1_b", out_in)
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        refuse_transposed("LoHa", weights, m, base)?;
        let w = &base.weight.entry;
        let shape = w.shape.as_slice();
        if !(2..=4).contains(&shape.len()) {
            return Err(Error::tensor(
                weights,
                &m.name,
                format!(
                    "LoHa adapts nn.Linear / Conv1d / Conv2d weights (2 to 4 dims); base '{}' has shape {shape:?}",
                    w.name
                ),
            ));
        }
        let cp = effective_conv(self.config.use_effective_conv2d, shape);
        let (r, _) = self.config.rank_alpha(&m.name);
        let get = |p: &str| m.part(weights, p);
        let (w1a, w1b, w2a, w2b) = (
            get("hada_w1_a")?,
            get("hada_w1_b")?,
            get("hada_w2_a")?,
            get("hada_w2_b")?,
        );
        let mut inputs = vec![w1a, w1b, w2a, w2b];
        let out = shape[0];
        let cols: usize = shape[1..].iter().product();
        let rank_why = "r / rank_pattern in adapter_config.json";
        let cores = if cp {
            let t1 = get("hada_t1")?;
            let t2 = get("hada_t2")?;
            let kernel = [shape[2], shape.get(3).copied().unwrap_or(1)];
            let tw = [r, r, kernel[0], kernel[1]];
            let why = "use_effective_conv2d: Tucker core [r, r, kh, kw]; r from r / rank_pattern";
            expect_shape(weights, t1, &tw, w, why)?;
            expect_shape(weights, t2, &tw, w, why)?;
            for a in [w1a, w2a] {
                expect_shape(weights, a, &[r, out], w, rank_why)?;
            }
            for b in [w1b, w2b] {
                expect_shape(weights, b, &[r, shape[1]], w, rank_why)?;
            }
            inputs.extend([t1, t2]);
            Some((t1.clone(), t2.clone()))
        } else {
            if let Some(t) = m.parts.get("hada_t1").or(m.parts.get("hada_t2")) {
                return Err(bad_part(
                    weights,
                    t,
                    format!(
                        "is a Tucker core, but PEFT builds none for base '{}' {shape:?} with \
                         use_effective_conv2d = {} in adapter_config.json",
                        w.name, self.config.use_effective_conv2d
                    ),
                ));
            }
            for a in [w1a, w2a] {
                expect_shape(weights, a, &[out, r], w, rank_why)?;
            }
            for b in [w1b, w2b] {
                expect_shape(weights, b, &[r, cols], w, rank_why)?;
            }
            None
        };
        check_float(weights, &inputs)?;
        Ok(vec![Change {
            target: w.name.clone(),
            change: Arc::new(Hada {
                w1a: w1a.clone(),
                w1b: w1b.clone(),
                w2a: w2a.clone(),
                w2b: w2b.clone(),
                cores,
                r,
                in_ch: shape[1],
                scale: self.config.scale(&m.name),
            }),
        }])
    }
}

/// `W += ((w1_a @ w1_b) * (w2_a @ w2_b)) * s`, or its Tucker form.
#[derive(Debug)]
struct Hada {
    w1a: TensorEntry,
    w1b: TensorEntry,
    w2a: TensorEntry,
    w2b: TensorEntry,
    /// (t1, t2) for the Tucker form.
    cores: Option<(TensorEntry, TensorEntry)>,
    r: usize,
    /// Input channels (per group) of the weight.
    in_ch: usize,
    scale: f32,
}

/// One of the two factors of the Hadamard product, ready to make rows of.
struct Factor {
    /// Plain: w_a `[out, r]`. Tucker: w_a `[r, out]`.
    a: Vec<f32>,
    /// Plain: w_b `[r, cols]`. Tucker: `t ×_j w_b`, `[r (i), cols]` (cols = in·kh·kw).
    b: Vec<f32>,
    /// How torch makes the rows from `a` and `b`.
    kind: Product,
}

struct PreparedHada {
    f1: Factor,
    f2: Factor,
    tucker: bool,
    r: usize,
    rows: usize,
    cols: usize,
    scale: f32,
}

impl Hada {
    fn factor(
        &self,
        a: &TensorEntry,
        b: &TensorEntry,
        t: Option<&TensorEntry>,
        rows: usize,
        cols: usize,
    ) -> Factor {
        let r = self.r;
        let a = decode(a);
        let wb = decode(b);
        match t {
            None => Factor {
                a,
                b: wb,
                kind: Product::Fma,
            },
            Some(t) => {
                // einsum("ijkl,jr,ip->prkl", t, w_b, w_a), first pair: for each i,
                // [in, kk] = w_bᵀ [in, r(j)] @ t[i] [r(j), kk] — one bmm of
                // [i·kk, j] @ [j, in] in torch, whose size picks its loop.
                let tv = decode(t);
                let kk = cols / self.in_ch.max(1);
                let first = Product::bmm(r * kk, r, self.in_ch);
                let mut tb = vec![0f32; r * cols];
                let mut tmp = vec![0f32; self.in_ch * kk];
                for i in 0..r {
                    matmul(
                        first,
                        self.in_ch,
                        r,
                        kk,
                        Mat {
                            data: &wb,
                            rs: 1,
                            cs: self.in_ch,
                        },
                        Mat {
                            data: &tv[i * r * kk..(i + 1) * r * kk],
                            rs: kk,
                            cs: 1,
                        },
                        &mut tmp,
                    );
                    tb[i * cols..(i + 1) * cols].copy_from_slice(&tmp);
                }
                Factor {
                    a,
                    b: tb,
                    // Second pair: [p, i] @ [i, in·kk], one bmm.
                    kind: Product::bmm(rows, r, cols),
                }
            }
        }
    }
}

impl TensorChange for Hada {
    fn tuner(&self) -> &'static str {
        "LoHa"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = vec![&self.w1a, &self.w1b, &self.w2a, &self.w2b];
        if let Some((t1, t2)) = &self.cores {
            v.extend([t1, t2]);
        }
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (rows, cols) = (base.rows, base.cols);
        let (t1, t2) = match &self.cores {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        let f1 = self.factor(&self.w1a, &self.w1b, t1, rows, cols);
        let f2 = self.factor(&self.w2a, &self.w2b, t2, rows, cols);
        let r = self.r;
        if f1.a.len() != rows * r
            || f1.b.len() != r * cols
            || f2.a.len() != rows * r
            || f2.b.len() != r * cols
        {
            return Err(Error::Internal(format!(
                "LoHa factors do not fit '{}' ({rows} x {cols}, r {r})",
                base.base.name
            )));
        }
        Ok(Box::new(PreparedHada {
            f1,
            f2,
            tucker: self.cores.is_some(),
            r,
            rows,
            cols,
            scale: self.scale,
        }))
    }
}

impl PreparedHada {
    /// Rows `[row0, row0 + m)` of one factor's product.
    fn rows_of(&self, f: &Factor, row0: usize, m: usize, out: &mut [f32]) {
        let (r, cols) = (self.r, self.cols);
        let a = if self.tucker {
            // w_a is [r, out]: row p of the left operand is column p of w_a.
            Mat {
                data: &f.a[row0..],
                rs: 1,
                cs: self.rows,
            }
        } else {
            Mat {
                data: &f.a[row0 * r..],
                rs: r,
                cs: 1,
            }
        };
        let b = Mat {
            data: &f.b,
            rs: cols,
            cs: 1,
        };
        matmul(f.kind, m, r, cols, a, b, out);
    }
}

impl BandChange for PreparedHada {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let m = band.len() / self.cols.max(1);
        let mut p1 = vec![0f32; m * self.cols];
        let mut p2 = vec![0f32; m * self.cols];
        self.rows_of(&self.f1, row0, m, &mut p1);
        self.rows_of(&self.f2, row0, m, &mut p2);
        for ((w, a), b) in band.iter_mut().zip(&p1).zip(&p2) {
            *w += (a * b) * self.scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;
    use serde_json::json;

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

    fn vals(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
    }

    fn module(parts: Vec<(&str, TensorEntry)>) -> SavedModule {
        SavedModule {
            name: "lin0".into(),
            parts: parts.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }

    fn base(shape: &[usize]) -> ModuleBase {
        let n = shape.iter().product();
        ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", shape, &vals(n, 0.5)),
                transposed: false,
            },
            bias: None,
        }
    }

    #[test]
    fn plain_delta_is_the_hadamard_product_in_any_band() {
        let (out, inp, r) = (5, 3, 2);
        let b = base(&[out, inp]);
        let tuner = open(&json!({"r": 2, "alpha": 3}), Path::new("c")).unwrap();
        let (w1a, w1b, w2a, w2b) = (
            vals(out * r, 1.0),
            vals(r * inp, 2.0),
            vals(out * r, 3.0),
            vals(r * inp, 4.0),
        );
        let m = module(vec![
            ("hada_w1_a", entry("lin0.hada_w1_a", &[out, r], &w1a)),
            ("hada_w1_b", entry("lin0.hada_w1_b", &[r, inp], &w1b)),
            ("hada_w2_a", entry("lin0.hada_w2_a", &[out, r], &w2a)),
            ("hada_w2_b", entry("lin0.hada_w2_b", &[r, inp], &w2b)),
        ]);
        assert!(tuner.fits(&m, [out, inp]) && !tuner.fits(&m, [inp, out]));
        let ch = tuner
            .changes(Path::new("a"), &m, &BTreeMap::new(), &b)
            .unwrap();
        let w = decode(&b.weight.entry);
        let s = 1.5f32;
        let want: Vec<f32> = (0..out * inp)
            .map(|x| {
                let (i, j) = (x / inp, x % inp);
                let p = |a: &[f32], bb: &[f32]| {
                    (0..r).fold(0f32, |acc, k| a[i * r + k].mul_add(bb[k * inp + j], acc))
                };
                w[x] + (p(&w1a, &w1b) * p(&w2a, &w2b)) * s
            })
            .collect();
        for band in [1, 2, 5] {
            assert_eq!(
                run_in_memory(&*ch[0].change, &b.weight.entry, band).unwrap(),
                want
            );
        }
        // A factor of the wrong rank names the tensor and the rank_pattern.
        let tuner = open(&json!({"r": 4}), Path::new("c")).unwrap();
        let e = tuner
            .changes(Path::new("a"), &m, &BTreeMap::new(), &b)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.hada_w1_a") && e.contains("rank_pattern"),
            "{e}"
        );
    }

    #[test]
    fn tucker_cores_follow_the_einsum() {
        // Conv2d [out 3, in 2, 2, 2], r 2.
        let (out, inp, kh, kw, r) = (3, 2, 2, 2, 2);
        let b = base(&[out, inp, kh, kw]);
        let tuner = open(
            &json!({"r": 2, "alpha": 2, "use_effective_conv2d": true}),
            Path::new("c"),
        )
        .unwrap();
        let t1 = vals(r * r * kh * kw, 5.0);
        let t2 = vals(r * r * kh * kw, 6.0);
        let (w1a, w1b, w2a, w2b) = (
            vals(r * out, 1.0),
            vals(r * inp, 2.0),
            vals(r * out, 3.0),
            vals(r * inp, 4.0),
        );
        let m = module(vec![
            ("hada_t1", entry("c.hada_t1", &[r, r, kh, kw], &t1)),
            ("hada_t2", entry("c.hada_t2", &[r, r, kh, kw], &t2)),
            ("hada_w1_a", entry("c.hada_w1_a", &[r, out], &w1a)),
            ("hada_w1_b", entry("c.hada_w1_b", &[r, inp], &w1b)),
            ("hada_w2_a", entry("c.hada_w2_a", &[r, out], &w2a)),
            ("hada_w2_b", entry("c.hada_w2_b", &[r, inp], &w2b)),
        ]);
        let ch = tuner
            .changes(Path::new("a"), &m, &BTreeMap::new(), &b)
            .unwrap();
        let w = decode(&b.weight.entry);
        // Both contractions are tiny bmm's: torch's plain loop (separate roundings).
        let rebuild = |t: &[f32], wa: &[f32], wb: &[f32], p: usize, q: usize, kl: usize| {
            let mut acc = 0f32;
            for i in 0..r {
                let mut inner = 0f32;
                for j in 0..r {
                    inner += t[(i * r + j) * kh * kw + kl] * wb[j * inp + q];
                }
                acc += wa[i * out + p] * inner;
            }
            acc
        };
        let want: Vec<f32> = (0..out * inp * kh * kw)
            .map(|x| {
                let (p, q, kl) = (x / (inp * kh * kw), (x / (kh * kw)) % inp, x % (kh * kw));
                w[x] + (rebuild(&t1, &w1a, &w1b, p, q, kl) * rebuild(&t2, &w2a, &w2b, p, q, kl))
            })
            .collect();
        for band in [1, 3] {
            assert_eq!(
                run_in_memory(&*ch[0].change, &b.weight.entry, band).unwrap(),
                want
            );
        }
        // Without use_effective_conv2d the cores are not PEFT's layout: refused by name.
        let tuner = open(&json!({"r": 2}), Path::new("c")).unwrap();
        let e = tuner
            .changes(Path::new("a"), &m, &BTreeMap::new(), &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use_effective_conv2d"), "{e}");
    }
}
