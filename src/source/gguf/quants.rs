//! ggml tensor types: their ids, block sizes and stored bytes per block, and the block
//! decoders (stored form → f32) and encoders (f32 → stored form) that reproduce the `gguf`
//! Python package's `gguf.quants` (itself bit-exact to ggml-quants.c) operation for
//! operation, in f32, so every result is the same bits.
//!
//! Block layouts are ggml's `block_q*` structs (little-endian, packed): the field order in
//! each decoder's comment is the byte order in the file.
//!
//! Decoded: every type gguf 0.19.0's `gguf.quants.dequantize` handles (the grid-based IQ
//! types read their lattices from [`super::iq_grids`], generated from gguf-py's own tables
//! by scripts/gen_iq_grids.py), plus Q8_K as ggml's `dequantize_row_q8_K`. Bit-exact
//! includes NaN/inf scales: tests/compat/test_gguf_quants.py compares every element's bits
//! over random blocks with edge-case scales. Encoded: every type `gguf.quants.quantize`
//! implements (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4), byte for
//! byte as numpy computes it on x86-64, including where numpy's out-of-range float→int
//! casts decide a byte (subnormal blocks; see `to_u8_clip` and MXFP4). Blocks whose
//! reference bytes would decode to inf/NaN are refused ([`EncodeError`]). The K-quants and
//! IQ types have no reference quantizer in gguf.quants, so they are not written
//! ([`GgmlType::why_not_encoded`]); ggml's C quantizers were not ported.

use super::iq_grids::*;
use half::f16;

/// Elements per super-block of the k-quants.
pub const QK_K: usize = 256;

/// A ggml tensor type (`enum ggml_type`), as GGUF tensor infos store it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// (type, id, name, elements per block, bytes per block), as `GGML_QUANT_SIZES` says.
const TYPES: [(GgmlType, u32, &str, usize, usize); 34] = {
    use GgmlType::*;
    [
        (F32, 0, "F32", 1, 4),
        (F16, 1, "F16", 1, 2),
        (Q4_0, 2, "Q4_0", 32, 18),
        (Q4_1, 3, "Q4_1", 32, 20),
        (Q5_0, 6, "Q5_0", 32, 22),
        (Q5_1, 7, "Q5_1", 32, 24),
        (Q8_0, 8, "Q8_0", 32, 34),
        (Q8_1, 9, "Q8_1", 32, 40),
        (Q2_K, 10, "Q2_K", 256, 84),
        (Q3_K, 11, "Q3_K", 256, 110),
        (Q4_K, 12, "Q4_K", 256, 144),
        (Q5_K, 13, "Q5_K", 256, 176),
        (Q6_K, 14, "Q6_K", 256, 210),
        (Q8_K, 15, "Q8_K", 256, 292),
        (IQ2_XXS, 16, "IQ2_XXS", 256, 66),
        (IQ2_XS, 17, "IQ2_XS", 256, 74),
        (IQ3_XXS, 18, "IQ3_XXS", 256, 98),
        (IQ1_S, 19, "IQ1_S", 256, 50),
        (IQ4_NL, 20, "IQ4_NL", 32, 18),
        (IQ3_S, 21, "IQ3_S", 256, 110),
        (IQ2_S, 22, "IQ2_S", 256, 82),
        (IQ4_XS, 23, "IQ4_XS", 256, 136),
        (I8, 24, "I8", 1, 1),
        (I16, 25, "I16", 1, 2),
        (I32, 26, "I32", 1, 4),
        (I64, 27, "I64", 1, 8),
        (F64, 28, "F64", 1, 8),
        (IQ1_M, 29, "IQ1_M", 256, 56),
        (BF16, 30, "BF16", 1, 2),
        (TQ1_0, 34, "TQ1_0", 256, 54),
        (TQ2_0, 35, "TQ2_0", 256, 66),
        (MXFP4, 39, "MXFP4", 32, 17),
        (NVFP4, 40, "NVFP4", 64, 36),
        (Q1_0, 41, "Q1_0", 128, 18),
    ]
};

