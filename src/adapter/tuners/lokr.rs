//! LoKr (`peft_type: "LOKR"`): the Kronecker product of two factors, each full or low-rank
//! (PEFT 0.21 `tuners/lokr/layer.py`, merge in `tuners/lycoris_utils.py`).
//!
//! PEFT splits `out = a·b` and `in = c·d` with `factorization(dim, decompose_factor)` and
//! saves per module `lokr_w1 [a, c]` (or, with `decompose_both` and `r < max(a, c)/2`,
//! `lokr_w1_a [a, r]`, `lokr_w1_b [r, c]`) and `lokr_w2 [b, d, k…]` (or, when
//! `r < max(b, d)/2`, `lokr_w2_a [b, r]`, `lokr_w2_b [r, d·k…]`, or for a convolution with
//! `use_effective_conv2d` the Tucker form `lokr_t2 [r, r, kh, kw]`, `lokr_w2_a [r, b]`,
//! `lokr_w2_b [r, d]`). Which of these PEFT built is recomputed here from the config and the
//! base shape, and the saved parts must be exactly those. PEFT's merge, all in f32:
//!
//! `w1 = lokr_w1 | w1_a @ w1_b`; `w2 = lokr_w2 | w2_a @ w2_b |
//! einsum("ijkl,ip,jr->prkl", t2, w2_a, w2_b)` (contracted left to right: over `i` with
//! `w2_a`, then over `j` with `w2_b`, one `bmm` each); `ΔW = kron(w1, w2) * s` reshaped to
//! the weight's shape, with `w1` unsqueezed to `[a, c, 1, 1]` when `w2` is 4-D; `s` the f32
//! of `alpha / r` (after `rank_pattern` / `alpha_pattern`); `W += ΔW` in place.
//!
//! `torch.kron` pads the lower-rank operand with leading 1s, so for a Conv1d whose `w2` is
//! saved whole (`[b, d, k]`, 3-D) against a 2-D `w1` the product is `[b, a·d, c·k]`,
//! which PEFT then *reshapes* (not permutes) to `[a·b, c·d, k]`: that layout is reproduced
//! as PEFT has it. Every other case is `ΔW[α·b+β, γ·n+j] = (w1[α,γ] · w2[β,j]) · s` over
//! `w2` flattened to `[b, n]`; the rows of `w2` a band needs are made per band from the low-rank
//! or Tucker factors. Products round as torch's do (see `loha.rs`: `mm` = sequential fused
//! multiply-adds, small `bmm` = torch's own loop). `rank_dropout`, `rank_dropout_scale` and
//! `module_dropout` act in training only. Weights stored `[in, out]` are refused (PEFT's
//! LoKr wraps only nn.Linear / Conv1d / Conv2d).

use super::loha::{
    LycorisConfig, Mat, Product, effective_conv, expect_shape, matmul, refuse_transposed,
    split_part,
};
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, check_float, decode,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "LOKR",
    open,
};

const PARTS: [&str; 7] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];

#[derive(Debug)]
struct LoKr {
    config: LycorisConfig,
    decompose_both: bool,
    decompose_factor: i64,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let decompose_factor = match v.get("decompose_factor") {
        None | Some(Value::Null) => -1,
        Some(x) => x.as_i64().ok_or_else(|| {
            Error::format(path, format!("decompose_factor is {x}, not an integer"))
        })?,
    };
    Ok(Box::new(LoKr {
        config: LycorisConfig::from_json(v, path)?,
        decompose_both: v
            .get("decompose_both")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        decompose_factor,
    }))
}

/// PEFT's `factorization(dimension, factor)`: `(m, n)`, `m <= n`, `m·n = dimension`.
fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    // factor == -1 means "near the square root"; any other value bounds m (PEFT's loop).
    let factor = if factor == -1 {
        dimension as i64
    } else {
        factor
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i64 > factor {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n { (n, m) } else { (m, n) }
}

/// What PEFT builds for one module.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    /// out = a·b, in = c·d.
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    /// Kernel dims (empty for Linear).
    kernel: Vec<usize>,
    use_w1: bool,
    use_w2: bool,
    tucker: bool,
}

