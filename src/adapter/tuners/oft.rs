//! OFT (`peft_type: "OFT"`): a block-diagonal orthogonal matrix `R` that rotates the input
//! side of each weight row (PEFT 0.21 `tuners/oft/layer.py`). Also home of the small-matrix
//! arithmetic OFT and BOFT share (Cayley transforms, the band rotation).
//!
//! Saved: `<module>.oft_R.weight` (Linear, Conv2d) or `<module>.oft_embedding_R.weight`
//! (Embedding), `[blocks, b·(b-1)/2]`: the strict upper triangle of each block's
//! skew-symmetric `Q` (row-major, `torch.triu_indices` order); one block with `block_share`.
//! The block size `b` and count follow PEFT's `update_layer` from the config's `r` /
//! `oft_block_size` and the layer's input size (with PEFT's `adjust_oft_parameters`), which
//! is also how a weight's orientation is told apart.
//!
//! Merge, as PEFT does it, all in f32 (PEFT upcasts the adapter; the base is cast to f32):
//! - `coft`: the saved `Q` is first projected to Frobenius norm `eps / sqrt(blocks)` when
//!   it is larger (`_project_batch`);
//! - `R_b = (I - Q)(I + Q)⁻¹` (`torch.linalg.solve(I+Q, I-Q, left=False)`), or with
//!   `use_cayley_neumann` the truncated series `I + 2Q + 2Q² + … + Q^(t-1)`, which
//!   approximates `(I + Q)(I - Q)⁻¹`, the transpose (PEFT's two options rotate opposite
//!   ways; each is reproduced as PEFT has it);
//! - Linear / Conv2d (weight viewed `[out, in·k·k]`): `W ← (R · Wᵀ)ᵀ = W · Rᵀ`; Embedding:
//!   `W ← W · R`; rounded once into the weight's dtype.
//!
//! Where we differ: the product is a per-block f32 GEMM (sequential FMA over `k`, as MKL's
//! sgemm does for these sizes) instead of a full `[in, in]` block-diagonal matrix; the
//! zeros PEFT multiplies leave its sums unchanged. The Neumann products follow ATen's bmm
//! (plain multiply-add below 400 multiply-adds per matrix, FMA above). The LU solve is
//! LAPACK's partially pivoted `getrf` + `getrs('T')`; MKL's triangular solves order their
//! sums in a way we do not reproduce bit for bit, so `R` can differ from PEFT's by an ulp
//! (see the ULP_OVERRIDE entries in fixtures/tuner_rows/oft.py). Transformers Conv1D
//! (stored `[in, out]`) and Conv1d/3-D weights are refused, as PEFT does not adapt them.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "OFT",
    open,
};

const PART_LINEAR: &str = "oft_R.weight";
const PART_EMBEDDING: &str = "oft_embedding_R.weight";

#[derive(Debug, Clone)]
struct Oft {
    r: usize,
    oft_block_size: usize,
    coft: bool,
    eps: f64,
    block_share: bool,
    neumann: bool,
    neumann_terms: usize,
}

/// A boolean config field (absent or null: `default`).
pub(super) fn cfg_bool(v: &Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(Error::format(
            path,
            format!("{key} is {other}, not true or false"),
        )),
    }
}

/// A non-negative integer config field (absent or null: `default`).
pub(super) fn cfg_usize(v: &Value, key: &str, default: usize, path: &Path) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                Error::format(path, format!("{key} is {x}, not a non-negative integer"))
            }),
    }
}

