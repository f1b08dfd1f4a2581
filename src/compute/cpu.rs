//! The CPU backend: row bands of the weight, split across a thread pool, each band
//! decoded to f32, updated with `matrixmultiply::sgemm` (a maintained, vectorised GEMM),
//! rounded into the base dtype after every step (PEFT merges in place) and encoded to the
//! output dtype. Memory is a few bands, never the whole tensor in f32.
//!
//! DoRA needs the norm of every row (Linear, Conv: inside one band) or of every column
//! (Conv1D, Embedding: across all bands); column norms take one extra pass over the
//! tensor before the writing pass.

use super::DeltaBackend;
use crate::dtype::{Dtype, decode_f32, encode_f32, round_through};
use crate::error::{Error, Result};
use crate::plan::merge_types::{DeltaLayout, Step};
use crate::sink::TensorSink;
use crate::source::TensorEntry;
use rayon::prelude::*;
use std::borrow::Cow;

/// f32 elements per band (per thread): 8 MB of values, and the same again for the delta.
const BAND_ELEMS: usize = 2 << 20;

/// Fewest rows per band: the GEMM packs the whole right operand (A, r × cols) once per
/// band, so thin bands spend their time packing (measured with matrixmultiply at r=512,
/// 14336 columns: 61 GFLOP/s at 73 rows, 85 at 292, 92 at 1024 on one core).
const MIN_BAND_ROWS: usize = 256;

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl CpuBackend {
    /// A backend with `threads` workers (None: one per core).
    pub fn new(threads: Option<usize>) -> Result<CpuBackend> {
        let threads = threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Device(format!("cannot start {threads} worker threads: {e}")))?;
        Ok(CpuBackend { pool, threads })
    }
}

impl DeltaBackend for CpuBackend {
    fn merge(
        &self,
        base: &TensorEntry,
        steps: &[Step],
        out_dtype: Dtype,
        sink: &mut dyn TensorSink,
    ) -> Result<()> {
        let job = PreparedMerge::new(base, steps)?;
        self.pool.install(|| job.run(out_dtype, self.threads, sink))
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }
}

fn internal(base: &TensorEntry, msg: &str) -> Error {
    Error::tensor(base.file.path(), &base.name, format!("internal: {msg}"))
}

/// A tensor's bytes with its dtype: borrowed from the map when contiguous.
struct Bytes<'a> {
    data: Cow<'a, [u8]>,
    dtype: Dtype,
}

impl<'a> Bytes<'a> {
    fn of(t: &'a TensorEntry) -> Bytes<'a> {
        Bytes {
            data: t.bytes(),
            dtype: t.dtype,
        }
    }
    /// Decodes elements [from, from+out.len()).
    fn decode(&self, from: usize, out: &mut [f32]) {
        let es = self.dtype.size();
        decode_f32(
            self.dtype,
            &self.data[from * es..(from + out.len()) * es],
            out,
        );
    }
    fn all(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.data.len() / self.dtype.size()];
        self.decode(0, &mut v);
        v
    }
}

enum Prepared<'a> {
    Replace(Bytes<'a>),
    Lora {
        /// B [rows, r] (Normal) or A [r, rows] (Transposed): read per band.
        left: Bytes<'a>,
        /// A as [r, cols] (Normal) or B as [cols, r] (Transposed), decoded once.
        right: Vec<f32>,
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
}

struct PreparedMerge<'a> {
    base: &'a TensorEntry,
    source_steps: &'a [Step],
    w: Bytes<'a>,
    rows: usize,
    cols: usize,
    steps: Vec<Prepared<'a>>,
}

/// Per-thread scratch space.
#[derive(Default)]
struct Scratch {
    value: Vec<f32>,
    delta: Vec<f32>,
    left: Vec<f32>,
}

