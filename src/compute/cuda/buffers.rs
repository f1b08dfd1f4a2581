//! Buffers and streams: the three streams (upload, compute, download), the slots of
//! pinned host and device buffers that bands travel through (allocated once, grown when a
//! tensor needs more, reused), the per-band scratch, and the uploads of whole tensors.
//! Streams are ordered by events only (cudarc's own tracking is off), so nothing here is
//! freed or replaced while a stream may still use it: growing waits for the device first.

use super::compile::Kernels;
use super::jobs::dt_code;
use super::library::{driver_error, open_device};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, result as drv,
};
use std::borrow::Cow;
use std::sync::Arc;

/// Band buffers in flight (H2D, kernel, D2H).
pub(super) const SLOTS: usize = 3;

pub(super) fn dev_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("CUDA: {what}: {e}"))
}

/// Device address of a buffer (event tracking is off: nothing is recorded).
pub(super) fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// One slot of a band in flight: its pinned and device buffers, and the events that order
/// the streams' uses of them.
pub(super) struct Slot {
    pub(super) pin_in: Option<PinnedHostSlice<u8>>,
    pub(super) pin_out: Option<PinnedHostSlice<u8>>,
    pub(super) d_in: Option<CudaSlice<u8>>,
    pub(super) d_out: Option<CudaSlice<u8>>,
    pub(super) ev_h2d: CudaEvent,
    pub(super) ev_comp: CudaEvent,
    pub(super) ev_d2h: CudaEvent,
}

/// The device, its streams, kernels and reusable buffers (behind the backend's mutex).
pub(super) struct Gpu {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) h2d: Arc<CudaStream>,
    pub(super) comp: Arc<CudaStream>,
    pub(super) d2h: Arc<CudaStream>,
    pub(super) k: Kernels,
    pub(super) slots: Vec<Slot>,
    /// f32 scratch value of one band.
    pub(super) v: Option<CudaSlice<f32>>,
    /// f32 running sums of one band (ranks above KC).
    pub(super) part: Option<CudaSlice<f32>>,
}

impl Gpu {
    /// Opens GPU `ordinal` with its kernels, streams and (empty) slots; also returns the
    /// backend's description ("cuda:0 (NAME, sm_90)").
    pub(super) fn new(ordinal: usize) -> std::result::Result<(Gpu, String), String> {
        let super::library::Device {
            ctx,
            name,
            major,
            minor,
        } = open_device(ordinal)?;
        let k = Kernels::load(&ctx, major, minor)?;
        let stream = || ctx.new_stream().map_err(|e| driver_error("stream", e));
        let (h2d, comp, d2h) = (stream()?, stream()?, stream()?);
        let ev = || ctx.new_event(None).map_err(|e| driver_error("event", e));
        let mut slots = Vec::with_capacity(SLOTS);
        for _ in 0..SLOTS {
            slots.push(Slot {
                pin_in: None,
                pin_out: None,
                d_in: None,
                d_out: None,
                ev_h2d: ev()?,
                ev_comp: ev()?,
                ev_d2h: ev()?,
            });
        }
        let desc = format!("cuda:{ordinal} ({name}, sm_{major}{minor})");
        Ok((
            Gpu {
                ctx,
                h2d,
                comp,
                d2h,
                k,
                slots,
                v: None,
                part: None,
            },
            desc,
        ))
    }
}
impl Gpu {
    pub(super) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))
    }

    /// Waits until every stream is idle (before buffers are replaced, after errors).
    pub(super) fn idle(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    pub(super) fn upload_bytes(&self, data: &[u8]) -> Result<CudaSlice<u8>> {
        // SAFETY: filled by the copy below before any kernel reads it.
        let d = unsafe { self.comp.alloc::<u8>(data.len().max(1)) }
            .map_err(|e| dev_err("allocate", e))?;
        if !data.is_empty() {
            // SAFETY: d holds at least data.len() bytes; a pageable source is staged by
            // the driver before the call returns.
            unsafe { drv::memcpy_htod_async(dptr(&d, &self.comp), data, self.comp.cu_stream()) }
                .map_err(|e| dev_err("upload", e))?;
        }
        Ok(d)
    }

    pub(super) fn upload_f32(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.comp.clone_htod(data).map_err(|e| dev_err("upload", e))
    }

    /// Grows a slot's buffers to hold `inb` bytes in and `outb` bytes out, the scratch
    /// value to `velems` f32 and the partial sums to `pelems`.
    pub(super) fn ensure(
        &mut self,
        inb: usize,
        outb: usize,
        velems: usize,
        pelems: usize,
    ) -> Result<()> {
        let round = |n: usize| n.max(1).next_multiple_of(1 << 20);
        let need_grow = self.slots.iter().any(|s| {
            s.pin_in.as_ref().map_or(0, |p| p.len()) < inb
                || s.pin_out.as_ref().map_or(0, |p| p.len()) < outb
                || s.d_in.as_ref().map_or(0, |d| d.len()) < inb
                || s.d_out.as_ref().map_or(0, |d| d.len()) < outb
        }) || self.v.as_ref().map_or(0, |v| v.len()) < velems
            || self.part.as_ref().map_or(0, |v| v.len()) < pelems;
        if !need_grow {
            return Ok(());
        }
        self.idle()?;
        let ctx = self.ctx.clone();
        let comp = self.comp.clone();
        let pinned = |n: usize| {
            // SAFETY: the buffer is written (by us or a D2H copy) before it is read.
            unsafe { ctx.alloc_pinned_with_flags::<u8>(round(n), 0) }
                .map_err(|e| dev_err("allocate pinned host memory", e))
        };
        let device = |n: usize| {
            // SAFETY: written by a copy or kernel before it is read.
            unsafe { comp.alloc::<u8>(round(n)) }.map_err(|e| dev_err("allocate", e))
        };
        for s in &mut self.slots {
            if s.pin_in.as_ref().map_or(0, |p| p.len()) < inb {
                s.pin_in = None;
                s.pin_in = Some(pinned(inb)?);
            }
            if s.pin_out.as_ref().map_or(0, |p| p.len()) < outb {
                s.pin_out = None;
                s.pin_out = Some(pinned(outb)?);
            }
            if s.d_in.as_ref().map_or(0, |d| d.len()) < inb {
                s.d_in = None;
                s.d_in = Some(device(inb)?);
            }
            if s.d_out.as_ref().map_or(0, |d| d.len()) < outb {
                s.d_out = None;
                s.d_out = Some(device(outb)?);
            }
        }
        let comp = self.comp.clone();
        let scratch = |n: usize| {
            // SAFETY: written by a kernel before it is read.
            unsafe { comp.alloc::<f32>(round(n * 4) / 4) }.map_err(|e| dev_err("allocate", e))
        };
        if self.v.as_ref().map_or(0, |v| v.len()) < velems {
            self.v = None;
            self.v = Some(scratch(velems)?);
        }
        if pelems > 0 && self.part.as_ref().map_or(0, |v| v.len()) < pelems {
            self.part = None;
            self.part = Some(scratch(pelems)?);
        }
        self.idle()
    }
}

/// A tensor's bytes with its dtype code and element size.
pub(super) struct Host<'a> {
    pub(super) bytes: Cow<'a, [u8]>,
    pub(super) dt: i32,
    pub(super) es: usize,
}

impl<'a> Host<'a> {
    pub(super) fn of(t: &'a TensorEntry) -> Option<Host<'a>> {
        let dt = dt_code(t.dtype)?;
        let bytes = t.bytes();
        let es = t.dtype.size();
        (bytes.len() == t.numel() * es).then_some(Host { bytes, dt, es })
    }
}
