//! Element types: their safetensors names, sizes, PyTorch storage names, and the
//! conversions between the floating types and f32 that casting and merging use.
//!
//! Every float conversion to a narrower type rounds to nearest, ties to even, and keeps
//! NaN a NaN — the same result as PyTorch's `.to(dtype)` on CPU. Wider-to-narrower from
//! f64 goes through f32 first, as PyTorch's c10 `Half`/`BFloat16` constructors do.

use half::f16;

/// An element type, named as safetensors names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
    C64,
    /// complex128: PyTorch only (safetensors has no name for it).
    C128,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
}

/// How a PyTorch pickle spells a dtype's storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchStorage {
    /// A typed storage class such as `torch.FloatStorage`, rebuilt with `_rebuild_tensor_v2`.
    Typed(&'static str),
    /// `torch.storage.UntypedStorage` (numel counts bytes) plus the dtype global
    /// `torch.<name>`, rebuilt with `_rebuild_tensor_v3`.
    Untyped(&'static str),
}

const ALL: [Dtype; 20] = [
    Dtype::Bool,
    Dtype::U8,
    Dtype::I8,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
    Dtype::C64,
    Dtype::C128,
    Dtype::F8E4M3,
    Dtype::F8E5M2,
    Dtype::F8E8M0,
    Dtype::F8E4M3Fnuz,
    Dtype::F8E5M2Fnuz,
];

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            Bool | U8 | I8 | F8E4M3 | F8E5M2 | F8E8M0 | F8E4M3Fnuz | F8E5M2Fnuz => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            F64 | I64 | U64 | C64 => 8,
            C128 => 16,
        }
    }

    /// The safetensors header name (`"BF16"`, `"F8_E4M3"`, …).
    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            Bool => "BOOL",
            U8 => "U8",
            I8 => "I8",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
            C64 => "C64",
            C128 => "C128",
            F8E4M3 => "F8_E4M3",
            F8E5M2 => "F8_E5M2",
            F8E8M0 => "F8_E8M0",
            F8E4M3Fnuz => "F8_E4M3FNUZ",
            F8E5M2Fnuz => "F8_E5M2FNUZ",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_name(name: &str) -> Option<Dtype> {
        ALL.into_iter().find(|d| d.name() == name)
    }

    /// Whether safetensors can store this dtype.
    pub fn in_safetensors(self) -> bool {
        self != Dtype::C128
    }

    /// The floating types that `--dtype` casts and a merge computes on.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// How `torch.save` writes a storage of this dtype.
    pub fn torch_storage(self) -> TorchStorage {
        use Dtype::*;
        use TorchStorage::*;
        match self {
            F64 => Typed("DoubleStorage"),
            F32 => Typed("FloatStorage"),
            F16 => Typed("HalfStorage"),
            BF16 => Typed("BFloat16Storage"),
            I64 => Typed("LongStorage"),
            I32 => Typed("IntStorage"),
            I16 => Typed("ShortStorage"),
            I8 => Typed("CharStorage"),
            U8 => Typed("ByteStorage"),
            Bool => Typed("BoolStorage"),
            C64 => Typed("ComplexFloatStorage"),
            C128 => Typed("ComplexDoubleStorage"),
            U16 => Untyped("uint16"),
            U32 => Untyped("uint32"),
            U64 => Untyped("uint64"),
            F8E4M3 => Untyped("float8_e4m3fn"),
            F8E5M2 => Untyped("float8_e5m2"),
            F8E8M0 => Untyped("float8_e8m0fnu"),
            F8E4M3Fnuz => Untyped("float8_e4m3fnuz"),
            F8E5M2Fnuz => Untyped("float8_e5m2fnuz"),
        }
    }

    /// The dtype of a typed storage class name (`FloatStorage` → F32).
    pub fn from_torch_storage_class(class: &str) -> Option<Dtype> {
        ALL.into_iter()
            .find(|d| matches!(d.torch_storage(), TorchStorage::Typed(n) if n == class))
    }

    /// The dtype of a `torch.<attr>` dtype object as pickles name it (`torch.bfloat16`).
    pub fn from_torch_attr(attr: &str) -> Option<Dtype> {
        use Dtype::*;
        Some(match attr {
            "float64" | "double" => F64,
            "float32" | "float" => F32,
            "float16" | "half" => F16,
            "bfloat16" => BF16,
            "int64" | "long" => I64,
            "int32" | "int" => I32,
            "int16" | "short" => I16,
            "int8" => I8,
            "uint8" => U8,
            "bool" => Bool,
            "complex64" | "cfloat" => C64,
            "complex128" | "cdouble" => C128,
            "uint16" => U16,
            "uint32" => U32,
            "uint64" => U64,
            "float8_e4m3fn" => F8E4M3,
            "float8_e5m2" => F8E5M2,
            "float8_e8m0fnu" => F8E8M0,
            "float8_e4m3fnuz" => F8E4M3Fnuz,
            "float8_e5m2fnuz" => F8E5M2Fnuz,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes little-endian elements of a floating dtype into f32. `src` holds exactly
/// `dst.len()` elements; it may be unaligned (it usually points into a memory map).
///
/// # Panics
/// If `dtype` is not floating or the lengths disagree: callers check both up front.
pub fn decode_f32(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * dtype.size(), "decode_f32 length");
    match dtype {
        Dtype::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        Dtype::F16 => {
            if let Ok(halves) = bytemuck::try_cast_slice::<u8, f16>(src) {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(halves, dst);
            } else {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
                }
            }
        }
        Dtype::BF16 => {
            // bf16 is the top half of an f32: widening is exact and needs no library.
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
            }
        }
        Dtype::F64 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(s);
                *d = f64::from_le_bytes(b) as f32;
            }
        }
        other => panic!("decode_f32 on non-float dtype {other}"),
    }
}