/// A number config field (absent or null: `default`).
pub(super) fn cfg_f64(v: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::format(path, format!("{key} is {x}, not a number"))),
    }
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let t = Oft {
        r: cfg_usize(v, "r", 0, path)?,
        oft_block_size: cfg_usize(v, "oft_block_size", 32, path)?,
        coft: cfg_bool(v, "coft", false, path)?,
        eps: cfg_f64(v, "eps", 6e-5, path)?,
        block_share: cfg_bool(v, "block_share", false, path)?,
        neumann: cfg_bool(v, "use_cayley_neumann", true, path)?,
        neumann_terms: cfg_usize(v, "num_cayley_neumann_terms", 5, path)?,
    };
    if (t.r == 0) == (t.oft_block_size == 0) {
        // PEFT's OFTConfig rejects this pair too.
        return Err(Error::format(
            path,
            format!(
                "OFT config has r = {} and oft_block_size = {}: exactly one of them must be non-zero",
                t.r, t.oft_block_size
            ),
        ));
    }
    Ok(Box::new(t))
}

/// PEFT's `adjust_oft_parameters`: the divisor of `in_features` nearest to `params`
/// (the lower one on a tie).
fn adjust(in_features: usize, params: usize) -> usize {
    if params >= in_features {
        return in_features;
    }
    let mut higher = params;
    while higher <= in_features && !in_features.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = params;
    while lower > 1 && !in_features.is_multiple_of(lower) {
        lower -= 1;
    }
    if params - lower <= higher - params {
        lower
    } else {
        higher
    }
}

impl Oft {
    /// (blocks, block size) PEFT's `update_layer` gives a layer of `in_features` inputs.
    fn layout(&self, in_features: usize) -> Option<(usize, usize)> {
        if in_features == 0 {
            return None;
        }
        if self.r == 0 {
            let mut b = self.oft_block_size;
            if !in_features.is_multiple_of(b) || b > in_features {
                b = adjust(in_features, b);
            }
            (b > 0).then(|| (in_features / b, b))
        } else {
            let mut r = self.r;
            if !in_features.is_multiple_of(r) || r > in_features {
                r = adjust(in_features, r);
            }
            (r > 0).then(|| (r, in_features / r))
        }
    }

    /// The saved part and whether it is the Embedding variant.
    fn part<'m>(&self, weights: &Path, m: &'m SavedModule) -> Result<(&'m TensorEntry, bool)> {
        if let Some(p) = m.parts.get(PART_EMBEDDING) {
            return Ok((p, true));
        }
        Ok((m.part(weights, PART_LINEAR)?, false))
    }

    /// Whether the saved rotation has PEFT's shape for a layer of `in_features` inputs.
    fn saved_fits(&self, p: &TensorEntry, in_features: usize) -> Option<(usize, usize)> {
        let (blocks, b) = self.layout(in_features)?;
        let want = [if self.block_share { 1 } else { blocks }, b * (b - 1) / 2];
        (p.shape == want).then_some((blocks, b))
    }
}

