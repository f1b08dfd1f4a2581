//! Low-rank products `ΔW = L · R` summed in the order torch's CPU matmul sums them, so that
//! tuners whose PEFT merge is an f32 `B @ A` (VeRA, PVeRA, RandLora, VB-LoRA, TinyLoRA…) give
//! PEFT's bits, computed one band of rows at a time.
//!
//! Measured on torch 2.15's CPU matmul (MKL sgemm, one thread): for an inner dimension of at
//! most 256 every element is a sequential fused multiply-add over k, starting from 0
//! (`acc = fma(l[i,k], r[k,j], acc)`, k = 0, 1, …); all 2-D products of the tuner fixtures
//! match bit for bit. Above 256 MKL splits k into blocks whose size depends on the shape and
//! adds the partial sums; there the sequential sum differs from PEFT's by round-off only
//! (a few ulps of the delta, not of the weight, away from cancellation).
//!
//! `f32::mul_add` is a true fused multiply-add on every target (a library call where the CPU
//! has none); on x86-64 with FMA the loops run in a copy compiled for it, so they vectorise.

/// `ΔW = L · R` with `L` `[out, r]` and `R` `[r, in]` (PEFT's orientation), handed out in the
/// stored orientation: rows of `ΔW` or, for a weight stored transposed, rows of `ΔWᵀ`.
#[derive(Debug)]
pub struct LowRank {
    /// The left factor in the stored orientation: `[rows, r]`.
    x: Vec<f32>,
    /// The right factor in the stored orientation: `[r, cols]`.
    y: Vec<f32>,
    r: usize,
    cols: usize,
}

impl LowRank {
    /// `left` `[out, r]`, `right` `[r, in]`, row-major; `transposed`: the weight is stored
    /// `[in, out]`. Each element of `ΔWᵀ` is the same sum of the same products in the same
    /// order as the element of `ΔW` torch transposes, so both orientations give PEFT's bits.
    pub fn new(
        left: &[f32],
        right: &[f32],
        out: usize,
        r: usize,
        inn: usize,
        transposed: bool,
    ) -> Self {
        debug_assert_eq!(left.len(), out * r);
        debug_assert_eq!(right.len(), r * inn);
        if transposed {
            LowRank {
                x: transpose(right, r, inn),
                y: transpose(left, out, r),
                r,
                cols: out,
            }
        } else {
            LowRank {
                x: left.to_vec(),
                y: right.to_vec(),
                r,
                cols: inn,
            }
        }
    }

    /// Stored rows of ΔW.
    pub fn rows(&self) -> usize {
        self.x.len() / self.r.max(1)
    }

    /// Stored columns of ΔW.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Writes rows `[row0, row0 + out.len() / cols)` of ΔW (stored orientation) into `out`.
    pub fn rows_into(&self, row0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("avx2")
            {
                // SAFETY: the CPU has the features the copy was compiled for (checked above).
                unsafe { rows_fma(&self.x, &self.y, self.r, self.cols, row0, out) };
                return;
            }
        }
        rows_generic(&self.x, &self.y, self.r, self.cols, row0, out);
    }

    /// Adds rows of ΔW to a band (`band[i] += ΔW[i]` in f32, one rounding, as torch's
    /// `weight += delta` does for an f32 delta).
    pub fn add_into(&self, row0: usize, band: &mut [f32]) {
        let mut d = vec![0f32; band.len()];
        self.rows_into(row0, &mut d);
        band.iter_mut().zip(&d).for_each(|(w, d)| *w += d);
    }
}

/// Row-major `[rows, cols]` -> `[cols, rows]`.
pub fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = v[i * cols + j];
        }
    }
    t
}

#[inline(always)]
fn rows_generic(x: &[f32], y: &[f32], r: usize, cols: usize, row0: usize, out: &mut [f32]) {
    if cols == 0 {
        return;
    }
    for (i, acc) in out.chunks_mut(cols).enumerate() {
        acc.iter_mut().for_each(|a| *a = 0.0);
        let xi = &x[(row0 + i) * r..(row0 + i + 1) * r];
        for (k, &a) in xi.iter().enumerate() {
            let yk = &y[k * cols..(k + 1) * cols];
            for (s, &b) in acc.iter_mut().zip(yk) {
                *s = a.mul_add(b, *s);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_fma(x: &[f32], y: &[f32], r: usize, cols: usize, row0: usize, out: &mut [f32]) {
    rows_generic(x, y, r, cols, row0, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_are_sequential_fmas_in_both_orientations() {
        // 0.1 · 3 + 1e-8 · 1: with one rounding per step (no fma) the small term is lost
        // differently; check against an exact f64 sequential fma.
        let l = [0.1f32, 1e-8, -0.3, 0.7, 2.5, -1.25];
        let r = [3.0f32, 1.0, 1.0 / 3.0, 0.2, -7.0, 0.125];
        let (out, rk, inn) = (2, 3, 2);
        let lr = LowRank::new(&l, &r, out, rk, inn, false);
        let mut d = vec![0f32; 4];
        lr.rows_into(0, &mut d);
        for i in 0..out {
            for j in 0..inn {
                let mut acc = 0f32;
                for k in 0..rk {
                    acc = ((l[i * rk + k] as f64) * (r[k * inn + j] as f64) + acc as f64) as f32;
                }
                assert_eq!(d[i * inn + j], acc);
            }
        }
        let lt = LowRank::new(&l, &r, out, rk, inn, true);
        let mut dt = vec![0f32; 4];
        lt.rows_into(0, &mut dt[..2]);
        lt.rows_into(1, &mut dt[2..]);
        assert_eq!(dt, transpose(&d, 2, 2));
    }
}