impl LoKr {
    fn layout(&self, shape: &[usize], r: usize) -> Layout {
        let (a, b) = factorization(shape[0], self.decompose_factor);
        let (c, d) = factorization(shape[1], self.decompose_factor);
        // Python: `r < max(...) / 2` in floating point.
        let below = |x: usize, y: usize| (r as f64) < x.max(y) as f64 / 2.0;
        Layout {
            a,
            b,
            c,
            d,
            kernel: shape[2..].to_vec(),
            use_w1: !(self.decompose_both && below(a, c)),
            use_w2: !below(b, d),
            // PEFT: `use_w2` first, then the Tucker form (a kernel larger than 1 only).
            tucker: below(b, d) && effective_conv(self.config.use_effective_conv2d, shape),
        }
    }
}

impl Tuner for LoKr {
    // PEFT's LyCORIS layers wrap nn.Linear / Conv only: a 2-D weight is stored [out, in].
    fn adapts_conv1d(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "LoKr"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &PARTS)
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        let (r, _) = self.config.rank_alpha(&m.name);
        let l = self.layout(&out_in, r);
        self.expected(&l, r)
            .iter()
            .all(|(p, s)| m.parts.get(*p).is_some_and(|t| &t.shape == s))
            && m.parts.len() == self.expected(&l, r).len()
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        refuse_transposed("LoKr", weights, m, base)?;
        let w = &base.weight.entry;
        let shape = w.shape.as_slice();
        if !(2..=4).contains(&shape.len()) {
            return Err(Error::tensor(
                weights,
                &m.name,
                format!(
                    "LoKr adapts nn.Linear / Conv1d / Conv2d weights (2 to 4 dims); base '{}' has shape {shape:?}",
                    w.name
                ),
            ));
        }
        let (r, _) = self.config.rank_alpha(&m.name);
        let l = self.layout(shape, r);
        let expected = self.expected(&l, r);
        let why = format!(
            "out {} = {}·{}, in {} = {}·{} by decompose_factor {}; r {r} (r / rank_pattern), \
             decompose_both {}, use_effective_conv2d {} in adapter_config.json",
            shape[0],
            l.a,
            l.b,
            shape[1],
            l.c,
            l.d,
            self.decompose_factor,
            self.decompose_both,
            self.config.use_effective_conv2d
        );
        for (p, s) in &expected {
            let t = m.parts.get(*p).ok_or_else(|| {
                Error::format(
                    weights,
                    format!(
                        "LoKr module '{}' has no '{p}', which PEFT builds for base '{}' {shape:?} \
                         ({why}); it has {:?}",
                        m.name,
                        w.name,
                        m.parts.keys().collect::<Vec<_>>()
                    ),
                )
            })?;
            expect_shape(weights, t, s, w, &why)?;
        }
        if let Some((p, t)) = m
            .parts
            .iter()
            .find(|(p, _)| !expected.iter().any(|(e, _)| e == p))
        {
            return Err(super::bad_part(
                weights,
                t,
                format!(
                    "is a '{p}', which PEFT does not build for base '{}' {shape:?} ({why})",
                    w.name
                ),
            ));
        }
        let inputs: Vec<&TensorEntry> = expected.iter().map(|(p, _)| &m.parts[*p]).collect();
        check_float(weights, &inputs)?;
        let get = |p: &str| m.parts.get(p).cloned();
        Ok(vec![Change {
            target: w.name.clone(),
            change: Arc::new(Kron {
                w1: get("lokr_w1"),
                w1_a: get("lokr_w1_a"),
                w1_b: get("lokr_w1_b"),
                w2: get("lokr_w2"),
                w2_a: get("lokr_w2_a"),
                w2_b: get("lokr_w2_b"),
                t2: get("lokr_t2"),
                layout: l,
                r,
                scale: self.config.scale(&m.name),
            }),
        }])
    }
}

impl LoKr {
    /// The parts PEFT saves for `l` and their shapes.
    fn expected(&self, l: &Layout, r: usize) -> Vec<(&'static str, Vec<usize>)> {
        let k: usize = l.kernel.iter().product();
        let mut v = Vec::new();
        if l.use_w1 {
            v.push(("lokr_w1", vec![l.a, l.c]));
        } else {
            v.push(("lokr_w1_a", vec![l.a, r]));
            v.push(("lokr_w1_b", vec![r, l.c]));
        }
        if l.use_w2 {
            let mut s = vec![l.b, l.d];
            s.extend(&l.kernel);
            v.push(("lokr_w2", s));
        } else if l.tucker {
            let kk = [l.kernel[0], l.kernel.get(1).copied().unwrap_or(1)];
            v.push(("lokr_t2", vec![r, r, kk[0], kk[1]]));
            v.push(("lokr_w2_a", vec![r, l.b]));
            v.push(("lokr_w2_b", vec![r, l.d]));
        } else {
            v.push(("lokr_w2_a", vec![l.b, r]));
            v.push(("lokr_w2_b", vec![r, l.d * k]));
        }
        v
    }
}