impl Tuner for Oft {
    // PEFT wraps nn.Linear / Conv / Embedding only: a 2-D weight is stored [out, in].
    fn adapts_conv1d(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "OFT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in [PART_LINEAR, PART_EMBEDDING] {
            if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        match self.part(Path::new(""), m) {
            Ok((p, _)) => self.saved_fits(p, out_in[1]).is_some(),
            Err(_) => false,
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let (p, embedding) = self.part(weights, m)?;
        check_float(weights, &[p])?;
        let w = &base.weight;
        let s = w.entry.shape.as_slice();
        let refuse = |why: String| bad_part(weights, p, why);
        if w.transposed {
            return Err(refuse(format!(
                "base '{}' {s:?} is stored [in, out] (a transformers Conv1D / fan_in_fan_out); \
                 PEFT's OFT adapts only Linear, Conv2d and Embedding layers",
                w.entry.name
            )));
        }
        let in_features = match (s, embedding) {
            ([_, c], _) => *c,
            ([_, c, kh, kw], false) if kh == kw => c * kh * kw,
            ([_, _, kh, kw], false) => {
                return Err(refuse(format!(
                    "base '{}' {s:?} has a {kh}x{kw} kernel; PEFT's OFT merge views a Conv2d \
                     weight with a square kernel only",
                    w.entry.name
                )));
            }
            _ => {
                return Err(refuse(format!(
                    "base '{}' has shape {s:?}; OFT adapts Linear [out, in], Conv2d \
                     [out, in, k, k] and Embedding [n, dim] weights",
                    w.entry.name
                )));
            }
        };
        let Some((blocks, b)) = self.saved_fits(p, in_features) else {
            let want = self
                .layout(in_features)
                .map(|(n, b)| [if self.block_share { 1 } else { n }, b * (b - 1) / 2]);
            return Err(refuse(format!(
                "has shape {:?}, but base '{}' {s:?} ({in_features} inputs) with r = {}, \
                 oft_block_size = {}, block_share = {} needs {want:?}",
                p.shape, w.entry.name, self.r, self.oft_block_size, self.block_share
            )));
        };
        if self.neumann && self.neumann_terms == 0 {
            return Err(refuse(
                "num_cayley_neumann_terms is 0; PEFT's series needs at least one term".into(),
            ));
        }
        let rot = Rotation {
            saved: p.clone(),
            block: b,
            blocks,
            cayley: if self.neumann {
                Cayley::Neumann(self.neumann_terms)
            } else {
                Cayley::Solve
            },
            coft: self.coft.then_some(self.eps),
            right_transposed: !embedding,
        };
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Blocks {
                rotation: rot,
                tuner: "OFT",
            }),
        }])
    }
}

/// How the skew-symmetric `Q` becomes an orthogonal block.
#[derive(Clone, Copy, Debug)]
pub(super) enum Cayley {
    /// `(I - Q)(I + Q)⁻¹` by PEFT's `linalg.solve(I + Q, I - Q, left=False)`.
    Solve,
    /// PEFT's truncated Neumann series with this many terms.
    Neumann(usize),
}

/// A block-diagonal rotation of OFT's saved form (upper triangles of `Q`).
#[derive(Debug)]
struct Rotation {
    saved: TensorEntry,
    block: usize,
    /// Blocks along the input dimension (one saved block repeated with `block_share`).
    blocks: usize,
    cayley: Cayley,
    coft: Option<f64>,
    /// `W · Rᵀ` (Linear, Conv2d) rather than `W · R` (Embedding).
    right_transposed: bool,
}

#[derive(Debug)]
struct Blocks {
    rotation: Rotation,
    tuner: &'static str,
}

impl TensorChange for Blocks {
    fn tuner(&self) -> &'static str {
        self.tuner
    }
    fn effect(&self) -> Effect {
        Effect::Transform
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.rotation.saved]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let r = &self.rotation;
        let b = r.block;
        if base.cols != b * r.blocks {
            return Err(Error::Internal(format!(
                "OFT rotation of {} x {b} for '{}' ({} x {})",
                r.blocks, base.base.name, base.rows, base.cols
            )));
        }
        let mut v = decode(&r.saved);
        let n = b * (b - 1) / 2;
        let saved_blocks = v.len().checked_div(n).unwrap_or(r.saved.shape[0]);
        if let Some(eps) = r.coft {
            project(&mut v, saved_blocks, b, eps);
        }
        let mats: Vec<Vec<f32>> = (0..saved_blocks)
            .map(|i| {
                let q = skew_from_triu(&v[i * n..(i + 1) * n], b);
                cayley(&q, b, r.cayley)
            })
            .collect();
        Ok(Box::new(BandRotation::new(
            mats,
            b,
            r.blocks,
            base.cols,
            r.right_transposed,
            None,
        )))
    }
}

/// `Q` from the strict upper triangle (row-major, `torch.triu_indices(b, b, 1)` order):
/// PEFT's `M[rows, cols] = vec; M - Mᵀ`.
fn skew_from_triu(v: &[f32], b: usize) -> Vec<f32> {
    let mut q = vec![0f32; b * b];
    let mut it = v.iter();
    for i in 0..b {
        for j in i + 1..b {
            let x = it.next().copied().unwrap_or(0.0);
            q[i * b + j] = x;
            q[j * b + i] = -x;
        }
    }
    q
}

