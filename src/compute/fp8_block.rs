//! FP8 block quantization of merged weights (`--requantize fp8-block`), as a sink in front
//! of the run's sink: a merged weight the plan lists as an [`Fp8Requant`] arrives in its
//! merge dtype (bf16 by default), is gathered one band of `block.0` whole rows at a time
//! (whatever the pieces the backend writes; the bands of one piece on the merge's number
//! of threads), quantized, and goes on as float8_e4m3fn;
//! its f32 scales (a few bytes per block) follow as the next tensor. Every other tensor
//! passes through untouched, ties re-pointed at the sink's indices.
//!
//! The arithmetic is transformers' `Fp8Quantize._quantize_one`
//! (transformers 5.23, src/transformers/integrations/finegrained_fp8.py), in f32:
//! `amax` = max |w| of the block; `scale = 448 / amax` (1 where amax is 0) — computed as
//! torch computes a scalar over a tensor, `(1 / amax) · 448`;
//! `weight_scale_inv = 1 / scale`; `q = clamp(w · scale, -448, 448).to(float8_e4m3fn)`,
//! torch's cast being c10's `fp8e4m3fn_from_fp32_value` (round to nearest even,
//! |x| ≥ 480 → NaN, subnormals rounded through an f32 add). Each step is one correctly
//! rounded f32 operation, so the bytes are torch's exactly.

use crate::dtype::decode_f32;
use crate::error::{Error, Result};
use crate::plan::requantize::Fp8Requant;
use crate::sink::{OutTensor, SharedBytes, TensorSink};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// The largest finite float8_e4m3fn.
const FP8_MAX: f32 = 448.0;

/// f32 → float8_e4m3fn bits as c10's `fp8e4m3fn_from_fp32_value` computes them
/// (c10/util/Float8_e4m3fn.h): round to nearest even; |x| ≥ 480 (and NaN) → 0x7F.
pub fn f32_to_e4m3fn(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7FFF_FFFF;
    // 480 = 1087 << 20 as f32 bits: everything at or above (inf and NaN too) is NaN.
    const FP8_OVER: u32 = 1087 << 20;
    // Below 2^-6 (121 << 23) the result is subnormal.
    const DENORM_LIMIT: u32 = 121 << 23;
    let r = if a >= FP8_OVER {
        0x7F
    } else if a < DENORM_LIMIT {
        // Adding 2^14 leaves f32 an ulp of 2^-9, the fp8 subnormal step: the FPU rounds.
        let magic = f32::from_bits(141 << 23);
        ((f32::from_bits(a) + magic).to_bits() - (141 << 23)) as u8
    } else {
        let odd = (a >> 20) & 1;
        let m = a
            .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7FFFF))
            .wrapping_add(odd);
        (m >> 20) as u8
    };
    r | sign
}

/// Quantizes one band of `rows × cols` f32 values (`rows` a multiple of `block.0`, `cols`
/// of `block.1`) into `q` (fp8 bytes, row-major) and appends its scales (row-major over
/// the band's blocks, little-endian f32) to `scales`.
pub fn quantize_band(
    vals: &[f32],
    cols: usize,
    block: (usize, usize),
    q: &mut [u8],
    scales: &mut Vec<u8>,
) {
    let (b0, b1) = block;
    let rows = vals.len() / cols;
    for br in 0..rows / b0 {
        for bc in 0..cols / b1 {
            let cell = |r: usize| (br * b0 + r) * cols + bc * b1;
            let (mut amax, mut nan) = (0f32, false);
            for r in 0..b0 {
                for &v in &vals[cell(r)..cell(r) + b1] {
                    amax = amax.max(v.abs());
                    nan |= v.is_nan();
                }
            }
            // torch's amax propagates NaN, and `max_abs > 0` is then false: scale 1.
            // (Merges are checked finite before this unless --allow-non-finite.)
            if nan {
                amax = f32::NAN;
            }
            // `_FP8_MAX / safe_max_abs` is a Python scalar over a tensor: torch's
            // `__rtruediv__` computes `reciprocal(t) * 448`, two roundings (not one
            // division); `1.0 / scales` is then a plain reciprocal.
            let scale = if amax > 0.0 {
                (1.0 / amax) * FP8_MAX
            } else {
                1.0
            };
            let inv = 1.0 / scale;
            scales.extend_from_slice(&inv.to_le_bytes());
            for r in 0..b0 {
                let at = cell(r);
                for (o, &v) in q[at..at + b1].iter_mut().zip(&vals[at..at + b1]) {
                    // torch.clamp keeps NaN; f32::clamp does too.
                    *o = f32_to_e4m3fn((v * scale).clamp(-FP8_MAX, FP8_MAX));
                }
            }
        }
    }
}

