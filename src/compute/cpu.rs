//! The CPU backend: row bands of the weight, split across a thread pool, each band
//! decoded to f32, updated with the LoRA delta of `gemm.rs` (own microkernels per ISA, one
//! reduction order on every CPU and the GPU), rounded into the base dtype after every step
//! (PEFT merges in place) and encoded to the output dtype. Memory is a few bands, never
//! the whole tensor in f32. The rows come from `read_ahead.rs`, read a group ahead (and a
//! tensor ahead) on helper threads. Merges come checked by the plan (`plan::checked`):
//! dtypes and sizes are not checked again here.
//!
//! The common merge — one plain LoRA step (no DoRA) on a weight stored as bytes — takes a
//! fused path (`fused_band`): per sub-block of the band's rows (`FUSED_SUB_ROWS`) L is
//! packed once, then per block of `gemm::COL_BLOCK` columns the delta is computed into
//! an L2-sized buffer and, row by row, decoded weight + delta → rounding → encoding →
//! non-finite check run in one pass (`convert::add_encode`) while it is in cache. It
//! performs the same IEEE operations in the same order as the general path
//! (`compute_band` + `encode_checked`), so its bytes are the same; the general path
//! serves every other merge (DoRA, several steps, other tuners, decoded bases).
//! Conversions go through `convert.rs` (vectorised per path, exact).
//!
//! DoRA needs the norm of every row (Linear, Conv: inside one band) or of every column
//! (Conv1D, Embedding: across all bands); column norms take one extra pass over the
//! tensor before the writing pass.

use super::DeltaBackend;
use super::convert;
use super::finite::{NonFinite, encode_checked};
use super::gemm::{self, AlignedF32, Elems, Isa, PackedRight, Strided};
use super::read_ahead::{
    GroupBuffers, GroupRanges, Prefetched, ReadAhead, Rows, decode_all, left_factor, read_group,
    right_factor, row_factors,
};
use super::walk::{self, Engine, WorkItem};
use crate::adapter::tuners::{BandChange, BandSource};
use crate::direct_io::AlignedBuf;
use crate::dtype::{Dtype, decode_f32};
use crate::error::{Error, Result};
use crate::plan::checked::CheckedMerge;
use crate::plan::merge_types::{DeltaLayout, Step};
use crate::sink::TensorSink;
use crate::source::TensorEntry;
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::Mutex;
use std::time::Duration;

/// f32 elements per band (per thread): 8 MB of values, and the same again for the delta.
const BAND_ELEMS: usize = 2 << 20;

/// Fewest rows per band: each band streams every packed panel of the right operand
/// (A, r × cols, packed once per tensor) through the cache, so thin bands pay that
/// traffic for few rows.
const MIN_BAND_ROWS: usize = 256;

/// Rows per band for a weight with `cols` columns. Very wide rows (a 3-D expert tensor
/// seen as one row per expert) give up the packing minimum rather than hold hundreds
/// of them: a band stays at most 4 × BAND_ELEMS values, or one row.
fn band_rows(cols: usize) -> usize {
    let cols = cols.max(1);
    if MIN_BAND_ROWS * cols <= 4 * BAND_ELEMS {
        (BAND_ELEMS / cols).max(MIN_BAND_ROWS)
    } else {
        (BAND_ELEMS / cols).max(1)
    }
}

/// Rows per sub-block of the fused band (`fused_band`): its packed L (r ≤ 256 values a
/// row per k block) and its block of delta (`gemm::COL_BLOCK` values a row) together stay
/// within a 512 KB L2 (AMD Zen 3 has that much per core), where those of a whole 512-row
/// band spill to L3: measured 1.5-5 % faster there (`gemm` microbench `fused_pass_rate`), no
/// difference on a Xeon with 1-2 MB of L2. A multiple of every path's tile rows (4, 6,
/// 8, 12), so no sub-block ends in a partial tile that a whole band would not have.
const FUSED_SUB_ROWS: usize = 192;

/// Rows per group (one band per worker): the unit read ahead and handed to the writer.
/// The read-ahead of a tensor's first group and the merge that uses it both size it here.
fn group_rows(cols: usize, threads: usize) -> usize {
    band_rows(cols) * threads.max(1)
}

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    /// One scratch space per worker, kept between bands and tensors: fresh ones would be
    /// zeroed (and page-faulted) for every band.
    scratch: Vec<Mutex<Scratch>>,
    /// Refuse merges that create inf/NaN (`finite.rs`); off with `--allow-non-finite`.
    check_non_finite: bool,
    /// The microkernel path (`gemm.rs`): the best this CPU runs, or `LORASTREAM_CPU`.
    isa: Isa,
}

