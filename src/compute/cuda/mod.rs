//! The CUDA backend: the same arithmetic as [`super::cpu`], on an NVIDIA GPU.
//!
//! `kernels/merge.cu` is embedded and compiled by NVRTC at run time for the device's
//! architecture (`compute_XY` PTX, JIT-compiled by the driver; a `sm_XY` cubin when the
//! driver cannot load NVRTC's PTX). A merged tensor streams through the GPU in row bands:
//!
//! ```text
//! host:   copy band b of W (memory map) into pinned buffer ─┐           write band b-2 to the sink
//! h2d:                                                      └ H2D b ─┐
//! comp:                                             fused kernel(s) on b ─┐
//! d2h:                                                                  └ D2H b
//! ```
//!
//! Three slots of pinned host buffers and device buffers are allocated once (grown when a
//! tensor needs more) and reused; the three streams are ordered by events only, so the copy
//! of one band in, the kernels on another and the copy of a third out overlap. W travels in
//! its stored dtype and the output in its own, both ways once; the LoRA factors are
//! uploaded once per tensor, also in their stored dtypes (the kernel converts on load).
//!
//! Merges the GPU does not run go to the CPU engine, whole, by design (`jobs.rs`): tensors
//! without a LoRA step after their last replacement, `lora_B.bias` additions (1-D biases)
//! and the other tuners' changes.
//!
//! The non-finite check (`finite.rs`) runs on the host, on each band's output bytes as
//! they come back and before they go to the sink: an integer scan of the exponent bits,
//! and only for a band with a hit a look at the source values in the memory map. The
//! kernels stay as they are, and the GPU and CPU backends refuse exactly the same tensors.
//!
//! Nothing here panics on a machine without CUDA: the driver and NVRTC libraries are looked
//! for before cudarc touches them, and any panic cudarc raises while the backend is set up
//! becomes an `Err`.
//!
//! The parts: `library.rs` (finding the libraries, opening the device), `compile.rs`
//! (NVRTC, the kernels' module), `buffers.rs` (streams, slots, uploads), `pipeline.rs`
//! (the bands through the kernels), `jobs.rs` (which merges the GPU runs; the rest go
//! to the CPU engine, per tensor).

mod buffers;
mod compile;
mod jobs;
mod library;
mod pipeline;

pub use compile::{Compiled, KERNEL_NAMES, KERNEL_SOURCE, compile};
pub use library::{driver_present, nvrtc_present, nvrtc_version};
pub use pipeline::KernelBench;

use super::DeltaBackend;
use super::cpu::{CpuBackend, CpuRun};
use super::walk::{self, Engine, WorkItem};
use crate::error::{Error, Result};
use crate::plan::checked::CheckedMerge;
use crate::sink::TensorSink;
use buffers::Gpu;
use jobs::Placement;
use library::one_line;
use std::sync::Mutex;
use std::time::Duration;

/// Elements of W per band (default): 8 MB of bf16, 16 MB of f32.
const BAND_ELEMS: usize = 1 << 22;

/// Tuning knobs (tests and benchmarks).
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// Worker threads of the CPU backend that takes the jobs the GPU adds nothing to.
    pub threads: Option<usize>,
    /// Elements of W per band (default 4 Mi; `LORASTREAM_CUDA_BAND_ELEMS` overrides).
    pub band_elems: Option<usize>,
}

/// The GPU merge backend. Create with [`CudaBackend::new`]; it fails (never panics) with a
/// one-line reason when no usable GPU is there.
pub struct CudaBackend {
    gpu: Mutex<Gpu>,
    cpu: CpuBackend,
    desc: String,
    band_elems: usize,
    /// Refuse merges that create inf/NaN (`finite.rs`); off with `--allow-non-finite`.
    check_non_finite: bool,
}

impl CudaBackend {
    /// The backend on GPU `ordinal`, or why there is none ("libcuda not found", "no CUDA
    /// device", an NVRTC or driver error…), in one line.
    pub fn new(ordinal: usize, threads: Option<usize>) -> std::result::Result<CudaBackend, String> {
        Self::with_options(
            ordinal,
            CudaOptions {
                threads,
                band_elems: None,
            },
        )
    }

    pub fn with_options(
        ordinal: usize,
        opts: CudaOptions,
    ) -> std::result::Result<CudaBackend, String> {
        if !driver_present() {
            return Err("libcuda not found".into());
        }
        // cudarc panics where a library symbol is missing; keep that an error.
        let setup = std::panic::catch_unwind(|| Gpu::new(ordinal));
        let (gpu, desc) = match setup {
            Ok(r) => r?,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                return Err(format!("CUDA set-up failed: {}", one_line(msg)));
            }
        };
        let cpu = CpuBackend::new(opts.threads).map_err(|e| e.to_string())?;
        let band_elems = opts
            .band_elems
            .or_else(|| {
                std::env::var("LORASTREAM_CUDA_BAND_ELEMS")
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            })
            .unwrap_or(BAND_ELEMS)
            .max(1);
        Ok(CudaBackend {
            gpu: Mutex::new(gpu),
            cpu,
            desc,
            band_elems,
            check_non_finite: true,
        })
    }

    /// Times the fused kernel (one LoRA step, no DoRA, W and output in `dtype`) on a
    /// rows × cols weight with rank `r`, data already on the GPU.
    pub fn bench_lora_kernel(
        &self,
        rows: usize,
        cols: usize,
        r: usize,
        dtype: crate::dtype::Dtype,
        iters: usize,
    ) -> Result<KernelBench> {
        self.lock()?
            .bench_lora_kernel(&self.desc, rows, cols, r, dtype, iters)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Gpu>> {
        self.gpu
            .lock()
            .map_err(|_| Error::Device("CUDA backend unusable after an earlier failure".into()))
    }
}

impl Engine for CudaBackend {
    /// The CPU engine's, for the tensors it takes.
    type Run = CpuRun;

    fn merge(
        &self,
        run: &mut CpuRun,
        m: CheckedMerge<'_>,
        next: Option<CheckedMerge<'_>>,
        sink: &mut dyn TensorSink,
    ) -> Result<()> {
        let p = match jobs::place(m) {
            Placement::Gpu(p) => p,
            Placement::Cpu => {
                // The CPU reads ahead only what it merges next itself.
                let next = next.filter(|n| matches!(jobs::place(*n), Placement::Cpu));
                return self.cpu.merge(run, m, next, sink);
            }
        };
        let (base, out_dtype) = (m.base(), m.out_dtype());
        let mut gpu = self.lock()?;
        let created = gpu
            .run(&p, out_dtype, self.band_elems, self.check_non_finite, sink)
            .map_err(|e| match e {
                Error::Device(msg) => Error::tensor(base.file.path(), &base.name, msg),
                other => other,
            })?;
        // Kernels round each step into W's dtype and the last into the output's: the
        // narrower of the two is the one that overflowed.
        let narrow = if out_dtype.size() < base.dtype.size() {
            out_dtype
        } else {
            base.dtype
        };
        match created.error(base.file.path(), &base.name, p.cols, narrow) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl DeltaBackend for CudaBackend {
    fn run(
        &self,
        work: &[WorkItem<'_>],
        sink: &mut dyn TensorSink,
        observer: &mut dyn FnMut(usize, Duration),
    ) -> Result<()> {
        walk::run(self, work, sink, observer)
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn set_check_non_finite(&mut self, on: bool) {
        self.check_non_finite = on;
        self.cpu.set_check_non_finite(on);
    }
}
