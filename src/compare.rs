//! The value-comparison core shared by `verify` and `diff`: the distance in units of the
//! last place (ulp) for f64/f32/f16/bf16, the tolerance rules, per-tensor statistics that
//! are fed chunk by chunk (so a tensor is compared in bounded memory), and reading an
//! element range of a stored tensor (contiguous or strided) without reading all of it.
//!
//! Tolerances (`Tolerance`), for two elements `a` (expected) and `b` (found) of the same
//! dtype:
//! - `Exact`: the bits are equal.
//! - `Values`: the values are equal (`+0 == -0`, any NaN equals any NaN); non-float
//!   dtypes compare bits.
//! - `Contract` (what `verify` accepts by default, the merge's fidelity contract): both NaN,
//!   or `ulp(a, b) <= 1`, or — f32 and f64 only, both finite — `|a - b| <= 1e-5 * max(|a|, |b|)`.
//!   Non-float dtypes (integers, bool, float8, complex) compare bits.
//! - `MaxUlp(n)`: both NaN, or `ulp(a, b) <= n` (floats); non-float dtypes compare bits.
//!
//! `ulp(a, b)` counts the representable values of the dtype between `a` and `b`: the bit
//! patterns are mapped onto one ordered integer line (`-0` and `+0` both at 0, so the two
//! zeros are 0 ulp apart and the smallest subnormals of either sign 2 apart; infinity is
//! one step beyond the largest finite value).
//!
//! When the dtypes of `a` and `b` differ, both are widened exactly to f64 and an element
//! differs when the values differ; no ulp distance is given (there is no common grid).

use crate::direct_io::AlignedBuf;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::{TensorData, TensorEntry};
use serde::Serialize;

/// The relative tolerance of the contract for f32 and f64 elements.
pub const CONTRACT_RTOL: f64 = 1e-5;

/// When two elements count as equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Tolerance {
    /// Bit for bit.
    Exact,
    /// Equal values (±0 equal, NaN equals NaN).
    Values,
    /// The merge's fidelity contract: ≤ 1 ulp, or rtol 1e-5 for f32/f64.
    #[default]
    Contract,
    /// At most this many ulp (floats).
    MaxUlp(u64),
}

impl Tolerance {
    /// One line for reports.
    pub fn describe(self) -> String {
        match self {
            Tolerance::Exact => "bit-exact".into(),
            Tolerance::Values => "equal values".into(),
            Tolerance::Contract => {
                "<= 1 ulp, or |a-b| <= 1e-5*max(|a|,|b|) for f32/f64 (fidelity contract)".into()
            }
            Tolerance::MaxUlp(n) => format!("<= {n} ulp"),
        }
    }
}