impl GgmlType {
    fn row(self) -> (GgmlType, u32, &'static str, usize, usize) {
        // Every variant is in TYPES (checked by a test), so the fallback is never taken.
        TYPES
            .iter()
            .copied()
            .find(|r| r.0 == self)
            .unwrap_or((self, u32::MAX, "?", 1, 1))
    }
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|r| r.1 == id).map(|r| r.0)
    }
    /// By name, as `--gguf-type` and ggml spell it (case-insensitive).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.0)
    }
    pub fn id(self) -> u32 {
        self.row().1
    }
    pub fn name(self) -> &'static str {
        self.row().2
    }
    /// Elements per block (1 for the plain types).
    pub fn block_size(self) -> usize {
        self.row().3
    }
    /// Stored bytes per block.
    pub fn type_size(self) -> usize {
        self.row().4
    }
    /// Whether this crate decodes blocks of the type to f32.
    pub fn decodes(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            Q4_0 | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
                | IQ2_XXS
                | IQ2_XS
                | IQ2_S
                | IQ3_XXS
                | IQ3_S
                | IQ1_S
                | IQ1_M
                | IQ4_NL
                | IQ4_XS
                | TQ1_0
                | TQ2_0
                | MXFP4
                | NVFP4
        )
    }
    /// Whether this crate can write the type from f32 values (`--gguf-type`).
    pub fn encodes(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | TQ1_0 | TQ2_0 | MXFP4
        )
    }
    /// Why lorastream does not write this type (for a type without [`GgmlType::encodes`]):
    /// writes must be bit-identical to `gguf.quants.quantize`, and gguf 0.19.0 quantizes
    /// only F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0 and MXFP4.
    pub fn why_not_encoded(self) -> String {
        use GgmlType::*;
        let alt = "write F16, BF16 or Q8_0 (--gguf-type) and re-quantize the result with \
                   llama.cpp's llama-quantize";
        match self {
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => format!(
                "{self} re-encoding: gguf.quants has no reference quantizer for it; llama.cpp's \
                 quantize_row_{}_ref searches each sub-block's scale (and min) iteratively \
                 (make_qx_quants/make_qkx2_quants) and llama-quantize adds importance-matrix \
                 weights, so no output could be checked bit for bit: {alt}",
                self.name().to_ascii_lowercase()
            ),
            IQ2_XXS | IQ2_XS | IQ2_S | IQ3_XXS | IQ3_S | IQ1_S | IQ1_M | IQ4_NL | IQ4_XS => {
                format!(
                    "{self} re-encoding: gguf.quants has no reference quantizer for it; llama.cpp \
                     quantizes it by a weighted search over its grid or table (an importance \
                     matrix is required for the smallest types): {alt}"
                )
            }
            NVFP4 => format!(
                "{self} re-encoding: gguf.quants has a dequantizer but no quantizer for it: {alt}"
            ),
            Q8_1 | Q8_K => format!(
                "{self} is ggml's intermediate type for dot products, not a weight storage type: {alt}"
            ),
            Q1_0 => format!("{self}: gguf.quants can neither decode nor encode it: {alt}"),
            _ => format!(
                "{self} is not a --gguf-type target (lorastream writes {})",
                GgmlType::encodable_names()
            ),
        }
    }
    /// The block-quantized types this crate dequantizes, for messages.
    pub fn decodable_names() -> String {
        TYPES
            .iter()
            .filter(|r| r.0.decodes())
            .map(|r| r.2)
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// The names `--gguf-type` accepts, for messages.
    pub fn encodable_names() -> String {
        TYPES
            .iter()
            .filter(|r| r.0.encodes())
            .map(|r| r.2)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Decodes one block `b` (exactly `ty.type_size()` bytes) into `out` (exactly
/// `ty.block_size()` values). Only for types with [`GgmlType::decodes`]; others write
/// nothing (the source refuses them before a decoder exists).
pub fn decode_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    use GgmlType::*;
    match ty {
        // d: f16, qs: [u8; 16]; element j is the low nibble of qs[j] (j < 16) or the high
        // nibble of qs[j - 16], minus 8.
        Q4_0 => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                out[j] = d * ((q & 0x0F) as i8 - 8) as f32;
                out[j + 16] = d * ((q >> 4) as i8 - 8) as f32;
            }
        }
        // d: f16, m: f16, qs: [u8; 16]; d * q + m.
        Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                let q = b[4 + j];
                out[j] = d * (q & 0x0F) as f32 + m;
                out[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
        // d: f16, qh: u32 (bit j = fifth bit of element j), qs: [u8; 16]; minus 16.
        Q5_0 => {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let q = b[6 + j];
                let lo = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                out[j] = d * (lo as i8 - 16) as f32;
                out[j + 16] = d * (hi as i8 - 16) as f32;
            }
        }
        // d: f16, m: f16, qh: u32, qs: [u8; 16]; d * q + m.
        Q5_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let q = b[8 + j];
                let lo = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                out[j] = d * lo as f32 + m;
                out[j + 16] = d * hi as f32 + m;
            }
        }
        // d: f16, qs: [i8; 32]; q * d.
        Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..32 {
                out[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
        // scales: [u8; 16] (low nibble scale, high nibble min), qs: [u8; 64] (2 bits),
        // d: f16, dmin: f16. Element 128·h + 32·s + l (h < 2, s < 4, l < 32) is bits 2s of
        // qs[32h + l], in sub-block 8h + 2s + l/16.
        Q2_K => {
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for (k, o) in out.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (k / 128, (k / 32) % 4, k % 32);
                let sub = k / 16;
                let sc = b[sub];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let q = (b[16 + 32 * h + l] >> (2 * s)) & 3;
                *o = dl * q as f32 - ml;
            }
        }
        // hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12] (16 six-bit scales), d: f16.
        Q3_K => {
            let d = f16_at(b, 108);
            let sc = &b[96..108];
            let mut scales = [0f32; 16];
            for (i, s) in scales.iter_mut().enumerate() {
                let low = (sc[i % 8] >> (4 * (i / 8))) & 0x0F;
                let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 0x03;
                *s = (((low | (high << 4)) as i8) - 32) as f32;
            }
            for (k, o) in out.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (k / 128, (k / 32) % 4, k % 32);
                let ql = (b[32 + 32 * h + l] >> (2 * s)) & 3;
                let hbit = (b[l] >> (k / 32)) & 1;
                let q = ql as i8 - (((hbit ^ 1) << 2) as i8);
                *o = (d * scales[k / 16]) * q as f32;
            }
        }
        // d: f16, dmin: f16, scales: [u8; 12] (8 six-bit scales and mins), qs: [u8; 128].
        Q4_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = scale_min_k4(&b[4..16]);
            for (k, o) in out.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (k / 64, (k / 32) % 2, k % 32);
                let q = (b[16 + 32 * h + l] >> (4 * s)) & 0x0F;
                let sub = k / 32;
                *o = (d * sc[sub] as f32) * q as f32 - dmin * mn[sub] as f32;
            }
        }
        // d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128].
        Q5_K => {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = scale_min_k4(&b[4..16]);
            for (k, o) in out.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (k / 64, (k / 32) % 2, k % 32);
                let ql = (b[48 + 32 * h + l] >> (4 * s)) & 0x0F;
                let qh = (b[16 + l] >> (k / 32)) & 1;
                let q = ql | (qh << 4);
                let sub = k / 32;
                *o = (d * sc[sub] as f32) * q as f32 - dmin * mn[sub] as f32;
            }
        }
        // ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16.
        Q6_K => {
            let d = f16_at(b, 208);
            for (k, o) in out.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (k / 128, (k / 32) % 4, k % 32);
                let ql = (b[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0F;
                let qh = (b[128 + 32 * h + l] >> (2 * s)) & 3;
                let q = (ql | (qh << 4)) as i8 - 32;
                let scale = b[192 + k / 16] as i8 as f32;
                *o = (d * scale) * q as f32;
            }
        }
        // d: f32, qs: [i8; 256], bsums: [i16; 16] (not needed to decode): ggml's
        // dequantize_row_q8_K, `d * qs[j]`.
        Q8_K => {
            let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            for j in 0..QK_K {
                out[j] = d * (b[4 + j] as i8) as f32;
            }
        }
        // d: f16, qs: [u8; 16]; nibbles index IQ4_NL's non-linear table.
        IQ4_NL => {
            let d = f16_at(b, 0);
            for j in 0..16 {
                let q = b[2 + j];
                out[j] = d * IQ4_NL_VALUES[(q & 0x0F) as usize] as f32;
                out[j + 16] = d * IQ4_NL_VALUES[(q >> 4) as usize] as f32;
            }
        }
        // d: f16, scales_h: u16 (2 bits per sub-block), scales_l: [u8; 4] (4 bits per
        // sub-block), qs: [u8; 128]; eight sub-blocks of 32 with 6-bit scales minus 32.
        IQ4_XS => {
            let d = f16_at(b, 0);
            let sh = u16::from_le_bytes([b[2], b[3]]);
            for i in 0..8 {
                let low = (b[4 + i / 2] >> (4 * (i % 2))) & 0x0F;
                let high = ((sh >> (2 * i)) & 3) as u8;
                let dl = d * (((low | (high << 4)) as i8) - 32) as f32;
                for m in 0..16 {
                    let q = b[8 + 16 * i + m];
                    out[32 * i + m] = dl * IQ4_NL_VALUES[(q & 0x0F) as usize] as f32;
                    out[32 * i + 16 + m] = dl * IQ4_NL_VALUES[(q >> 4) as usize] as f32;
                }
            }
        }
        // qs: [u8; 48] (five ternary digits per byte, scaled to 0..255), qh: [u8; 4] (four
        // digits per byte), d: f16. Digit p of a byte v is ((v · 3^p mod 256) · 3) >> 8.
        TQ1_0 => {
            let d = f16_at(b, 52);
            let digit = |v: u8, pow: u8| (((v.wrapping_mul(pow) as u16) * 3) >> 8) as i8 - 1;
            const POW: [u8; 5] = [1, 3, 9, 27, 81];
            for (p, &pow) in POW.iter().enumerate() {
                for l in 0..32 {
                    out[32 * p + l] = d * digit(b[l], pow) as f32;
                }
                for l in 0..16 {
                    out[160 + 16 * p + l] = d * digit(b[32 + l], pow) as f32;
                }
            }
            for (p, &pow) in POW[..4].iter().enumerate() {
                for l in 0..4 {
                    out[240 + 4 * p + l] = d * digit(b[48 + l], pow) as f32;
                }
            }
        }
        // qs: [u8; 64] (2 bits each, minus 1), d: f16.
        TQ2_0 => {
            let d = f16_at(b, 64);
            for (k, o) in out.iter_mut().enumerate().take(QK_K) {
                let (h, s, l) = (k / 128, (k / 32) % 4, k % 32);
                let q = ((b[32 * h + l] >> (2 * s)) & 3) as i8 - 1;
                *o = d * q as f32;
            }
        }
        // e: u8 (an e8m0 scale, halved), qs: [u8; 16]; nibbles index doubled e2m1 values.
        MXFP4 => {
            let d = e8m0_half(b[0]);
            for j in 0..16 {
                let q = b[1 + j];
                out[j] = d * MXFP4_VALUES[(q & 0x0F) as usize] as f32;
                out[j + 16] = d * MXFP4_VALUES[(q >> 4) as usize] as f32;
            }
        }
        // d: f16, qs: [u32; 16] as 8 pairs (a, b) per 32 elements: byte l of a indexes
        // the grid for elements 8l..8l+8, bits 7l..7l+7 of b index their sign pattern,
        // b >> 28 is the 4-bit scale: (d · (0.5 + s)) · 0.25.
        IQ2_XXS => {
            let d = f16_at(b, 0);
            for ib in 0..8 {
                let a = u32_at(b, 2 + 8 * ib).to_le_bytes();
                let s = u32_at(b, 6 + 8 * ib);
                let db = d * (0.5 + (s >> 28) as f32) * 0.25;
                for l in 0..4 {
                    let grid = IQ2XXS_GRID[a[l] as usize];
                    let signs = KSIGNS[((s >> (7 * l)) & 0x7F) as usize];
                    put_grid8(&mut out[32 * ib + 8 * l..], db, grid, signs);
                }
            }
        }
        // d: f16, qs: [u16; 32] (9-bit grid index, 7-bit sign index), scales: [u8; 8]
        // (a 4-bit scale per 16 elements, low nibble first).
        IQ2_XS => {
            let d = f16_at(b, 0);
            for k in 0..32 {
                let q = u16_at(b, 2 + 2 * k);
                let sc = (b[66 + k / 4] >> (4 * ((k / 2) % 2))) & 0x0F;
                let db = d * (0.5 + sc as f32) * 0.25;
                let grid = IQ2XS_GRID[(q & 511) as usize];
                put_grid8(&mut out[8 * k..], db, grid, KSIGNS[(q >> 9) as usize]);
            }
        }
        // d: f16, qs: [u8; 32] (low 8 bits of the grid index), signs: [u8; 32] (one bit
        // per element), qh: [u8; 8] (2 high index bits each for 4 groups), scales: [u8; 8].
        IQ2_S => {
            let d = f16_at(b, 0);
            for k in 0..32 {
                let hi = ((b[66 + k / 4] >> (2 * (k % 4))) & 3) as usize;
                let idx = b[2 + k] as usize | (hi << 8);
                let sc = (b[74 + k / 4] >> (4 * ((k / 2) % 2))) & 0x0F;
                let db = d * (0.5 + sc as f32) * 0.25;
                put_grid8(&mut out[8 * k..], db, IQ2S_GRID[idx], b[34 + k]);
            }
        }
        // d: f16, qs: [u8; 64] (grid index per 4 elements), scales: [u32; 8] (per 32
        // elements: four 7-bit sign indexes, then a 4-bit scale: (d · (0.5 + s)) · 0.5).
        IQ3_XXS => {
            let d = f16_at(b, 0);
            for ib in 0..8 {
                let s = u32_at(b, 66 + 4 * ib);
                let db = d * (0.5 + (s >> 28) as f32) * 0.5;
                for l in 0..4 {
                    let signs = KSIGNS[((s >> (7 * l)) & 0x7F) as usize];
                    let g = 32 * ib + 8 * l;
                    let grid = (IQ3XXS_GRID[b[2 + g / 4] as usize] as u64)
                        | ((IQ3XXS_GRID[b[2 + g / 4 + 1] as usize] as u64) << 32);
                    put_grid8(&mut out[g..], db, grid, signs);
                }
            }
        }
        // d: f16, qs: [u8; 64], qh: [u8; 8] (ninth index bit), signs: [u8; 32], scales:
        // [u8; 4] (a 4-bit scale per 32 elements: d · (1 + 2s)).
        IQ3_S => {
            let d = f16_at(b, 0);
            for k in 0..32 {
                let idx = |i: usize| {
                    b[2 + i] as usize | ((((b[66 + i / 8] >> (i % 8)) & 1) as usize) << 8)
                };
                let sc = (b[106 + k / 8] >> (4 * ((k / 4) % 2))) & 0x0F;
                let db = d * (1 + 2 * sc) as f32;
                let grid =
                    (IQ3S_GRID[idx(2 * k)] as u64) | ((IQ3S_GRID[idx(2 * k + 1)] as u64) << 32);
                put_grid8(&mut out[8 * k..], db, grid, b[74 + k]);
            }
        }
        // d: f16, qs: [u8; 32], qh: [u16; 8] (per 32 elements: four 3-bit high index
        // parts, a 3-bit scale, the delta's sign): dl · (grid + ±delta), dl = d · (2s + 1).
        IQ1_S => {
            let d = f16_at(b, 0);
            let delta = f32::from_bits(IQ1_DELTA_BITS);
            for ib in 0..8 {
                let qh = u16_at(b, 34 + 2 * ib);
                let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
                let dv = if qh & 0x8000 == 0 { delta } else { -delta };
                for l in 0..4 {
                    let k = 4 * ib + l;
                    let idx = b[2 + k] as usize | ((((qh >> (3 * l)) & 7) as usize) << 8);
                    put_grid1(&mut out[8 * k..], dl, IQ1S_GRID[idx], dv);
                }
            }
        }
        // qs: [u8; 32], qh: [u8; 16] (a nibble per 8 elements: 3 high index bits and the
        // delta's sign), scales: [u16; 4] (3-bit scales per 16 elements; the top nibbles of
        // the four together are the f16 d).
        IQ1_M => {
            let sc = [0, 1, 2, 3].map(|i| u16_at(b, 48 + 2 * i));
            let dbits = ((sc[0] & 0xF000) >> 12)
                | ((sc[1] & 0xF000) >> 8)
                | ((sc[2] & 0xF000) >> 4)
                | (sc[3] & 0xF000);
            let d = f16::from_bits(dbits).to_f32();
            let delta = f32::from_bits(IQ1_DELTA_BITS);
            for k in 0..32 {
                let t = k / 2;
                let dl = d * (2 * ((sc[t / 4] >> (3 * (t % 4))) & 7) + 1) as f32;
                let nib = (b[32 + k / 2] >> (4 * (k % 2))) & 0x0F;
                let idx = b[k] as usize | (((nib & 7) as usize) << 8);
                let dv = if nib & 8 == 0 { delta } else { -delta };
                put_grid1(&mut out[8 * k..], dl, IQ1S_GRID[idx], dv);
            }
        }
        // d: [u8; 4] (unsigned e4m3 scales, one per 16 elements), qs: [u8; 32] (per 16
        // elements 8 bytes: low nibbles are elements 0..8, high nibbles 8..16) indexing the
        // doubled e2m1 values.
        NVFP4 => {
            for s in 0..4 {
                let d = ue4m3_half(b[s]);
                for m in 0..8 {
                    let q = b[4 + 8 * s + m];
                    out[16 * s + m] = d * MXFP4_VALUES[(q & 0x0F) as usize] as f32;
                    out[16 * s + 8 + m] = d * MXFP4_VALUES[(q >> 4) as usize] as f32;
                }
            }
        }
        _ => {}
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Eight elements of a grid row (byte j = element j): `(db · g_j) · ±1`, minus where bit j
/// of `signs` is set, in gguf.quants' order of operations. The `· -1` is a negation except
/// for NaN, which keeps its sign as the multiplication does (the compiler would otherwise
/// turn `x · -1` into a sign flip).
fn put_grid8(out: &mut [f32], db: f32, grid: u64, signs: u8) {
    for (j, o) in out.iter_mut().enumerate().take(8) {
        let v = db * ((grid >> (8 * j)) & 0xFF) as f32;
        *o = if (signs >> j) & 1 == 0 || v.is_nan() {
            v
        } else {
            -v
        };
    }
}

/// Eight elements of an IQ1 grid row (bytes are -1/0/1): `dl · (g_j + delta)`.
fn put_grid1(out: &mut [f32], dl: f32, grid: u64, delta: f32) {
    for (j, o) in out.iter_mut().enumerate().take(8) {
        let g = ((grid >> (8 * j)) & 0xFF) as u8 as i8 as f32;
        *o = dl * (g + delta);
    }
}

/// NVFP4's unsigned e4m3 scale (bias 7), halved for the doubled e2m1 table, as
/// `gguf.quants.NVFP4.ue4m3_to_fp32` computes it: bit 7 is ignored, 0 and 0x7F are 0.
/// Every value is a small mantissa times a power of two, so this is exact.
fn ue4m3_half(x: u8) -> f32 {
    if x == 0 || x == 0x7F {
        return 0.0;
    }
    let exp = ((x >> 3) & 0x0F) as i32;
    let man = (x & 7) as f32;
    let raw = if exp == 0 {
        man * 2f32.powi(-9)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    raw * 0.5
}

/// IQ4_NL's (and IQ4_XS's) table of the 16 levels (`kvalues_iq4nl`).
const IQ4_NL_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];
/// e2m1 values, doubled (`kvalues_mxfp4`).
const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// The 8 scales and 8 mins of a Q4_K/Q5_K block, six bits each, packed in 12 bytes
/// (`get_scale_min_k4`).
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// numpy's `x.astype(np.float16)` (round to nearest even) as little-endian bytes. A NaN
/// keeps its sign and the top 10 bits of its payload, made nonzero when they are all zero
/// (numpy's `npy_floatbits_to_halfbits`; the `half` crate would make it quiet).
fn f16_bytes(x: f32) -> [u8; 2] {
    if x.is_nan() {
        let b = x.to_bits();
        let m = ((b & 0x007f_ffff) >> 13) as u16;
        let h = ((b >> 16) & 0x8000) as u16 | 0x7c00 | if m == 0 { 1 } else { m };
        return h.to_le_bytes();
    }
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// `gguf.quants.np_roundf`: round half away from zero, in f32 as numpy computes it.
fn roundf(n: f32) -> f32 {
    let a = n.abs();
    let fl = a.floor();
    let b = fl + (2.0 * (a - fl)).floor();
    let sign = if n > 0.0 {
        1.0
    } else if n < 0.0 {
        -1.0
    } else {
        0.0
    };
    sign * b
}

/// numpy's float → uint8 cast followed by `.clip(0, hi)` for the values quantizers make
/// (at most a little above `hi`, or ±inf/NaN when a subnormal block's `1/d` overflows).
/// numpy casts through a 32-bit int on x86-64, where ±inf and NaN become 0x80000000, whose
/// low byte is 0 (such blocks store d = 0 in f16, so every q decodes alike).
fn to_u8_clip(v: f32, hi: u8) -> u8 {
    if !v.is_finite() {
        return 0;
    }
    (v as u8).min(hi)
}

/// The element of largest magnitude, first one on ties (`abs(x).argmax()` then take).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if v.abs() > x[best].abs() {
            best = i;
        }
    }
    x[best]
}