/// What the CPU engine keeps from one merge to the next during a run.
#[derive(Default)]
pub(crate) struct CpuRun {
    /// Read buffers: two groups of input rows (one being computed, the next being read),
    /// one for whole factors, and one for the next tensor's first group (lent to the
    /// read-ahead).
    groups: [GroupBuffers; 2],
    factor: AlignedBuf,
    spare: Option<GroupBuffers>,
    /// The next merge's inputs, being read while the current one computes.
    ahead: Option<ReadAhead>,
}

impl CpuBackend {
    /// A backend with `threads` workers (None: one per core), on the microkernel path
    /// `LORASTREAM_CPU` names (scalar, avx2, avx512, neon; an error if this CPU cannot run
    /// it), else the best this CPU runs.
    pub fn new(threads: Option<usize>) -> Result<CpuBackend> {
        CpuBackend::with_isa(threads, Isa::from_env()?)
    }

    /// A backend on the given microkernel path (tests compare paths in one process); an
    /// error if this CPU cannot run it.
    pub fn with_isa(threads: Option<usize>, isa: Isa) -> Result<CpuBackend> {
        if !isa.supported() {
            return Err(Error::Device(format!(
                "this CPU cannot run the {} path",
                isa.name()
            )));
        }
        let (pool, threads) = super::worker_pool(threads, "worker")?;
        Ok(CpuBackend {
            pool,
            threads,
            scratch: (0..threads).map(|_| Mutex::default()).collect(),
            check_non_finite: true,
            isa,
        })
    }
}

impl Engine for CpuBackend {
    type Run = CpuRun;

    fn merge(
        &self,
        run: &mut CpuRun,
        m: CheckedMerge<'_>,
        next: Option<CheckedMerge<'_>>,
        sink: &mut dyn TensorSink,
    ) -> Result<()> {
        let CpuRun {
            groups,
            factor,
            spare,
            ahead,
        } = run;
        let (base, steps) = (m.base(), m.steps());
        let first = match ahead.take() {
            Some(a) if a.is_for(base, steps) => Some(a.join()?),
            // Read for another tensor (the walk reads ahead only the merge it runs next,
            // so this is not expected): wait, then drop it.
            Some(a) => {
                let _ = a.join();
                None
            }
            None => None,
        };
        // A group read ahead will replace groups[0]; its old buffers serve the next one.
        if first.is_some() {
            *spare = Some(std::mem::take(&mut groups[0]));
        }
        // The next merge's factors and first rows are read while this one computes.
        if let Some(n) = next {
            let (_, cols) = n.rows_cols();
            *ahead = Some(ReadAhead::start(
                n.base(),
                n.steps(),
                group_rows(cols, self.threads),
                spare.take().unwrap_or_default(),
            ));
        }
        let check = self.check_non_finite;
        let out_dtype = m.out_dtype();
        // Prepared on the pool too: packing the LoRA factor splits across its workers.
        self.pool.install(|| {
            let job = PreparedMerge::new(m, factor, &self.scratch, first.as_ref(), self.isa)?;
            // The group read ahead becomes this merge's first group.
            let first_ranges = first.map(|p| {
                groups[0] = p.first;
                p.first_ranges
            });
            job.run(out_dtype, self.threads, groups, first_ranges, check, sink)
        })
    }
}

impl DeltaBackend for CpuBackend {
    fn run(
        &self,
        work: &[WorkItem<'_>],
        sink: &mut dyn TensorSink,
        observer: &mut dyn FnMut(usize, Duration),
    ) -> Result<()> {
        walk::run(self, work, sink, observer)
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads, {})", self.threads, self.isa.name())
    }

    fn set_check_non_finite(&mut self, on: bool) {
        self.check_non_finite = on;
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b).max(1) * b
}

fn internal(base: &TensorEntry, msg: &str) -> Error {
    Error::tensor(base.file.path(), &base.name, format!("internal: {msg}"))
}

/// A tensor's bytes with its dtype: borrowed from the map when contiguous. A decoded
/// tensor (a quantized base) is not decoded whole here: its bands are decoded when asked
/// for, so memory stays a band.
struct Bytes<'a> {
    data: Cow<'a, [u8]>,
    dtype: Dtype,
    decoded: Option<&'a TensorEntry>,
}