/// PEFT's `_project_batch` (COFT) on the saved upper triangles, in place.
fn project(v: &mut [f32], blocks: usize, b: usize, eps: f64) {
    let n = b * (b - 1) / 2;
    if n == 0 {
        return;
    }
    // `eps * 1 / torch.sqrt(torch.tensor(blocks))`: Python's `/` on a tensor is
    // `reciprocal() * eps`, in f32.
    let eps = (1.0 / (blocks as f32).sqrt()) * eps as f32;
    for blk in v.chunks_mut(n) {
        let q = skew_from_triu(blk, b);
        let norm = q.iter().fold(0f32, |s, x| s + x * x).sqrt();
        if norm <= eps {
            continue;
        }
        for x in blk.iter_mut() {
            *x = eps * (*x / norm);
        }
    }
}

/// `a · b` for `n x n` row-major matrices, each sum in order over `k` from zero:
/// `fused` with FMA (BLAS kernels), else a rounded multiply then add (ATen's small bmm).
fn square_mm(a: &[f32], b: &[f32], n: usize, fused: bool) -> Vec<f32> {
    let mut c = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            let mut acc = 0f32;
            for k in 0..n {
                acc = if fused {
                    a[i * n + k].mul_add(b[k * n + j], acc)
                } else {
                    acc + a[i * n + k] * b[k * n + j]
                };
            }
            c[i * n + j] = acc;
        }
    }
    c
}

/// PEFT's Cayley transform of one skew-symmetric block `q` (`b x b`).
pub(super) fn cayley(q: &[f32], b: usize, how: Cayley) -> Vec<f32> {
    let eye = |i: usize, j: usize| if i == j { 1f32 } else { 0.0 };
    match how {
        Cayley::Neumann(terms) => {
            // ATen's bmm runs its own plain loops below 400 multiply-adds per product.
            let fused = b * b * b >= 400;
            let mut r: Vec<f32> = (0..b * b).map(|x| eye(x / b, x % b)).collect();
            // `R.add_(X, alpha=2.0)`: 2·X is exact, so one rounding either way.
            let add = |r: &mut Vec<f32>, x: &[f32], alpha: f32| {
                r.iter_mut().zip(x).for_each(|(r, x)| *r += alpha * x);
            };
            if terms > 1 {
                add(&mut r, q, 2.0);
                if terms > 2 {
                    let q2 = square_mm(q, q, b, fused);
                    add(&mut r, &q2, 2.0);
                    let mut qp = q2;
                    for _ in 3..terms - 1 {
                        qp = square_mm(&qp, q, b, fused);
                        add(&mut r, &qp, 2.0);
                    }
                    qp = square_mm(&qp, q, b, fused);
                    add(&mut r, &qp, 1.0);
                }
            }
            r
        }
        Cayley::Solve => {
            let a: Vec<f32> = (0..b * b).map(|x| eye(x / b, x % b) + q[x]).collect();
            let rhs: Vec<f32> = (0..b * b).map(|x| eye(x / b, x % b) - q[x]).collect();
            solve_right(&a, &rhs, b)
        }
    }
}