/// The weight being quantized.
struct Current {
    spec: Fp8Requant,
    cols: usize,
    /// Bytes received and not yet quantized (less than a band, between writes).
    pending: Vec<u8>,
    scales: Vec<u8>,
}

/// A sink that quantizes the merged weights the plan lists as they pass (see the module
/// comment) into `inner`.
pub struct Requantizer<'a> {
    inner: &'a mut dyn TensorSink,
    specs: HashMap<String, Fp8Requant>,
    /// Job index → the index of its (first) tensor in the sink's plan.
    sink_index: Vec<usize>,
    cur: Option<Current>,
    /// The workers that quantize a piece's bands (as many as the merge's).
    pool: rayon::ThreadPool,
}

impl<'a> Requantizer<'a> {
    /// `threads`: quantizing workers (None: one per core, as the merge's `--threads`).
    pub fn new(
        inner: &'a mut dyn TensorSink,
        specs: &[Fp8Requant],
        sink_index: Vec<usize>,
        threads: Option<usize>,
    ) -> Result<Requantizer<'a>> {
        let (pool, _) = super::worker_pool(threads, "quantizing")?;
        Ok(Requantizer {
            pool,
            inner,
            specs: specs
                .iter()
                .map(|s| (s.input.name.clone(), s.clone()))
                .collect(),
            sink_index,
            cur: None,
        })
    }

    fn take(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(c) = self.cur.as_mut() else {
            return self.inner.write(bytes);
        };
        c.pending.extend_from_slice(bytes);
        let es = c.spec.input.dtype.size();
        let band = c.spec.block.0 * c.cols * es;
        let whole = c.pending.len() / band * band;
        if whole == 0 {
            return Ok(());
        }
        // The piece's bands in parallel (blocks are independent, so the bytes do not
        // depend on the split), each decoded to f32 one band at a time per worker: memory
        // stays a band per worker, not the piece. Scales are kept in band order.
        let mut q = self.inner.buffer();
        q.resize(whole / es, 0);
        let (dtype, cols, block) = (c.spec.input.dtype, c.cols, c.spec.block);
        let pending = &c.pending[..whole];
        let band_scales: Vec<Vec<u8>> = self.pool.install(|| {
            pending
                .par_chunks_exact(band)
                .zip(q.par_chunks_exact_mut(band / es))
                .map_init(Vec::new, |vals: &mut Vec<f32>, (src, dst)| {
                    vals.resize(band / es, 0.0);
                    decode_f32(dtype, src, vals);
                    let mut scales = Vec::new();
                    quantize_band(vals, cols, block, dst, &mut scales);
                    scales
                })
                .collect()
        });
        band_scales
            .iter()
            .for_each(|s| c.scales.extend_from_slice(s));
        c.pending.drain(..whole);
        self.inner.write_owned(q)
    }
}

