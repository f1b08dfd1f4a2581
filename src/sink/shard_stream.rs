//! `ShardStream`: the part of a folder writer that does not depend on where its shards
//! go. It takes the tensors of a plan in order (checked by a `PlanCursor`), sends each to
//! the `SafetensorsWriter` of the shard it belongs to, opening a shard's file when its
//! first tensor begins and completing the one before, and at the end writes the shards no
//! tensor opened (the one empty shard of an empty output) before handing over to the
//! owner's last step. The owner, a `ShardFiles`, decides how a shard's file is created and
//! completed: `sharded::FolderShards` (a single run's folder, see `sharded.rs`) and
//! `parts::PartShards` (one part, `--part K/N`, see `parts.rs`).

use super::safetensors::SafetensorsWriter;
use super::{OutTensor, PlanCursor, SharedBytes, TensorSink};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Where the shards of a `ShardStream` go.
pub trait ShardFiles: Send {
    /// Creates the file of shard `at` and its writer.
    fn open(&mut self, at: usize) -> Result<SafetensorsWriter>;
    /// Completes shard `at` once its last tensor is written.
    fn close(&mut self, at: usize, writer: SafetensorsWriter) -> Result<()>;
    /// After every shard is complete: the files that make the output whole.
    fn finish(self) -> Result<()>;
}

pub struct ShardStream<F: ShardFiles> {
    files: F,
    /// For each tensor of the plan (cursor order), the shard it belongs to.
    shard_of: Vec<usize>,
    /// Which shards have been opened.
    opened: Vec<bool>,
    current: Option<(usize, SafetensorsWriter)>,
    cursor: PlanCursor,
}

impl<F: ShardFiles> ShardStream<F> {
    /// Tensors `plan`, in order, the `i`th into shard `shard_of[i]` of `shards`.
    pub(super) fn new(files: F, plan: &[OutTensor], shard_of: Vec<usize>, shards: usize) -> Self {
        ShardStream {
            files,
            shard_of,
            opened: vec![false; shards],
            current: None,
            cursor: PlanCursor::new(plan),
        }
    }

    /// Completes the open shard, then opens shard `at`.
    fn open_shard(&mut self, at: usize) -> Result<()> {
        self.close_shard()?;
        let writer = self.files.open(at)?;
        self.opened[at] = true;
        self.current = Some((at, writer));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        match self.current.take() {
            Some((at, writer)) => self.files.close(at, writer),
            None => Ok(()),
        }
    }

    fn writer(&mut self) -> Result<&mut SafetensorsWriter> {
        match &mut self.current {
            Some((_, w)) => Ok(w),
            None => Err(Error::Internal("no shard open".into())),
        }
    }
}

impl<F: ShardFiles> TensorSink for ShardStream<F> {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        let i = self.cursor.begin(t)?;
        let at = self.shard_of[i];
        if self.current.as_ref().map(|(s, _)| *s) != Some(at) {
            self.open_shard(at)?;
        }
        self.writer()?.begin(t)
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.cursor.write(bytes.len())?;
        self.writer()?.write(bytes)
    }
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        self.cursor.write(len)?;
        self.writer()?.write_shared(src, start, len)
    }
    fn end(&mut self) -> Result<()> {
        self.cursor.end()?;
        self.writer()?.end()
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        self.cursor.check_complete()?;
        self.close_shard()?;
        // Shards without tensors (the one shard of an empty output) are still written.
        for at in 0..self.opened.len() {
            if !self.opened[at] {
                self.open_shard(at)?;
                self.close_shard()?;
            }
        }
        self.files.finish()
    }
}
