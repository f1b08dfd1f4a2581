//! The band pipeline: a merged tensor streams through the GPU in row bands, three in
//! flight (one copied in, one computed, one copied out), each band's output checked for
//! created non-finite values on the host before it goes to the sink. The LoRA factors are
//! uploaded once per tensor in their stored dtypes and converted to f32 on the device; a
//! DoRA step on columns takes one extra pass for its column norms.

use super::buffers::{Gpu, Host, SLOTS, dev_err, dptr};
use super::jobs::{DT_F32, GpuPlan, dt_code};
use crate::compute::finite::{NonFinite, encoded_non_finite};
use crate::dtype::{Dtype, decode_f32};
use crate::error::{Error, Result};
use crate::plan::merge_types::DeltaLayout;
use crate::sink::TensorSink;
use cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, result as drv, sys as drv_sys,
};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::VecDeque;

/// Output tile of the fused kernel (rows, columns) and its threads per block.
const TILE_M: usize = 128;
const TILE_N: usize = 128;
const THREADS: u32 = 256;
/// Above this rank the delta is computed in launches of 256 values of k, each resuming
/// the FMA chain from the partial the one before stored (the reduction order of
/// `compute/gemm.rs`: one chain over k, so the block size does not enter the result).
const KC: usize = 256;

/// Arguments of `ls_factor_f32` (struct FactorArgs in merge.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FactorArgs {
    src: u64,
    dst: u64,
    s_outer: i64,
    s_inner: i64,
    outer: i64,
    inner: i64,
    dt: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<FactorArgs>() == 56);
// SAFETY: plain-old-data with the C layout the kernel declares (size checked on both sides).
unsafe impl DeviceRepr for FactorArgs {}

