//! What the CPU backend reads, and when: a merge's inputs are read with positioned
//! (direct) reads into reusable buffers, never by touching the maps, so reading costs the
//! cores almost nothing and leaves nothing resident. Rows are read a group at a time, the
//! next group while the current one is computed (`cpu.rs`), and the next tensor's factors
//! and first group while the current tensor is computed ([`ReadAhead`]), so the cores do
//! not wait for the disk between tensors.

use crate::direct_io::AlignedBuf;
use crate::dtype::decode_f32;
use crate::error::{Error, Result};
use crate::plan::merge_types::{DeltaLayout, LoraStep, Step};
use crate::source::TensorEntry;
use std::ops::Range;
use std::sync::Arc;

/// Rows of a stored weight and elements per row (trailing dimensions flattened).
pub(super) fn rows_cols(base: &TensorEntry) -> (usize, usize) {
    let rows = base.shape.first().copied().unwrap_or(1).max(1);
    (rows, base.numel() / rows)
}

/// The factor decoded whole, once per tensor: A [r, cols] (Normal) or B [cols, r]
/// (Transposed).
pub(super) fn right_factor(l: &LoraStep) -> &TensorEntry {
    match l.layout {
        DeltaLayout::Normal => &l.a,
        DeltaLayout::Transposed => &l.b,
    }
}

/// The factor read by bands: B [rows, r] (Normal) or A [r, rows] (Transposed).
pub(super) fn left_factor(l: &LoraStep) -> &TensorEntry {
    match l.layout {
        DeltaLayout::Normal => &l.b,
        DeltaLayout::Transposed => &l.a,
    }
}

/// Per step, the tensor read by rows along with the weight (B in the Normal layout).
pub(super) fn row_factors(steps: &[Step]) -> Vec<Option<&TensorEntry>> {
    steps
        .iter()
        .map(|s| match s {
            Step::Lora(l) => (l.layout == DeltaLayout::Normal).then_some(&l.b),
            // Read whole by their own step (`prepare`), or row-aligned with the weight
            // from the map (a replacement, a bias).
            Step::Replace(_) | Step::AddBias { .. } | Step::Tuned(_) => None,
        })
        .collect()
}

/// All of `t` as f32, read in pieces with positioned reads (not through the map) when
/// contiguous.
pub(super) fn decode_all(t: &TensorEntry, buf: &mut AlignedBuf) -> Result<Vec<f32>> {
    const PIECE: usize = 4 << 20;
    let mut v = vec![0f32; t.numel()];
    if t.contiguous_range().is_none() {
        decode_f32(t.dtype, &t.bytes(), &mut v);
        return Ok(v);
    }
    let es = t.dtype.size();
    let piece = PIECE / es * es;
    for (i, out) in v.chunks_mut(piece / es).enumerate() {
        if let Some(r) = t.read_into(i * piece, out.len() * es, buf) {
            decode_f32(t.dtype, &buf.as_slice()[r?], out);
        }
    }
    Ok(v)
}

/// Buffers for one group of rows: the weight's and each row-read factor's; for a group
/// read ahead, also the whole factors (two per step: right factor, DoRA magnitude).
#[derive(Default)]
pub(super) struct GroupBuffers {
    w: AlignedBuf,
    left: Vec<AlignedBuf>,
    whole: Vec<AlignedBuf>,
}

/// Where a group's rows `[first, end)` landed in its `GroupBuffers`; None for a tensor
/// read from its map instead (strided views).
#[derive(Default)]
pub(super) struct GroupRanges {
    rows: Range<usize>,
    w: Option<Range<usize>>,
    left: Vec<Option<Range<usize>>>,
}

impl GroupRanges {
    pub(super) fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }
}

/// Reads rows `[g0, g1)` of `base` and of every row-read factor into `bufs`.
pub(super) fn read_group(
    base: &TensorEntry,
    row_factors: &[Option<&TensorEntry>],
    g0: usize,
    g1: usize,
    bufs: &mut GroupBuffers,
) -> Result<GroupRanges> {
    let (rows, cols) = rows_cols(base);
    let row_bytes = cols * base.dtype.size();
    let w = base
        .read_into(g0 * row_bytes, (g1 - g0) * row_bytes, &mut bufs.w)
        .transpose()?;
    bufs.left
        .resize_with(row_factors.len(), AlignedBuf::default);
    let mut left = Vec::with_capacity(row_factors.len());
    for (f, buf) in row_factors.iter().zip(&mut bufs.left) {
        left.push(match f {
            Some(t) => {
                let rb = t.numel() / rows * t.dtype.size();
                t.read_into(g0 * rb, (g1 - g0) * rb, buf).transpose()?
            }
            None => None,
        });
    }
    Ok(GroupRanges {
        rows: g0..g1,
        w,
        left,
    })
}

/// Rows `[first, …)` of the weight and of the row-read factors, as bytes.
pub(super) struct Rows<'b> {
    pub first: usize,
    pub w: Option<&'b [u8]>,
    pub left: Vec<Option<&'b [u8]>>,
}

impl<'b> Rows<'b> {
    /// Nothing read ahead: every tensor is decoded from its map.
    pub(super) fn from_maps() -> Rows<'b> {
        Rows {
            first: 0,
            w: None,
            left: Vec::new(),
        }
    }

    pub(super) fn of(bufs: &'b GroupBuffers, ranges: &GroupRanges) -> Rows<'b> {
        Rows {
            first: ranges.rows.start,
            w: ranges.w.clone().map(|r| &bufs.w.as_slice()[r]),
            left: ranges
                .left
                .iter()
                .zip(&bufs.left)
                .map(|(r, b)| r.clone().map(|r| &b.as_slice()[r]))
                .collect(),
        }
    }
}