/// `X` with `X · A = B` (`n x n`, row-major), as torch's `linalg.solve(A, B, left=False)`
/// on the CPU: LAPACK `getrf` of `A` (partial pivoting, pivot column scaled by the
/// reciprocal), then `getrs('T')` on each row of `B`.
pub(super) fn solve_right(a: &[f32], rhs: &[f32], n: usize) -> Vec<f32> {
    let mut lu = a.to_vec();
    let mut piv = vec![0usize; n];
    for k in 0..n {
        let mut p = k;
        for i in k + 1..n {
            if lu[i * n + k].abs() > lu[p * n + k].abs() {
                p = i;
            }
        }
        piv[k] = p;
        if p != k {
            for j in 0..n {
                lu.swap(k * n + j, p * n + j);
            }
        }
        let d = lu[k * n + k];
        if d != 0.0 {
            let rcp = 1.0 / d;
            for i in k + 1..n {
                lu[i * n + k] *= rcp;
            }
        }
        for i in k + 1..n {
            let l = lu[i * n + k];
            for j in k + 1..n {
                lu[i * n + j] = (-l).mul_add(lu[k * n + j], lu[i * n + j]);
            }
        }
    }
    let mut x = vec![0f32; n * n];
    for (row, out) in rhs.chunks(n).zip(x.chunks_mut(n)) {
        // Aᵀ z = bᵀ with Aᵀ = Uᵀ Lᵀ P: Uᵀ (forward), then Lᵀ (backward, unit), then Pᵀ.
        let z = out;
        z.copy_from_slice(row);
        for i in 0..n {
            let mut t = z[i];
            for k in 0..i {
                t = (-lu[k * n + i]).mul_add(z[k], t);
            }
            z[i] = t * (1.0 / lu[i * n + i]);
        }
        for i in (0..n).rev() {
            let mut t = z[i];
            for k in i + 1..n {
                t = (-lu[k * n + i]).mul_add(z[k], t);
            }
            z[i] = t;
        }
        for k in (0..n).rev() {
            z.swap(k, piv[k]);
        }
    }
    x
}

/// A prepared block-diagonal transform of each row: columns `[i·b, (i+1)·b)` of the band
/// times block `i` (or its transpose), then optionally each row scaled.
pub(super) struct BandRotation {
    /// One `b x b` matrix per block, or a single one shared by every block.
    mats: Vec<Vec<f32>>,
    block: usize,
    blocks: usize,
    cols: usize,
    right_transposed: bool,
    row_scale: Option<Vec<f32>>,
}

impl BandRotation {
    pub(super) fn new(
        mats: Vec<Vec<f32>>,
        block: usize,
        blocks: usize,
        cols: usize,
        right_transposed: bool,
        row_scale: Option<Vec<f32>>,
    ) -> Self {
        BandRotation {
            mats,
            block,
            blocks,
            cols,
            right_transposed,
            row_scale,
        }
    }
}

