//! The LoRA delta product `d = scale · (L @ R)` of the CPU backend, with its own small
//! microkernels (scalar, AVX2+FMA, AVX-512F, NEON) chosen at run time, and the reduction
//! order that makes every one of them — and `kernels/merge.cu` — give the same bits.
//!
//! # The output contract (reduction order)
//!
//! For every element (i, j) of the delta, with r = the rank (the reduction length):
//!
//! ```text
//! acc = +0.0f32
//! for k in 0, 1, …, r-1 (ascending, no reassociation, one chain):
//!     acc = fma(L[i,k], R[k,j], acc)        one IEEE fused multiply-add, rounded once
//! d[i,j] = acc * scale                      one f32 multiply, round to nearest even
//! ```
//!
//! Blocking over k (`KC` here, 256-wide launches on the GPU) stores the f32 partial and
//! resumes the *same* chain from it, so no block size enters the result; tile shapes and
//! vector widths only decide which independent elements are computed together. Denormals
//! are kept (no flush-to-zero on any path). The steps after the delta (add to the value,
//! rounding into the weight dtype, DoRA) are element-wise IEEE operations in `cpu.rs` and
//! the same on every path. Only NaN payloads may differ between ISAs.
//!
//! # Why own microkernels
//!
//! `matrixmultiply` (used before) picks its kernel and its k blocking per ISA and adds its
//! k blocks to C after scaling each, so its bits could differ between an AVX-512 and an
//! AVX2 machine and from the GPU, and its AVX-512 kernel ran at about half of OpenBLAS's
//! rate on the same core. No GEMM crate lets the caller fix the order across ISAs. The
//! kernels here are the textbook register-blocked outer product: an MR × NR tile of
//! accumulators, per k one load of NR values of the packed R panel and MR broadcasts of
//! the packed L panel. `reference` (plain loops) is the specification they are tested
//! against, bit for bit.
//!
//! # Packing
//!
//! R (the LoRA factor read whole: A, or Bᵀ for transposed layouts) is packed once per
//! tensor into panels of NR columns, k-major ([`PackedRight`]); L (the factor read per
//! band) is packed once per band ([`pack_left`]) into panels of MR rows, k-major, decoded
//! from its stored dtype straight into the panels (the f16/bf16 → f32 conversion is part
//! of the packing, a contiguous run at a time through the vectorised `convert.rs`). Loop
//! order: column panel → k block → row panel, so one R panel slice (KC × NR) stays in L1
//! while the band's L panels stream from L2. [`delta_cols`] computes a block of columns
//! into a block-sized buffer (row stride = the block's width): the CPU backend's fused
//! band walks [`COL_BLOCK`] columns at a time so the block's f32 delta is still in L2
//! when it is added to the weight and encoded. None of this blocking changes any
//! element's chain.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use half::f16;
use rayon::prelude::*;

/// Values of k per block: a KC × NR slice of an R panel (32 KB for NR = 32) stays in L1.
const KC: usize = 256;

/// A compute path: which microkernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust (`f32::mul_add`): every CPU; the reference the others are checked against.
    Scalar,
    /// x86-64 with AVX2 and FMA: 6 × 16 tiles in 12 ymm accumulators.
    Avx2,
    /// x86-64 with AVX-512F: 12 × 32 tiles in 24 zmm accumulators.
    Avx512,
    /// aarch64 Advanced SIMD: 8 × 8 tiles in 16 q accumulators.
    Neon,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Rows × columns of one microkernel tile.
    fn tile(self) -> (usize, usize) {
        match self {
            Isa::Scalar => (4, 8),
            Isa::Avx2 => (6, 16),
            Isa::Avx512 => (12, 32),
            Isa::Neon => (8, 8),
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every path this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Neon, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// The fastest path this CPU runs.
    pub fn best() -> Isa {
        Isa::available().pop().unwrap_or(Isa::Scalar)
    }

    /// The path named by `LORASTREAM_CPU` (scalar | avx2 | avx512 | neon | auto), else the
    /// best one. A named path this CPU cannot run is an error, never a silent fallback:
    /// the variable exists to test a path.
    pub fn from_env() -> Result<Isa> {
        match std::env::var("LORASTREAM_CPU") {
            Ok(v) => Isa::parse(&v),
            Err(_) => Ok(Isa::best()),
        }
    }

    fn parse(v: &str) -> Result<Isa> {
        let isa = match v.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => return Ok(Isa::best()),
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            "neon" => Isa::Neon,
            other => {
                return Err(Error::Usage(format!(
                    "LORASTREAM_CPU={other}: not a CPU path (scalar, avx2, avx512, neon or auto)"
                )));
            }
        };
        if !isa.supported() {
            let have: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
            return Err(Error::Device(format!(
                "LORASTREAM_CPU={}: this CPU cannot run that path (it runs: {})",
                isa.name(),
                have.join(", ")
            )));
        }
        Ok(isa)
    }
}

