//! Compute: turns the plan's checked jobs into output bytes, band by band. Backends sit
//! behind [`DeltaBackend`]; readers, plan and writers never know which one runs.
//!
//! A backend is handed the whole work list of a run ([`WorkItem`]s: ties, copies, merges,
//! sampled rows) and walks it itself (`walk.rs`, shared by every backend), so it sees
//! what comes next and reads ahead on its own. What differs between backends is only how
//! one merge is computed: their engine (`walk::Engine`).

mod convert;
pub mod cpu;
pub mod cuda;
pub mod finite;
pub mod fp8_block;
pub mod gemm;
mod read_ahead;
pub mod rows;
mod walk;

pub use walk::{Source, Task, WorkItem};

use crate::error::{Error, Result};
use crate::plan::checked::CheckedMerge;
use crate::sink::TensorSink;
use std::time::Duration;

/// A pool of `threads` workers (None: one per core, at least one) and its size; `what`
/// names the workers in the error when they cannot be started. The CPU backend and the
/// FP8 re-quantizer size theirs from the same `--threads`.
pub(crate) fn worker_pool(
    threads: Option<usize>,
    what: &str,
) -> Result<(rayon::ThreadPool, usize)> {
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Device(format!("cannot start {threads} {what} threads: {e}")))?;
    Ok((pool, threads))
}
use walk::Engine;

/// Something that produces a run's tensors, computing merges, into a sink.
pub trait DeltaBackend: Send + Sync {
    /// Produces every item of `work`, in order, into `sink` (each tensor begun and ended
    /// there); `observer` is told each finished item: its index in `work` and how long it
    /// took. Sampled rows come out as the whole merge computes them.
    fn run(
        &self,
        work: &[WorkItem<'_>],
        sink: &mut dyn TensorSink,
        observer: &mut dyn FnMut(usize, Duration),
    ) -> Result<()>;
    /// For messages and reports ("cpu (8 threads, avx512)").
    fn describe(&self) -> String;
    /// Whether merges that create inf/NaN fail (default: on; see `finite.rs`). Every
    /// backend must implement it: one that ignored it would write such tensors silently.
    fn set_check_non_finite(&mut self, on: bool);
}

/// The backend of a run that computes nothing (copies and ties only: `--keep-lora`, a
/// base without adapters), so that no GPU is probed and no worker thread started.
pub struct NoDeltas;

impl Engine for NoDeltas {
    type Run = ();
    fn merge(
        &self,
        _: &mut (),
        _: CheckedMerge<'_>,
        _: Option<CheckedMerge<'_>>,
        _: &mut dyn TensorSink,
    ) -> Result<()> {
        Err(Error::Internal("a delta to compute but no backend".into()))
    }
}

impl DeltaBackend for NoDeltas {
    fn run(
        &self,
        work: &[WorkItem<'_>],
        sink: &mut dyn TensorSink,
        observer: &mut dyn FnMut(usize, Duration),
    ) -> Result<()> {
        walk::run(self, work, sink, observer)
    }
    fn describe(&self) -> String {
        "none".into()
    }
    /// Nothing is computed, so nothing can turn non-finite.
    fn set_check_non_finite(&mut self, _: bool) {}
}