/// Encodes f32 values as little-endian elements of a floating dtype, rounding to nearest
/// even. `dst` receives exactly `src.len() * dtype.size()` bytes.
///
/// # Panics
/// If `dtype` is not floating or the lengths disagree.
pub fn encode_f32(dtype: Dtype, src: &[f32], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len() * dtype.size(), "encode_f32 length");
    match dtype {
        Dtype::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        Dtype::F16 => {
            if let Ok(halves) = bytemuck::try_cast_slice_mut::<u8, f16>(dst) {
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(halves, src);
            } else {
                for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
                }
            }
        }
        Dtype::BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16_bits(*s).to_le_bytes());
            }
        }
        Dtype::F64 => {
            for (d, s) in dst.chunks_exact_mut(8).zip(src) {
                d.copy_from_slice(&(*s as f64).to_le_bytes());
            }
        }
        other => panic!("encode_f32 on non-float dtype {other}"),
    }
}

/// f32 → bf16 bits, round to nearest even, NaN kept a (quiet) NaN. Branch-free so the
/// compiler vectorises loops over it; equal to `half::bf16::from_f32` (tested).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    if nan {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

/// Rounds f32 values in place to the nearest value of `dtype` (a no-op for f32 and f64),
/// as storing them in that dtype and reading them back would.
pub fn round_through(dtype: Dtype, v: &mut [f32]) {
    match dtype {
        Dtype::BF16 => {
            for x in v.iter_mut() {
                *x = f32::from_bits((bf16_bits(*x) as u32) << 16);
            }
        }
        Dtype::F16 => {
            let mut tmp = [f16::ZERO; 256];
            for chunk in v.chunks_mut(256) {
                let t = &mut tmp[..chunk.len()];
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(t, chunk);
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&*t, chunk);
            }
        }
        _ => {}
    }
}