fn reciprocal_or_zero(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// Why a block cannot be written in a block-quantized type. In each case
/// `gguf.quants.quantize` (and ggml-quants.c) would still write bytes, but bytes that decode
/// to inf/NaN or to values unrelated to the input, so lorastream refuses instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("holds a non-finite value ({0}), which {1} cannot store")]
    NonFinite(f32, GgmlType),
    #[error(
        "needs a {1} scale of {0:e}, beyond f16's range (65504): the block would decode to inf/NaN"
    )]
    ScaleOverflow(f32, GgmlType),
}

/// The f16 scale bytes of `v`, refused when it rounds to inf.
fn f16_scale(v: f32, ty: GgmlType) -> Result<[u8; 2], EncodeError> {
    let h = f16::from_f32(v);
    if h.is_infinite() {
        return Err(EncodeError::ScaleOverflow(v, ty));
    }
    Ok(h.to_bits().to_le_bytes())
}

/// Elements of a TQ1_0 block in digit order, and their base-3 weights in a packed byte.
const TQ_POW: [u16; 5] = [81, 27, 9, 3, 1];

/// Encodes one block of `ty.block_size()` values `x` into `out` (`ty.type_size()` bytes),
/// as `gguf.quants.quantize` does. Only for types with [`GgmlType::encodes`]. The
/// block-quantized types refuse what the reference would write as garbage
/// ([`EncodeError`]); F32/F16/BF16 are plain casts and take any value.
pub fn encode_block(ty: GgmlType, x: &[f32], out: &mut [u8]) -> Result<(), EncodeError> {
    use GgmlType::*;
    if ty.block_size() > 1 {
        if let Some(v) = x.iter().find(|v| !v.is_finite()) {
            return Err(EncodeError::NonFinite(*v, ty));
        }
    }
    match ty {
        F32 => out.copy_from_slice(&x[0].to_le_bytes()),
        F16 => out.copy_from_slice(&f16_bytes(x[0])),
        BF16 => {
            // gguf's BF16.quantize_blocks (= ggml_compute_fp32_to_bf16): NaN made quiet,
            // otherwise round to nearest even.
            let n = x[0].to_bits();
            let r = if n & 0x7fff_ffff > 0x7f80_0000 {
                ((n & 0xffff_0000) | (64 << 16)) >> 16
            } else {
                ((n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) >> 16) as u32
            };
            out.copy_from_slice(&(r as u16).to_le_bytes());
        }
        Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = reciprocal_or_zero(d);
            out[..2].copy_from_slice(&f16_scale(d, ty)?);
            for j in 0..32 {
                out[2 + j] = (roundf(x[j] * id) as i8) as u8;
            }
        }
        Q4_0 => {
            let d = signed_absmax(x) / -8.0;
            let id = reciprocal_or_zero(d);
            out[..2].copy_from_slice(&f16_scale(d, ty)?);
            for j in 0..16 {
                let lo = to_u8_clip((x[j] * id + 8.5).trunc(), 15);
                let hi = to_u8_clip((x[j + 16] * id + 8.5).trunc(), 15);
                out[2 + j] = lo | (hi << 4);
            }
        }
        Q4_1 | Q5_1 => {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            let levels = if ty == Q4_1 { 15.0 } else { 31.0 };
            let d = (max - min) / levels;
            let id = reciprocal_or_zero(d);
            out[..2].copy_from_slice(&f16_scale(d, ty)?);
            out[2..4].copy_from_slice(&f16_scale(min, ty)?);
            let q: Vec<u8> = x
                .iter()
                .map(|&v| to_u8_clip(((v - min) * id + 0.5).trunc(), levels as u8))
                .collect();
            if ty == Q4_1 {
                for j in 0..16 {
                    out[4 + j] = q[j] | (q[j + 16] << 4);
                }
            } else {
                pack_q5(&q, &mut out[4..]);
            }
        }
        Q5_0 => {
            let d = signed_absmax(x) / -16.0;
            let id = reciprocal_or_zero(d);
            out[..2].copy_from_slice(&f16_scale(d, ty)?);
            let q: Vec<u8> = x
                .iter()
                .map(|&v| to_u8_clip((v * id + 16.5).trunc(), 31))
                .collect();
            pack_q5(&q, &mut out[2..]);
        }
        // d = max |x|; each element rounded (half away from zero) to -1, 0 or 1, stored + 1.
        TQ1_0 | TQ2_0 => {
            let d = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = reciprocal_or_zero(d);
            let q: Vec<u8> = x
                .iter()
                .map(|&v| (roundf(v * id) as i8 + 1) as u8)
                .collect();
            if ty == TQ2_0 {
                // qs[32h + l] holds elements 128h + 32s + l at bits 2s.
                for h in 0..2 {
                    for l in 0..32 {
                        let e = |s: usize| q[128 * h + 32 * s + l] << (2 * s);
                        out[32 * h + l] = e(0) | e(1) | e(2) | e(3);
                    }
                }
                out[64..66].copy_from_slice(&f16_scale(d, ty)?);
            } else {
                // Five (four for the last 16) base-3 digits per byte, most significant first,
                // scaled to 0..255 by ceil(v · 256 / 243).
                let byte = |v: u16| (v * 256).div_ceil(243) as u8;
                for l in 0..32 {
                    out[l] = byte((0..5).map(|p| q[32 * p + l] as u16 * TQ_POW[p]).sum());
                }
                for l in 0..16 {
                    let v = (0..5).map(|p| q[160 + 16 * p + l] as u16 * TQ_POW[p]).sum();
                    out[32 + l] = byte(v);
                }
                for l in 0..4 {
                    let v = (0..4).map(|p| q[240 + 4 * p + l] as u16 * TQ_POW[p]).sum();
                    out[48 + l] = byte(v);
                }
                out[52..54].copy_from_slice(&f16_scale(d, ty)?);
            }
        }
        // e = floor(log2(max |x|)) - 2 + 127 (0 for an all-zero block); each element the
        // nearest (first on ties) of the doubled e2m1 values times the halved scale. Below
        // 2^-125 e is negative and numpy's cast (through an i32 on x86-64) wraps it to
        // 232..255, a huge scale: every element then takes 0, within 2^-125 of its value.
        MXFP4 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let e = if amax > 0.0 {
                (amax.log2().floor() - 2.0 + 127.0) as i32 as u8
            } else {
                0
            };
            let d = e8m0_half(e);
            out[0] = e;
            let mut q = [0u8; 32];
            for (qj, &v) in q.iter_mut().zip(x) {
                let mut best = (0usize, f32::INFINITY);
                for (k, &kv) in MXFP4_VALUES.iter().enumerate() {
                    let err = (d * kv as f32 - v).abs();
                    if err < best.1 {
                        best = (k, err);
                    }
                }
                *qj = best.0 as u8;
            }
            for j in 0..16 {
                out[1 + j] = q[j] | (q[j + 16] << 4);
            }
        }
        _ => {}
    }
    Ok(())
}