/// Whether the dtype has a float grid the ulp distance is defined on.
pub fn has_ulp(d: Dtype) -> bool {
    matches!(d, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// The element's bits as an integer (little-endian), for dtypes of at most 8 bytes.
fn bits(d: Dtype, e: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = d.size().min(8);
    b[..n].copy_from_slice(&e[..n]);
    u64::from_le_bytes(b)
}

/// The position of a float bit pattern on the ordered line (sign-magnitude to integer).
fn ordered(d: Dtype, bits: u64) -> i128 {
    let width = d.size() * 8;
    let sign = 1u64 << (width - 1);
    let mag = (bits & (sign - 1)) as i128;
    if bits & sign != 0 { -mag } else { mag }
}

/// Distance in ulp between two floats of dtype `d` given as bits (see the module comment).
pub fn ulp_distance(d: Dtype, a_bits: u64, b_bits: u64) -> u64 {
    let diff = (ordered(d, a_bits) - ordered(d, b_bits)).unsigned_abs();
    u64::try_from(diff).unwrap_or(u64::MAX)
}

/// The element widened exactly to f64; None for dtypes without a real value here
/// (float8, complex).
pub fn to_f64(d: Dtype, e: &[u8]) -> Option<f64> {
    let b = bits(d, e);
    Some(match d {
        Dtype::F64 => f64::from_bits(b),
        Dtype::F32 => f32::from_bits(b as u32) as f64,
        Dtype::F16 => half::f16::from_bits(b as u16).to_f64(),
        Dtype::BF16 => f32::from_bits((b as u32 & 0xffff) << 16) as f64,
        Dtype::Bool => (b & 0xff != 0) as u8 as f64,
        Dtype::U8 => b as u8 as f64,
        Dtype::I8 => b as u8 as i8 as f64,
        Dtype::U16 => b as u16 as f64,
        Dtype::I16 => b as u16 as i16 as f64,
        Dtype::U32 => b as u32 as f64,
        Dtype::I32 => b as u32 as i32 as f64,
        Dtype::U64 => b as f64,
        Dtype::I64 => b as i64 as f64,
        _ => return None,
    })
}

/// What was found comparing one tensor (or the part of it compared so far).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Stats {
    /// Elements compared.
    pub compared: u64,
    /// Elements outside the tolerance.
    pub differing: u64,
    /// Largest |a - b| over the compared elements (NaN pairs left out); 0 when equal.
    pub max_abs: f64,
    /// Largest ulp distance (same float dtype only; NaN pairs left out).
    pub max_ulp: Option<u64>,
    /// Elements where exactly one side is NaN (counted in `differing`).
    pub nan_mismatch: u64,
    /// Flat index (row-major, in the whole tensor) of the first differing element.
    pub first_differing: Option<u64>,
}

impl Stats {
    /// Compares `n` elements: `a` of dtype `da`, `b` of dtype `db` (element `i` of the
    /// chunk is flat index `index(i)` of the tensor, for `first_differing`).
    pub fn add(
        &mut self,
        tol: Tolerance,
        da: Dtype,
        a: &[u8],
        db: Dtype,
        b: &[u8],
        index: impl Fn(usize) -> u64,
    ) {
        let (ea, eb) = (da.size(), db.size());
        let n = (a.len() / ea).min(b.len() / eb);
        let same = da == db;
        let float = has_ulp(da) && same;
        if same && float && self.max_ulp.is_none() {
            self.max_ulp = Some(0);
        }
        for i in 0..n {
            let (xa, xb) = (&a[i * ea..(i + 1) * ea], &b[i * eb..(i + 1) * eb]);
            let equal = if same && !float {
                // Integers, bool, float8, complex: bits.
                xa == xb
            } else {
                let (va, vb) = match (to_f64(da, xa), to_f64(db, xb)) {
                    (Some(va), Some(vb)) => (va, vb),
                    // No value to compare (float8/complex against another dtype).
                    _ => (f64::NAN, 0.0),
                };
                let (na, nb) = (va.is_nan(), vb.is_nan());
                if na || nb {
                    if na != nb {
                        self.nan_mismatch += 1;
                        false
                    } else {
                        tol != Tolerance::Exact || xa == xb
                    }
                } else {
                    let abs = (va - vb).abs();
                    if abs > self.max_abs {
                        self.max_abs = abs;
                    }
                    if float {
                        let (ba, bb) = (bits(da, xa), bits(db, xb));
                        let ulp = ulp_distance(da, ba, bb);
                        if let Some(m) = &mut self.max_ulp {
                            *m = (*m).max(ulp);
                        }
                        match tol {
                            Tolerance::Exact => ba == bb,
                            Tolerance::Values => ulp == 0,
                            Tolerance::MaxUlp(k) => ulp <= k,
                            Tolerance::Contract => {
                                ulp <= 1
                                    || (matches!(da, Dtype::F32 | Dtype::F64)
                                        && va.is_finite()
                                        && vb.is_finite()
                                        && abs <= CONTRACT_RTOL * va.abs().max(vb.abs()))
                            }
                        }
                    } else {
                        // Different dtypes: exact values.
                        va == vb
                    }
                }
            };
            if !equal {
                self.differing += 1;
                if self.first_differing.is_none() {
                    self.first_differing = Some(index(i));
                }
            }
        }
        self.compared += n as u64;
    }
}

/// Elements per piece when two stored tensors are compared: bounds memory per tensor.
pub const PIECE_ELEMS: usize = 1 << 20;

/// Reads elements `[e0, e0 + n)` (row-major) of `t` and returns their bytes: a positioned
/// read for contiguous tensors, a gather for strided views (only those elements).
pub fn read_elements<'b>(
    t: &TensorEntry,
    e0: usize,
    n: usize,
    buf: &'b mut AlignedBuf,
    gather: &'b mut Vec<u8>,
) -> Result<&'b [u8]> {
    let es = t.dtype.size();
    if e0.checked_add(n).is_none_or(|e| e > t.numel()) {
        return Err(Error::tensor(
            t.file.path(),
            &t.name,
            "internal: read past the end of the tensor",
        ));
    }
    match &t.data {
        TensorData::Contiguous { .. } | TensorData::Decoded { .. } => {
            match t.read_into(e0 * es, n * es, buf) {
                Some(r) => Ok(&buf.as_slice()[r?]),
                None => Err(Error::tensor(
                    t.file.path(),
                    &t.name,
                    "internal: not contiguous",
                )),
            }
        }
        TensorData::Strided {
            base,
            offset,
            strides,
        } => {
            gather.clear();
            let all = t.file.bytes();
            // The multi-index of element e0, then an odometer over the shape.
            let mut idx = vec![0usize; t.shape.len()];
            let mut rest = e0;
            for d in (0..t.shape.len()).rev() {
                let dim = t.shape[d].max(1);
                idx[d] = rest % dim;
                rest /= dim;
            }
            for _ in 0..n {
                let elem = offset + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
                let at = base + elem * es;
                let e = all.get(at..at + es).ok_or_else(|| {
                    Error::tensor(
                        t.file.path(),
                        &t.name,
                        "strided view past the end of the file",
                    )
                })?;
                gather.extend_from_slice(e);
                for d in (0..t.shape.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < t.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            Ok(gather)
        }
    }
}

/// One tensor's comparison, as reported by `verify` and `diff`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TensorDiff {
    pub name: String,
    /// Dtype on the expected / first side (`verify`: the recomputed merge; `diff`: A).
    pub dtype_a: String,
    /// Dtype on the found / second side (`verify`: OUT; `diff`: B).
    pub dtype_b: String,
    pub shape_a: Vec<usize>,
    pub shape_b: Vec<usize>,
    /// Rows of the first dimension compared (None: all of them).
    pub rows_compared: Option<Vec<usize>>,
    #[serde(flatten)]
    pub stats: Stats,
}