/// Arguments of `ls_lora_band[_kc]` (struct LoraArgs in merge.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LoraArgs {
    lt: u64,
    rc: u64,
    inp: u64,
    out: u64,
    colf: u64,
    part_in: u64,
    part_out: u64,
    ld_l: i64,
    m: i32,
    n: i32,
    k: i32,
    in_dt: i32,
    out_dt: i32,
    wd: i32,
    scale: f32,
    round_delta_first: i32,
    round_result: i32,
    vec: i32,
}
const _: () = assert!(std::mem::size_of::<LoraArgs>() == 104);
// SAFETY: as above.
unsafe impl DeviceRepr for LoraArgs {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DoraRowsArgs {
    v: u64,
    mag: u64,
    out: u64,
    m: i32,
    n: i32,
    wd: i32,
    out_dt: i32,
}
const _: () = assert!(std::mem::size_of::<DoraRowsArgs>() == 40);
// SAFETY: as above.
unsafe impl DeviceRepr for DoraRowsArgs {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ColSumsqArgs {
    v: u64,
    colsum: u64,
    m: i32,
    n: i32,
}
const _: () = assert!(std::mem::size_of::<ColSumsqArgs>() == 24);
// SAFETY: as above.
unsafe impl DeviceRepr for ColSumsqArgs {}

/// How a step's DoRA magnitude applies.
enum Dora {
    None,
    /// Per row (Normal layout): magnitudes of all rows on the device.
    Rows(CudaSlice<f32>),
    /// Per column (Transposed): magnitudes on the host; factors once the first pass ran.
    Cols {
        mag: Vec<f32>,
        colf: Option<CudaSlice<f32>>,
    },
}

/// One LoRA step on the device: delta = scale · L @ R, with L held as L^T [k][rows] and R
/// as [k][cols], both f32 (converted from the stored factors once per tensor).
struct DevStep {
    lt: CudaSlice<f32>,
    rc: CudaSlice<f32>,
    rows: usize,
    k: usize,
    scale: f32,
    round_delta_first: bool,
    dora: Dora,
}

/// Where a drained band goes: the sink (None in column-norm passes), whether and as what
/// dtype its bytes are checked for created non-finite values, and the running tally.
struct Drained<'a, 's> {
    sink: &'a mut Option<&'s mut (dyn TensorSink + 's)>,
    check: Option<Dtype>,
    created: &'a mut NonFinite,
}

/// What a pass over the bands ends with.
#[derive(Clone, Copy)]
enum Final {
    /// All steps, the last one writing the output dtype; bands go to the sink.
    Out { dt: i32, es: usize },
    /// Steps before `step`, then step `step`'s unrounded value summed per column into
    /// `colsum` (DoRA column norms).
    ColSum { step: usize, colsum: u64 },
}

impl Gpu {
    /// Uploads a stored factor and converts it on the device to f32 `[outer][inner]` with
    /// element (o, i) taken from `o * s_outer + i * s_inner`.
    fn factor_f32(
        &self,
        h: &Host,
        outer: usize,
        inner: usize,
        s_outer: i64,
        s_inner: i64,
    ) -> Result<CudaSlice<f32>> {
        let raw = self.upload_bytes(&h.bytes)?;
        let total = outer * inner;
        // SAFETY: written by the kernel below before anything reads it.
        let dst =
            unsafe { self.comp.alloc::<f32>(total.max(1)) }.map_err(|e| dev_err("allocate", e))?;
        let a = FactorArgs {
            src: dptr(&raw, &self.comp),
            dst: dptr(&dst, &self.comp),
            s_outer,
            s_inner,
            outer: outer as i64,
            inner: inner as i64,
            dt: h.dt,
            pad: 0,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                total.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32,
                1,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.comp.launch_builder(&self.k.factor);
        b.arg(&a);
        // SAFETY: src holds the factor (every (o, i) address is inside it: the strides are
        // those of its own shape), dst outer·inner floats.
        unsafe { b.launch(cfg) }.map_err(|e| dev_err("launch", e))?;
        // `raw` is freed in stream order on the compute stream, after the kernel.
        drop(raw);
        Ok(dst)
    }

    fn upload_steps(&self, p: &GpuPlan) -> Result<Vec<DevStep>> {
        let internal = || {
            Error::tensor(
                p.src.file.path(),
                &p.src.name,
                "internal: LoRA factor bytes do not match their shape",
            )
        };
        let mut out = Vec::with_capacity(p.steps.len());
        for l in &p.steps {
            let (left, right) = match l.layout {
                DeltaLayout::Normal => (&l.b, &l.a),
                DeltaLayout::Transposed => (&l.a, &l.b),
            };
            let lh = Host::of(left).ok_or_else(internal)?;
            let rh = Host::of(right).ok_or_else(internal)?;
            let (r, rows, cols) = (l.r as i64, p.rows as i64, p.cols as i64);
            // Element strides of L (along rows, along k) and R (along k, along columns).
            // Normal: L = B [rows, r], R = A [r, cols].
            // Transposed: L[i,k] = A[k,i] (A [r, rows]), R[k,j] = B[j,k] (B [cols, r]).
            let (l_si, l_sk, r_sk, r_sj) = match l.layout {
                DeltaLayout::Normal => (r, 1, cols, 1),
                DeltaLayout::Transposed => (1, rows, 1, r),
            };
            let dora = match &l.magnitude {
                None => Dora::None,
                Some(m) => {
                    let mh = Host::of(m).ok_or_else(internal)?;
                    let mut mag = vec![0f32; m.numel()];
                    decode_f32(m.dtype, &mh.bytes, &mut mag);
                    match l.layout {
                        DeltaLayout::Normal => Dora::Rows(self.upload_f32(&mag)?),
                        DeltaLayout::Transposed => Dora::Cols { mag, colf: None },
                    }
                }
            };
            out.push(DevStep {
                lt: self.factor_f32(&lh, l.r, p.rows, l_sk, l_si)?,
                rc: self.factor_f32(&rh, l.r, p.cols, r_sk, r_sj)?,
                rows: p.rows,
                k: l.r,
                scale: l.scale,
                round_delta_first: l.round_delta_first,
                dora,
            });
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_lora(
        &self,
        s: &DevStep,
        i0: usize,
        m: usize,
        n: usize,
        wd: i32,
        inp: (u64, i32),
        out: (u64, i32),
        colf: u64,
        round_result: bool,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(TILE_N) as u32, m.div_ceil(TILE_M) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // Ranks above KC: one launch per block of KC values of k; all but the last leave
        // their (running) sums in `part`, the last adds its own and merges.
        let blocks = s.k.div_ceil(KC);
        let part = if blocks > 1 {
            self.part
                .as_ref()
                .map(|p| dptr(p, &self.comp))
                .ok_or_else(|| Error::Internal("no partial-sum buffer".into()))?
        } else {
            0
        };
        let (lt, rc) = (dptr(&s.lt, &self.comp), dptr(&s.rc, &self.comp));
        for blk in 0..blocks {
            let k0 = blk * KC;
            let last = blk + 1 == blocks;
            let a = LoraArgs {
                lt: lt + ((k0 * s.rows + i0) * 4) as u64,
                rc: rc + ((k0 * n) * 4) as u64,
                inp: inp.0,
                out: out.0,
                colf,
                part_in: if blk > 0 { part } else { 0 },
                part_out: if last { 0 } else { part },
                ld_l: s.rows as i64,
                m: m as i32,
                n: n as i32,
                k: (s.k - k0).min(KC) as i32,
                in_dt: inp.1,
                out_dt: out.1,
                wd,
                scale: s.scale,
                round_delta_first: s.round_delta_first as i32,
                round_result: round_result as i32,
                vec: n.is_multiple_of(4) as i32,
            };
            let mut b = self.comp.launch_builder(&self.k.lora);
            b.arg(&a);
            // SAFETY: the argument struct matches the kernel's; every pointer addresses a
            // live buffer of at least the extent the kernel reads or writes (m rows × n
            // columns of in/out/part, k rows of L^T and R from k0, n column factors).
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("launch", e))?;
        }
        Ok(())
    }

    /// Queues the kernels of one band (rows i0.., m of them) on the compute stream.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_band(
        &self,
        p: &GpuPlan,
        steps: &[DevStep],
        i0: usize,
        m: usize,
        din: u64,
        dout: u64,
        fin: Final,
    ) -> Result<()> {
        let n = p.cols;
        let v = self
            .v
            .as_ref()
            .map(|v| dptr(v, &self.comp))
            .ok_or_else(|| Error::Internal("no scratch buffer".into()))?;
        let src_dt = dt_code(p.src.dtype).unwrap_or(DT_F32);
        let upto = match fin {
            Final::Out { .. } => steps.len(),
            Final::ColSum { step, .. } => step,
        };
        let mut cur = (din, src_dt);
        for (idx, s) in steps[..upto].iter().enumerate() {
            let last = matches!(fin, Final::Out { .. }) && idx + 1 == upto;
            let dest = match fin {
                Final::Out { dt, .. } if last => (dout, dt),
                _ => (v, DT_F32),
            };
            match &s.dora {
                Dora::Rows(mag) => {
                    self.launch_lora(s, i0, m, n, p.wd, cur, (v, DT_F32), 0, false)?;
                    let a = DoraRowsArgs {
                        v,
                        mag: dptr(mag, &self.comp) + (i0 * 4) as u64,
                        out: if last { dest.0 } else { 0 },
                        m: m as i32,
                        n: n as i32,
                        wd: p.wd,
                        out_dt: dest.1,
                    };
                    let cfg = LaunchConfig {
                        grid_dim: (m as u32, 1, 1),
                        block_dim: (THREADS, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let mut b = self.comp.launch_builder(&self.k.dora_rows);
                    b.arg(&a);
                    // SAFETY: v holds m·n values, mag rows i0..i0+m, out m·n of out_dt.
                    unsafe { b.launch(cfg) }.map_err(|e| dev_err("launch", e))?;
                }
                Dora::Cols { colf, .. } => {
                    let cf = colf
                        .as_ref()
                        .map(|c| dptr(c, &self.comp))
                        .ok_or_else(|| Error::Internal("DoRA column factors missing".into()))?;
                    self.launch_lora(s, i0, m, n, p.wd, cur, dest, cf, true)?;
                }
                Dora::None => self.launch_lora(s, i0, m, n, p.wd, cur, dest, 0, true)?,
            }
            cur = (v, DT_F32);
        }
        if let Final::ColSum { step, colsum } = fin {
            let s = &steps[step];
            self.launch_lora(s, i0, m, n, p.wd, cur, (v, DT_F32), 0, false)?;
            let a = ColSumsqArgs {
                v,
                colsum,
                m: m as i32,
                n: n as i32,
            };
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(THREADS as usize) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.comp.launch_builder(&self.k.col_sumsq);
            b.arg(&a);
            // SAFETY: v holds m·n values, colsum n.
            unsafe { b.launch(cfg) }.map_err(|e| dev_err("launch", e))?;
        }
        Ok(())
    }

    /// One pass over all bands of the tensor: copy in, compute, and (for Final::Out) copy
    /// out and hand to the sink, with up to SLOTS bands in flight.
    #[allow(clippy::too_many_arguments)]
    fn pass(
        &mut self,
        p: &GpuPlan,
        steps: &[DevStep],
        src: &[u8],
        band_rows: usize,
        fin: Final,
        sink: Option<&mut dyn TensorSink>,
        check: Option<Dtype>,
    ) -> Result<NonFinite> {
        let (rows, cols) = (p.rows, p.cols);
        let mut created = NonFinite::default();
        let in_es = p.src.dtype.size();
        let out_es = match fin {
            Final::Out { es, .. } => es,
            Final::ColSum { .. } => 0,
        };
        let writes = matches!(fin, Final::Out { .. });
        let mut sink = sink;
        let nb = rows.div_ceil(band_rows);
        // (band, slot, out bytes) copied out but not yet written.
        let mut pending: VecDeque<(usize, usize, usize)> = VecDeque::new();
        for b in 0..nb {
            let si = b % SLOTS;
            let i0 = b * band_rows;
            let m = band_rows.min(rows - i0);
            let inb = m * cols * in_es;
            let outb = m * cols * out_es;
            let slot = &mut self.slots[si];
            // The pinned buffer's previous upload (band b - SLOTS) has finished.
            slot.ev_h2d
                .synchronize()
                .map_err(|e| dev_err("wait for upload", e))?;
            let (Some(pin_in), Some(d_in), Some(d_out)) = (
                slot.pin_in.as_mut(),
                slot.d_in.as_ref(),
                slot.d_out.as_ref(),
            ) else {
                return Err(Error::Internal("band buffers missing".into()));
            };
            let host = pin_in
                .as_mut_slice()
                .map_err(|e| dev_err("pinned buffer", e))?;
            let from = &src[i0 * cols * in_es..i0 * cols * in_es + inb];
            host[..inb]
                .par_chunks_mut(1 << 20)
                .zip(from.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            let (din, dout) = (dptr(d_in, &self.h2d), dptr(d_out, &self.comp));
            // The kernels of band b - SLOTS have finished reading d_in.
            self.h2d
                .wait(&slot.ev_comp)
                .map_err(|e| dev_err("stream wait", e))?;
            // SAFETY: d_in holds ≥ inb bytes (ensure); host[..inb] stays untouched until
            // ev_h2d has passed (checked before the next fill of this slot).
            unsafe { drv::memcpy_htod_async(din, &host[..inb], self.h2d.cu_stream()) }
                .map_err(|e| dev_err("copy to device", e))?;
            slot.ev_h2d
                .record(&self.h2d)
                .map_err(|e| dev_err("event", e))?;
            self.comp
                .wait(&slot.ev_h2d)
                .map_err(|e| dev_err("stream wait", e))?;
            // d_out's previous contents (band b - SLOTS) are on the host.
            self.comp
                .wait(&slot.ev_d2h)
                .map_err(|e| dev_err("stream wait", e))?;
            let slot = &self.slots[si];
            self.enqueue_band(p, steps, i0, m, din, dout, fin)?;
            slot.ev_comp
                .record(&self.comp)
                .map_err(|e| dev_err("event", e))?;
            if writes {
                let slot = &mut self.slots[si];
                self.d2h
                    .wait(&slot.ev_comp)
                    .map_err(|e| dev_err("stream wait", e))?;
                let Some(pin_out) = slot.pin_out.as_mut() else {
                    return Err(Error::Internal("band buffers missing".into()));
                };
                let host = pin_out
                    .as_mut_slice()
                    .map_err(|e| dev_err("pinned buffer", e))?;
                // SAFETY: d_out holds ≥ outb bytes written by the band's last kernel; the
                // host buffer is not read before ev_d2h has passed.
                unsafe { drv::memcpy_dtoh_async(&mut host[..outb], dout, self.d2h.cu_stream()) }
                    .map_err(|e| dev_err("copy from device", e))?;
                slot.ev_d2h
                    .record(&self.d2h)
                    .map_err(|e| dev_err("event", e))?;
                pending.push_back((b, si, outb));
                while pending.len() >= SLOTS {
                    let out = Drained {
                        sink: &mut sink,
                        check,
                        created: &mut created,
                    };
                    self.drain(p, src, &mut pending, band_rows, out)?;
                }
            }
        }
        while !pending.is_empty() {
            let out = Drained {
                sink: &mut sink,
                check,
                created: &mut created,
            };
            self.drain(p, src, &mut pending, band_rows, out)?;
        }
        if !writes {
            self.comp
                .synchronize()
                .map_err(|e| dev_err("synchronize", e))?;
        }
        Ok(created)
    }

    /// Checks the oldest band copied out, writes it to the sink (unless the tensor already
    /// has created non-finite values: then it only counts them) and releases its input
    /// pages. `src`: the bytes the merge started from (W or its last replacement).
    fn drain(
        &self,
        p: &GpuPlan,
        src: &[u8],
        pending: &mut VecDeque<(usize, usize, usize)>,
        band_rows: usize,
        out: Drained<'_, '_>,
    ) -> Result<()> {
        let Drained {
            sink,
            check,
            created,
        } = out;
        let Some((b, si, outb)) = pending.pop_front() else {
            return Ok(());
        };
        let slot = &self.slots[si];
        slot.ev_d2h
            .synchronize()
            .map_err(|e| dev_err("wait for copy from device", e))?;
        let Some(pin_out) = slot.pin_out.as_ref() else {
            return Err(Error::Internal("band buffers missing".into()));
        };
        let host = pin_out
            .as_slice()
            .map_err(|e| dev_err("pinned buffer", e))?;
        let i0 = b * band_rows;
        if let Some(out_dtype) = check {
            let (ses, oes) = (p.src.dtype.size(), out_dtype.size());
            for h in encoded_non_finite(out_dtype, &host[..outb]) {
                let at = i0 * p.cols + h;
                let (mut was, mut now) = ([0f32], [0f32]);
                decode_f32(p.src.dtype, &src[at * ses..(at + 1) * ses], &mut was);
                decode_f32(out_dtype, &host[h * oes..(h + 1) * oes], &mut now);
                if was[0].is_finite() {
                    created.add(at, now[0]);
                }
            }
        }
        if let Some(sink) = sink.as_mut().filter(|_| created.count == 0) {
            sink.write(&host[..outb])?;
        }
        if let Some((start, _)) = p.src.contiguous_range() {
            let es = p.src.dtype.size();
            let m = band_rows.min(p.rows - i0);
            p.src
                .file
                .release(start + i0 * p.cols * es, m * p.cols * es);
        }
        Ok(())
    }

    /// Merges `p` into `sink`; returns the non-finite values the merge created (always
    /// none unless `check`), for the caller to turn into the error.
    pub(super) fn run(
        &mut self,
        p: &GpuPlan,
        out_dtype: Dtype,
        band_elems: usize,
        check: bool,
        sink: &mut dyn TensorSink,
    ) -> Result<NonFinite> {
        self.bind()?;
        self.idle()?;
        let internal = |m: &str| Error::tensor(p.src.file.path(), &p.src.name, m.to_string());
        let out_dt =
            dt_code(out_dtype).ok_or_else(|| internal("internal: output dtype is not floating"))?;
        let src = Host::of(p.src)
            .ok_or_else(|| internal("internal: tensor bytes do not match its shape"))?;
        let mut band_rows = (band_elems / p.cols.max(1)).max(1);
        if band_rows >= TILE_M {
            band_rows -= band_rows % TILE_M;
        }
        band_rows = band_rows.min(p.rows).min(65535 * TILE_M);
        let elems = band_rows * p.cols;
        let pelems = if p.steps.iter().any(|l| l.r > KC) {
            elems
        } else {
            0
        };
        self.ensure(elems * src.es, elems * out_dtype.size(), elems, pelems)?;
        let mut steps = self.upload_steps(p)?;
        // DoRA on columns: one pass per such step for its column norms, in step order.
        for j in 0..steps.len() {
            if !matches!(steps[j].dora, Dora::Cols { .. }) {
                continue;
            }
            let colsum = self
                .comp
                .alloc_zeros::<f64>(p.cols)
                .map_err(|e| dev_err("allocate", e))?;
            let fin = Final::ColSum {
                step: j,
                colsum: dptr(&colsum, &self.comp),
            };
            self.pass(p, &steps, &src.bytes, band_rows, fin, None, None)?;
            let sums = self
                .comp
                .clone_dtoh(&colsum)
                .map_err(|e| dev_err("copy from device", e))?;
            self.comp
                .synchronize()
                .map_err(|e| dev_err("synchronize", e))?;
            if let Dora::Cols { mag, .. } = &steps[j].dora {
                let f: Vec<f32> = mag
                    .iter()
                    .zip(&sums)
                    .map(|(m, s)| m / (s.sqrt() as f32))
                    .collect();
                let colf = self.upload_f32(&f)?;
                steps[j].dora = Dora::Cols {
                    mag: Vec::new(),
                    colf: Some(colf),
                };
            }
        }
        let fin = Final::Out {
            dt: out_dt,
            es: out_dtype.size(),
        };
        let check = check.then_some(out_dtype);
        let r = self.pass(p, &steps, &src.bytes, band_rows, fin, Some(sink), check);
        // Whatever happened, nothing may still run when the step buffers are freed.
        let idle = self.idle();
        drop(steps);
        let created = r?;
        idle.map(|()| created)
    }
}

/// One timing of the fused kernel alone, on device-resident data.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelBench {
    pub device: String,
    pub rows: usize,
    pub cols: usize,
    pub r: usize,
    pub dtype: String,
    pub iters: usize,
    pub seconds_per_launch: f64,
    /// (W in + out + both factors) bytes / time.
    pub bytes_per_second: f64,
    /// 2·rows·cols·r / time.
    pub flop_per_second: f64,
    /// From the memory clock and bus width the driver reports (None if it reports none).
    pub peak_bytes_per_second: Option<f64>,
    /// SMs × FP32 lanes per SM × 2 × SM clock.
    pub peak_fp32_flop_per_second: Option<f64>,
}

impl Gpu {
    /// Times the fused kernel (one LoRA step, no DoRA, W and output in `dtype`) on a
    /// rows × cols weight with rank `r`, data already on the GPU (`device`: the
    /// backend's description, for the report).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bench_lora_kernel(
        &mut self,
        device: &str,
        rows: usize,
        cols: usize,
        r: usize,
        dtype: Dtype,
        iters: usize,
    ) -> Result<KernelBench> {
        let dt =
            dt_code(dtype).ok_or_else(|| Error::Usage("bench dtype must be floating".into()))?;
        let es = dtype.size();
        let g = self;
        g.bind()?;
        g.ensure(0, 0, 0, if r > KC { rows * cols } else { 0 })?;
        // Deterministic small values (|x| < 0.05) in the bench dtype.
        let fill = |n: usize, seed: u64| -> Vec<u8> {
            let mut x = seed | 1;
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                })
                .collect();
            let mut out = vec![0u8; n * es];
            crate::dtype::encode_f32(dtype, &vals, &mut out);
            out
        };
        let w = g.upload_bytes(&fill(rows * cols, 1))?;
        let host = |bytes: Vec<u8>| Host {
            bytes: Cow::Owned(bytes),
            dt,
            es,
        };
        let step = DevStep {
            lt: g.factor_f32(&host(fill(rows * r, 2)), r, rows, 1, r as i64)?,
            rc: g.factor_f32(&host(fill(r * cols, 3)), r, cols, cols as i64, 1)?,
            rows,
            k: r,
            scale: 0.5,
            round_delta_first: false,
            dora: Dora::None,
        };
        // SAFETY: written by the kernel before anything reads it.
        let out =
            unsafe { g.comp.alloc::<u8>(rows * cols * es) }.map_err(|e| dev_err("allocate", e))?;
        let (wp, op) = (dptr(&w, &g.comp), dptr(&out, &g.comp));
        let launch = || g.launch_lora(&step, 0, rows, cols, dt, (wp, dt), (op, dt), 0, true);
        launch()?;
        launch()?;
        let ev = |f| g.ctx.new_event(Some(f)).map_err(|e| dev_err("event", e));
        let (t0, t1) = (
            ev(drv_sys::CUevent_flags::CU_EVENT_DEFAULT)?,
            ev(drv_sys::CUevent_flags::CU_EVENT_DEFAULT)?,
        );
        t0.record(&g.comp).map_err(|e| dev_err("event", e))?;
        for _ in 0..iters.max(1) {
            launch()?;
        }
        t1.record(&g.comp).map_err(|e| dev_err("event", e))?;
        let ms = t0.elapsed_ms(&t1).map_err(|e| dev_err("timing", e))? as f64;
        g.idle()?;
        let secs = ms / 1e3 / iters.max(1) as f64;
        let bytes = (2 * rows * cols + rows * r + r * cols) * es;
        let attr = |a| g.ctx.attribute(a).ok().filter(|&v| v > 0).map(|v| v as f64);
        use drv_sys::CUdevice_attribute_enum::*;
        let peak_bw = attr(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)
            .zip(attr(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH))
            .map(|(khz, bits)| 2.0 * khz * 1e3 * bits / 8.0);
        let (major, minor) = g.ctx.compute_capability().unwrap_or((0, 0));
        let lanes = match (major, minor) {
            (6, 0) | (7, _) | (8, 0) => 64.0,
            _ => 128.0,
        };
        let peak_fp32 = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .zip(attr(CU_DEVICE_ATTRIBUTE_CLOCK_RATE))
            .map(|(sms, khz)| sms * lanes * 2.0 * khz * 1e3);
        Ok(KernelBench {
            device: device.to_string(),
            rows,
            cols,
            r,
            dtype: dtype.name().to_string(),
            iters: iters.max(1),
            seconds_per_launch: secs,
            bytes_per_second: bytes as f64 / secs,
            flop_per_second: 2.0 * (rows * cols * r) as f64 / secs,
            peak_bytes_per_second: peak_bw,
            peak_fp32_flop_per_second: peak_fp32,
        })
    }
}