/// f32 storage whose first element sits on a 64-byte boundary (vector loads of packed
/// panels never split a cache line).
#[derive(Default)]
pub struct AlignedF32 {
    buf: Vec<f32>,
    off: usize,
}

impl AlignedF32 {
    /// `len` zeros (the padding of edge panels must be zero: it is multiplied, not stored).
    fn zeroed(&mut self, len: usize) -> &mut [f32] {
        self.buf.clear();
        self.buf.resize(len + 16, 0.0);
        self.off = (self.buf.as_ptr() as usize).wrapping_neg() % 64 / 4;
        &mut self.buf[self.off..self.off + len]
    }
    fn as_slice(&self) -> &[f32] {
        &self.buf[self.off.min(self.buf.len())..]
    }
}

/// A matrix to be packed: element (i, k) is `get(base + i·rs + k·cs)`.
pub struct Strided<'a> {
    pub data: Elems<'a>,
    pub base: usize,
    pub rs: usize,
    pub cs: usize,
}

/// Test shorthand: an f32 matrix to be packed (see [`Strided`]).
#[cfg(test)]
impl<'a> Strided<'a> {
    fn f32(data: &'a [f32], base: usize, rs: usize, cs: usize) -> Strided<'a> {
        Strided {
            data: Elems::F32(data),
            base,
            rs,
            cs,
        }
    }
}

/// Elements in f32 or in a stored dtype (decoded as they are packed).
#[derive(Clone, Copy)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Stored(Dtype, &'a [u8]),
}

impl Elems<'_> {
    /// dst = elements [s, s + dst.len()), decoded to f32 (vectorised per path,
    /// `convert.rs`: the same bits as the scalar decoding). False when out of range.
    fn run(&self, isa: Isa, s: usize, dst: &mut [f32]) -> bool {
        let n = dst.len();
        match *self {
            Elems::F32(v) => match v.get(s..s + n) {
                Some(v) => {
                    dst.copy_from_slice(v);
                    true
                }
                None => false,
            },
            Elems::Stored(dt, b)
                if matches!(dt, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) =>
            {
                let es = dt.size();
                match b.get(s * es..(s + n) * es) {
                    Some(b) => {
                        super::convert::decode(isa, dt, b, dst);
                        true
                    }
                    None => false,
                }
            }
            Elems::Stored(..) => false,
        }
    }

    /// Packs the matrix X [count, k], element (x, kk) at `base + x·xs + kk·ks`, into
    /// panels of `w` values of x, each k-major: dst[p·w·k + kk·w + (x − p·w)]. `dst` is
    /// zeroed (the padding of the last panel stays zero). Contiguous runs (along x or
    /// along k) are decoded a run at a time; False when an element is out of range.
    #[allow(clippy::too_many_arguments)]
    fn pack_panels(
        &self,
        isa: Isa,
        base: usize,
        xs: usize,
        ks: usize,
        count: usize,
        k: usize,
        w: usize,
        dst: &mut [f32],
    ) -> bool {
        let panels = count.div_ceil(w);
        if dst.len() < panels * w * k {
            return false;
        }
        if xs == 1 {
            // Along x contiguous: one run of the panel's width per k.
            for p in 0..panels {
                let width = w.min(count - p * w);
                for kk in 0..k {
                    let d = &mut dst[p * w * k + kk * w..][..width];
                    if !self.run(isa, base + p * w + kk * ks, d) {
                        return false;
                    }
                }
            }
            return true;
        }
        if ks == 1 {
            // Along k contiguous: each x's k values decoded as one run, then spread into
            // the panel (stride w) from L1.
            let mut tmp = vec![0f32; k];
            for x in 0..count {
                if !self.run(isa, base + x * xs, &mut tmp) {
                    return false;
                }
                let (p, xi) = (x / w, x % w);
                let panel = &mut dst[p * w * k..(p + 1) * w * k];
                for (kk, v) in tmp.iter().enumerate() {
                    panel[kk * w + xi] = *v;
                }
            }
            return true;
        }
        let idx = (0..panels).flat_map(move |p| {
            (0..k).flat_map(move |kk| {
                (p * w..((p + 1) * w).min(count))
                    .map(move |x| (p * w * k + kk * w + (x - p * w), base + x * xs + kk * ks))
            })
        });
        self.pack(idx, dst)
    }

    /// dst[d] = element s, decoded to f32, for every (d, s) of `idx`; the dtype is matched
    /// once, outside the loop. False (and `dst` partly written) when an index is out of range.
    fn pack(&self, idx: impl Iterator<Item = (usize, usize)>, dst: &mut [f32]) -> bool {
        fn run(
            idx: impl Iterator<Item = (usize, usize)>,
            dst: &mut [f32],
            get: impl Fn(usize) -> Option<f32>,
        ) -> bool {
            for (d, s) in idx {
                match (dst.get_mut(d), get(s)) {
                    (Some(d), Some(v)) => *d = v,
                    _ => return false,
                }
            }
            true
        }
        let u16_at = |b: &[u8], s: usize| {
            b.get(2 * s..2 * s + 2)
                .map(|x| u16::from_le_bytes([x[0], x[1]]))
        };
        match *self {
            Elems::F32(v) => run(idx, dst, |s| v.get(s).copied()),
            Elems::Stored(Dtype::F32, b) => run(idx, dst, |s| {
                b.get(4 * s..4 * s + 4)
                    .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
            }),
            Elems::Stored(Dtype::F16, b) => run(idx, dst, |s| {
                u16_at(b, s).map(|h| f16::from_bits(h).to_f32())
            }),
            Elems::Stored(Dtype::BF16, b) => run(idx, dst, |s| {
                u16_at(b, s).map(|h| f32::from_bits((h as u32) << 16))
            }),
            Elems::Stored(Dtype::F64, b) => run(idx, dst, |s| {
                b.get(8 * s..8 * s + 8).map(|x| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(x);
                    f64::from_le_bytes(a) as f32
                })
            }),
            Elems::Stored(..) => false,
        }
    }
}