/// A merge's inputs read before it starts: its first group of rows and its whole factors
/// (stored bytes, decoded when the merge starts: f32 would double their memory), all in
/// `first`, whose buffers are recycled like any group's.
pub(super) struct Prefetched {
    pub first: GroupBuffers,
    pub first_ranges: GroupRanges,
    /// Per step j: where the right factor (2j) and the DoRA magnitude (2j+1) landed in
    /// `first.whole`.
    whole: Vec<Option<Range<usize>>>,
}

impl Prefetched {
    /// Step j's right factor (`magnitude`: its DoRA magnitude) `t` as f32, when read ahead.
    pub(super) fn decode(&self, j: usize, magnitude: bool, t: &TensorEntry) -> Option<Vec<f32>> {
        let bytes = self.raw(j, magnitude, t)?;
        let mut v = vec![0f32; t.numel()];
        decode_f32(t.dtype, bytes, &mut v);
        Some(v)
    }

    /// The same bytes as stored (the CPU engine decodes them as it packs them).
    pub(super) fn raw(&self, j: usize, magnitude: bool, t: &TensorEntry) -> Option<&[u8]> {
        let i = 2 * j + usize::from(magnitude);
        let at = self.whole.get(i)?.clone()?;
        let bytes = self.first.whole.get(i)?.as_slice().get(at)?;
        (bytes.len() == t.nbytes()).then_some(bytes)
    }
}

/// The next merge's inputs, being read on a helper thread.
pub(super) struct ReadAhead {
    base: TensorEntry,
    /// Every tensor the steps read, in order: the read-ahead serves only the same merge.
    step_tensors: Vec<TensorEntry>,
    /// Taken by `join`; joined on drop otherwise, so no reader outlives its backend.
    handle: Option<std::thread::JoinHandle<Result<Prefetched>>>,
}

/// The tensors a merge's steps read, in order.
fn step_tensors(steps: &[Step]) -> Vec<TensorEntry> {
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Lora(l) => {
                out.extend([l.a.clone(), l.b.clone()]);
                out.extend(l.magnitude.clone());
            }
            Step::Replace(t) | Step::AddBias { bias: t, .. } => out.push(t.clone()),
            Step::Tuned(c) => out.extend(c.inputs().into_iter().cloned()),
        }
    }
    out
}

/// Whether two entries are the same bytes of the same open file.
fn same_tensor(a: &TensorEntry, b: &TensorEntry) -> bool {
    Arc::ptr_eq(&a.file, &b.file)
        && a.name == b.name
        && a.dtype == b.dtype
        && a.shape == b.shape
        && a.contiguous_range() == b.contiguous_range()
}

impl ReadAhead {
    /// Starts reading `base`'s factors and rows `[0, group_rows)` into `bufs`.
    pub(super) fn start(
        base: &TensorEntry,
        steps: &[Step],
        group_rows: usize,
        bufs: GroupBuffers,
    ) -> ReadAhead {
        let (b, s) = (base.clone(), steps.to_vec());
        let handle = std::thread::spawn(move || prefetch(&b, &s, group_rows, bufs));
        ReadAhead {
            base: base.clone(),
            step_tensors: step_tensors(steps),
            handle: Some(handle),
        }
    }

    /// Whether this is the read-ahead of `base` with `steps` (the same tensors of the same
    /// files: another adapter of the same shape must not get these factors).
    pub(super) fn is_for(&self, base: &TensorEntry, steps: &[Step]) -> bool {
        let theirs = step_tensors(steps);
        same_tensor(&self.base, base)
            && theirs.len() == self.step_tensors.len()
            && theirs
                .iter()
                .zip(&self.step_tensors)
                .all(|(a, b)| same_tensor(a, b))
    }

    /// Waits for the reads; their errors name the tensor.
    pub(super) fn join(mut self) -> Result<Prefetched> {
        let joined = self.handle.take().map(|h| h.join());
        match joined {
            Some(Ok(r)) => r,
            _ => Err(Error::tensor(
                self.base.file.path(),
                &self.base.name,
                "internal: the read-ahead thread panicked",
            )),
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn prefetch(
    base: &TensorEntry,
    steps: &[Step],
    group_rows: usize,
    mut bufs: GroupBuffers,
) -> Result<Prefetched> {
    bufs.whole.resize_with(2 * steps.len(), AlignedBuf::default);
    let mut whole = Vec::with_capacity(2 * steps.len());
    for (s, pair) in steps.iter().zip(bufs.whole.chunks_mut(2)) {
        let (f, m) = match s {
            Step::Lora(l) => (Some(right_factor(l)), l.magnitude.as_ref()),
            // Nothing read ahead: a tuner's change reads its (small) tensors when it is
            // prepared; replacements and biases are read with the bands.
            Step::Replace(_) | Step::AddBias { .. } | Step::Tuned(_) => (None, None),
        };
        for (t, buf) in [f, m].into_iter().zip(pair) {
            whole.push(match t {
                Some(t) => t.read_into(0, t.nbytes(), buf).transpose()?,
                None => None,
            });
        }
    }
    let (rows, _) = rows_cols(base);
    let first_ranges = read_group(
        base,
        &row_factors(steps),
        0,
        group_rows.min(rows),
        &mut bufs,
    )?;
    Ok(Prefetched {
        first: bufs,
        first_ranges,
        whole,
    })
}
