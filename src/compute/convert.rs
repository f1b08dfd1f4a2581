//! The CPU backend's element conversions between stored dtypes and f32 (decode, encode,
//! round-through), vectorised per compute path, and the fused pass that turns a band's
//! delta into output bytes: decode the weight, add the delta, round, encode and check for
//! non-finite values — for 16-bit weights and outputs on x86 one vector pass straight from
//! the weight's bytes to the output's (`x86::add_encode_16`), else in L1-sized chunks
//! (one pass over memory instead of four).
//!
//! Every function gives exactly the bits of the scalar definitions in `crate::dtype`
//! (`decode_f32`, `encode_f32`, `round_through`), on every input: f16 uses the F16C /
//! AVX-512F `vcvtph2ps` / `vcvtps2ph` instructions (exact, round to nearest even, which is
//! also what `half` uses at run time on these CPUs), bf16 the same integer rounding as
//! `dtype::bf16_bits`. The tests check every f16/bf16 bit pattern and random f32 values
//! (denormals, ties, ±inf, NaN) against the scalar definitions on every path this CPU runs.
//! `Isa::Scalar` (and NEON, for now) uses the scalar definitions themselves. The one
//! exception the contract allows (`gemm.rs`): where a weight and its delta are both NaN,
//! which of the two payloads the sum keeps is the compiler's operand order; it stays NaN.

use super::gemm::Isa;
use crate::dtype::{self, Dtype};

/// Elements per chunk of the fused pass: the chunk's f32 values (16 KB) stay in L1
/// between decoding, adding, rounding and encoding.
const CHUNK: usize = 4096;

/// dst = `src` (little-endian `dtype` elements) as f32, like `dtype::decode_f32`.
pub fn decode(isa: Isa, dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if src.len() == dst.len() * dtype.size() {
        match (isa, dtype) {
            // SAFETY: the path was checked supported when it was chosen (`Isa::from_env`);
            // the lengths agree (checked above).
            (Isa::Avx512, Dtype::F16) => return unsafe { x86::f16_to_f32_avx512(src, dst) },
            (Isa::Avx512, Dtype::BF16) => return unsafe { x86::bf16_to_f32_avx512(src, dst) },
            (Isa::Avx2, Dtype::F16) if x86::f16c() => {
                return unsafe { x86::f16_to_f32_f16c(src, dst) };
            }
            (Isa::Avx2, Dtype::BF16) => return unsafe { x86::bf16_to_f32_avx2(src, dst) },
            _ => {}
        }
    }
    let _ = isa;
    dtype::decode_f32(dtype, src, dst);
}

/// dst = `src` encoded as little-endian `dtype` elements, like `dtype::encode_f32`.
pub fn encode(isa: Isa, dtype: Dtype, src: &[f32], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() == src.len() * dtype.size() {
        match (isa, dtype) {
            // SAFETY: as in `decode`.
            (Isa::Avx512, Dtype::F16) => return unsafe { x86::f32_to_f16_avx512(src, dst) },
            (Isa::Avx512, Dtype::BF16) => return unsafe { x86::f32_to_bf16_avx512(src, dst) },
            (Isa::Avx2, Dtype::F16) if x86::f16c() => {
                return unsafe { x86::f32_to_f16_f16c(src, dst) };
            }
            (Isa::Avx2, Dtype::BF16) => return unsafe { x86::f32_to_bf16_avx2(src, dst) },
            _ => {}
        }
    }
    let _ = isa;
    dtype::encode_f32(dtype, src, dst);
}

/// Rounds `v` in place to the nearest value of `dtype`, like `dtype::round_through`.
pub fn round_through(isa: Isa, dtype: Dtype, v: &mut [f32]) {
    if !matches!(dtype, Dtype::F16 | Dtype::BF16) || matches!(isa, Isa::Scalar | Isa::Neon) {
        dtype::round_through(dtype, v);
        return;
    }
    let mut tmp = [0u8; 2 * 1024];
    for chunk in v.chunks_mut(1024) {
        let t = &mut tmp[..2 * chunk.len()];
        encode(isa, dtype, chunk, t);
        decode(isa, dtype, t, chunk);
    }
}