/// Panels per parallel chunk of [`PackedRight::pack`]: at r = 512 and 16 columns a
/// panel, 32 panels are 1 MiB of f32 (enough work per task, several tasks per worker).
const PACK_CHUNK_PANELS: usize = 32;

/// R [k, n] packed for one path: panels of NR columns, each k-major (`[k][NR]`), the last
/// panel padded with zero columns. Made once per tensor and shared by every band.
pub struct PackedRight {
    isa: Isa,
    k: usize,
    n: usize,
    data: AlignedF32,
}

impl PackedRight {
    /// Packs element (k, j) = `src` at (k, j) (`Strided` with i = k). False when `src`
    /// is too short for the shape (the caller's sizes are wrong).
    /// The panels are packed in chunks on the current rayon pool (each chunk is the
    /// same sub-problem starting at its first column), so a tensor's packing does not
    /// leave the other workers idle; the bytes do not depend on the split.
    pub fn pack(isa: Isa, src: &Strided<'_>, k: usize, n: usize) -> Option<PackedRight> {
        let (_, nr) = isa.tile();
        let panels = n.div_ceil(nr);
        let mut data = AlignedF32::default();
        let dst = data.zeroed(panels * nr * k);
        let chunk = PACK_CHUNK_PANELS * nr * k;
        if chunk == 0 {
            return Some(PackedRight { isa, k, n, data });
        }
        // x = the column j (panel dimension), stride cs; k along rs.
        let packed = dst.par_chunks_mut(chunk).enumerate().all(|(c, dst)| {
            let j0 = c * PACK_CHUNK_PANELS * nr;
            let count = (n - j0).min(PACK_CHUNK_PANELS * nr);
            src.data.pack_panels(
                isa,
                src.base + j0 * src.cs,
                src.cs,
                src.rs,
                count,
                k,
                nr,
                dst,
            )
        });
        packed.then_some(PackedRight { isa, k, n, data })
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// out[m × n, row-major] = scale · (L @ R) in the contract's order. `left` is L [m, k]
/// (decoded from its dtype as it is packed into `lpack`, the caller's reused scratch).
/// False when `left` is too short or `out` is not m × n.
pub fn delta(
    left: &Strided<'_>,
    m: usize,
    right: &PackedRight,
    scale: f32,
    out: &mut [f32],
    lpack: &mut AlignedF32,
) -> bool {
    out.len() == m * right.n
        && pack_left(left, m, right, lpack)
        && delta_cols(lpack, m, right, 0, right.n, scale, out, right.n)
}

/// Columns per block of [`delta_cols`] for callers that finish a band block by block
/// (a multiple of every path's NR, so blocks start on a panel).
pub const COL_BLOCK: usize = 256;

/// Packs L [m, k] (`left`, decoded from its dtype as it is packed) into `lpack` in the
/// panels of `right`'s path: once per band, then used by every [`delta_cols`] block.
/// False when `left` is too short.
pub fn pack_left(
    left: &Strided<'_>,
    m: usize,
    right: &PackedRight,
    lpack: &mut AlignedF32,
) -> bool {
    let (mr, _) = right.isa.tile();
    let k = right.k;
    let dst = lpack.zeroed(m.div_ceil(mr) * mr * k);
    left.data
        .pack_panels(right.isa, left.base, left.rs, left.cs, m, k, mr, dst)
}

/// Columns j0..j1 of the delta: out[i·ldo + (j − j0)] = scale · (L @ R)[i, j], L being
/// `lpack` as [`pack_left`] made it for these m rows. Blocking over columns only picks
/// which elements are computed; each one's chain is the same. False when j0 is not a
/// multiple of the path's NR, the range or `out` does not fit, or `lpack` is too short.
#[allow(clippy::too_many_arguments)]
pub fn delta_cols(
    lpack: &AlignedF32,
    m: usize,
    right: &PackedRight,
    j0: usize,
    j1: usize,
    scale: f32,
    out: &mut [f32],
    ldo: usize,
) -> bool {
    let (isa, k, n) = (right.isa, right.k, right.n);
    let (mr, nr) = isa.tile();
    let width = j1.saturating_sub(j0);
    if !j0.is_multiple_of(nr) || j1 > n || j1 < j0 || ldo < width {
        return false;
    }
    if m == 0 || width == 0 {
        return true;
    }
    if out.len() < (m - 1) * ldo + width {
        return false;
    }
    if k == 0 {
        for row in out.chunks_mut(ldo).take(m) {
            row[..width].iter_mut().for_each(|x| *x = 0.0 * scale);
        }
        return true;
    }
    let rpanels = m.div_ceil(mr);
    let (lp, rp) = (lpack.as_slice(), right.data.as_slice());
    if lp.len() < rpanels * mr * k || rp.len() < n.div_ceil(nr) * nr * k {
        return false;
    }
    let c = out.as_mut_ptr();
    // Where panel p's values of k block k0.. sit in the packed R (`PackedRight`).
    let slice = |p: usize, k0: usize| {
        let at = p * nr * k + k0 * nr;
        at..at + KC.min(k - k0) * nr
    };
    for jp in j0 / nr..j1.div_ceil(nr) {
        let cols = nr.min(j1 - jp * nr);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let last = k0 + kc == k;
            // The R slice of the next step (this panel's next k block, else the next
            // panel's first, which may be the caller's next block of columns) is hinted
            // into L2 a few cache lines per row panel while this slice computes: a packed
            // R bigger than the cache (29 MB at r = 512 and 14336 columns) would otherwise
            // reach the next slice's first tile from memory. A hint: no result changes.
            let next = if !last {
                slice(jp, k0 + kc)
            } else if jp + 1 < n.div_ceil(nr) {
                slice(jp + 1, 0)
            } else {
                0..0
            };
            let next = rp.get(next).unwrap_or(&[]);
            // At most one part per row panel, each whole 64-byte lines (16 f32).
            let per_panel = next.len().div_ceil(rpanels).next_multiple_of(16).max(1);
            let mut ahead = next.chunks(per_panel);
            for ip in 0..rpanels {
                if let Some(part) = ahead.next() {
                    super::convert::prefetch(part);
                }
                let rows = mr.min(m - ip * mr);
                let t = Tile {
                    k: kc,
                    rows,
                    cols,
                    resume: k0 > 0,
                    scale: last.then_some(scale),
                };
                // SAFETY: panel ip of lpack holds mr·k values and panel jp of the packed R
                // nr·k (lengths checked above), read from k0 on for kc values of k; the
                // tile writes rows × cols elements of `out` at row ip·mr, column
                // jp·nr − j0 (< width), row stride ldo: the last one at most
                // (m − 1)·ldo + width − 1 < out.len() (checked); the path was checked
                // supported when the caller chose it (`Isa::from_env`).
                unsafe {
                    let a = lp.as_ptr().add(ip * mr * k + k0 * mr);
                    let b = rp.as_ptr().add(slice(jp, k0).start);
                    let cp = c.add(ip * mr * ldo + (jp * nr - j0));
                    run_tile(isa, &t, a, b, cp, ldo);
                }
            }
        }
    }
    true
}

/// One tile's work: `k` values of the chain from the packed panels; `resume`: the chain
/// continues from the partial stored in C (else from +0); `scale`: the last block, C gets
/// acc · scale (else the raw partial).
struct Tile {
    k: usize,
    rows: usize,
    cols: usize,
    resume: bool,
    scale: Option<f32>,
}

/// # Safety
/// `a`, `b` address k·MR and k·NR values; `c` a rows × cols tile with row stride `ldc`;
/// `isa` is supported by this CPU.
unsafe fn run_tile(isa: Isa, t: &Tile, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    let (mr, nr) = isa.tile();
    if t.rows == mr && t.cols == nr {
        unsafe { full_tile(isa, t, a, b, c, ldc) };
        return;
    }
    // Edge tile: through a full-size copy (padded rows/columns are computed from the zero
    // padding of the panels and dropped).
    let mut tmp = [0f32; 12 * 32];
    if t.resume {
        for i in 0..t.rows {
            for j in 0..t.cols {
                tmp[i * nr + j] = unsafe { *c.add(i * ldc + j) };
            }
        }
    }
    unsafe { full_tile(isa, t, a, b, tmp.as_mut_ptr(), nr) };
    for i in 0..t.rows {
        for j in 0..t.cols {
            unsafe { *c.add(i * ldc + j) = tmp[i * nr + j] };
        }
    }
}

/// # Safety
/// As `run_tile`, with a full MR × NR tile at `c`.
unsafe fn full_tile(isa: Isa, t: &Tile, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::tile_avx512(t, a, b, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::tile_avx2(t, a, b, c, ldc) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { arm::tile_neon(t, a, b, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        _ if is_x86_feature_detected!("fma") => unsafe { x86::tile_scalar_fma(t, a, b, c, ldc) },
        _ => unsafe { tile_scalar(t, a, b, c, ldc) },
    }
}

/// The scalar microkernel (4 × 8): the contract spelled out with `f32::mul_add`.
///
/// # Safety
/// As `full_tile` for a 4 × 8 tile.
#[inline(always)]
unsafe fn tile_scalar(t: &Tile, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    const MR: usize = 4;
    const NR: usize = 8;
    let mut acc = [[0f32; NR]; MR];
    if t.resume {
        for (i, row) in acc.iter_mut().enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = unsafe { *c.add(i * ldc + j) };
            }
        }
    }
    for kk in 0..t.k {
        for (i, row) in acc.iter_mut().enumerate() {
            let av = unsafe { *a.add(kk * MR + i) };
            for (j, x) in row.iter_mut().enumerate() {
                *x = av.mul_add(unsafe { *b.add(kk * NR + j) }, *x);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            let v = match t.scale {
                Some(s) => x * s,
                None => *x,
            };
            unsafe { *c.add(i * ldc + j) = v };
        }
    }
}

// The AVX-512 intrinsics are stable since Rust 1.89 (the crate's rust-version still says
// 1.87: raising it turns on lints across the crate; building for x86-64 needs 1.89).
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod x86 {
    //! The x86-64 microkernels. Each accumulator register holds independent output
    //! elements; per k it takes exactly one `vfmadd` (the contract's single FMA chain).
    use super::Tile;
    use std::arch::x86_64::*;

    /// The scalar microkernel where FMA is an instruction (else `mul_add` is a libm call
    /// per element): the same code, the same single rounding per step.
    ///
    /// # Safety
    /// FMA present; as `tile_scalar`.
    #[target_feature(enable = "fma")]
    pub(super) unsafe fn tile_scalar_fma(
        t: &Tile,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        unsafe { super::tile_scalar(t, a, b, c, ldc) }
    }

    /// 12 × 32: 24 zmm accumulators, 2 zmm of R per k, L broadcast from memory.
    ///
    /// # Safety
    /// AVX-512F present; `a`/`b` hold t.k·12 / t.k·32 values; `c` a 12 × 32 tile.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        t: &Tile,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        const MR: usize = 12;
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        unsafe {
            if t.resume {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_loadu_ps(c.add(i * ldc));
                    row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
                }
            }
            let (mut a, mut b) = (a, b);
            for _ in 0..t.k {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(i));
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
                a = a.add(MR);
                b = b.add(32);
            }
            if let Some(s) = t.scale {
                let s = _mm512_set1_ps(s);
                for row in acc.iter_mut() {
                    row[0] = _mm512_mul_ps(row[0], s);
                    row[1] = _mm512_mul_ps(row[1], s);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * ldc), row[0]);
                _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
            }
        }
    }

    /// 6 × 16: 12 ymm accumulators, 2 ymm of R per k, L broadcast from memory.
    ///
    /// # Safety
    /// AVX2 and FMA present; `a`/`b` hold t.k·6 / t.k·16 values; `c` a 6 × 16 tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(
        t: &Tile,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        const MR: usize = 6;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        unsafe {
            if t.resume {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm256_loadu_ps(c.add(i * ldc));
                    row[1] = _mm256_loadu_ps(c.add(i * ldc + 8));
                }
            }
            let (mut a, mut b) = (a, b);
            for _ in 0..t.k {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(i));
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
                a = a.add(MR);
                b = b.add(16);
            }
            if let Some(s) = t.scale {
                let s = _mm256_set1_ps(s);
                for row in acc.iter_mut() {
                    row[0] = _mm256_mul_ps(row[0], s);
                    row[1] = _mm256_mul_ps(row[1], s);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(c.add(i * ldc), row[0]);
                _mm256_storeu_ps(c.add(i * ldc + 8), row[1]);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    //! The aarch64 microkernel: `vfmaq_f32` is a fused multiply-add per lane (FMLA).
    use super::Tile;
    use std::arch::aarch64::*;

    /// 8 × 8: 16 q accumulators, 2 q of R per k, L broadcast.
    ///
    /// # Safety
    /// NEON present; `a`/`b` hold t.k·8 values each; `c` an 8 × 8 tile.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn tile_neon(
        t: &Tile,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        const MR: usize = 8;
        let mut acc = [[vdupq_n_f32(0.0); 2]; MR];
        unsafe {
            if t.resume {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = vld1q_f32(c.add(i * ldc));
                    row[1] = vld1q_f32(c.add(i * ldc + 4));
                }
            }
            let (mut a, mut b) = (a, b);
            for _ in 0..t.k {
                let b0 = vld1q_f32(b);
                let b1 = vld1q_f32(b.add(4));
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = vdupq_n_f32(*a.add(i));
                    row[0] = vfmaq_f32(row[0], av, b0);
                    row[1] = vfmaq_f32(row[1], av, b1);
                }
                a = a.add(MR);
                b = b.add(8);
            }
            if let Some(s) = t.scale {
                let s = vdupq_n_f32(s);
                for row in acc.iter_mut() {
                    row[0] = vmulq_f32(row[0], s);
                    row[1] = vmulq_f32(row[1], s);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                vst1q_f32(c.add(i * ldc), row[0]);
                vst1q_f32(c.add(i * ldc + 4), row[1]);
            }
        }
    }
}