impl<'a> PreparedMerge<'a> {
    fn new(base: &'a TensorEntry, steps: &'a [Step]) -> Result<PreparedMerge<'a>> {
        if !base.dtype.is_float() {
            return Err(Error::tensor(
                base.file.path(),
                &base.name,
                format!(
                    "cannot merge into a {} tensor (only floating weights take LoRA deltas)",
                    base.dtype
                ),
            ));
        }
        let numel = base.numel();
        let rows = base.shape.first().copied().unwrap_or(1).max(1);
        let cols = numel / rows;
        let mut prepared = Vec::with_capacity(steps.len());
        for s in steps {
            prepared.push(match s {
                Step::Replace(t) => {
                    if t.numel() != numel || !t.dtype.is_float() {
                        return Err(internal(base, "replacement of another size or dtype"));
                    }
                    Prepared::Replace(Bytes::of(t))
                }
                Step::AddBias { bias, scale } => {
                    if bias.numel() != numel || !bias.dtype.is_float() {
                        return Err(internal(base, "lora_B.bias of another size"));
                    }
                    Prepared::AddBias {
                        bias: Bytes::of(bias),
                        scale: *scale,
                    }
                }
                Step::Lora(l) => {
                    let (left_t, right_t) = match l.layout {
                        DeltaLayout::Normal => (&l.b, &l.a),
                        DeltaLayout::Transposed => (&l.a, &l.b),
                    };
                    if left_t.numel() != rows * l.r || right_t.numel() != cols * l.r {
                        return Err(internal(base, "LoRA factors do not fit the weight"));
                    }
                    let magnitude = match &l.magnitude {
                        Some(m) => {
                            let want = if l.layout == DeltaLayout::Normal {
                                rows
                            } else {
                                cols
                            };
                            if m.numel() != want {
                                return Err(internal(base, "DoRA magnitude of another size"));
                            }
                            Some(Bytes::of(m).all())
                        }
                        None => None,
                    };
                    Prepared::Lora {
                        left: Bytes::of(left_t),
                        right: Bytes::of(right_t).all(),
                        r: l.r,
                        scale: l.scale,
                        layout: l.layout,
                        round_delta_first: l.round_delta_first,
                        magnitude,
                    }
                }
            });
        }
        Ok(PreparedMerge {
            base,
            source_steps: steps,
            w: Bytes::of(base),
            rows,
            cols,
            steps: prepared,
        })
    }

    fn band_rows(&self) -> usize {
        (BAND_ELEMS / self.cols.max(1)).max(MIN_BAND_ROWS)
    }

    fn run(&self, out_dtype: Dtype, threads: usize, sink: &mut dyn TensorSink) -> Result<()> {
        if self.rows * self.cols == 0 {
            return Ok(());
        }
        // Column factors of DoRA steps on transposed layouts, computed in step order.
        let mut col_factors: Vec<Option<Vec<f32>>> = vec![None; self.steps.len()];
        for j in 0..self.steps.len() {
            if let Prepared::Lora {
                layout: DeltaLayout::Transposed,
                magnitude: Some(m),
                ..
            } = &self.steps[j]
            {
                let sums = self.column_sumsq(j, &col_factors);
                col_factors[j] = Some(
                    m.iter()
                        .zip(&sums)
                        .map(|(m, s)| m / (s.sqrt() as f32))
                        .collect(),
                );
            }
        }
        let band = self.band_rows();
        let group = band * threads.max(1);
        let oes = out_dtype.size();
        let es = self.base.dtype.size();
        let row_bytes = self.cols * es;
        let mut g0 = 0;
        while g0 < self.rows {
            let g1 = (g0 + group).min(self.rows);
            // Let the kernel read the next group while this one is computed.
            if let Some((start, _)) = self.base.contiguous_range() {
                let next = (g1 + group).min(self.rows);
                self.base
                    .file
                    .prefetch(start + g1 * row_bytes, (next - g1) * row_bytes);
            }
            let mut out = sink.buffer();
            out.resize((g1 - g0) * self.cols * oes, 0u8);
            out.par_chunks_mut(band * self.cols * oes)
                .enumerate()
                .for_each_init(Scratch::default, |scratch, (ci, chunk)| {
                    let i0 = g0 + ci * band;
                    let i1 = (i0 + band).min(g1);
                    // Encoding into the base dtype rounds the last step itself.
                    let last_round = out_dtype != self.base.dtype;
                    self.compute_band(i0, i1, self.steps.len(), &col_factors, last_round, scratch);
                    encode_f32(out_dtype, &scratch.value, chunk);
                });
            sink.write_owned(out)?;
            if let Some((start, _)) = self.base.contiguous_range() {
                self.base
                    .file
                    .release(start + g0 * row_bytes, (g1 - g0) * row_bytes);
            }
            // B's rows for this group (Normal layout reads B by rows; an lm_head-sized B
            // is ~100 MB, so it is released as it goes, like the weight).
            for l in self.source_steps.iter().filter_map(|s| match s {
                Step::Lora(l) if l.layout == DeltaLayout::Normal => Some(l),
                _ => None,
            }) {
                if let Some((start, _)) = l.b.contiguous_range() {
                    let rb = l.r * l.b.dtype.size();
                    l.b.file.release(start + g0 * rb, (g1 - g0) * rb);
                }
            }
            g0 = g1;
        }
        // The adapter's pages for this tensor are done with: without this, every adapter
        // tensor ever read would stay resident (GBs for an r=512 adapter of a 7B model).
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
            }
        }
        Ok(())
    }

    /// Σ over rows of V², per column, where V = value after steps[..j] plus step j's delta.
    fn column_sumsq(&self, j: usize, col_factors: &[Option<Vec<f32>>]) -> Vec<f64> {
        let band = self.band_rows();
        let starts: Vec<usize> = (0..self.rows).step_by(band).collect();
        starts
            .par_iter()
            .map_init(Scratch::default, |scratch, &i0| {
                let i1 = (i0 + band).min(self.rows);
                self.compute_band(i0, i1, j, col_factors, true, scratch);
                self.delta(j, i0, i1, scratch);
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

    /// scratch.delta = s·(B @ A) for rows [i0, i1) of step j (in stored orientation).
    fn delta(&self, j: usize, i0: usize, i1: usize, scratch: &mut Scratch) {
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
        let (m, k, n) = (i1 - i0, *r, self.cols);
        scratch.left.resize(m * k, 0.0);
        scratch.delta.resize(m * n, 0.0);
        // Strides (row, column) of the left [m, k] and right [k, n] operands.
        let (lrs, lcs, rrs, rcs) = match layout {
            DeltaLayout::Normal => {
                left.decode(i0 * k, &mut scratch.left);
                (k as isize, 1, n as isize, 1)
            }
            DeltaLayout::Transposed => {
                // A is [r, rows]: take columns i0..i1 of each of its r rows.
                for kk in 0..k {
                    left.decode(kk * self.rows + i0, &mut scratch.left[kk * m..(kk + 1) * m]);
                }
                (1, m as isize, 1, k as isize)
            }
        };
        // SAFETY: the operands hold m·k, k·n and m·n elements (checked in `new` and sized
        // above) and the strides address exactly those ranges.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                // PEFT computes (B @ A) * s: the kernel scales the finished f32 dot
                // product, which rounds exactly like a separate multiply.
                *scale,
                scratch.left.as_ptr(),
                lrs,
                lcs,
                right.as_ptr(),
                rrs,
                rcs,
                0.0,
                scratch.delta.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }

    /// scratch.value = rows [i0, i1) after steps[..upto]; the rounding into the base dtype
    /// after the last of them is skipped when `last_round` is false.
    fn compute_band(
        &self,
        i0: usize,
        i1: usize,
        upto: usize,
        col_factors: &[Option<Vec<f32>>],
        last_round: bool,
        scratch: &mut Scratch,
    ) {
        let (n, wd) = (self.cols, self.base.dtype);
        let len = (i1 - i0) * n;
        scratch.value.resize(len, 0.0);
        self.w.decode(i0 * n, &mut scratch.value);
        for (j, step) in self.steps.iter().enumerate().take(upto) {
            match step {
                Prepared::Replace(t) => t.decode(i0 * n, &mut scratch.value),
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
                    self.delta(j, i0, i1, scratch);
                    if *round_delta_first {
                        round_through(wd, &mut scratch.delta);
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
                round_through(wd, &mut scratch.value);
            }
        }
    }
}
