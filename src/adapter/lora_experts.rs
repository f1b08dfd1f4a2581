//! LoRA on a 3-D `nn.Parameter` (`target_parameters` on fused MoE experts: gpt-oss,
//! Qwen3-MoE, Llama 4…), merged as PEFT 0.21.2's `ParamWrapper` does, one expert at a time.
//!
//! PEFT (`tuners/lora/layer.py`, `ParamWrapper`): for a parameter of shape `[E, d1, d2]`
//! it first reads `in = d1, out = d2`, then swaps them unless the owning module says
//! `is_transposed` (transformers' `use_experts_implementation(is_transposed=True)`:
//! gpt-oss, Aria, openai-privacy-filter). So by default the parameter is taken as
//! `[E, out, in]` (`_did_swap_in_out_features`), and as `[E, in, out]` for `is_transposed`
//! modules. The factors are one `nn.Linear` pair for all experts: `lora_A` `[r·E, in]`
//! (expert `e`'s rows `e·r .. e·r + r`), `lora_B` `[out, r·E]` (expert `e`'s columns
//! `k·E + e`, interleaved: PEFT reshapes B to `[out, r, E]`). The merge:
//!
//! ```text
//! ΔW = einsum("o r e, e r i -> e o i", B, A) * s     (swapped: [E, out, in])
//! ΔW = einsum("o r e, e r i -> e i o", B, A) * s     (is_transposed: [E, in, out])
//! W += ΔW.to(W.dtype)                                (two roundings for 16-bit W)
//! ```
//!
//! With one expert PEFT uses `Linear.get_delta_weight` (`B @ A`, `[out, in]`) and adds it
//! to the `[1, d1, d2]` parameter by broadcasting: the swapped formula, whatever
//! `is_transposed` says (the only case PEFT's add accepts is `[d1, d2] = [out, in]`).
//!
//! The engine sees the parameter as rows = experts, columns = the rest, so a band row is
//! one expert; ΔW is made one expert at a time, summed over the rank in order with each
//! product rounded (torch's CPU bmm kernel for small problems, bit-identical there; for
//! large experts torch hands the einsum to a blocked GEMM whose order is its own, so ΔW
//! may differ by an ulp). Factors are f32 in PEFT after loading (it upcasts 16-bit adapter
//! weights), so the math is f32.

use crate::adapter::tuners::{BandChange, BandSource, Effect, TensorChange, decode};
use crate::error::{Error, Result};
use crate::source::TensorEntry;

/// How the parameter's trailing dims line up with the factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertsLayout {
    /// `[E, out, in]`: PEFT's default (`_did_swap_in_out_features`).
    OutIn,
    /// `[E, in, out]`: the owning module has `is_transposed = True`.
    InOut,
}

/// One LoRA on a 3-D experts parameter.
#[derive(Debug)]
pub struct ExpertsDelta {
    /// `lora_A.weight`, `[r·E, in]`.
    pub a: TensorEntry,
    /// `lora_B.weight`, `[out, r·E]`.
    pub b: TensorEntry,
    pub experts: usize,
    /// Rank per expert.
    pub r: usize,
    pub scale: f32,
    pub layout: ExpertsLayout,
}

impl ExpertsDelta {
    /// The layouts the factors fit on a parameter of `shape` (`[E, d1, d2]`) with rank `r`:
    /// (fits `[E, out, in]`, fits `[E, in, out]`).
    pub fn fits(a: &[usize], b: &[usize], shape: &[usize], r: usize) -> (bool, bool) {
        let &[e, d1, d2] = shape else {
            return (false, false);
        };
        let re = r * e;
        let out_in = a == [re, d2] && b == [d1, re];
        // With one expert PEFT's add only works as [out, in] (see the module comment).
        let in_out = e > 1 && a == [re, d1] && b == [d2, re];
        (out_in, in_out)
    }

    /// One expert's (in, out) features: A is `[r·E, in]`, B `[out, r·E]`.
    fn in_out(&self) -> (usize, usize) {
        (
            self.a.shape.get(1).copied().unwrap_or(0),
            self.b.shape.first().copied().unwrap_or(0),
        )
    }
}