/// `W += kron(w1, w2) * s`.
#[derive(Debug)]
struct Kron {
    w1: Option<TensorEntry>,
    w1_a: Option<TensorEntry>,
    w1_b: Option<TensorEntry>,
    w2: Option<TensorEntry>,
    w2_a: Option<TensorEntry>,
    w2_b: Option<TensorEntry>,
    t2: Option<TensorEntry>,
    layout: Layout,
    r: usize,
    scale: f32,
}

/// Where the rows of `w2` (flattened to `[b, n]`) come from.
enum W2 {
    /// Saved whole (`lokr_w2`).
    Full(Vec<f32>),
    /// `w2_a [b, r] @ w2_b [r, n]` (an `mm`).
    Product { a: Vec<f32>, b: Vec<f32> },
    /// Tucker: `x[β, j, kk] = Σ_i t2[i, j, kk] · w2_a[i, β]` (the first contraction,
    /// `[b, r, kk]`), rows `Σ_j w2_b[j, δ] · x[β, j, kk]` (the second, of kind `kind`).
    Tucker {
        x: Vec<f32>,
        wb: Vec<f32>,
        kk: usize,
        kind: Product,
    },
}

struct PreparedKron {
    w1: Vec<f32>,
    w2: W2,
    l: Layout,
    r: usize,
    /// Columns of `w2` flattened to `[b, n]`.
    n: usize,
    cols: usize,
    scale: f32,
    /// torch.kron of a 2-D w1 with a 3-D w2 (Conv1d, `lokr_w2` saved whole).
    padded: bool,
}

fn need(t: &Option<TensorEntry>, what: &str) -> Result<Vec<f32>> {
    t.as_ref()
        .map(decode)
        .ok_or_else(|| Error::Internal(format!("LoKr change without its {what}")))
}