impl TensorDiff {
    pub fn new(name: &str, a: (Dtype, &[usize]), b: (Dtype, &[usize])) -> TensorDiff {
        TensorDiff {
            name: name.to_string(),
            dtype_a: a.0.name().to_string(),
            dtype_b: b.0.name().to_string(),
            shape_a: a.1.to_vec(),
            shape_b: b.1.to_vec(),
            rows_compared: None,
            stats: Stats::default(),
        }
    }

    pub fn dtype_changed(&self) -> bool {
        self.dtype_a != self.dtype_b
    }

    pub fn shape_changed(&self) -> bool {
        self.shape_a != self.shape_b
    }

    /// Whether this tensor counts as different: a dtype or shape change, or any element
    /// outside the tolerance.
    pub fn differs(&self) -> bool {
        self.dtype_changed() || self.shape_changed() || self.stats.differing > 0
    }

    /// "F32→BF16", "[4, 8]→[8, 4]", "3 of 128 elements (max 2 ulp, max |Δ| 1.5e-3)".
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.dtype_changed() {
            parts.push(format!("dtype {} -> {}", self.dtype_a, self.dtype_b));
        }
        if self.shape_changed() {
            parts.push(format!("shape {:?} -> {:?}", self.shape_a, self.shape_b));
            return parts.join(", ");
        }
        let s = &self.stats;
        if s.differing > 0 || self.dtype_changed() {
            let mut v = format!("{} of {} elements differ", s.differing, s.compared);
            let mut details = Vec::new();
            if let Some(u) = s.max_ulp {
                details.push(format!("max {u} ulp"));
            }
            details.push(format!("max |a-b| {}", fmt_abs(s.max_abs)));
            if s.nan_mismatch > 0 {
                details.push(format!("{} NaN vs number", s.nan_mismatch));
            }
            if let Some(i) = s.first_differing {
                details.push(format!("first at flat index {i}"));
            }
            v.push_str(&format!(" ({})", details.join(", ")));
            parts.push(v);
        }
        parts.join(", ")
    }
}