/// Asks the CPU to bring the cache lines of `v` into L2 (a hint: no effect on results).
/// The fused pass reads the weight in column blocks of many rows, a pattern the hardware
/// prefetcher does not follow; hinted one block ahead, the reads overlap the block's GEMM.
/// `gemm::delta_cols` hints the next slice of the packed right factor the same way.
pub fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let start = v.as_ptr().cast::<u8>();
        for at in (0..std::mem::size_of_val(v)).step_by(64) {
            // SAFETY: `at` is inside `v`'s bytes; SSE is part of x86-64, and a prefetch
            // reads nothing architecturally.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.add(at).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Indices (relative to `bytes`) of the elements of `bytes` (little-endian `dtype`) whose
/// exponent bits are all set (inf or NaN); empty for other dtypes.
fn non_finite_at(dtype: Dtype, bytes: &[u8], base: usize, hits: &mut Vec<usize>) {
    fn scan<const N: usize>(
        bytes: &[u8],
        mask: u64,
        base: usize,
        hits: &mut Vec<usize>,
        get: impl Fn([u8; N]) -> u64,
    ) {
        let word = |c: &[u8]| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            get(a) & mask == mask
        };
        // A branch-free sweep first (vectorises); only a chunk with a hit is walked again.
        if !bytes.chunks_exact(N).fold(false, |any, c| any | word(c)) {
            return;
        }
        hits.extend(
            bytes
                .chunks_exact(N)
                .enumerate()
                .filter(|(_, c)| word(c))
                .map(|(i, _)| base + i),
        );
    }
    match dtype {
        Dtype::F16 => scan::<2>(bytes, 0x7C00, base, hits, |a| u16::from_le_bytes(a) as u64),
        Dtype::BF16 => scan::<2>(bytes, 0x7F80, base, hits, |a| u16::from_le_bytes(a) as u64),
        Dtype::F32 => scan::<4>(bytes, 0x7F80_0000, base, hits, |a| {
            u32::from_le_bytes(a) as u64
        }),
        Dtype::F64 => scan::<8>(bytes, 0x7FF0_0000_0000_0000, base, hits, u64::from_le_bytes),
        _ => {}
    }
}