impl TensorChange for Kron {
    fn tuner(&self) -> &'static str {
        "LoKr"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        [
            &self.w1, &self.w1_a, &self.w1_b, &self.w2, &self.w2_a, &self.w2_b, &self.t2,
        ]
        .into_iter()
        .flatten()
        .collect()
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let l = &self.layout;
        let r = self.r;
        let k: usize = l.kernel.iter().product();
        let w1 = if l.use_w1 {
            need(&self.w1, "lokr_w1")?
        } else {
            let (a, b) = (
                need(&self.w1_a, "lokr_w1_a")?,
                need(&self.w1_b, "lokr_w1_b")?,
            );
            let mut w1 = vec![0f32; l.a * l.c];
            matmul(
                Product::Fma,
                l.a,
                r,
                l.c,
                Mat {
                    data: &a,
                    rs: r,
                    cs: 1,
                },
                Mat {
                    data: &b,
                    rs: l.c,
                    cs: 1,
                },
                &mut w1,
            );
            w1
        };
        let n = l.d * k;
        let w2 = if l.use_w2 {
            W2::Full(need(&self.w2, "lokr_w2")?)
        } else if l.tucker {
            let t = need(&self.t2, "lokr_t2")?;
            let wa = need(&self.w2_a, "lokr_w2_a")?;
            let wb = need(&self.w2_b, "lokr_w2_b")?;
            // First pair of einsum("ijkl,ip,jr->prkl"): over i, one bmm of
            // (j·kk) x i x p multiply-adds; for each j, [b, kk] = w2_aᵀ @ t2[:, j, :].
            let first = Product::bmm(r * k, r, l.b);
            let mut x = vec![0f32; l.b * r * k];
            let mut tmp = vec![0f32; l.b * k];
            for j in 0..r {
                matmul(
                    first,
                    l.b,
                    r,
                    k,
                    Mat {
                        data: &wa,
                        rs: 1,
                        cs: l.b,
                    },
                    Mat {
                        data: &t[j * k..],
                        rs: r * k,
                        cs: 1,
                    },
                    &mut tmp,
                );
                for beta in 0..l.b {
                    x[(beta * r + j) * k..(beta * r + j + 1) * k]
                        .copy_from_slice(&tmp[beta * k..(beta + 1) * k]);
                }
            }
            W2::Tucker {
                x,
                wb,
                kk: k,
                kind: Product::bmm(l.b * k, r, l.d),
            }
        } else {
            W2::Product {
                a: need(&self.w2_a, "lokr_w2_a")?,
                b: need(&self.w2_b, "lokr_w2_b")?,
            }
        };
        if base.rows != l.a * l.b || base.cols != l.c * n {
            return Err(Error::Internal(format!(
                "LoKr factors do not fit '{}' ({} x {})",
                base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(PreparedKron {
            w1,
            padded: l.use_w2 && l.kernel.len() == 1,
            w2,
            l: l.clone(),
            r,
            n,
            cols: base.cols,
            scale: self.scale,
        }))
    }
}

impl PreparedKron {
    /// Rows `betas` of `w2` (`[b, n]`) into `out` (`betas.len() x n`).
    fn w2_rows(&self, betas: &[usize], out: &mut [f32]) {
        let (r, n) = (self.r, self.n);
        match &self.w2 {
            W2::Full(w2) => {
                for (o, &beta) in out.chunks_mut(n).zip(betas) {
                    o.copy_from_slice(&w2[beta * n..(beta + 1) * n]);
                }
            }
            W2::Product { a, b } => {
                let mut left = Vec::with_capacity(betas.len() * r);
                for &beta in betas {
                    left.extend_from_slice(&a[beta * r..(beta + 1) * r]);
                }
                matmul(
                    Product::Fma,
                    betas.len(),
                    r,
                    n,
                    Mat {
                        data: &left,
                        rs: r,
                        cs: 1,
                    },
                    Mat {
                        data: b,
                        rs: n,
                        cs: 1,
                    },
                    out,
                );
            }
            W2::Tucker { x, wb, kk, kind } => {
                let d = self.l.d;
                for (o, &beta) in out.chunks_mut(n).zip(betas) {
                    // Row β laid out [δ, kk]: [d, kk] = w2_bᵀ [d, r(j)] @ x[β] [r(j), kk].
                    matmul(
                        *kind,
                        d,
                        r,
                        *kk,
                        Mat {
                            data: wb,
                            rs: 1,
                            cs: d,
                        },
                        Mat {
                            data: &x[beta * r * kk..(beta + 1) * r * kk],
                            rs: *kk,
                            cs: 1,
                        },
                        o,
                    );
                }
            }
        }
    }

    /// torch.kron([1, a, c], [b, d, k]) = [b, a·d, c·k], read as [a·b, c·d, k]: the
    /// value at flat index `f`.
    fn padded_at(&self, w2: &[f32], f: usize) -> f32 {
        let l = &self.l;
        let k = l.kernel[0];
        let (d1, d2) = (l.a * l.d, l.c * k);
        let (i0, rest) = (f / (d1 * d2), f % (d1 * d2));
        let (i1, i2) = (rest / d2, rest % d2);
        let (alpha, delta) = (i1 / l.d, i1 % l.d);
        let (gamma, kappa) = (i2 / k, i2 % k);
        (self.w1[alpha * l.c + gamma] * w2[(i0 * l.d + delta) * k + kappa]) * self.scale
    }
}

impl BandChange for PreparedKron {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let l = &self.l;
        let m = band.len() / self.cols.max(1);
        if self.padded {
            if let W2::Full(w2) = &self.w2 {
                let f0 = row0 * self.cols;
                for (x, v) in band.iter_mut().enumerate() {
                    *v += self.padded_at(w2, f0 + x);
                }
            }
            return;
        }
        // The w2 rows this band needs: all b of them, or one per band row.
        let betas: Vec<usize> = if m >= l.b {
            (0..l.b).collect()
        } else {
            (row0..row0 + m).map(|i| i % l.b).collect()
        };
        let mut rows = vec![0f32; betas.len() * self.n];
        self.w2_rows(&betas, &mut rows);
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let global = row0 + i;
            let (alpha, beta) = (global / l.b, global % l.b);
            let slot = if m >= l.b { beta } else { i };
            let w2row = &rows[slot * self.n..(slot + 1) * self.n];
            let w1row = &self.w1[alpha * l.c..(alpha + 1) * l.c];
            for (chunk, &w1v) in row.chunks_mut(self.n).zip(w1row) {
                for (v, &w2v) in chunk.iter_mut().zip(w2row) {
                    *v += (w1v * w2v) * self.scale;
                }
            }
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

    fn setup(shape: &[usize], parts: Vec<(&str, &[usize], Vec<f32>)>) -> (ModuleBase, SavedModule) {
        let n = shape.iter().product();
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("m.weight", shape, &vals(n, 0.5)),
                transposed: false,
            },
            bias: None,
        };
        let m = SavedModule {
            name: "m".into(),
            parts: parts
                .into_iter()
                .map(|(p, s, v)| (p.to_string(), entry(&format!("m.{p}"), s, &v)))
                .collect(),
        };
        (base, m)
    }

