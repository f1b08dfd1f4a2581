//! The non-finite check every backend applies to merged values (PEFT's `safe_merge` idea,
//! on by default, `--allow-non-finite` turns it off): a merge that turns a finite weight
//! into ±inf or NaN — large LoRA factors overflowing f16, NaN in an adapter — fails with
//! the tensor, the count and the first element named, instead of writing a model that
//! produces NaN at inference.
//!
//! What counts as "created": an output element that is non-finite in the output dtype
//! where the value the merge started from (the base tensor, or its last replacement from
//! the adapter) is finite. An element that was already inf/NaN in that source stays as
//! PEFT leaves it and is not reported: the merge did not make it so, and refusing would
//! make such a model unmergeable.
//!
//! Backends check where a band's values are final, on the encoded output (so a finite f32
//! that rounds to inf in f16 counts): the CPU backend chunk by chunk as it encodes them
//! ([`encode_checked`], no extra pass over memory), the CUDA backend on the bytes it
//! copies back ([`encoded_non_finite`]). Only bands with a hit look at the source again.

use crate::dtype::{Dtype, encode_f32};
use crate::error::Error;
use std::path::Path;

/// Elements encoded per chunk: small enough that a chunk scanned for non-finite values is
/// still in L1 when it is encoded, so the check adds no pass over memory.
const CHUNK: usize = 4096;

/// Non-finite output values found so far in one tensor (in plan order of bands).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NonFinite {
    pub count: usize,
    /// The first one: element index (row-major) and its f32 value before encoding (for
    /// the CUDA backend: after, as decoded).
    pub first: Option<(usize, f32)>,
}

impl NonFinite {
    pub fn add(&mut self, index: usize, value: f32) {
        self.merge(NonFinite {
            count: 1,
            first: Some((index, value)),
        });
    }

    /// Adds the hits of another band (bands finish in any order).
    pub fn merge(&mut self, other: NonFinite) {
        self.count += other.count;
        if let Some((i, v)) = other.first {
            if self.first.is_none_or(|(j, _)| i < j) {
                self.first = Some((i, v));
            }
        }
    }

    /// The error for a tensor whose merge created these values (None when there are none).
    pub fn error(&self, file: &Path, tensor: &str, cols: usize, out_dtype: Dtype) -> Option<Error> {
        let (first, value) = self.first?;
        let cols = cols.max(1);
        let max = match out_dtype {
            Dtype::F16 => " (f16 holds at most ±65504)",
            Dtype::BF16 => " (bf16 holds at most ±3.39e38)",
            _ => "",
        };
        Some(Error::tensor(
            file,
            tensor,
            format!(
                "the merge created {} non-finite value(s) (inf/NaN) in {out_dtype}{max}, the first at \
                 element {first} (row {}, column {}, value {value}); the value the merge started \
                 from there was finite. Nothing was written. Check the adapter's factors, merge into a \
                 wider --dtype, or pass --allow-non-finite to write them anyway",
                self.count,
                first / cols,
                first % cols,
            ),
        ))
    }
}

/// Encodes `src` into `dst` as `dtype` (like `encode_f32`) and, when `check`, returns the
/// indices (relative to `src`) of values that come out non-finite. Chunk by chunk: each
/// encoded chunk is scanned while it is still in L1 (exponent bits all set, integer
/// lanes, which vectorise with plain SSE2), so the check adds no pass over memory; only a
/// chunk with a hit is walked again to list its indices.
pub fn encode_checked(dtype: Dtype, src: &[f32], dst: &mut [u8], check: bool) -> Vec<usize> {
    let mut hits = Vec::new();
    if !check {
        encode_f32(dtype, src, dst);
        return hits;
    }
    let es = dtype.size();
    for (ci, (s, d)) in src
        .chunks(CHUNK)
        .zip(dst.chunks_mut(CHUNK * es))
        .enumerate()
    {
        encode_f32(dtype, s, d);
        if any_non_finite(dtype, d) {
            hits.extend(
                encoded_non_finite(dtype, d)
                    .into_iter()
                    .map(|i| ci * CHUNK + i),
            );
        }
    }
    hits
}

/// Whether any element of `bytes` (little-endian `dtype`) has all exponent bits set.
fn any_non_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    fn scan<T>(bytes: &[u8], mask: T) -> Option<bool>
    where
        T: bytemuck::Pod + std::ops::BitAnd<Output = T> + PartialEq,
    {
        // Aligned in practice (chunks of a Vec at multiples of 16 KiB); else the slow path.
        let lanes = bytemuck::try_cast_slice::<u8, T>(bytes).ok()?;
        Some(
            lanes
                .iter()
                .fold(false, |any, &x| any | ((x & mask) == mask)),
        )
    }
    // The lanes are read in native order: the element bytes are little-endian.
    let fast = if cfg!(target_endian = "little") {
        match dtype {
            Dtype::F16 => scan(bytes, 0x7C00u16),
            Dtype::BF16 => scan(bytes, 0x7F80u16),
            Dtype::F32 => scan(bytes, 0x7F80_0000u32),
            _ => None,
        }
    } else {
        None
    };
    fast.unwrap_or_else(|| !encoded_non_finite(dtype, bytes).is_empty())
}