impl<'a> Bytes<'a> {
    fn of(t: &'a TensorEntry) -> Bytes<'a> {
        if matches!(t.data, crate::source::TensorData::Decoded { .. }) {
            return Bytes {
                data: Cow::Borrowed(&[]),
                dtype: t.dtype,
                decoded: Some(t),
            };
        }
        Bytes {
            data: t.bytes(),
            dtype: t.dtype,
            decoded: None,
        }
    }
    /// Decodes elements [from, from+out.len()).
    fn decode(&self, from: usize, out: &mut [f32]) {
        let es = self.dtype.size();
        if let Some(t) = self.decoded {
            let mut piece = Vec::with_capacity(out.len() * es);
            t.gather(from, out.len(), &mut piece);
            decode_f32(self.dtype, &piece, out);
            return;
        }
        decode_f32(
            self.dtype,
            &self.data[from * es..(from + out.len()) * es],
            out,
        );
    }
}

enum Prepared<'a> {
    Replace(Bytes<'a>),
    Lora {
        /// B [rows, r] (Normal) or A [r, rows] (Transposed): read per band.
        left: Bytes<'a>,
        /// A as [r, cols] (Normal) or B as [cols, r] (Transposed), decoded and packed
        /// once per tensor for the microkernels.
        right: PackedRight,
        r: usize,
        scale: f32,
        layout: DeltaLayout,
        round_delta_first: bool,
        magnitude: Option<Vec<f32>>,
    },
    AddBias {
        bias: Bytes<'a>,
        scale: f32,
    },
    /// Another tuner's change, prepared for this tensor (`adapter/tuners`).
    Tuned(Box<dyn BandChange + 'a>),
}

struct PreparedMerge<'a> {
    base: &'a TensorEntry,
    source_steps: &'a [Step],
    /// Per step: the tensor read by rows (B in the Normal layout), None for the others.
    row_factors: Vec<Option<&'a TensorEntry>>,
    scratch: &'a [Mutex<Scratch>],
    w: Bytes<'a>,
    rows: usize,
    cols: usize,
    /// Rows per band: a multiple of every step's row block.
    band: usize,
    steps: Vec<Prepared<'a>>,
    /// Per step: the column factors m / ‖V‖ of a DoRA step on a transposed layout.
    col_factors: Vec<Option<Vec<f32>>>,
    /// The compute path: microkernels and vectorised conversions (`convert.rs`).
    isa: Isa,
}

/// Per-thread scratch space.
#[derive(Default)]
struct Scratch {
    value: Vec<f32>,
    delta: Vec<f32>,
    /// The band's left factor, packed for the microkernels.
    left: AlignedF32,
    /// The fused pass's chunk of f32 values (`convert::add_encode`).
    chunk: Vec<f32>,
    /// A delta could not be computed (operands of another size than planned).
    broken: bool,
}

impl<'a> PreparedMerge<'a> {
    fn new(
        m: CheckedMerge<'a>,
        factor_buf: &mut AlignedBuf,
        scratch: &'a [Mutex<Scratch>],
        prefetched: Option<&Prefetched>,
        isa: Isa,
    ) -> Result<PreparedMerge<'a>> {
        // Decoded from the bytes read ahead when they are there; else read now.
        let mut decoded = |j: usize, magnitude: bool, t: &TensorEntry| match prefetched
            .and_then(|p| p.decode(j, magnitude, t))
        {
            Some(v) => Ok(v),
            None => decode_all(t, factor_buf),
        };
        let (base, steps) = (m.base(), m.steps());
        let (rows, cols) = m.rows_cols();
        let block = steps
            .iter()
            .map(|s| match s {
                Step::Tuned(c) => c.row_block().max(1),
                Step::Replace(_) | Step::AddBias { .. } | Step::Lora(_) => 1,
            })
            .fold(1, lcm);
        let mut merge = PreparedMerge {
            base,
            source_steps: steps,
            row_factors: row_factors(steps),
            scratch,
            w: Bytes::of(base),
            rows,
            cols,
            band: band_rows(cols).div_ceil(block) * block,
            steps: Vec::with_capacity(steps.len()),
            col_factors: Vec::with_capacity(steps.len()),
            isa,
        };
        // Steps are prepared in order: a tuner's preparation may stream the value after
        // the steps before it, and a DoRA column norm needs them too.
        for (j, s) in steps.iter().enumerate() {
            let prepared = match s {
                Step::Replace(t) => Prepared::Replace(Bytes::of(t)),
                Step::AddBias { bias, scale } => Prepared::AddBias {
                    bias: Bytes::of(bias),
                    scale: *scale,
                },
                Step::Lora(l) => {
                    let (left_t, right_t) = (left_factor(l), right_factor(l));
                    let magnitude = match &l.magnitude {
                        Some(m) => Some(decoded(j, true, m)?),
                        None => None,
                    };
                    // The plan checked the sizes (`CheckedMerge`); the length stays a
                    // hard guard here. R[k, j] is A[k, j] (Normal) or B[j, k] (Transposed).
                    if right_t.numel() != cols * l.r {
                        return Err(internal(base, "LoRA factor of another size"));
                    }
                    let (rs, cs) = match l.layout {
                        DeltaLayout::Normal => (cols, 1),
                        DeltaLayout::Transposed => (1, l.r),
                    };
                    let pack = |data| {
                        let src = Strided {
                            data,
                            base: 0,
                            rs,
                            cs,
                        };
                        PackedRight::pack(isa, &src, l.r, cols)
                            .ok_or_else(|| internal(base, "LoRA factor of another size"))
                    };
                    // Read ahead: decoded from the stored bytes as it is packed (no f32
                    // copy of the whole factor besides the packed one).
                    let right = match prefetched.and_then(|p| p.raw(j, false, right_t)) {
                        Some(bytes) => pack(Elems::Stored(right_t.dtype, bytes))?,
                        None => pack(Elems::F32(&decoded(j, false, right_t)?))?,
                    };
                    Prepared::Lora {
                        left: Bytes::of(left_t),
                        right,
                        r: l.r,
                        scale: l.scale,
                        layout: l.layout,
                        round_delta_first: l.round_delta_first,
                        magnitude,
                    }
                }
                Step::Tuned(c) => {
                    let stream = |f: &mut dyn FnMut(usize, &[f32])| merge.stream_upto(j, f);
                    let source = BandSource {
                        base,
                        rows,
                        cols,
                        stream: &stream,
                    };
                    Prepared::Tuned(c.prepare(&source)?)
                }
            };
            merge.steps.push(prepared);
            merge.col_factors.push(None);
            // Column factors of a DoRA step on a transposed layout: one extra pass.
            if let Some(Prepared::Lora {
                layout: DeltaLayout::Transposed,
                magnitude: Some(m),
                ..
            }) = merge.steps.last()
            {
                let sums = merge.column_sumsq(j);
                let f = m
                    .iter()
                    .zip(&sums)
                    .map(|(m, s)| m / (s.sqrt() as f32))
                    .collect();
                merge.col_factors[j] = Some(f);
            }
        }
        Ok(merge)
    }