    #[test]
    fn low_rank_w2_rows_are_made_per_band() {
        // Linear [6, 4]: out = 2·3, in = 2·2; r 1 < 3/2, so w2 = w2_a [3, 1] @ w2_b [1, 2].
        let (w1, w2a, w2b) = (vals(4, 1.0), vals(3, 2.0), vals(2, 3.0));
        let (b, m) = setup(
            &[6, 4],
            vec![
                ("lokr_w1", &[2, 2], w1.clone()),
                ("lokr_w2_a", &[3, 1], w2a.clone()),
                ("lokr_w2_b", &[1, 2], w2b.clone()),
            ],
        );
        let t = open(&json!({"r": 1, "alpha": 3}), Path::new("c")).unwrap();
        assert!(t.fits(&m, [6, 4]) && !t.fits(&m, [4, 6]));
        let ch = t.changes(Path::new("a"), &m, &BTreeMap::new(), &b).unwrap();
        let w = decode(&b.weight.entry);
        let want: Vec<f32> = (0..24)
            .map(|x| {
                let (i, j) = (x / 4, x % 4);
                let w2 = w2a[i % 3] * w2b[j % 2];
                w[x] + (w1[(i / 3) * 2 + j / 2] * w2) * 3.0
            })
            .collect();
        // Bands of 1 and 2 rows need fewer w2 rows than b; 6 needs all of them.
        for band in [1, 2, 6] {
            assert_eq!(
                run_in_memory(&*ch[0].change, &b.weight.entry, band).unwrap(),
                want
            );
        }
        // A saved part PEFT does not build for this layout is refused by name.
        let (b, mut m) = setup(&[6, 4], vec![]);
        m.parts = [("lokr_w1", &[2usize, 2][..]), ("lokr_w2", &[3, 2])]
            .into_iter()
            .map(|(p, s)| {
                (
                    p.to_string(),
                    entry(&format!("m.{p}"), s, &vals(s.iter().product(), 0.0)),
                )
            })
            .collect();
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &b)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lokr_w2_a") && e.contains("decompose_factor"),
            "{e}"
        );
    }

    #[test]
    fn conv1d_with_whole_w2_keeps_torch_kron_layout() {
        // Conv1d [4, 2, 3]: out = 2·2, in = 1·2, w2 [2, 2, 3] (3-D) against w1 [2, 1]:
        // torch.kron gives [2, 2·2, 1·3], reshaped (not permuted) to [4, 2, 3].
        let (w1, w2) = (vals(2, 1.0), vals(12, 2.0));
        let (b, m) = setup(
            &[4, 2, 3],
            vec![
                ("lokr_w1", &[2, 1], w1.clone()),
                ("lokr_w2", &[2, 2, 3], w2.clone()),
            ],
        );
        let t = open(&json!({"r": 8, "alpha": 8}), Path::new("c")).unwrap();
        let ch = t.changes(Path::new("a"), &m, &BTreeMap::new(), &b).unwrap();
        let w = decode(&b.weight.entry);
        let mut want = w.clone();
        // kron over [1, 2, 1] x [2, 2, 3] -> [2, 4, 3], in row-major order.
        let mut f = 0;
        for i0 in 0..2 {
            for i1 in 0..4 {
                for i2 in 0..3 {
                    let (alpha, delta) = (i1 / 2, i1 % 2);
                    want[f] += w1[alpha] * w2[(i0 * 2 + delta) * 3 + i2];
                    f += 1;
                }
            }
        }
        for band in [1, 4] {
            assert_eq!(
                run_in_memory(&*ch[0].change, &b.weight.entry, band).unwrap(),
                want
            );
        }
    }

    #[test]
    fn factorization_is_peft_s() {
        // PEFT's docstring examples, and a prime.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(20, -1), (4, 5));
        assert_eq!(factorization(10, 4), (2, 5));
    }
}