/// A table of tensor differences: name, dtype and shape (with their changes), differing
/// elements of those compared, max ulp, max |a-b|, first differing flat index.
/// Names, dtypes and shapes are left-aligned, numbers right-aligned.
pub fn table(rows: &[TensorDiff]) -> String {
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|d| {
            let dtype = if d.dtype_changed() {
                format!("{}->{}", d.dtype_a, d.dtype_b)
            } else {
                d.dtype_a.clone()
            };
            let shape = if d.shape_changed() {
                format!("{:?}->{:?}", d.shape_a, d.shape_b)
            } else {
                format!("{:?}", d.shape_a)
            };
            let s = &d.stats;
            let (differing, ulp, abs) = if d.shape_changed() {
                ("-".into(), "-".into(), "-".into())
            } else {
                (
                    format!("{}/{}", s.differing, s.compared),
                    s.max_ulp.map_or("-".into(), |u| u.to_string()),
                    fmt_abs(s.max_abs),
                )
            };
            let first = s.first_differing.map_or("-".into(), |i| i.to_string());
            [d.name.clone(), dtype, shape, differing, ulp, abs, first]
        })
        .collect();
    let head = [
        "TENSOR",
        "DTYPE",
        "SHAPE",
        "DIFFERING",
        "MAX ULP",
        "MAX |a-b|",
        "FIRST AT",
    ];
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for c in &cells {
        for (i, x) in c.iter().enumerate() {
            w[i] = w[i].max(x.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String]| {
        for (i, x) in c.iter().enumerate() {
            let pad = w[i].saturating_sub(x.chars().count());
            if i < 3 {
                out.push_str(x);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(x);
            }
            out.push_str(if i + 1 < c.len() { "  " } else { "\n" });
        }
    };
    line(&mut out, &head.map(String::from));
    for c in &cells {
        line(&mut out, c);
    }
    out
}

/// `1.5e-3`, `0`, `inf`.
pub fn fmt_abs(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.3e}")
    }
}