/// Casts floating elements from one dtype to another (both floating), appending to `out`.
/// f64 → f64 and same-dtype casts copy; f64 → f32/f16/bf16 round through f32 like torch.
pub fn cast_float(from: Dtype, to: Dtype, src: &[u8], out: &mut Vec<u8>) {
    if from == to {
        out.extend_from_slice(src);
        return;
    }
    const CHUNK: usize = 16 * 1024;
    let n = src.len() / from.size();
    let mut tmp = vec![0f32; CHUNK.min(n)];
    let start = out.len();
    out.resize(start + n * to.size(), 0);
    let mut done = 0;
    while done < n {
        let k = CHUNK.min(n - done);
        let s = &src[done * from.size()..(done + k) * from.size()];
        let d = &mut out[start + done * to.size()..start + (done + k) * to.size()];
        // f64 sources only reach here with a narrower target, so the f32 step is exactly
        // torch's rounding; for every other source widening to f32 is exact.
        decode_f32(from, s, &mut tmp[..k]);
        encode_f32(to, &tmp[..k], d);
        done += k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn names_round_trip() {
        for d in ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
        }
        assert_eq!(Dtype::from_name("F4"), None);
    }

    #[test]
    fn storage_classes_round_trip() {
        for d in ALL {
            if let TorchStorage::Typed(class) = d.torch_storage() {
                assert_eq!(Dtype::from_torch_storage_class(class), Some(d));
            }
        }
        assert_eq!(Dtype::from_torch_storage_class("UntypedStorage"), None);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
        let x = 1.0f32 + f32::powi(2.0, -8);
        let mut out = [0u8; 2];
        encode_f32(Dtype::BF16, &[x], &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        // Just above the tie rounds up.
        let y = f32::from_bits(x.to_bits() + 1);
        encode_f32(Dtype::BF16, &[y], &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f81);
        encode_f32(Dtype::BF16, &[f32::NAN], &mut out);
        let back = f32::from_bits((u16::from_le_bytes(out) as u32) << 16);
        assert!(back.is_nan());
    }

    #[test]
    fn bf16_bits_matches_half_everywhere_that_matters() {
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-45,
        ];
        let mut x = 0x1234_5678u32;
        let randoms = (0..200_000).map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            f32::from_bits(x)
        });
        for v in specials.into_iter().chain(randoms) {
            let ours = bf16_bits(v);
            let theirs = bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(bf16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{v:e} ({:#x})", v.to_bits());
            }
        }
    }

    #[test]
    fn round_through_equals_encode_decode() {
        let vals: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0137).collect();
        for d in [Dtype::F16, Dtype::BF16] {
            let mut a = vals.clone();
            round_through(d, &mut a);
            let mut bytes = vec![0u8; vals.len() * 2];
            encode_f32(d, &vals, &mut bytes);
            let mut b = vec![0f32; vals.len()];
            decode_f32(d, &bytes, &mut b);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn f16_decode_handles_unaligned_input() {
        let vals = [1.5f32, -2.25, 65504.0];
        let mut bytes = [0u8; 1 + 6];
        encode_f32(Dtype::F16, &vals, &mut bytes[1..]);
        let mut back = [0f32; 3];
        decode_f32(Dtype::F16, &bytes[1..], &mut back);
        assert_eq!(back, vals);
    }

    #[test]
    fn cast_f32_to_bf16_and_back() {
        let vals: Vec<f32> = (0..100).map(|i| i as f32 * 0.37 - 11.0).collect();
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut bf = Vec::new();
        cast_float(Dtype::F32, Dtype::BF16, &src, &mut bf);
        assert_eq!(bf.len(), 200);
        let mut wide = Vec::new();
        cast_float(Dtype::BF16, Dtype::F32, &bf, &mut wide);
        for (i, v) in vals.iter().enumerate() {
            let w = f32::from_le_bytes(wide[i * 4..i * 4 + 4].try_into().unwrap());
            assert!((w - v).abs() <= v.abs() / 128.0);
        }
    }
}