impl TensorChange for ExpertsDelta {
    fn tuner(&self) -> &'static str {
        "LoRA (experts)"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.a, &self.b]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (fin, fout) = self.in_out();
        let re = self.r * self.experts;
        if base.rows != self.experts
            || base.cols != fin * fout
            || self.a.shape != [re, fin]
            || self.b.shape != [fout, re]
        {
            return Err(Error::Internal(format!(
                "experts LoRA A {:?} / B {:?} (rank {}, {} experts) for '{}' ({} x {})",
                self.a.shape,
                self.b.shape,
                self.r,
                self.experts,
                base.base.name,
                base.rows,
                base.cols
            )));
        }
        Ok(Box::new(Prepared {
            a: decode(&self.a),
            b: regroup_b(&decode(&self.b), self.experts, self.r, fout, self.layout),
            change: self,
            dtype: base.dtype(),
            fin,
            fout,
        }))
    }
}

struct Prepared<'c> {
    a: Vec<f32>,
    /// B regrouped per expert: `[E, out, r]` (OutIn) or `[E, r, out]` (InOut).
    b: Vec<f32>,
    change: &'c ExpertsDelta,
    dtype: crate::dtype::Dtype,
    fin: usize,
    fout: usize,
}

/// B `[out, r·E]` (expert `e`'s column `k` at `k·E + e`) regrouped per expert.
fn regroup_b(b: &[f32], experts: usize, r: usize, fout: usize, layout: ExpertsLayout) -> Vec<f32> {
    let mut out = vec![0f32; b.len()];
    for e in 0..experts {
        for o in 0..fout {
            for k in 0..r {
                let at = match layout {
                    ExpertsLayout::OutIn => (e * fout + o) * r + k,
                    ExpertsLayout::InOut => (e * r + k) * fout + o,
                };
                out[at] = b[o * r * experts + k * experts + e];
            }
        }
    }
    out
}

impl Prepared<'_> {
    /// ΔW of expert `e` (scaled, f32) into `out` (`fin·fout` values, the stored layout).
    /// Every element is `((p₀ + p₁) + … + p_{r-1}) · s` with each product rounded, the
    /// order of torch's CPU bmm kernel for small batches (what PEFT's einsum runs on);
    /// rows are accumulated whole so the loop vectorises without changing that order.
    fn delta(&self, e: usize, out: &mut [f32]) {
        let (r, fin, fout) = (self.change.r, self.fin, self.fout);
        let a = &self.a[e * r * fin..(e + 1) * r * fin];
        let b = &self.b[e * r * fout..(e + 1) * r * fout];
        out.fill(0.0);
        match self.change.layout {
            // out[o, :] = Σ_k B_e[o, k] · A_e[k, :]
            ExpertsLayout::OutIn => {
                for (row, bo) in out.chunks_exact_mut(fin).zip(b.chunks_exact(r)) {
                    for (&bk, ak) in bo.iter().zip(a.chunks_exact(fin)) {
                        row.iter_mut().zip(ak).for_each(|(x, &y)| *x += bk * y);
                    }
                }
            }
            // out[i, :] = Σ_k A_e[k, i] · B_e[:, k]
            ExpertsLayout::InOut => {
                for (i, row) in out.chunks_exact_mut(fout).enumerate() {
                    for (ak, bk) in a.chunks_exact(fin).zip(b.chunks_exact(fout)) {
                        let x = ak[i];
                        row.iter_mut().zip(bk).for_each(|(o, &y)| *o += x * y);
                    }
                }
            }
        }
        // PEFT: einsum(…) * scaling, a separate f32 multiply.
        let s = self.change.scale;
        out.iter_mut().for_each(|x| *x *= s);
    }
}

