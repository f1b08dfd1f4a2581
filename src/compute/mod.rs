//! Compute: turns a base tensor plus its merge steps into output bytes, band by band.
//! Backends sit behind [`DeltaBackend`]; readers, plan and writers never know which one
//! runs.

pub mod cpu;
pub mod cuda;
pub mod finite;
mod read_ahead;
pub mod rows;

use crate::dtype::Dtype;
use crate::error::Result;
use crate::plan::merge_types::Step;
use crate::sink::TensorSink;
use crate::source::TensorEntry;

/// Something that can apply merge steps to a tensor and stream the result into a sink.
pub trait DeltaBackend: Send + Sync {
    /// Writes `base` with `steps` applied, encoded as `out_dtype`, into `sink` (which has
    /// already begun the tensor).
    fn merge(
        &self,
        base: &TensorEntry,
        steps: &[Step],
        out_dtype: Dtype,
        sink: &mut dyn TensorSink,
    ) -> Result<()>;
    /// Like `merge`, told which merge comes next (`next`: its base and steps), so that a
    /// backend can read its inputs while this one computes.
    fn merge_before(
        &self,
        base: &TensorEntry,
        steps: &[Step],
        _next: Option<(&TensorEntry, &[Step])>,
        out_dtype: Dtype,
        sink: &mut dyn TensorSink,
    ) -> Result<()> {
        self.merge(base, steps, out_dtype, sink)
    }
    /// Writes only rows `rows` (indices of the first dimension, increasing) of the merge,
    /// one after another, each as `merge` would compute it: for `verify --sample`, which
    /// must not compute the whole tensor to check a few rows.
    fn merge_rows(
        &self,
        base: &TensorEntry,
        steps: &[Step],
        rows: &[usize],
        out_dtype: Dtype,
        sink: &mut dyn TensorSink,
    ) -> Result<()> {
        rows::merge_rows(self, base, steps, rows, out_dtype, sink)
    }
    /// For messages and reports ("cpu (8 threads)").
    fn describe(&self) -> String;
    /// Whether merges that create inf/NaN fail (default: on; see `finite.rs`). Every
    /// backend must implement it: one that ignored it would write such tensors silently.
    fn set_check_non_finite(&mut self, on: bool);
}