/// The contract as plain loops over unpacked f32 matrices (L [m, k], R [k, n], both
/// row-major): the specification every path is tested against.
pub fn reference(l: &[f32], r: &[f32], m: usize, k: usize, n: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for kk in 0..k {
                acc = l[i * k + kk].mul_add(r[kk * n + j], acc);
            }
            out[i * n + j] = acc * scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::encode_f32;

    /// Deterministic values of mixed sign and magnitude (so reassociation would show).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                let e = ((s >> 20) % 12) as i32 - 6;
                (u - 0.5) * 2f32.powi(e)
            })
            .collect()
    }

    fn run(isa: Isa, l: &Strided<'_>, r: &Strided<'_>, m: usize, k: usize, n: usize) -> Vec<f32> {
        let packed = PackedRight::pack(isa, r, k, n).unwrap();
        let mut out = vec![f32::NAN; m * n];
        let mut lp = AlignedF32::default();
        assert!(delta(l, m, &packed, 0.37, &mut out, &mut lp));
        out
    }

    /// Every path this CPU runs gives the reference's bits, on odd shapes (edge tiles in
    /// both directions), ranks across the k blocking (1 … 1024), both operand layouts
    /// (row-major and transposed strides) and stored dtypes decoded while packing.
    #[test]
    fn every_path_matches_the_reference_bit_for_bit() {
        let shapes = [
            (1, 1, 1),
            (13, 7, 33),
            (25, 16, 65),
            (12, 256, 32),
            (29, 257, 47),
            (7, 513, 19),
            (37, 1024, 70),
        ];
        for (si, &(m, k, n)) in shapes.iter().enumerate() {
            let l = values(m * k, si as u64 + 1);
            let r = values(k * n, si as u64 + 100);
            let want = reference(&l, &r, m, k, n, 0.37);
            // The same matrices transposed in memory (the Transposed layout's strides).
            let lt: Vec<f32> = (0..k * m).map(|x| l[(x % m) * k + x / m]).collect();
            let rt: Vec<f32> = (0..n * k).map(|x| r[(x % k) * n + x / k]).collect();
            for isa in Isa::available() {
                let ln = Strided::f32(&l, 0, k, 1);
                let rn = Strided::f32(&r, 0, n, 1);
                let got = run(isa, &ln, &rn, m, k, n);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} differs from the reference at {m}x{k}x{n}",
                    isa.name()
                );
                let ltr = Strided::f32(&lt, 0, 1, m);
                let rtr = Strided::f32(&rt, 0, 1, k);
                let got = run(isa, &ltr, &rtr, m, k, n);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} (transposed strides) differs at {m}x{k}x{n}",
                    isa.name()
                );
            }
        }
    }

    /// Packing R in parallel chunks of panels gives the bytes of packing it in one pass,
    /// on both layouts and from stored f16, with a last chunk shorter than the others
    /// and a last panel padded with zeros.
    #[test]
    fn chunked_packing_is_the_one_pass_packing() {
        let (k, n) = (7usize, 3 * PACK_CHUNK_PANELS * 32 + 5);
        let vals = values(k * n, 5);
        let f16s: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        for isa in Isa::available() {
            let (_, nr) = isa.tile();
            for data in [Elems::F32(&vals), Elems::Stored(Dtype::F16, &f16s)] {
                // Normal (R[k, j] at k·n + j) and transposed (at j·k + k) strides.
                for (rs, cs) in [(n, 1), (1, k)] {
                    let src = Strided {
                        data,
                        base: 0,
                        rs,
                        cs,
                    };
                    let p = PackedRight::pack(isa, &src, k, n).unwrap();
                    let mut whole = AlignedF32::default();
                    let len = n.div_ceil(nr) * nr * k;
                    assert!(data.pack_panels(isa, 0, cs, rs, n, k, nr, whole.zeroed(len)));
                    // as_slice runs on into the alignment slack: compare the packed length.
                    let (got, want) = (&p.data.as_slice()[..len], &whole.as_slice()[..len]);
                    let differ = (0..len).find(|&i| got[i].to_bits() != want[i].to_bits());
                    assert_eq!(
                        differ,
                        None,
                        "{} rs={rs} cs={cs}: first differing element",
                        isa.name()
                    );
                }
            }
        }
    }

    /// The delta computed column block by column block (`pack_left` once, then
    /// `delta_cols` per block into a block-sized buffer, as the fused band does) gives the
    /// reference's bits, with blocks not a multiple of the tile width at the end.
    #[test]
    fn column_blocks_match_the_reference_bit_for_bit() {
        for (si, &(m, k, n)) in [(29usize, 257usize, 600usize), (13, 16, 257), (40, 512, 300)]
            .iter()
            .enumerate()
        {
            let l = values(m * k, si as u64 + 11);
            let r = values(k * n, si as u64 + 200);
            let want = reference(&l, &r, m, k, n, 0.37);
            for isa in Isa::available() {
                let rs = Strided::f32(&r, 0, n, 1);
                let p = PackedRight::pack(isa, &rs, k, n).unwrap();
                let ls = Strided::f32(&l, 0, k, 1);
                let mut lp = AlignedF32::default();
                assert!(pack_left(&ls, m, &p, &mut lp));
                for j0 in (0..n).step_by(COL_BLOCK) {
                    let j1 = (j0 + COL_BLOCK).min(n);
                    let w = j1 - j0;
                    let mut out = vec![f32::NAN; m * w];
                    assert!(delta_cols(&lp, m, &p, j0, j1, 0.37, &mut out, w));
                    for i in 0..m {
                        for j in j0..j1 {
                            assert_eq!(
                                out[i * w + j - j0].to_bits(),
                                want[i * n + j].to_bits(),
                                "{} {m}x{k}x{n} at ({i}, {j})",
                                isa.name()
                            );
                        }
                    }
                }
                // A block start off the tile grid is refused, not computed.
                let mut out = vec![0f32; m * 8];
                assert!(!delta_cols(&lp, m, &p, 1, 9, 1.0, &mut out, 8) || isa.tile().1 == 1);
            }
        }
    }

    /// Left factors in f16, bf16, f64 and f32 bytes are decoded while packed: the same
    /// bits as decoding first, on every path.
    #[test]
    fn packing_decodes_every_stored_dtype() {
        let (m, k, n) = (19, 40, 37);
        let r = values(k * n, 7);
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            let l = values(m * k, 9);
            let mut bytes = vec![0u8; m * k * dt.size()];
            encode_f32(dt, &l, &mut bytes);
            let mut dec = vec![0f32; m * k];
            crate::dtype::decode_f32(dt, &bytes, &mut dec);
            let want = reference(&dec, &r, m, k, n, 0.37);
            for isa in Isa::available() {
                let ls = Strided {
                    data: Elems::Stored(dt, &bytes),
                    base: 0,
                    rs: k,
                    cs: 1,
                };
                let rs = Strided::f32(&r, 0, n, 1);
                let got = run(isa, &ls, &rs, m, k, n);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {dt}",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn short_operands_are_refused_not_read() {
        let l = values(10, 1);
        let r = values(12, 2);
        let rs = Strided::f32(&r, 0, 4, 1);
        assert!(PackedRight::pack(Isa::Scalar, &rs, 4, 4).is_none());
        let rs = Strided::f32(&r, 0, 4, 1);
        let p = PackedRight::pack(Isa::Scalar, &rs, 3, 4).unwrap();
        let ls = Strided::f32(&l, 0, 3, 1);
        let mut out = vec![0f32; 16];
        assert!(!delta(
            &ls,
            4,
            &p,
            1.0,
            &mut out,
            &mut AlignedF32::default()
        ));
    }

    #[test]
    fn lorastream_cpu_names_a_path_or_fails() {
        assert_eq!(Isa::parse("scalar").unwrap(), Isa::Scalar);
        assert_eq!(Isa::parse("auto").unwrap(), Isa::best());
        assert!(matches!(Isa::parse("sse9"), Err(Error::Usage(_))));
        for isa in [Isa::Avx2, Isa::Avx512, Isa::Neon] {
            assert_eq!(Isa::parse(isa.name()).is_ok(), isa.supported());
        }
    }
}