impl BandChange for Prepared<'_> {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let cols = self.fin * self.fout;
        let mut d = vec![0f32; cols];
        for (i, row) in band.chunks_mut(cols).enumerate() {
            self.delta(row0 + i, &mut d);
            // ParamWrapper.get_delta_weight ends with `.to(param.dtype)` before the add.
            crate::dtype::round_through(self.dtype, &mut d);
            row.iter_mut().zip(&d).for_each(|(w, x)| *w += x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::run_in_memory;
    use crate::dtype::{Dtype, encode_f32};
    use std::path::Path;

    fn entry(name: &str, dtype: Dtype, shape: &[usize], v: &[f32]) -> TensorEntry {
        let mut bytes = vec![0u8; v.len() * dtype.size()];
        encode_f32(dtype, v, &mut bytes);
        TensorEntry::in_memory(Path::new("t"), name, dtype, shape.to_vec(), &bytes).unwrap()
    }

    fn vals(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + seed).sin() * 1.7).round() / 4.0)
            .collect()
    }

    /// PEFT's einsum written out with its reshapes, in f64 (the test values are exact).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f32],
        b: &[f32],
        e: usize,
        r: usize,
        fin: usize,
        fout: usize,
        s: f32,
        layout: ExpertsLayout,
    ) -> Vec<f32> {
        let mut out = vec![0f32; e * fin * fout];
        for x in 0..e {
            for o in 0..fout {
                for i in 0..fin {
                    let mut acc = 0f64;
                    for k in 0..r {
                        // B.reshape(out, r, E)[o, k, x]; A.reshape(E, r, in)[x, k, i]
                        acc += b[o * r * e + k * e + x] as f64 * a[(x * r + k) * fin + i] as f64;
                    }
                    let at = match layout {
                        ExpertsLayout::OutIn => x * fout * fin + o * fin + i,
                        ExpertsLayout::InOut => x * fin * fout + i * fout + o,
                    };
                    out[at] = (acc as f32) * s;
                }
            }
        }
        out
    }

    #[test]
    fn each_expert_gets_its_own_rows_and_interleaved_columns() {
        let (e, r, fin, fout) = (3, 2, 5, 4);
        let a = vals(r * e * fin, 0.1);
        let b = vals(fout * r * e, 2.3);
        for layout in [ExpertsLayout::OutIn, ExpertsLayout::InOut] {
            let shape = match layout {
                ExpertsLayout::OutIn => [e, fout, fin],
                ExpertsLayout::InOut => [e, fin, fout],
            };
            let w = vals(e * fin * fout, 5.0);
            let base = entry("experts", Dtype::F32, &shape, &w);
            let ch = ExpertsDelta {
                a: entry("lora_A", Dtype::F32, &[r * e, fin], &a),
                b: entry("lora_B", Dtype::F32, &[fout, r * e], &b),
                experts: e,
                r,
                scale: 0.5,
                layout,
            };
            let d = reference(&a, &b, e, r, fin, fout, 0.5, layout);
            let want: Vec<f32> = w.iter().zip(&d).map(|(x, y)| x + y).collect();
            for band in [1, 2, 3] {
                assert_eq!(run_in_memory(&ch, &base, band).unwrap(), want, "{layout:?}");
            }
        }
    }

    #[test]
    fn delta_is_rounded_to_bf16_before_the_add() {
        let (e, r, fin, fout) = (2, 1, 1, 1);
        let w2 = [2.0f32, 2.0];
        let base2 = entry("experts", Dtype::BF16, &[e, fout, fin], &w2);
        // ΔW = 2^-7 + 2^-16: rounded first it is 2^-7 and 2 + 2^-7 is a tie that rounds
        // to even (2.0); unrounded, 2 + 2^-7 + 2^-16 rounds up to 2.015625.
        let d2 = 2f32.powi(-7) + 2f32.powi(-16);
        let ch2 = ExpertsDelta {
            a: entry("lora_A", Dtype::F32, &[r * e, fin], &[d2, d2]),
            b: entry("lora_B", Dtype::F32, &[fout, r * e], &[1.0, 1.0]),
            experts: e,
            r,
            scale: 1.0,
            layout: ExpertsLayout::OutIn,
        };
        assert_eq!(run_in_memory(&ch2, &base2, 2).unwrap(), vec![2.0, 2.0]);
    }

    #[test]
    fn fits_tells_the_layouts_apart_unless_square() {
        // [E=3, 8, 6], r = 2: A [6, 6] B [8, 6] fits [E, out, in]; A [6, 8] B [6, 6] [E, in, out].
        assert_eq!(
            ExpertsDelta::fits(&[6, 6], &[8, 6], &[3, 8, 6], 2),
            (true, false)
        );
        assert_eq!(
            ExpertsDelta::fits(&[6, 8], &[6, 6], &[3, 8, 6], 2),
            (false, true)
        );
        assert_eq!(
            ExpertsDelta::fits(&[6, 4], &[4, 6], &[3, 4, 4], 2),
            (true, true)
        );
        // One expert: only [out, in] works in PEFT.
        assert_eq!(
            ExpertsDelta::fits(&[2, 4], &[4, 2], &[1, 4, 4], 2),
            (true, false)
        );
        assert_eq!(
            ExpertsDelta::fits(&[4, 4], &[8, 4], &[3, 8, 4], 2),
            (false, false)
        );
    }
}