    /// Visits the value after steps[..upto] band by band (each rounded into the base
    /// dtype, as the next step sees it), in row order, on the calling thread.
    fn stream_upto(&self, upto: usize, f: &mut dyn FnMut(usize, &[f32])) {
        let mut scratch = Scratch::default();
        let rows = Rows::from_maps();
        for i0 in (0..self.rows).step_by(self.band.max(1)) {
            let i1 = (i0 + self.band).min(self.rows);
            self.compute_band(i0, i1, &rows, upto, true, &mut scratch);
            f(i0, &scratch.value);
        }
    }

    /// This worker's scratch space (workers never wait on each other's).
    fn scratch(&self) -> std::sync::MutexGuard<'a, Scratch> {
        let i = rayon::current_thread_index().unwrap_or(0) % self.scratch.len().max(1);
        match self.scratch.get(i) {
            Some(m) => m.lock().unwrap_or_else(|p| p.into_inner()),
            None => unreachable!("CpuBackend makes one scratch per worker, at least one"),
        }
    }

    fn band_rows(&self) -> usize {
        self.band
    }

    fn read_group(&self, g0: usize, g1: usize, bufs: &mut GroupBuffers) -> Result<GroupRanges> {
        read_group(self.base, &self.row_factors, g0, g1, bufs)
    }

    fn run(
        &self,
        out_dtype: Dtype,
        threads: usize,
        bufs: &mut [GroupBuffers; 2],
        first_group: Option<GroupRanges>,
        check: bool,
        sink: &mut dyn TensorSink,
    ) -> Result<()> {
        if self.rows * self.cols == 0 {
            return Ok(());
        }
        let band = self.band_rows();
        let group = band * threads.max(1);
        let oes = out_dtype.size();
        // Encoding into the base dtype rounds the last step itself.
        let last_round = out_dtype != self.base.dtype;
        let [first, second] = bufs;
        let (mut cur, mut next) = (first, second);
        let mut ranges = match first_group {
            Some(r) if r.rows() == (0..group.min(self.rows)) => r,
            _ => self.read_group(0, group.min(self.rows), cur)?,
        };
        // Non-finite values the merge created so far; once there is one, bands are still
        // computed (to count them all for the message) but no longer written.
        let mut created = NonFinite::default();
        let mut g0 = 0;
        while g0 < self.rows {
            let g1 = (g0 + group).min(self.rows);
            let n1 = (g1 + group).min(self.rows);
            // The next group is read on a helper thread while this one is computed; the
            // reads are DMA into `next`, so the helper costs the cores almost nothing.
            let (computed, read) = std::thread::scope(|s| {
                let reader = (g1 < self.rows).then(|| {
                    let next = &mut *next;
                    s.spawn(move || self.read_group(g1, n1, next))
                });
                let rows = Rows::of(cur, &ranges);
                let mut out = sink.buffer();
                out.resize((g1 - g0) * self.cols * oes, 0u8);
                let found = Mutex::new(NonFinite::default());
                let broken = Mutex::new(false);
                out.par_chunks_mut(band * self.cols * oes)
                    .enumerate()
                    .for_each(|(ci, chunk)| {
                        let mut scratch = self.scratch();
                        scratch.broken = false;
                        let i0 = g0 + ci * band;
                        let i1 = (i0 + band).min(g1);
                        let fused = self.fused_weight(i0, i1, &rows);
                        let mut hits = Vec::new();
                        if let Some((w, round_delta)) = fused {
                            // One plain LoRA step: delta, decode + add + round + encode +
                            // check in one pass, block by block (`fused_band`).
                            hits = self.fused_band(
                                i0,
                                i1,
                                &rows,
                                w,
                                round_delta,
                                last_round,
                                out_dtype,
                                chunk,
                                check,
                                &mut scratch,
                            );
                        } else {
                            self.compute_band(
                                i0,
                                i1,
                                &rows,
                                self.steps.len(),
                                last_round,
                                &mut scratch,
                            );
                        }
                        if scratch.broken {
                            *broken.lock().unwrap_or_else(|p| p.into_inner()) = true;
                            return;
                        }
                        // The band's values are final here: checked as they are encoded.
                        if fused.is_none() {
                            hits = encode_checked(out_dtype, &scratch.value, chunk, check);
                        }
                        if !hits.is_empty() {
                            if fused.is_some() {
                                // The values before encoding, for the message (rare).
                                self.compute_band(
                                    i0,
                                    i1,
                                    &rows,
                                    self.steps.len(),
                                    last_round,
                                    &mut scratch,
                                );
                            }
                            let nf = self.created_non_finite(i0, i1, &rows, &hits, &mut scratch);
                            found.lock().unwrap_or_else(|p| p.into_inner()).merge(nf);
                        }
                    });
                created.merge(found.into_inner().unwrap_or_else(|p| p.into_inner()));
                let computed = if broken.into_inner().unwrap_or_else(|p| p.into_inner()) {
                    Err(internal(
                        self.base,
                        "LoRA factor of another size than planned",
                    ))
                } else if created.count == 0 {
                    sink.write_owned(out)
                } else {
                    Ok(())
                };
                let read = reader.map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(internal(self.base, "the reading thread panicked")))
                });
                (computed, read)
            });
            computed?;
            if let Some(r) = read {
                ranges = r?;
            }
            std::mem::swap(&mut cur, &mut next);
            g0 = g1;
        }
        // Pages of the tensors read through the map (small factors, strided views) are
        // done with: without this, every adapter tensor ever read would stay resident.
        self.base.release();
        for step in self.source_steps {
            match step {
                Step::Lora(l) => {
                    l.a.release();
                    l.b.release();
                    if let Some(m) = &l.magnitude {
                        m.release();
                    }
                }
                Step::Replace(t) | Step::AddBias { bias: t, .. } => t.release(),
                Step::Tuned(c) => c.inputs().iter().for_each(|t| t.release()),
            }
        }
        // Named in the dtype that overflowed: the narrower of the weight's and the output's.
        let narrow = if out_dtype.size() < self.base.dtype.size() {
            out_dtype
        } else {
            self.base.dtype
        };
        match created.error(self.base.file.path(), &self.base.name, self.cols, narrow) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Of the band's non-finite outputs (`hits`, relative to row i0), those whose source
    /// value — the weight, or its last replacement — was finite: the ones the merge
    /// created (see `finite.rs`). Runs only for bands with a hit.
    fn created_non_finite(
        &self,
        i0: usize,
        i1: usize,
        rows: &Rows<'_>,
        hits: &[usize],
        scratch: &mut Scratch,
    ) -> NonFinite {
        let len = (i1 - i0) * self.cols;
        let mut source = std::mem::take(&mut scratch.delta);
        source.resize(len, 0.0);
        let last_replace = self.steps.iter().rev().find_map(|s| match s {
            Prepared::Replace(t) => Some(t),
            _ => None,
        });
        match last_replace {
            Some(t) => t.decode(i0 * self.cols, &mut source),
            None => self.decode_w(i0, i1, rows, &mut source),
        }
        let mut nf = NonFinite::default();
        for &h in hits {
            if source[h].is_finite() {
                nf.add(i0 * self.cols + h, scratch.value[h]);
            }
        }
        scratch.delta = source;
        nf
    }

    /// When the merge is one plain LoRA step (no DoRA) on a weight stored as bytes: the
    /// stored bytes of rows [i0, i1) and whether the step rounds its delta first — what
    /// the fused pass (`convert::add_encode`) needs. None for every other merge.
    fn fused_weight<'r>(
        &'r self,
        i0: usize,
        i1: usize,
        rows: &Rows<'r>,
    ) -> Option<(&'r [u8], bool)> {
        let [
            Prepared::Lora {
                round_delta_first,
                magnitude: None,
                ..
            },
        ] = self.steps.as_slice()
        else {
            return None;
        };
        let es = self.base.dtype.size();
        let len = (i1 - i0) * self.cols * es;
        let w = match rows.w {
            Some(w) => w.get((i0 - rows.first) * self.cols * es..)?,
            None if self.w.decoded.is_none() => self.w.data.get(i0 * self.cols * es..)?,
            None => return None,
        };
        Some((w.get(..len)?, *round_delta_first))
    }

    /// The weight's rows [i0, i1) in f32, from the group read ahead or the map.
    fn decode_w(&self, i0: usize, i1: usize, rows: &Rows<'_>, out: &mut [f32]) {
        let (n, wd) = (self.cols, self.base.dtype);
        let len = (i1 - i0) * n;
        match rows.w {
            Some(w) => {
                let es = wd.size();
                let at = (i0 - rows.first) * n * es;
                convert::decode(self.isa, wd, &w[at..at + len * es], &mut out[..len]);
            }
            None => self.w.decode(i0 * n, &mut out[..len]),
        }
    }

    /// Σ over rows of V², per column, where V = value after steps[..j] plus step j's delta.
    fn column_sumsq(&self, j: usize) -> Vec<f64> {
        let band = self.band_rows();
        let starts: Vec<usize> = (0..self.rows).step_by(band).collect();
        starts
            .par_iter()
            .map_init(Scratch::default, |scratch, &i0| {
                let i1 = (i0 + band).min(self.rows);
                let rows = Rows::from_maps();
                self.compute_band(i0, i1, &rows, j, true, scratch);
                self.delta(j, i0, i1, &rows, scratch);
                let mut sums = vec![0f64; self.cols];
                for (row, drow) in scratch
                    .value
                    .chunks(self.cols)
                    .zip(scratch.delta.chunks(self.cols))
                {
                    for ((s, v), d) in sums.iter_mut().zip(row).zip(drow) {
                        let x = (v + d) as f64;
                        *s += x * x;
                    }
                }
                sums
            })
            .reduce(
                || vec![0f64; self.cols],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            )
    }

    /// scratch.delta = s·(B @ A) for rows [i0, i1) of step j (in stored orientation), in
    /// the reduction order of `gemm.rs`. The left factor is decoded from its stored bytes
    /// as it is packed.
    fn delta(&self, j: usize, i0: usize, i1: usize, rows: &Rows<'_>, scratch: &mut Scratch) {
        let Prepared::Lora {
            left,
            right,
            r,
            scale,
            layout,
            ..
        } = &self.steps[j]
        else {
            return;
        };
        let (m, n) = (i1 - i0, self.cols);
        scratch.delta.resize(m * n, 0.0);
        let src = self.left_rows(left, *r, *layout, j, i0, rows);
        // PEFT computes (B @ A) * s: the kernel scales the finished f32 dot product, which
        // rounds exactly like a separate multiply.
        if right.k() != *r
            || !gemm::delta(
                &src,
                m,
                right,
                *scale,
                &mut scratch.delta,
                &mut scratch.left,
            )
        {
            // Sizes were checked by the plan and in `new`: not reachable with a valid plan.
            // `run` turns the mark into an error for the tensor (never a silent output).
            scratch.broken = true;
        }
    }

    /// The left factor of step j (rank k) for rows i0.. as the microkernels read it.
    fn left_rows<'r>(
        &'r self,
        left: &'r Bytes<'r>,
        k: usize,
        layout: DeltaLayout,
        j: usize,
        i0: usize,
        rows: &Rows<'r>,
    ) -> Strided<'r> {
        match layout {
            // B [rows, r]: rows i0..i1, from the group read ahead or the map.
            DeltaLayout::Normal => match rows.left.get(j).copied().flatten() {
                Some(b) => Strided {
                    data: Elems::Stored(left.dtype, b),
                    base: (i0 - rows.first) * k,
                    rs: k,
                    cs: 1,
                },
                None => Strided {
                    data: Elems::Stored(left.dtype, &left.data),
                    base: i0 * k,
                    rs: k,
                    cs: 1,
                },
            },
            // A [r, rows]: columns i0..i1 of each of its r rows.
            DeltaLayout::Transposed => Strided {
                data: Elems::Stored(left.dtype, &left.data),
                base: i0,
                rs: 1,
                cs: self.rows,
            },
        }
    }

    /// A band of a one-step plain LoRA merge, fused: per sub-block of `FUSED_SUB_ROWS`
    /// rows, L packed once, then column block by column block (`gemm::COL_BLOCK`, so the
    /// block's f32 delta stays in L2) the delta and, row by row, `convert::add_encode`
    /// of it with the weight's bytes `w` (rows [i0, i1)) into `out`. The same operations
    /// in the same order as `compute_band` followed by `encode_checked`; returns the
    /// indices (from row i0) of outputs that are non-finite when `check`.
    #[allow(clippy::too_many_arguments)]
    fn fused_band(
        &self,
        i0: usize,
        i1: usize,
        rows: &Rows<'_>,
        w: &[u8],
        round_delta: bool,
        last_round: bool,
        out_dtype: Dtype,
        out: &mut [u8],
        check: bool,
        scratch: &mut Scratch,
    ) -> Vec<usize> {
        let mut hits = Vec::new();
        let Some(Prepared::Lora {
            left,
            right,
            r,
            scale,
            layout,
            ..
        }) = self.steps.first()
        else {
            scratch.broken = true;
            return hits;
        };
        let (band, n) = (i1 - i0, self.cols);
        let (wes, oes) = (self.base.dtype.size(), out_dtype.size());
        if right.k() != *r || w.len() != band * n * wes || out.len() != band * n * oes {
            scratch.broken = true;
            return hits;
        }
        let nc = gemm::COL_BLOCK.min(n);
        for s0 in (0..band).step_by(FUSED_SUB_ROWS) {
            let m = FUSED_SUB_ROWS.min(band - s0);
            let src = self.left_rows(left, *r, *layout, 0, i0 + s0, rows);
            if !gemm::pack_left(&src, m, right, &mut scratch.left) {
                scratch.broken = true;
                return hits;
            }
            scratch.delta.resize(m * nc, 0.0);
            for j0 in (0..n).step_by(nc.max(1)) {
                let j1 = (j0 + nc).min(n);
                let width = j1 - j0;
                let d = &mut scratch.delta[..m * width];
                for i in s0..s0 + m {
                    let at = i * n + j0;
                    convert::prefetch(&w[at * wes..(at + width) * wes]);
                }
                if !gemm::delta_cols(&scratch.left, m, right, j0, j1, *scale, d, width) {
                    scratch.broken = true;
                    return hits;
                }
                for (i, drow) in (s0..).zip(d.chunks_mut(width)) {
                    let at = i * n + j0;
                    let h = convert::add_encode(
                        self.isa,
                        self.base.dtype,
                        &w[at * wes..(at + width) * wes],
                        drow,
                        round_delta,
                        last_round,
                        out_dtype,
                        &mut out[at * oes..(at + width) * oes],
                        check,
                        &mut scratch.chunk,
                    );
                    hits.extend(h.into_iter().map(|x| at + x));
                }
            }
        }
        hits
    }

    /// scratch.value = rows [i0, i1) after steps[..upto]; the rounding into the base dtype
    /// after the last of them is skipped when `last_round` is false.
    fn compute_band(
        &self,
        i0: usize,
        i1: usize,
        rows: &Rows<'_>,
        upto: usize,
        last_round: bool,
        scratch: &mut Scratch,
    ) {
        let col_factors = &self.col_factors;
        let (n, wd) = (self.cols, self.base.dtype);
        let len = (i1 - i0) * n;
        scratch.value.resize(len, 0.0);
        self.decode_w(i0, i1, rows, &mut scratch.value);
        for (j, step) in self.steps.iter().enumerate().take(upto) {
            match step {
                Prepared::Replace(t) => t.decode(i0 * n, &mut scratch.value),
                Prepared::Tuned(change) => change.apply(i0, &mut scratch.value),
                Prepared::AddBias { bias, scale } => {
                    scratch.delta.resize(len, 0.0);
                    bias.decode(i0 * n, &mut scratch.delta);
                    for (v, b) in scratch.value.iter_mut().zip(&scratch.delta) {
                        *v += b * scale;
                    }
                }
                Prepared::Lora {
                    layout,
                    round_delta_first,
                    magnitude,
                    ..
                } => {
                    self.delta(j, i0, i1, rows, scratch);
                    if *round_delta_first {
                        convert::round_through(self.isa, wd, &mut scratch.delta);
                    }
                    for (v, d) in scratch.value.iter_mut().zip(&scratch.delta) {
                        *v += d;
                    }
                    match (layout, magnitude, &col_factors[j]) {
                        (DeltaLayout::Normal, Some(m), _) => {
                            for (row, mag) in scratch.value.chunks_mut(n).zip(&m[i0..i1]) {
                                let norm = row
                                    .iter()
                                    .map(|&x| (x as f64) * (x as f64))
                                    .sum::<f64>()
                                    .sqrt() as f32;
                                let f = mag / norm;
                                row.iter_mut().for_each(|x| *x *= f);
                            }
                        }
                        (DeltaLayout::Transposed, Some(_), Some(f)) => {
                            for row in scratch.value.chunks_mut(n) {
                                row.iter_mut().zip(f).for_each(|(x, f)| *x *= f);
                            }
                        }
                        _ => {}
                    }
                }
            }
            // Each step lands in the weight's own dtype, like PEFT's in-place merge.
            if last_round || j + 1 < upto {
                convert::round_through(self.isa, wd, &mut scratch.value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::walk::{Source, Task, merged};
    use crate::plan::merge_types::LoraStep;
    use crate::sink::{MemorySink, OutTensor};
    use crate::source::{MappedFile, TensorData};

    /// Two merges of the same weight with other factors of the same shape, one after the
    /// other in a run: the second is read ahead while the first computes, and each comes
    /// out as when it runs alone (the read-ahead serves only the merge it was read for).
    #[test]
    fn read_ahead_serves_the_merge_it_was_read_for() {
        let (rows, cols, r) = (4usize, 8usize, 2usize);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut data: Vec<f32> = Vec::new();
        data.extend((0..rows * cols).map(|i| i as f32)); // W
        data.extend((0..r * cols).map(|i| 1.0 + i as f32)); // A1
        data.extend((0..rows * r).map(|i| 0.5 + i as f32)); // B1
        data.extend((0..r * cols).map(|i| -3.0 * i as f32)); // A2
        data.extend((0..rows * r).map(|i| 7.0 - i as f32)); // B2
        std::fs::write(&path, bytemuck::cast_slice::<f32, u8>(&data)).unwrap();
        let file = MappedFile::open(&path).unwrap();
        let mut at = 0;
        let mut entry = |name: &str, shape: Vec<usize>| {
            let len = shape.iter().product::<usize>() * 4;
            let t = TensorEntry {
                name: name.into(),
                dtype: Dtype::F32,
                shape,
                file: file.clone(),
                data: TensorData::Contiguous { start: at, len },
            };
            at += len;
            t
        };
        let w = entry("w", vec![rows, cols]);
        let (a1, b1) = (entry("a1", vec![r, cols]), entry("b1", vec![rows, r]));
        let (a2, b2) = (entry("a2", vec![r, cols]), entry("b2", vec![rows, r]));
        let step = |a: &TensorEntry, b: &TensorEntry| {
            vec![Step::Lora(Box::new(LoraStep {
                a: a.clone(),
                b: b.clone(),
                r,
                scale: 1.0,
                layout: DeltaLayout::Normal,
                round_delta_first: false,
                magnitude: None,
            }))]
        };
        let (s1, s2) = (step(&a1, &b1), step(&a2, &b2));
        let alone =
            |s: &[Step]| merged(&CpuBackend::new(Some(1)).unwrap(), &w, s, Dtype::F32, None);
        let (one, two) = (alone(&s1).unwrap(), alone(&s2).unwrap());
        assert!(one != two, "the two merges should differ");
        let out = OutTensor {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: w.shape.clone(),
        };
        let item = |s| WorkItem {
            out: &out,
            task: Task::Write {
                from: Source::Merge(CheckedMerge::new(&w, s, &out).unwrap()),
                rows: None,
            },
        };
        let be = CpuBackend::new(Some(1)).unwrap();
        let mut sink = MemorySink::default();
        let mut seen = Vec::new();
        be.run(
            &[item(&s1), item(&s2), item(&s1)],
            &mut sink,
            &mut |i, _| seen.push(i),
        )
        .unwrap();
        assert_eq!(seen, [0, 1, 2]);
        assert!(
            sink.0 == [one.clone(), two, one].concat(),
            "a merge used another's factors"
        );
    }
}