impl BandChange for BandRotation {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let b = self.block;
        let cols = self.cols;
        if b == 0 || cols == 0 || self.mats.is_empty() {
            return;
        }
        let rows = band.len() / cols;
        let mut out = vec![0f32; rows * b];
        for blk in 0..self.blocks {
            let m = &self.mats[if self.mats.len() == 1 { 0 } else { blk }];
            let (rsb, csb) = if self.right_transposed {
                (1, b as isize)
            } else {
                (b as isize, 1)
            };
            // SAFETY: A is rows x b inside the band (row stride cols, starting at column
            // blk·b, blk·b + b <= cols), B is the b x b block, C is `out` (rows x b).
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    b,
                    b,
                    1.0,
                    band.as_ptr().add(blk * b),
                    cols as isize,
                    1,
                    m.as_ptr(),
                    rsb,
                    csb,
                    0.0,
                    out.as_mut_ptr(),
                    b as isize,
                    1,
                );
            }
            for (i, o) in out.chunks(b).enumerate() {
                band[i * cols + blk * b..i * cols + blk * b + b].copy_from_slice(o);
            }
        }
        if let Some(s) = &self.row_scale {
            for (i, row) in band.chunks_mut(cols).enumerate() {
                let f = s[row0 + i];
                row.iter_mut().for_each(|x| *x *= f);
            }
        }
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

    fn oft(r: usize, block: usize, share: bool, neumann: bool) -> Oft {
        Oft {
            r,
            oft_block_size: block,
            coft: false,
            eps: 6e-5,
            block_share: share,
            neumann,
            neumann_terms: 5,
        }
    }

    #[test]
    fn peft_block_layout_and_adjustment() {
        // r = 3 on 10 inputs: PEFT adjusts r to 2 (the nearer divisor, lower on ties).
        assert_eq!(oft(3, 0, false, true).layout(10), Some((2, 5)));
        assert_eq!(oft(0, 4, false, true).layout(10), Some((2, 5)));
        assert_eq!(oft(0, 2, false, true).layout(10), Some((5, 2)));
        assert_eq!(oft(20, 0, false, true).layout(10), Some((10, 1)));
    }

    #[test]
    fn cayley_is_orthogonal_and_matches_the_2x2_closed_form() {
        let a = 0.3f32;
        let q = skew_from_triu(&[a], 2);
        let r = cayley(&q, 2, Cayley::Solve);
        // (I - Q)(I + Q)^-1 for Q = [[0, a], [-a, 0]].
        let d = 1.0 + a * a;
        let want = [
            (1.0 - a * a) / d,
            -2.0 * a / d,
            2.0 * a / d,
            (1.0 - a * a) / d,
        ];
        for (g, w) in r.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{r:?}");
        }
        // The series approximates (I + Q)(I - Q)^-1, the transpose (PEFT's two options
        // rotate opposite ways), to its truncation order.
        let n = cayley(&q, 2, Cayley::Neumann(5));
        for (g, w) in n.iter().zip([want[0], want[2], want[1], want[3]]) {
            assert!((g - w).abs() < 0.02, "{n:?}");
        }
        let q = skew_from_triu(&[0.1, -0.2, 0.05, 0.3, 0.0, -0.1], 4);
        let r = cayley(&q, 4, Cayley::Solve);
        let rrt = square_mm(
            &r,
            &(0..16).map(|x| r[(x % 4) * 4 + x / 4]).collect::<Vec<_>>(),
            4,
            true,
        );
        for (i, x) in rrt.iter().enumerate() {
            let e = if i % 5 == 0 { 1.0 } else { 0.0 };
            assert!((x - e).abs() < 1e-5, "{rrt:?}");
        }
    }

    #[test]
    fn rotates_rows_blockwise_and_checks_shapes() {
        // [3, 4] weight, 2 blocks of 2: W · Rᵀ per block.
        let w: Vec<f32> = (0..12).map(|i| i as f32 - 5.0).collect();
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[3, 4], &w),
                transposed: false,
            },
            bias: None,
        };
        let t = oft(2, 0, false, false);
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(
                PART_LINEAR.to_string(),
                entry("lin0.oft_R.weight", &[2, 1], &[0.5, -0.25]),
            )]
            .into(),
        };
        assert!(t.fits(&m, [3, 4]) && !t.fits(&m, [4, 3]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 2).unwrap();
        let r0 = cayley(&skew_from_triu(&[0.5], 2), 2, Cayley::Solve);
        let r1 = cayley(&skew_from_triu(&[-0.25], 2), 2, Cayley::Solve);
        for i in 0..3 {
            for (blk, r) in [&r0, &r1].iter().enumerate() {
                for j in 0..2 {
                    let want: f32 = (0..2).map(|k| w[i * 4 + blk * 2 + k] * r[j * 2 + k]).sum();
                    let g = got[i * 4 + blk * 2 + j];
                    assert!((g - want).abs() < 1e-5, "{got:?}");
                }
            }
        }
        // Rows are rotated, so their norms stay.
        for i in 0..3 {
            let n0: f32 = w[i * 4..i * 4 + 4].iter().map(|x| x * x).sum();
            let n1: f32 = got[i * 4..i * 4 + 4].iter().map(|x| x * x).sum();
            assert!((n0 - n1).abs() < 1e-3);
        }
        // A base with other inputs is reported with both names.
        let wide = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 6], &[0.0; 12]),
                transposed: false,
            },
            bias: None,
        };
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &wide)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.oft_R.weight") && e.contains("lin0.weight"),
            "{e}"
        );
    }
}