/// Compares two stored tensors of the same shape piece by piece (at most `PIECE_ELEMS`
/// elements of each in memory).
pub fn compare_entries(a: &TensorEntry, b: &TensorEntry, tol: Tolerance) -> Result<TensorDiff> {
    let mut d = TensorDiff::new(&a.name, (a.dtype, &a.shape), (b.dtype, &b.shape));
    if a.shape != b.shape {
        return Ok(d);
    }
    let n = a.numel();
    let (mut ba, mut ga, mut bb, mut gb) = Default::default();
    let mut e0 = 0;
    while e0 < n {
        let k = PIECE_ELEMS.min(n - e0);
        let xa = read_elements(a, e0, k, &mut ba, &mut ga)?;
        let xb = read_elements(b, e0, k, &mut bb, &mut gb)?;
        d.stats
            .add(tol, a.dtype, xa, b.dtype, xb, |i| (e0 + i) as u64);
        e0 += k;
    }
    a.release();
    b.release();
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn f16s(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
            .collect()
    }
    fn bf16s(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect()
    }
    fn stats(tol: Tolerance, da: Dtype, a: &[u8], db: Dtype, b: &[u8]) -> Stats {
        let mut s = Stats::default();
        s.add(tol, da, a, db, b, |i| i as u64);
        s
    }

    #[test]
    fn ulp_distance_on_every_float_grid() {
        let one = 1.0f32;
        assert_eq!(
            ulp_distance(
                Dtype::F32,
                one.to_bits() as u64,
                f32::from_bits(one.to_bits() + 3).to_bits() as u64
            ),
            3
        );
        let h = |x: f32| f16::from_f32(x).to_bits() as u64;
        assert_eq!(ulp_distance(Dtype::F16, h(1.0), h(1.0 + 2f32.powi(-10))), 1);
        let b = |x: f32| bf16::from_f32(x).to_bits() as u64;
        assert_eq!(ulp_distance(Dtype::BF16, b(1.0), b(1.0 + 2f32.powi(-7))), 1);
        assert_eq!(
            ulp_distance(Dtype::BF16, b(-1.0), b(-1.0 - 2f32.powi(-7))),
            1
        );
        // ±0 are one point; the smallest subnormals of either sign are 2 apart.
        assert_eq!(ulp_distance(Dtype::F16, h(0.0), h(-0.0)), 0);
        assert_eq!(ulp_distance(Dtype::F16, 0x0001, 0x8001), 2);
        let d = |x: f64| x.to_bits();
        assert_eq!(
            ulp_distance(Dtype::F64, d(1.0), f64::from_bits(d(1.0) + 5).to_bits()),
            5
        );
        // Infinity is one step past the largest finite value.
        assert_eq!(ulp_distance(Dtype::F16, h(65504.0), h(f32::INFINITY)), 1);
        assert_eq!(
            ulp_distance(
                Dtype::F32,
                f32::MAX.to_bits() as u64,
                f32::MIN.to_bits() as u64
            ),
            2 * f32::MAX.to_bits() as u64
        );
    }

    #[test]
    fn contract_is_one_ulp_for_16_bit_and_rtol_for_f32() {
        let a = [1.0f32, 2.0, -3.0];
        let one_up = [1.0 + 2f32.powi(-10), 2.0, -3.0];
        let two_up = [1.0 + 2.0 * 2f32.powi(-10), 2.0, -3.0];
        let s = stats(
            Tolerance::Contract,
            Dtype::F16,
            &f16s(&a),
            Dtype::F16,
            &f16s(&one_up),
        );
        assert_eq!((s.differing, s.max_ulp, s.compared), (0, Some(1), 3));
        let s = stats(
            Tolerance::Contract,
            Dtype::F16,
            &f16s(&a),
            Dtype::F16,
            &f16s(&two_up),
        );
        assert_eq!(
            (s.differing, s.max_ulp, s.first_differing),
            (1, Some(2), Some(0))
        );
        // bf16: 2 ulp is outside even though the relative difference is < 1e-2.
        let b2 = [1.0 + 2.0 * 2f32.powi(-7), 2.0, -3.0];
        let s = stats(
            Tolerance::Contract,
            Dtype::BF16,
            &bf16s(&a),
            Dtype::BF16,
            &bf16s(&b2),
        );
        assert_eq!((s.differing, s.max_ulp), (1, Some(2)));
        // f32: 8 ulp at 1.0 is ~9.5e-7 relative: inside rtol 1e-5; 1e-4 relative is not.
        let near = [f32::from_bits(1.0f32.to_bits() + 8), 2.0, -3.0];
        let s = stats(
            Tolerance::Contract,
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&near),
        );
        assert_eq!((s.differing, s.max_ulp), (0, Some(8)));
        let far = [1.0001f32, 2.0, -3.0];
        let s = stats(
            Tolerance::Contract,
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&far),
        );
        assert_eq!(s.differing, 1);
        assert!((s.max_abs - 1e-4).abs() < 1e-6, "{}", s.max_abs);
        // rtol never excuses an infinity against a finite value (inf <= 1e-5*inf).
        let inf = [f32::INFINITY, 2.0, -3.0];
        let s = stats(
            Tolerance::Contract,
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&inf),
        );
        assert_eq!(s.differing, 1);
        // Exact and MaxUlp.
        let s = stats(
            Tolerance::Exact,
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&near),
        );
        assert_eq!(s.differing, 1);
        let s = stats(
            Tolerance::MaxUlp(8),
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&near),
        );
        assert_eq!(s.differing, 0);
        let s = stats(
            Tolerance::MaxUlp(7),
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&near),
        );
        assert_eq!(s.differing, 1);
    }

    #[test]
    fn nans_and_zeros() {
        let a = [f32::NAN, 0.0, 1.0];
        let b = [f32::from_bits(0x7fc0_0001), -0.0, f32::NAN];
        let s = stats(
            Tolerance::Values,
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&b),
        );
        // NaN payloads and zero signs do not matter for values; NaN against 1.0 does.
        assert_eq!((s.differing, s.nan_mismatch, s.max_ulp), (1, 1, Some(0)));
        assert_eq!(s.first_differing, Some(2));
        let s = stats(
            Tolerance::Exact,
            Dtype::F32,
            &f32s(&a),
            Dtype::F32,
            &f32s(&b),
        );
        assert_eq!(s.differing, 3);
    }

    #[test]
    fn different_dtypes_compare_exact_values() {
        let a = [1.0f32, 1.0 + 2f32.powi(-12), 3.0];
        let b = bf16s(&a); // 1.0+2^-12 rounds to 1.0 in bf16
        let s = stats(Tolerance::Contract, Dtype::F32, &f32s(&a), Dtype::BF16, &b);
        assert_eq!(
            (s.differing, s.max_ulp, s.first_differing),
            (1, None, Some(1))
        );
        assert!((s.max_abs - 2f64.powi(-12)).abs() < 1e-12);
        // Integers widen exactly too.
        let ints: Vec<u8> = [1i64, -2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let i32s: Vec<u8> = [1i32, -2, 4].iter().flat_map(|x| x.to_le_bytes()).collect();
        let s = stats(Tolerance::Contract, Dtype::I64, &ints, Dtype::I32, &i32s);
        assert_eq!((s.differing, s.max_abs), (1, 1.0));
        // Same integer dtype: bits, whatever the tolerance.
        let s = stats(Tolerance::MaxUlp(100), Dtype::I64, &ints, Dtype::I64, &ints);
        assert_eq!((s.differing, s.compared, s.max_ulp), (0, 3, None));
    }

    #[test]
    fn strided_ranges_read_only_what_is_asked() {
        use crate::source::MappedFile;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // A 3x4 storage; the tensor is its transpose [4, 3] (strides [1, 4]).
        let storage: Vec<f32> = (0..12).map(|i| i as f32).collect();
        std::fs::write(&path, f32s(&storage)).unwrap();
        let t = TensorEntry {
            name: "t".into(),
            dtype: Dtype::F32,
            shape: vec![4, 3],
            file: MappedFile::open(&path).unwrap(),
            data: TensorData::Strided {
                base: 0,
                offset: 0,
                strides: vec![1, 4],
            },
        };
        let (mut buf, mut g) = Default::default();
        let got = read_elements(&t, 4, 5, &mut buf, &mut g).unwrap();
        // Row-major elements 4..9 of the transpose: (1,1) (1,2) (2,0) (2,1) (2,2).
        assert_eq!(got, f32s(&[5.0, 9.0, 2.0, 6.0, 10.0]).as_slice());
        assert!(read_elements(&t, 10, 3, &mut buf, &mut g).is_err());
        let c = TensorEntry {
            data: TensorData::Contiguous { start: 0, len: 48 },
            shape: vec![3, 4],
            ..t.clone()
        };
        let got = read_elements(&c, 5, 2, &mut buf, &mut g).unwrap();
        assert_eq!(got, f32s(&[5.0, 6.0]).as_slice());
    }
}