#[cfg(test)]
mod perf {
    use super::*;

    /// One thread's rate per path on a band-shaped product (`cargo test --release
    /// gemm_rate -- --ignored --nocapture`): the microkernels alone, without the merge.
    #[test]
    #[ignore]
    fn gemm_rate() {
        for &(m, k, n) in &[
            (256usize, 512usize, 4096usize),
            (256, 16, 4096),
            (146, 512, 14336),
        ] {
            let l: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let r: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
            for isa in Isa::available() {
                let rs = Strided::f32(&r, 0, n, 1);
                let p = PackedRight::pack(isa, &rs, k, n).unwrap();
                let ls = Strided::f32(&l, 0, k, 1);
                let mut out = vec![0f32; m * n];
                let mut lp = AlignedF32::default();
                // On-CPU time of this thread (ns): the machine may be shared.
                let cpu = || -> f64 {
                    std::fs::read_to_string("/proc/thread-self/schedstat")
                        .ok()
                        .and_then(|s| s.split_whitespace().next()?.parse().ok())
                        .unwrap_or(0.0)
                };
                let (t, c0) = (std::time::Instant::now(), cpu());
                let mut reps = 0;
                while t.elapsed().as_secs_f64() < 1.0 {
                    assert!(delta(&ls, m, &p, 1.0, &mut out, &mut lp));
                    reps += 1;
                }
                let flop = 2.0 * (m * n * k * reps) as f64;
                let g = flop / t.elapsed().as_secs_f64() / 1e9;
                let gc = flop / (cpu() - c0).max(1.0);
                println!(
                    "{m}x{k}x{n} {}: {g:.1} GFLOP/s wall, {gc:.1} per CPU-second",
                    isa.name()
                );
            }
        }
    }

