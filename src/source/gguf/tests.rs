//! Reader tests: the committed fixtures (written by the `gguf` package's GGUFWriter, see
//! fixtures/make_gguf_fixtures.py) parse and decode to what `gguf.quants.dequantize` gave;
//! every truncation and a set of crafted corruptions fail with a message, never a panic.

use super::*;
use std::path::Path;

const TYPES: &[u8] = include_bytes!("../../../fixtures/gguf/types.gguf");
const EXPECTED: &[u8] = include_bytes!("../../../fixtures/gguf/types.expected.safetensors");
const ALIGNED: &[u8] = include_bytes!("../../../fixtures/gguf/aligned64.gguf");

fn p() -> &'static Path {
    Path::new("t.gguf")
}

#[test]
fn fixture_metadata_and_infos() {
    let g = parse(TYPES, p()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(g.get("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(g.get("test.u64"), Some(&Value::U64((1 << 63) + 5)));
    assert_eq!(g.get("test.f64"), Some(&Value::F64(-1.0e-300)));
    assert_eq!(g.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(
        g.get("test.array.str"),
        Some(&Value::Array(
            8,
            ["a", "bc", "", "déf"]
                .iter()
                .map(|s| Value::Str(s.to_string()))
                .collect()
        ))
    );
    let q4k = g.tensors.iter().find(|t| t.name == "k.q4_k").unwrap();
    assert_eq!(
        (q4k.ty, q4k.ne.clone(), q4k.nbytes),
        (GgmlType::Q4_K, vec![256, 5], 720)
    );
    assert_eq!(q4k.shape(), vec![5, 256]);
    assert!(g.tensors.iter().all(|t| t.start.is_multiple_of(32)));
    let a = parse(ALIGNED, p()).unwrap();
    assert_eq!(a.alignment, 64);
    assert!(
        a.tensors
            .iter()
            .all(|t| (t.start - a.data_start).is_multiple_of(64))
    );
}

/// Decoded bands, whatever their size and start, equal the reference values.
#[test]
fn fixture_tensors_decode_to_the_reference() {
    let file = MappedFile::from_bytes(p(), TYPES).unwrap();
    let want_file = MappedFile::from_bytes(Path::new("e.safetensors"), EXPECTED).unwrap();
    let want = crate::source::safetensors::read(&want_file).unwrap();
    let got = read(&file).unwrap();
    assert_eq!(got.len(), want.len());
    for w in &want {
        let g = got.iter().find(|g| g.name == w.name).unwrap();
        assert_eq!(g.shape, w.shape, "{}", w.name);
        // The reference stores BF16 dequantized to f32.
        let bytes: Vec<u8> = if g.dtype == Dtype::BF16 {
            g.bytes()
                .chunks_exact(2)
                .flat_map(|c| {
                    f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16).to_le_bytes()
                })
                .collect()
        } else {
            g.bytes().into_owned()
        };
        assert_eq!(bytes, &w.bytes()[..], "{}", w.name);
        for band in [1, 7, 31, 33, 255, 257] {
            let mut out = Vec::new();
            let mut at = 0;
            while at < g.numel() {
                g.gather(at, band, &mut out);
                at += band;
            }
            assert_eq!(out, g.bytes().into_owned(), "{} band {band}", w.name);
        }
    }
}

/// Every prefix of a valid file is refused with a message (no panic, no read past the end).
#[test]
fn every_truncation_is_refused() {
    let g = parse(TYPES, p()).unwrap();
    let last = g.tensors.last().map(|t| t.start + t.nbytes).unwrap();
    for n in 0..last {
        assert!(parse(&TYPES[..n], p()).is_err(), "prefix {n}");
    }
    assert!(parse(&TYPES[..last], p()).is_ok());
}

/// Byte flips anywhere in the header either parse (a value changed) or fail cleanly; the
/// parsed result never points outside the file.
#[test]
fn flipped_header_bytes_never_panic() {
    let g = parse(TYPES, p()).unwrap();
    for at in 0..g.data_start {
        for x in [0x01u8, 0x80, 0xFF] {
            let mut b = TYPES.to_vec();
            b[at] ^= x;
            if let Ok(h) = parse(&b, p()) {
                for t in &h.tensors {
                    assert!(t.start + t.nbytes <= b.len());
                }
            }
        }
    }
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend(version.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn s(b: &mut Vec<u8>, v: &str) {
    b.extend((v.len() as u64).to_le_bytes());
    b.extend(v.as_bytes());
}

fn err(b: &[u8]) -> String {
    parse(b, p()).unwrap_err().to_string()
}

#[test]
fn crafted_corruptions_are_named() {
    assert!(err(b"GGUX\x03\0\0\0").contains("no GGUF magic"));
    assert!(err(&header(1, 0, 0)).contains("version 1"));
    assert!(err(&header(3u32.swap_bytes(), 0, 0)).contains("big-endian"));
    assert!(err(&header(3, 0, u64::MAX)).contains("metadata entries"));
    assert!(err(&header(3, u64::MAX / 2, 0)).contains("tensors"));
    // An array claiming more elements than the file holds.
    let mut b = header(3, 0, 1);
    s(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    assert!(err(&b).contains("array elements"));
    // Nested arrays.
    let mut b = header(3, 0, 1);
    s(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    b.extend(9u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend([0u8; 16]);
    assert!(err(&b).contains("array of arrays"));
    // Bad alignment.
    let mut b = header(3, 0, 1);
    s(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(24u32.to_le_bytes());
    assert!(err(&b).contains("power of two"));
    // A tensor whose row does not fit its blocks, one with a gap, one past the end.
    let tensor = |ne0: u64, ty: u32, offset: u64| {
        let mut b = header(3, 1, 0);
        s(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(ne0.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        b.resize(b.len().next_multiple_of(32), 0);
        b.extend([0u8; 64]);
        b
    };
    assert!(parse(&tensor(8, 0, 0), p()).is_ok());
    assert!(err(&tensor(40, 8, 0)).contains("block size"));
    assert!(err(&tensor(8, 0, 32)).contains("not where the previous"));
    assert!(err(&tensor(32, 0, 0)).contains("past the end"));
    assert!(err(&tensor(8, 99, 0)).contains("unknown ggml tensor type"));
    assert!(err(&tensor(u64::MAX, 0, 0)).contains("negative"));
    // A type the reader cannot decode is refused when the entry is made, by name.
    // (Q8_1, ggml's dot-product intermediate, which gguf.quants does not dequantize.)
    let b = tensor(256, 9, 0);
    let mut b = b;
    b.resize(b.len() + 640, 0);
    let file = MappedFile::from_bytes(p(), &b).unwrap();
    let e = read(&file).unwrap_err().to_string();
    assert!(e.contains("'w'") && e.contains("Q8_1"), "{e}");
}