/// Indices of the elements of `bytes` (encoded as `dtype`) that are ±inf or NaN: all
/// exponent bits set. Integer work only, no decode.
pub fn encoded_non_finite(dtype: Dtype, bytes: &[u8]) -> Vec<usize> {
    let (es, mask): (usize, u64) = match dtype {
        Dtype::F16 => (2, 0x7C00),
        Dtype::BF16 => (2, 0x7F80),
        Dtype::F32 => (4, 0x7F80_0000),
        Dtype::F64 => (8, 0x7FF0_0000_0000_0000),
        _ => return Vec::new(),
    };
    bytes
        .chunks_exact(es)
        .enumerate()
        .filter(|(_, b)| {
            let mut v = [0u8; 8];
            v[..es].copy_from_slice(b);
            u64::from_le_bytes(v) & mask == mask
        })
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::decode_f32;

    /// The smallest magnitude of a finite f32 that encodes as ±inf in `dtype` (round to
    /// nearest even: halfway between the largest finite value and the next power of two
    /// rounds to the even neighbour, which is inf). `!(|v| < this)` also holds for inf and NaN.
    fn overflow_threshold(dtype: Dtype) -> f32 {
        match dtype {
            // Largest f16 65504; 65520 is halfway to 65536.
            Dtype::F16 => 65520.0,
            // Largest bf16 0x7F7F; 0x7F7F8000 is halfway to 0x7F80 (inf).
            Dtype::BF16 => f32::from_bits(0x7F7F_8000),
            _ => f32::INFINITY,
        }
    }

    /// The thresholds agree with the real encoders: the largest value below encodes finite,
    /// the threshold itself encodes as inf.
    #[test]
    fn thresholds_match_the_encoders() {
        for dtype in [Dtype::F16, Dtype::BF16] {
            let thr = overflow_threshold(dtype);
            let below = f32::from_bits(thr.to_bits() - 1);
            let vals = [below, thr, -below, -thr, f32::NAN, f32::INFINITY, 1.0];
            let mut bytes = vec![0u8; vals.len() * 2];
            let hits = encode_checked(dtype, &vals, &mut bytes, true);
            let mut back = vec![0f32; vals.len()];
            decode_f32(dtype, &bytes, &mut back);
            let non_finite: Vec<usize> =
                (0..vals.len()).filter(|&i| !back[i].is_finite()).collect();
            assert_eq!(hits, non_finite, "{dtype}: {back:?}");
            assert_eq!(hits, vec![1, 3, 4, 5], "{dtype}");
            assert_eq!(encoded_non_finite(dtype, &bytes), hits, "{dtype}");
        }
    }

    #[test]
    fn finds_hits_across_chunks_and_encodes_everything() {
        let mut vals: Vec<f32> = (0..3 * CHUNK + 7).map(|i| i as f32 * 0.5).collect();
        vals[5] = f32::NAN;
        vals[2 * CHUNK + 3] = 1e6;
        let mut checked = vec![0u8; vals.len() * 4];
        let mut plain = vec![0u8; vals.len() * 4];
        assert_eq!(
            encode_checked(Dtype::F32, &vals, &mut checked, true),
            vec![5]
        );
        encode_f32(Dtype::F32, &vals, &mut plain);
        assert_eq!(checked, plain);
        let mut half = vec![0u8; vals.len() * 2];
        assert_eq!(
            encode_checked(Dtype::F16, &vals, &mut half, true),
            vec![5, 2 * CHUNK + 3]
        );
        assert!(encode_checked(Dtype::F16, &vals, &mut half, false).is_empty());
        // Unaligned output (the slow path of the scan) finds the same.
        let mut odd = vec![0u8; vals.len() * 2 + 1];
        assert_eq!(
            encode_checked(Dtype::F16, &vals, &mut odd[1..], true),
            vec![5, 2 * CHUNK + 3]
        );
        assert_eq!(
            encoded_non_finite(Dtype::F32, &checked),
            vec![5],
            "f32 bytes"
        );
    }

    #[test]
    fn tally_keeps_the_first_and_counts_all() {
        let mut a = NonFinite::default();
        a.add(40, 1.0);
        a.add(7, 2.0);
        let mut b = NonFinite::default();
        b.add(3, f32::NAN);
        b.add(90, 0.0);
        a.merge(b);
        assert_eq!(a.count, 4);
        assert_eq!(a.first.map(|f| f.0), Some(3));
        let e = a
            .error(Path::new("m.safetensors"), "w", 10, Dtype::F16)
            .unwrap()
            .to_string();
        assert!(e.contains("4 non-finite") && e.contains("element 3 (row 0, column 3"));
        assert!(e.contains("--allow-non-finite") && e.contains("'w'"), "{e}");
        assert!(
            NonFinite::default()
                .error(Path::new("x"), "w", 1, Dtype::F16)
                .is_none()
        );
    }
}