/// MXFP4's e8m0 scale, halved for the doubled e2m1 table (`ggml_e8m0_to_fp32_half`).
fn e8m0_half(e: u8) -> f32 {
    let e = e as u32;
    f32::from_bits(if e < 2 {
        0x0020_0000 << e
    } else {
        (e - 1) << 23
    })
}

/// qh (bit j = fifth bit of element j, a little-endian u32) then qs (low nibbles of
/// elements j and j + 16) of a Q5_0/Q5_1 block.
fn pack_q5(q: &[u8], out: &mut [u8]) {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate().take(32) {
        qh |= (((v >> 4) & 1) as u32) << j;
    }
    out[..4].copy_from_slice(&qh.to_le_bytes());
    for j in 0..16 {
        out[4 + j] = (q[j] & 0x0F) | (q[j + 16] << 4);
    }
}

#[cfg(test)]
// Hand-built blocks are written field by field at their byte offsets, as ggml lays them out.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16_bytes(x)
    }

    #[test]
    fn every_type_has_a_row_and_ids_round_trip() {
        for r in TYPES {
            assert_eq!(GgmlType::from_id(r.1), Some(r.0));
            assert_eq!(GgmlType::from_name(r.2), Some(r.0));
            assert_eq!(r.0.id(), r.1);
        }
        assert_eq!(GgmlType::from_id(4), None);
        assert_eq!(GgmlType::from_name("q8_0"), Some(GgmlType::Q8_0));
    }

    /// Q8_0: d = 0.5, q = -128..: element j = q_j * 0.5.
    #[test]
    fn q8_0_block() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|j| (j as i8 * 4 - 64) as u8));
        let mut out = [0f32; 32];
        decode_block(GgmlType::Q8_0, &b, &mut out);
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, (j as f32 * 4.0 - 64.0) * 0.5);
        }
    }

    /// Q4_0 and Q4_1: low nibbles are elements 0..16, high nibbles 16..32.
    #[test]
    fn q4_blocks() {
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut b = h(2.0).to_vec();
        b.extend(&qs);
        let mut out = [0f32; 32];
        decode_block(GgmlType::Q4_0, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], 2.0 * (15.0 - j as f32 - 8.0));
        }
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend(&qs);
        decode_block(GgmlType::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], 0.25 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.25 * (15 - j) as f32 - 1.0);
        }
    }

    /// Q5_0 and Q5_1: qh bit j is the fifth bit of element j.
    #[test]
    fn q5_blocks() {
        let want: Vec<u8> = (0..32u8).map(|j| (j * 7) % 32).collect();
        let mut packed = [0u8; 20];
        pack_q5(&want, &mut packed);
        let mut b = h(1.0).to_vec();
        b.extend(packed);
        let mut out = [0f32; 32];
        decode_block(GgmlType::Q5_0, &b, &mut out);
        for j in 0..32 {
            assert_eq!(out[j], want[j] as f32 - 16.0, "{j}");
        }
        let mut b = h(0.5).to_vec();
        b.extend(h(3.0));
        b.extend(packed);
        decode_block(GgmlType::Q5_1, &b, &mut out);
        for j in 0..32 {
            assert_eq!(out[j], 0.5 * want[j] as f32 + 3.0, "{j}");
        }
    }

    /// Q2_K: sub-block i has scale i % 16 and min i / 2; 2-bit values cycle 0..4.
    #[test]
    fn q2_k_block() {
        let mut b = vec![0u8; 84];
        for i in 0..16 {
            b[i] = (i as u8) | (((i / 2) as u8) << 4);
        }
        // qs[32h + l] holds elements 128h + 32s + l at bits 2s: put value (s + l) % 4.
        for h in 0..2 {
            for l in 0..32 {
                let mut v = 0u8;
                for s in 0..4 {
                    v |= (((s + l) % 4) as u8) << (2 * s);
                }
                b[16 + 32 * h + l] = v;
            }
        }
        b[80..82].copy_from_slice(&h(0.5));
        b[82..84].copy_from_slice(&h(0.25));
        let mut out = [0f32; 256];
        decode_block(GgmlType::Q2_K, &b, &mut out);
        for (k, v) in out.iter().enumerate() {
            let (s, l) = ((k / 32) % 4, k % 32);
            let sub = k / 16;
            let want = 0.5 * sub as f32 * ((s + l) % 4) as f32 - 0.25 * (sub / 2) as f32;
            assert_eq!(*v, want, "{k}");
        }
    }

    /// Q3_K: scales 6-bit (low nibbles in bytes 0..8, high pairs in 8..12) minus 32; a
    /// clear hmask bit subtracts 4.
    #[test]
    fn q3_k_block() {
        let mut b = vec![0u8; 110];
        // hmask: element k's bit is bit k/32 of hmask[k % 32]: set it for even l only.
        for l in 0..32 {
            b[l] = if l % 2 == 0 { 0xFF } else { 0 };
        }
        for i in 0..64 {
            b[32 + i] = 0b11_10_01_00; // s = 0..4 get q = 0, 1, 2, 3
        }
        // Scale i = 32 + i (six bits: low nibble i & 15, high two bits 2 + i / 16 = 2).
        let want_scale = |i: usize| (32 + i) as u8;
        let mut sc = [0u8; 12];
        for i in 0..16 {
            let v = want_scale(i);
            sc[i % 8] |= (v & 0x0F) << (4 * (i / 8));
            sc[8 + i % 4] |= ((v >> 4) & 3) << (2 * (i / 4));
        }
        b[96..108].copy_from_slice(&sc);
        b[108..110].copy_from_slice(&h(2.0));
        let mut out = [0f32; 256];
        decode_block(GgmlType::Q3_K, &b, &mut out);
        for (k, v) in out.iter().enumerate() {
            let (s, l) = ((k / 32) % 4, k % 32);
            let q = s as f32 - if l % 2 == 0 { 0.0 } else { 4.0 };
            assert_eq!(*v, 2.0 * (k / 16) as f32 * q, "{k}");
        }
    }

    fn pack_scale_min_k4(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[4 + j] >> 4) << 6);
            s[4 + j] = mn[j] | ((mn[4 + j] >> 4) << 6);
            s[8 + j] = (sc[4 + j] & 0x0F) | ((mn[4 + j] & 0x0F) << 4);
        }
        s
    }

    #[test]
    fn k4_scales_unpack() {
        let sc = [1, 2, 3, 63, 17, 33, 48, 62];
        let mn = [0, 5, 60, 7, 63, 16, 32, 1];
        assert_eq!(scale_min_k4(&pack_scale_min_k4(sc, mn)), (sc, mn));
    }

    /// Q4_K and Q5_K: eight 32-element sub-blocks with their own scale and min.
    #[test]
    fn q4_k_and_q5_k_blocks() {
        let sc = [1, 2, 3, 4, 5, 6, 7, 8];
        let mn = [8, 7, 6, 5, 4, 3, 2, 1];
        let q = |k: usize| ((k * 5) % 16) as u8;
        let mut b = h(0.5).to_vec();
        b.extend(h(0.125));
        b.extend(pack_scale_min_k4(sc, mn));
        for hh in 0..4 {
            for l in 0..32 {
                b.push(q(64 * hh + l) | (q(64 * hh + 32 + l) << 4));
            }
        }
        let mut out = [0f32; 256];
        decode_block(GgmlType::Q4_K, &b, &mut out);
        for (k, v) in out.iter().enumerate() {
            let sub = k / 32;
            let want = 0.5 * sc[sub] as f32 * q(k) as f32 - 0.125 * mn[sub] as f32;
            assert_eq!(*v, want, "{k}");
        }
        // Q5_K: the same plus a fifth bit from qh, set for odd l.
        let mut b5 = b[..16].to_vec();
        for l in 0..32 {
            b5.push(if l % 2 == 1 { 0xFF } else { 0 });
        }
        b5.extend(&b[16..]);
        decode_block(GgmlType::Q5_K, &b5, &mut out);
        for (k, v) in out.iter().enumerate() {
            let sub = k / 32;
            let qq = q(k) as f32 + if k % 2 == 1 { 16.0 } else { 0.0 };
            let want = 0.5 * sc[sub] as f32 * qq - 0.125 * mn[sub] as f32;
            assert_eq!(*v, want, "{k}");
        }
    }

    /// Q6_K: low 4 bits from ql, high 2 from qh, minus 32, times a signed 8-bit scale.
    #[test]
    fn q6_k_block() {
        let q = |k: usize| ((k * 11) % 64) as u8;
        let mut b = vec![0u8; 210];
        for k in 0..256 {
            let (hh, s, l) = (k / 128, (k / 32) % 4, k % 32);
            b[64 * hh + 32 * (s % 2) + l] |= (q(k) & 0x0F) << (4 * (s / 2));
            b[128 + 32 * hh + l] |= (q(k) >> 4) << (2 * s);
        }
        for i in 0..16 {
            b[192 + i] = (i as i8 - 8) as u8;
        }
        b[208..210].copy_from_slice(&h(0.5));
        let mut out = [0f32; 256];
        decode_block(GgmlType::Q6_K, &b, &mut out);
        for (k, v) in out.iter().enumerate() {
            let want = (0.5 * ((k / 16) as f32 - 8.0)) * (q(k) as f32 - 32.0);
            assert_eq!(*v, want, "{k}");
        }
    }

    #[test]
    fn iq4_and_mxfp4_blocks() {
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let mut b = h(0.5).to_vec();
        b.extend(&qs);
        let mut out = [0f32; 256];
        decode_block(GgmlType::IQ4_NL, &b, &mut out[..32]);
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * IQ4_NL_VALUES[j] as f32);
            assert_eq!(out[j + 16], 0.5 * IQ4_NL_VALUES[15 - j] as f32);
        }
        // MXFP4 with e = 128: d = 2^0 (the halving is in the doubled table).
        let mut b = vec![128u8];
        b.extend(&qs);
        decode_block(GgmlType::MXFP4, &b, &mut out[..32]);
        for j in 0..16 {
            assert_eq!(out[j], MXFP4_VALUES[j] as f32);
        }
        // e = 0 and 1 are subnormal scales: 2^-127 and 2^-126 (0x00200000 << e).
        b[0] = 1;
        decode_block(GgmlType::MXFP4, &b, &mut out[..32]);
        assert_eq!(out[1], f32::from_bits(0x0040_0000));
        // IQ4_XS: sub-block i has scale (i + 33) - 32 = i + 1.
        let mut b = h(1.0).to_vec();
        let (mut sh, mut sl) = (0u16, [0u8; 4]);
        for i in 0..8 {
            let v = (i + 33) as u8;
            sl[i / 2] |= (v & 0x0F) << (4 * (i % 2));
            sh |= (((v >> 4) & 3) as u16) << (2 * i);
        }
        b.extend(sh.to_le_bytes());
        b.extend(sl);
        for _ in 0..8 {
            b.extend(&qs);
        }
        decode_block(GgmlType::IQ4_XS, &b, &mut out);
        for i in 0..8 {
            for m in 0..16 {
                assert_eq!(out[32 * i + m], (i + 1) as f32 * IQ4_NL_VALUES[m] as f32);
            }
        }
    }

    /// Ternary blocks: TQ2_0 stores q + 1 in two bits; TQ1_0 base-3 digits scaled to bytes.
    #[test]
    fn ternary_blocks() {
        let mut b = vec![0u8; 66];
        for l in 0..64 {
            b[l] = 0b10_01_00_10; // s = 0..4: q + 1 = 2, 0, 1, 2
        }
        b[64..66].copy_from_slice(&h(0.5));
        let mut out = [0f32; 256];
        decode_block(GgmlType::TQ2_0, &b, &mut out);
        for (k, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.5 * [1.0, -1.0, 0.0, 1.0][(k / 32) % 4], "{k}");
        }
        // TQ1_0: digits (2, 0, 1, 2, 1) make 2·81 + 0·27 + 1·9 + 2·3 + 1 = 178; stored as
        // ceil(178 · 256 / 243).
        let v = ((178u16 * 256).div_ceil(243)) as u8;
        let mut b = vec![v; 52];
        b.extend(h(1.0));
        decode_block(GgmlType::TQ1_0, &b, &mut out);
        let want = [2.0, 0.0, 1.0, 2.0, 1.0].map(|d: f32| d - 1.0);
        for p in 0..5 {
            assert_eq!(out[32 * p], want[p], "{p}");
            assert_eq!(out[160 + 16 * p], want[p], "{p}");
        }
        for p in 0..4 {
            assert_eq!(out[240 + 4 * p], want[p], "{p}");
        }
    }

    #[test]
    fn q8_k_block() {
        let mut b = 0.25f32.to_le_bytes().to_vec();
        b.extend((0..256).map(|j| (j as u8).wrapping_sub(128)));
        b.extend([0u8; 32]);
        let mut out = [0f32; 256];
        decode_block(GgmlType::Q8_K, &b, &mut out);
        for (j, v) in out.iter().enumerate() {
            assert_eq!(*v, 0.25 * (j as f32 - 128.0));
        }
    }

    /// Encoding then decoding a block gives each value back within half a step, and
    /// the hand-checkable cases exactly: zeros, the ±max element, rounding half away.
    #[test]
    fn encoders_round_trip_within_a_step() {
        let x: Vec<f32> = (0..32).map(|j| (j as f32 - 13.0) * 0.37).collect();
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
        ] {
            let mut b = vec![0u8; ty.type_size()];
            encode_block(ty, &x, &mut b).unwrap();
            let mut y = [0f32; 32];
            decode_block(ty, &b, &mut y);
            let levels = match ty {
                GgmlType::Q8_0 => 254.0,
                GgmlType::Q4_0 | GgmlType::Q4_1 => 15.0,
                _ => 31.0,
            };
            let step = (x[31] - x[0]) / levels * 2.0;
            for j in 0..32 {
                assert!((x[j] - y[j]).abs() <= step * 0.51 + 1e-3, "{ty} {j}");
            }
            let mut z = vec![0u8; ty.type_size()];
            encode_block(ty, &[0.0; 32], &mut z).unwrap();
            decode_block(ty, &z, &mut y);
            assert!(y.iter().all(|v| *v == 0.0), "{ty}");
        }
        assert_eq!(roundf(2.5), 3.0);
        assert_eq!(roundf(-2.5), -3.0);
        assert_eq!(roundf(2.4999), 2.0);
        let mut b = [0u8; 2];
        encode_block(GgmlType::BF16, &[1.0 + 1.0 / 256.0], &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0x3f80);
        encode_block(GgmlType::BF16, &[f32::from_bits(0x7f80_0001)], &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0x7fc0);
    }
}