impl TensorSink for Requantizer<'_> {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        match self.specs.get(&t.name) {
            Some(spec) if *t == spec.input => {
                let cols = spec.input.shape.last().copied().unwrap_or(1);
                self.inner.begin(&spec.weight)?;
                self.cur = Some(Current {
                    spec: spec.clone(),
                    cols,
                    pending: Vec::new(),
                    scales: Vec::new(),
                });
                Ok(())
            }
            Some(_) => Err(Error::Internal(format!(
                "{}: the tensor to re-quantize is not the one planned",
                t.name
            ))),
            None => self.inner.begin(t),
        }
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.take(bytes)
    }
    fn write_owned(&mut self, bytes: Vec<u8>) -> Result<()> {
        if self.cur.is_some() {
            self.take(&bytes)
        } else {
            self.inner.write_owned(bytes)
        }
    }
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        if self.cur.is_some() {
            self.take(&src.bytes()[start..start + len])?;
            src.done(start, len);
            Ok(())
        } else {
            self.inner.write_shared(src, start, len)
        }
    }
    fn buffer(&mut self) -> Vec<u8> {
        self.inner.buffer()
    }
    fn end(&mut self) -> Result<()> {
        let Some(c) = self.cur.take() else {
            return self.inner.end();
        };
        if !c.pending.is_empty() {
            return Err(Error::Internal(format!(
                "{}: {} bytes left over after the last whole band of {} rows",
                c.spec.input.name,
                c.pending.len(),
                c.spec.block.0
            )));
        }
        self.inner.end()?;
        self.inner.begin(&c.spec.scales)?;
        self.inner.write_owned(c.scales)?;
        self.inner.end()
    }
    fn shares_storage(&self) -> bool {
        self.inner.shares_storage()
    }
    fn tie(&mut self, t: &OutTensor, to: usize) -> Result<()> {
        let at = self
            .sink_index
            .get(to)
            .copied()
            .ok_or_else(|| Error::Internal(format!("{}: tie to unknown job {to}", t.name)))?;
        match self.specs.get(&t.name) {
            Some(spec) => {
                let (w, s) = (spec.weight.clone(), spec.scales.clone());
                self.inner.tie(&w, at)?;
                self.inner.tie(&s, at + 1)
            }
            None => self.inner.tie(t, at),
        }
    }
    fn finish(self: Box<Self>) -> Result<()> {
        // The wrapped sink is finished by whoever owns it.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::quantized::e4m3fn_to_f32 as e4m3;

    #[test]
    fn every_code_round_trips_and_ties_go_to_even() {
        for b in 0u8..=255 {
            let v = e4m3(b);
            if v.is_nan() {
                assert_eq!(f32_to_e4m3fn(v) & 0x7F, 0x7F);
                continue;
            }
            let got = f32_to_e4m3fn(v);
            // +0 and -0 are both kept.
            assert_eq!(got, b, "{b:#x} = {v}");
        }
        // 1.0 = 0x38, next 1.125 = 0x39: the midpoint goes to the even code 0x38,
        // the midpoint of 1.125 and 1.25 to 0x3A.
        assert_eq!(f32_to_e4m3fn(1.0625), 0x38);
        assert_eq!(f32_to_e4m3fn(1.1875), 0x3A);
        // Subnormals: 2^-9 steps; half a step rounds to even (0).
        assert_eq!(f32_to_e4m3fn(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3fn(3.0 * 2f32.powi(-10)), 0x02);
        // 448 is the largest; from 480 on it is NaN (torch's cast; the quantizer clamps).
        assert_eq!(f32_to_e4m3fn(448.0), 0x7E);
        assert_eq!(f32_to_e4m3fn(-480.0), 0xFF);
    }

    #[test]
    fn a_band_is_scaled_per_block() {
        // 2×4 with 2×2 blocks: block 0 amax 4, block 1 amax 0 (scale 1).
        let vals = [1.0, -4.0, 0.0, 0.0, 2.0, 3.0, 0.0, 0.0];
        let mut q = [0u8; 8];
        let mut s = Vec::new();
        quantize_band(&vals, 4, (2, 2), &mut q, &mut s);
        let scale = (1.0f32 / 4.0) * 448.0;
        assert_eq!(q[0], f32_to_e4m3fn(scale));
        assert_eq!(q[1], f32_to_e4m3fn(-448.0));
        assert_eq!(q[5], f32_to_e4m3fn(3.0 * scale));
        assert_eq!(q[2], 0);
        let inv: Vec<f32> = s
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(inv, [1.0 / scale, 1.0]);
    }
}