/// The last step of a plain LoRA merge, fused: for every element,
/// `out = encode(out_dtype, R(decode(wd, w) + D(delta)))` with D = rounding into `wd`
/// when `round_delta`, R = rounding into `wd` when `last_round` — the same IEEE operations
/// in the same order as decoding the band, `round_through` of the delta, adding it,
/// `round_through` of the value and `encode_f32`, chunk by chunk while a chunk is in L1.
/// Returns the indices of outputs that are non-finite in `out_dtype` when `check`.
/// `delta` is used as scratch (the chunked steps round it in place when `round_delta`);
/// `tmp` is the caller's reused chunk buffer (grown here once: zeroing a fresh one per
/// call would cost as much as the pass).
#[allow(clippy::too_many_arguments)]
pub fn add_encode(
    isa: Isa,
    wd: Dtype,
    w: &[u8],
    delta: &mut [f32],
    round_delta: bool,
    last_round: bool,
    out_dtype: Dtype,
    out: &mut [u8],
    check: bool,
    tmp: &mut Vec<f32>,
) -> Vec<usize> {
    let (wes, oes) = (wd.size(), out_dtype.size());
    let mut hits = Vec::new();
    // 16-bit weights and outputs on x86: all of it in one vector pass, straight from the
    // weight's bytes to the output's (`x86::add_encode_16`); what it leaves (a tail of
    // fewer than 8, or other dtypes) goes through the chunks below.
    #[cfg(target_arch = "x86_64")]
    let done = match x86::add_encode_16(isa, wd, w, delta, round_delta, last_round, out_dtype, out)
    {
        Some((n, any)) => {
            if check && any {
                non_finite_at(out_dtype, &out[..n * oes], 0, &mut hits);
            }
            n
        }
        None => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let (delta, w, out) = (
        &mut delta[done..],
        w.get(done * wes..).unwrap_or(&[]),
        out.get_mut(done * oes..).unwrap_or(&mut []),
    );
    if tmp.len() < CHUNK.min(delta.len()) {
        tmp.resize(CHUNK, 0.0);
    }
    for (ci, ((d, w), o)) in delta
        .chunks_mut(CHUNK)
        .zip(w.chunks(CHUNK * wes))
        .zip(out.chunks_mut(CHUNK * oes))
        .enumerate()
    {
        let v = &mut tmp[..d.len()];
        decode(isa, wd, w, v);
        if round_delta {
            round_through(isa, wd, d);
        }
        v.iter_mut().zip(&*d).for_each(|(v, d)| *v += d);
        if last_round {
            round_through(isa, wd, v);
        }
        encode(isa, out_dtype, v, o);
        if check {
            non_finite_at(out_dtype, o, done + ci * CHUNK, &mut hits);
        }
    }
    hits
}

#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod x86 {
    //! x86-64 conversions. Loads and stores are unaligned (bands start anywhere in a
    //! group's bytes); tails go through the scalar definitions.
    use crate::dtype::{self, Dtype};
    use std::arch::x86_64::*;

    /// Round to nearest even from the immediate (not from MXCSR), exceptions suppressed.
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    /// The same for the VEX form (3 bits: rounding from the immediate, nearest even).
    const RNE_F16C: i32 = _MM_FROUND_TO_NEAREST_INT;

    pub(super) fn f16c() -> bool {
        is_x86_feature_detected!("f16c")
    }

    /// # Safety
    /// AVX-512F present; `src.len() == 2 * dst.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f16_to_f32_avx512(src: &[u8], dst: &mut [f32]) {
        let n = dst.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: elements i..i+16 exist in both (i + 16 <= n <= len).
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(2 * i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        dtype::decode_f32(Dtype::F16, &src[2 * n..], &mut dst[n..]);
    }

    /// # Safety
    /// AVX-512F present; `dst.len() == 2 * src.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn f32_to_f16_avx512(src: &[f32], dst: &mut [u8]) {
        let n = src.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: as in `f16_to_f32_avx512`.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(i));
                let h = _mm512_cvtps_ph::<RNE>(v);
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
        }
        dtype::encode_f32(Dtype::F16, &src[n..], &mut dst[2 * n..]);
    }

    /// # Safety
    /// F16C and AVX present; `src.len() == 2 * dst.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f16_to_f32_f16c(src: &[u8], dst: &mut [f32]) {
        let n = dst.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: as in `f16_to_f32_avx512`.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        dtype::decode_f32(Dtype::F16, &src[2 * n..], &mut dst[n..]);
    }

    /// # Safety
    /// F16C and AVX present; `dst.len() == 2 * src.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [u8]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: as in `f16_to_f32_avx512`.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<RNE_F16C>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast(), h);
            }
        }
        dtype::encode_f32(Dtype::F16, &src[n..], &mut dst[2 * n..]);
    }

    /// Eight 16-bit elements (f16, or bf16 when `BF16`) → f32, exactly.
    ///
    /// # Safety
    /// AVX2 and F16C present.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn decode8<const BF16: bool>(h: __m128i) -> __m256 {
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        } else {
            _mm256_cvtph_ps(h)
        }
    }

    /// Eight f32 → 16-bit elements, round to nearest even: `vcvtps2ph` for f16, for bf16
    /// the integer rounding of `dtype::bf16_bits` (a NaN keeps its top bits, made quiet).
    ///
    /// # Safety
    /// AVX2 and F16C present.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn encode8<const BF16: bool>(v: __m256) -> __m128i {
        if !BF16 {
            return _mm256_cvtps_ph::<RNE_F16C>(v);
        }
        let b = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, bias));
        let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x40));
        let abs = _mm256_and_si256(b, _mm256_set1_epi32(0x7FFF_FFFF));
        // Both sides are below 2^31: the signed compare is the unsigned one.
        let nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7F80_0000));
        let bits = _mm256_blendv_epi8(rounded, quiet, nan);
        // Every lane is below 2^16, so packing does not saturate; the pack works per
        // 128-bit half, so lanes 0-3 and 4-7 sit in 64-bit quarters 0 and 2.
        let packed = _mm256_packus_epi32(bits, bits);
        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b10_00>(packed))
    }

    /// `super::add_encode` for 16-bit weights and outputs in one pass, eight elements at
    /// a time: out = encode(R(decode(w) + D(delta))), the same IEEE operations as the
    /// chunked steps (`decode8`/`encode8` are exact like `decode`/`encode`). Returns how
    /// many leading elements it wrote (the rest, fewer than 8, is the caller's) and
    /// whether one of them is non-finite; None when it does not apply: not on an x86
    /// vector path, other dtypes, or lengths that do not agree. The AVX-512 path runs it
    /// too (it is element-wise, so the vector width changes no bit).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_encode_16(
        isa: super::Isa,
        wd: Dtype,
        w: &[u8],
        delta: &[f32],
        round_delta: bool,
        last_round: bool,
        od: Dtype,
        out: &mut [u8],
    ) -> Option<(usize, bool)> {
        let vector = matches!(isa, super::Isa::Avx2 | super::Isa::Avx512)
            && is_x86_feature_detected!("avx2")
            && f16c();
        let n = delta.len();
        if !vector || w.len() != 2 * n || out.len() != 2 * n {
            return None;
        }
        let pass = match (wd, od) {
            (Dtype::F16, Dtype::F16) => pass16::<false, false>,
            (Dtype::F16, Dtype::BF16) => pass16::<false, true>,
            (Dtype::BF16, Dtype::F16) => pass16::<true, false>,
            (Dtype::BF16, Dtype::BF16) => pass16::<true, true>,
            _ => return None,
        };
        // SAFETY: AVX2 and F16C were detected above; the lengths agree.
        Some(unsafe { pass(w, delta, round_delta, last_round, out) })
    }

    /// # Safety
    /// AVX2 and F16C present; `w.len() == out.len() == 2 * delta.len()`.
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn pass16<const W_BF16: bool, const O_BF16: bool>(
        w: &[u8],
        delta: &[f32],
        round_delta: bool,
        last_round: bool,
        out: &mut [u8],
    ) -> (usize, bool) {
        let n = delta.len() / 8 * 8;
        // Inf and NaN: every exponent bit set.
        let exp = _mm_set1_epi16(if O_BF16 { 0x7F80 } else { 0x7C00 });
        let mut any = _mm_setzero_si128();
        for i in (0..n).step_by(8) {
            // SAFETY: elements i..i+8 exist in all three (i + 8 <= n, lengths agree).
            unsafe {
                let wv = decode8::<W_BF16>(_mm_loadu_si128(w.as_ptr().add(2 * i).cast()));
                let mut d = _mm256_loadu_ps(delta.as_ptr().add(i));
                if round_delta {
                    d = decode8::<W_BF16>(encode8::<W_BF16>(d));
                }
                let mut v = _mm256_add_ps(wv, d);
                if last_round {
                    v = decode8::<W_BF16>(encode8::<W_BF16>(v));
                }
                let h = encode8::<O_BF16>(v);
                _mm_storeu_si128(out.as_mut_ptr().add(2 * i).cast(), h);
                any = _mm_or_si128(any, _mm_cmpeq_epi16(_mm_and_si128(h, exp), exp));
            }
        }
        (n, _mm_testz_si128(any, any) == 0)
    }

    /// bf16 → f32 is a shift; written as the scalar definition so the compiler vectorises
    /// it for the enabled features.
    #[inline(always)]
    fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
        }
    }

    /// `dtype::bf16_bits` element-wise (the same branch-free integer rounding).
    #[inline(always)]
    fn f32_to_bf16(src: &[f32], dst: &mut [u8]) {
        for (d, s) in dst.chunks_exact_mut(2).zip(src) {
            d.copy_from_slice(&dtype::bf16_bits(*s).to_le_bytes());
        }
    }

    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn bf16_to_f32_avx512(src: &[u8], dst: &mut [f32]) {
        bf16_to_f32(src, dst)
    }

    /// # Safety
    /// AVX-512F present.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn f32_to_bf16_avx512(src: &[f32], dst: &mut [u8]) {
        f32_to_bf16(src, dst)
    }

    /// # Safety
    /// AVX2 present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_to_f32_avx2(src: &[u8], dst: &mut [f32]) {
        bf16_to_f32(src, dst)
    }

    /// # Safety
    /// AVX2 present.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn f32_to_bf16_avx2(src: &[f32], dst: &mut [u8]) {
        f32_to_bf16(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random f32 bit patterns, with the special classes mixed in: denormals, ±0, ±inf,
    /// NaNs (quiet and signalling payloads), exact f16/bf16 ties, and values around the
    /// f16 overflow and denormal thresholds.
    fn specials(n: usize) -> Vec<f32> {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut v: Vec<f32> = (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let b = s as u32;
                match i % 8 {
                    0 => f32::from_bits(b),
                    1 => f32::from_bits(b & 0x807F_FFFF), // f32 denormal
                    2 => f32::from_bits((b & 0x8000_0000) | 0x3380_0000 | (b & 0x00FF_E000)), // f16 denormal range
                    3 => f32::from_bits((b & 0xFFFF_0000) | 0x8000), // bf16 tie
                    4 => f32::from_bits((b & 0xFFFF_E000) | 0x1000), // f16 tie
                    5 => f32::from_bits((b & 0x8000_0000) | 0x4770_0000 | (b & 0x000F_FFFF)), // near 65504
                    6 => f32::from_bits(0x7F80_0000 | (b & 0x807F_FFFF)), // inf / NaN
                    _ => (b as i32 as f32) * 1e-9,
                }
            })
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            65504.0,
            65520.0,
        ]);
        v.extend([
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            1e-45,
        ]);
        v
    }

    fn bits_eq(a: &[u8], b: &[u8]) -> bool {
        a == b
    }

    /// Every f16 and bf16 bit pattern decodes to the scalar definition's bits, and the
    /// decoded value encodes back to the same pattern, on every path.
    #[test]
    fn every_f16_and_bf16_pattern_decodes_and_encodes_like_the_scalar_definition() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        for dt in [Dtype::F16, Dtype::BF16] {
            let mut want = vec![0f32; 1 << 16];
            dtype::decode_f32(dt, &all, &mut want);
            let mut want_back = vec![0u8; all.len()];
            dtype::encode_f32(dt, &want, &mut want_back);
            for isa in Isa::available() {
                // Offsets 0 and 1 element: the vector loop and the scalar tail both run,
                // on unaligned memory.
                for off in [0usize, 1, 7] {
                    let src = &all[2 * off..];
                    let mut got = vec![0f32; src.len() / 2];
                    decode(isa, dt, src, &mut got);
                    assert!(
                        got.iter()
                            .zip(&want[off..])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{} {dt} decode (offset {off})",
                        isa.name()
                    );
                    let mut back = vec![0u8; src.len()];
                    encode(isa, dt, &got, &mut back);
                    assert!(
                        bits_eq(&back, &want_back[2 * off..]),
                        "{} {dt} encode",
                        isa.name()
                    );
                }
            }
        }
    }

    /// Random f32 values (denormals, ties, inf, NaN payloads) encode and round like the
    /// scalar definitions, on every path and output dtype.
    #[test]
    fn random_f32_encode_and_round_like_the_scalar_definition() {
        let v = specials(100_003);
        for dt in [Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64] {
            let mut want = vec![0u8; v.len() * dt.size()];
            dtype::encode_f32(dt, &v, &mut want);
            let mut want_r = v.clone();
            dtype::round_through(dt, &mut want_r);
            for isa in Isa::available() {
                let mut got = vec![0u8; v.len() * dt.size()];
                encode(isa, dt, &v, &mut got);
                assert!(bits_eq(&got, &want), "{} {dt} encode", isa.name());
                let mut r = v.clone();
                round_through(isa, dt, &mut r);
                assert!(
                    r.iter()
                        .zip(&want_r)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {dt} round_through",
                    isa.name()
                );
            }
        }
    }

    /// The fused pass equals its unfused definition (decode, round the delta, add, round,
    /// encode, then list non-finite outputs) for every dtype pair and flag.
    #[test]
    fn add_encode_equals_the_unfused_steps() {
        let mut d0: Vec<f32> = specials(3 * CHUNK + 5)
            .into_iter()
            .map(|x| if x.is_finite() { x % 70000.0 } else { x })
            .collect();
        let n = d0.len();
        let mut wv: Vec<f32> = specials(n + 5)[5..5 + n].iter().map(|x| x * 0.5).collect();
        // Past the last multiple of 8 is the vector pass's scalar tail: an infinite delta
        // there, so a hit's index from the tail is checked too.
        assert_ne!(n % 8, 0, "the inputs should leave a tail");
        let tail = n / 8 * 8;
        (wv[tail], d0[tail]) = (1.0, f32::INFINITY);
        for wd in [Dtype::F16, Dtype::BF16, Dtype::F32] {
            let mut w = vec![0u8; n * wd.size()];
            dtype::encode_f32(wd, &wv, &mut w);
            let mut wf = vec![0f32; n];
            dtype::decode_f32(wd, &w, &mut wf);
            for od in [Dtype::F16, Dtype::BF16, Dtype::F32] {
                for (round_delta, last_round) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let mut v = vec![0f32; n];
                    dtype::decode_f32(wd, &w, &mut v);
                    let mut d = d0.clone();
                    if round_delta {
                        dtype::round_through(wd, &mut d);
                    }
                    v.iter_mut().zip(&d).for_each(|(v, d)| *v += d);
                    if last_round {
                        dtype::round_through(wd, &mut v);
                    }
                    let mut want = vec![0u8; n * od.size()];
                    let want_hits = crate::compute::finite::encode_checked(od, &v, &mut want, true);
                    assert!(
                        want_hits.len() > 1 && want_hits.last() == Some(&tail),
                        "the inputs should overflow in the vector part and the tail"
                    );
                    for isa in Isa::available() {
                        let mut d = d0.clone();
                        let mut got = vec![0u8; n * od.size()];
                        let hits = add_encode(
                            isa,
                            wd,
                            &w,
                            &mut d,
                            round_delta,
                            last_round,
                            od,
                            &mut got,
                            true,
                            &mut Vec::new(),
                        );
                        // Where both the weight and the delta are NaN, which payload the
                        // sum keeps is the compiler's choice of operand order (the
                        // contract leaves NaN payloads open): NaN must stay NaN. Every
                        // other element is exact.
                        let nan = |b: &[u8]| {
                            let mut x = [0f32; 1];
                            dtype::decode_f32(od, b, &mut x);
                            x[0].is_nan()
                        };
                        let first = got
                            .chunks(od.size())
                            .zip(want.chunks(od.size()))
                            .enumerate()
                            .position(|(i, (a, b))| {
                                let open = wf[i].is_nan() && d0[i].is_nan();
                                a != b && !(open && nan(a) && nan(b))
                            });
                        assert_eq!(
                            first,
                            None,
                            "{} {wd}->{od} {round_delta} {last_round}",
                            isa.name()
                        );
                        assert_eq!(hits, want_hits, "{} {wd}->{od} hits", isa.name());
                    }
                }
            }
        }
    }
}
