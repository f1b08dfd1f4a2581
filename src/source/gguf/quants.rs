//! ggml tensor types: their ids, block sizes and stored bytes per block, and the block
//! decoders (stored form → f32) and encoders (f32 → stored form) that reproduce the `gguf`
//! Python package's `gguf.quants` (itself bit-exact to ggml-quants.c) operation for
//! operation, in f32, so every result is the same bits.
//!
//! Block layouts are ggml's `block_q*` structs (little-endian, packed): the field order in
//! each decoder's comment is the byte order in the file.

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
}

/// (type, id, name, elements per block, bytes per block), as `GGML_QUANT_SIZES` says.
const TYPES: [(GgmlType, u32, &str, usize, usize); 32] = {
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
                | IQ4_NL
                | IQ4_XS
                | TQ1_0
                | TQ2_0
                | MXFP4
        )
    }
    /// Whether this crate can write the type from f32 values (`--gguf-type`).
    pub fn encodes(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0)
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
            let e = b[0] as u32;
            let bits = if e < 2 {
                0x0020_0000 << e
            } else {
                (e - 1) << 23
            };
            let d = f32::from_bits(bits);
            for j in 0..16 {
                let q = b[1 + j];
                out[j] = d * MXFP4_VALUES[(q & 0x0F) as usize] as f32;
                out[j + 16] = d * MXFP4_VALUES[(q >> 4) as usize] as f32;
            }
        }
        _ => {}
    }
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

/// numpy's `x.astype(np.float16)` (round to nearest even) as little-endian bytes.
fn f16_bytes(x: f32) -> [u8; 2] {
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
/// (non-negative, at most a little above `hi`).
fn to_u8_clip(v: f32, hi: u8) -> u8 {
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

/// Encodes one block of `ty.block_size()` values `x` into `out` (`ty.type_size()` bytes),
/// as `gguf.quants.quantize` does. Only for types with [`GgmlType::encodes`].
pub fn encode_block(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    use GgmlType::*;
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
            out[..2].copy_from_slice(&f16_bytes(d));
            for j in 0..32 {
                out[2 + j] = (roundf(x[j] * id) as i8) as u8;
            }
        }
        Q4_0 => {
            let d = signed_absmax(x) / -8.0;
            let id = reciprocal_or_zero(d);
            out[..2].copy_from_slice(&f16_bytes(d));
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
            out[..2].copy_from_slice(&f16_bytes(d));
            out[2..4].copy_from_slice(&f16_bytes(min));
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
            out[..2].copy_from_slice(&f16_bytes(d));
            let q: Vec<u8> = x
                .iter()
                .map(|&v| to_u8_clip((v * id + 16.5).trunc(), 31))
                .collect();
            pack_q5(&q, &mut out[2..]);
        }
        _ => {}
    }
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
            encode_block(ty, &x, &mut b);
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
            encode_block(ty, &[0.0; 32], &mut z);
            decode_block(ty, &z, &mut y);
            assert!(y.iter().all(|v| *v == 0.0), "{ty}");
        }
        assert_eq!(roundf(2.5), 3.0);
        assert_eq!(roundf(-2.5), -3.0);
        assert_eq!(roundf(2.4999), 2.0);
        let mut b = [0u8; 2];
        encode_block(GgmlType::BF16, &[1.0 + 1.0 / 256.0], &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x3f80);
        encode_block(GgmlType::BF16, &[f32::from_bits(0x7f80_0001)], &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x7fc0);
    }
}