    /// The fused band's pass alone (`cpu.rs`: L packed, then per COL_BLOCK the delta and
    /// `convert::add_encode` with weight rows that come from memory, not cache), by rows
    /// per sub-block: `cargo test --release fused_pass_rate -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn fused_pass_rate() {
        let (band, k, n) = (512usize, 512usize, 4096usize);
        // Weight and output bands rotate through 512 MB each (past the last-level cache).
        let bands = 128usize;
        let w: Vec<u8> = (0..bands * band * n)
            .flat_map(|i| {
                f16::from_f32(((i % 13) as f32 - 6.0) * 0.01)
                    .to_bits()
                    .to_le_bytes()
            })
            .collect();
        let mut out = vec![0u8; w.len()];
        let l: Vec<f32> = (0..band * k).map(|i| (i % 7) as f32 * 1e-4).collect();
        let r: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 1e-3).collect();
        for isa in Isa::available().into_iter().rev().take(2) {
            let rs = Strided::f32(&r, 0, n, 1);
            let p = PackedRight::pack(isa, &rs, k, n).unwrap();
            let subs = [512usize, 256, 192, 128];
            let mut best = vec![0f64; subs.len()];
            let (mut lp, mut chunk) = (AlignedF32::default(), Vec::new());
            let mut d = vec![0f32; band * COL_BLOCK];
            for round in 0..4 {
                for (si, &sub) in subs.iter().enumerate() {
                    let t = std::time::Instant::now();
                    let mut done = 0usize;
                    for b in 0..bands / 4 {
                        let b = (b + round * 7 + si * 31) % bands;
                        let wb = &w[b * band * n * 2..(b + 1) * band * n * 2];
                        let ob = &mut out[b * band * n * 2..(b + 1) * band * n * 2];
                        for s0 in (0..band).step_by(sub) {
                            let m = sub.min(band - s0);
                            let ls = Strided::f32(&l, s0 * k, k, 1);
                            assert!(pack_left(&ls, m, &p, &mut lp));
                            for j0 in (0..n).step_by(COL_BLOCK) {
                                let j1 = (j0 + COL_BLOCK).min(n);
                                let width = j1 - j0;
                                for i in 0..m {
                                    let at = (s0 + i) * n + j0;
                                    super::super::convert::prefetch(&wb[at * 2..(at + width) * 2]);
                                }
                                let dd = &mut d[..m * width];
                                assert!(delta_cols(&lp, m, &p, j0, j1, 1.0, dd, width));
                                for (i, drow) in dd.chunks_mut(width).enumerate() {
                                    let at = (s0 + i) * n + j0;
                                    super::super::convert::add_encode(
                                        isa,
                                        Dtype::F16,
                                        &wb[at * 2..(at + width) * 2],
                                        drow,
                                        false,
                                        false,
                                        Dtype::F16,
                                        &mut ob[at * 2..(at + width) * 2],
                                        true,
                                        &mut chunk,
                                    );
                                }
                            }
                        }
                        done += 1;
                    }
                    let g = 2.0 * (band * n * k * done) as f64 / t.elapsed().as_secs_f64() / 1e9;
                    best[si] = best[si].max(g);
                }
            }
            for (sub, g) in subs.iter().zip(&best) {
                println!(
                    "{} rows per sub-block {sub}: best {g:.1} GFLOP/s",
                    isa.name()
                );
            }
        }
    }
}
