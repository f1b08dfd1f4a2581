//! Block-decoder tests on the committed fixture fixtures/gguf_quants (random blocks of the
//! grid IQ types and NVFP4, with subnormal, 65504, inf and NaN scales, written by the
//! `gguf` package; see fixtures/make_gguf_quant_fixtures.py): every element decodes to the
//! bits `gguf.quants.dequantize` gave, NaN payloads included. Plus the encoders' own checks.

use super::quants::{EncodeError, GgmlType, decode_block, encode_block};
use super::*;
use std::path::Path;

const BLOCKS: &[u8] = include_bytes!("../../../fixtures/gguf_quants/blocks.gguf");
const EXPECTED: &[u8] = include_bytes!("../../../fixtures/gguf_quants/blocks.expected.safetensors");

#[test]
fn grid_types_decode_to_the_reference_bits() {
    let file = MappedFile::from_bytes(Path::new("blocks.gguf"), BLOCKS).unwrap();
    let want_file = MappedFile::from_bytes(Path::new("e.safetensors"), EXPECTED).unwrap();
    let want = crate::source::safetensors::read(&want_file).unwrap();
    let got = read(&file).unwrap();
    let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
    for ty in [
        "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "NVFP4",
    ] {
        assert!(
            names.contains(&format!("b.{ty}").as_str()),
            "{ty} in the fixture"
        );
    }
    let mut nan = 0;
    for w in &want {
        let g = got.iter().find(|g| g.name == w.name).unwrap();
        assert_eq!((g.dtype, &g.shape), (Dtype::F32, &w.shape), "{}", w.name);
        let (gb, wb) = (g.bytes(), w.bytes());
        for (k, (a, b)) in gb.chunks_exact(4).zip(wb.chunks_exact(4)).enumerate() {
            assert_eq!(a, b, "{} element {k}", w.name);
            nan += f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_nan() as usize;
        }
        assert!(!gb.iter().all(|&b| b == 0), "{}", w.name);
    }
    assert!(nan > 0, "the NaN scales decode as the reference's NaNs");
}

/// Hand-checkable: IQ2_XXS with d = 1, scale nibble 0: db = 0.125, grid row 0 is all 8s,
/// sign index 1 (ksigns 0x81) negates elements 0 and 7.
#[test]
fn iq2_xxs_by_hand() {
    let mut b = vec![0u8; 66];
    b[..2].copy_from_slice(&half::f16::from_f32(1.0).to_bits().to_le_bytes());
    b[6..10].copy_from_slice(&1u32.to_le_bytes());
    let mut out = [0f32; 256];
    decode_block(GgmlType::IQ2_XXS, &b, &mut out);
    let want: Vec<f32> = (0..8)
        .map(|j| if j == 0 || j == 7 { -1.0 } else { 1.0 })
        .collect();
    assert_eq!(&out[..8], &want[..]);
    assert!(out[8..].iter().all(|&v| v == 1.0));
}

/// TQ1_0/TQ2_0/MXFP4: encoding then decoding gives back values that are exactly
/// representable; out-of-range blocks are refused, not written.
#[test]
fn new_encoders_round_trip_and_refuse() {
    let x: Vec<f32> = (0..256).map(|k| [-1.5, 0.0, 1.5][k % 3]).collect();
    for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
        let mut b = vec![0u8; ty.type_size()];
        encode_block(ty, &x, &mut b).unwrap();
        let mut y = [0f32; 256];
        decode_block(ty, &b, &mut y);
        assert_eq!(&y[..], &x[..], "{ty}");
        assert_eq!(
            encode_block(ty, &[70000.0; 256], &mut b),
            Err(EncodeError::ScaleOverflow(70000.0, ty))
        );
    }
    let x: Vec<f32> = (0..32).map(|k| [0.5, -1.0, 3.0, -6.0][k % 4]).collect();
    let mut b = [0u8; 17];
    encode_block(GgmlType::MXFP4, &x, &mut b).unwrap();
    let mut y = [0f32; 32];
    decode_block(GgmlType::MXFP4, &b, &mut y);
    assert_eq!(&y[..], &x[..]);
    let mut nan = x.clone();
    nan[3] = f32::NAN;
    assert!(matches!(
        encode_block(GgmlType::Q8_0, &nan, &mut [0u8; 34]),
        Err(EncodeError::NonFinite(..))
    ));
}

#[test]
fn unwritable_types_say_why() {
    let m = GgmlType::Q4_K.why_not_encoded();
    assert!(
        m.contains("quantize_row_q4_k_ref") && m.contains("llama-quantize"),
        "{m}"
    );
    assert!(
        GgmlType::IQ2_XS
            .why_not_encoded()
            .contains("no reference quantizer")
    );
    assert!(GgmlType::NVFP4.why_not_encoded().contains("no quantizer"));
    for ty in [
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::Q8_0,
    ] {
        assert!(ty.encodes() && ty.decodes(), "{ty}");
    }
    assert!(!GgmlType::Q1_0.decodes() && !GgmlType::Q8_1.decodes());
}

/// Any bytes decode without a panic (every index into a table is masked to its size) and
/// any finite values encode or are refused, for every type.
#[test]
fn random_bytes_and_values_never_panic() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = [0f32; 256];
    for id in 0..64 {
        let Some(ty) = GgmlType::from_id(id) else {
            continue;
        };
        let (bs, ts) = (ty.block_size(), ty.type_size());
        for _ in 0..200 {
            let b: Vec<u8> = (0..ts).map(|_| next() as u8).collect();
            if ty.decodes() {
                decode_block(ty, &b, &mut out[..bs]);
            }
            if ty.encodes() {
                let x: Vec<f32> = (0..bs).map(|_| f32::from_bits(next() as u32)).collect();
                let mut o = vec![0u8; ts];
                let _ = encode_block(ty, &x, &mut o);
            }
        }
    }
}
