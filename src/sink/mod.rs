//! Sinks: writers that receive planned tensors one at a time, their bytes in pieces, and
//! produce a checkpoint incrementally. Every sink knows the full list of tensors up front
//! (`OutTensor`s), so headers can be written before data and the shard layout decided;
//! bytes go straight to a buffered file, so memory does not grow with the model.
//!
//! Sinks know nothing of sources: they see names, dtypes, shapes and bytes.

mod atomic;
mod compare;
mod direct_file;
pub mod gguf;
pub mod part_plan;
mod parts;
mod pickle_writer;
mod preflight;
mod safetensors;
mod shard_stream;
mod sharded;
mod torch_zip;
mod write_behind;

pub(crate) use atomic::sync_dir;
pub use atomic::{TempOutput, install_interrupt_cleanup};
pub use compare::{CompareSink, Expected};
pub use direct_file::DirectFileWriter;
pub(crate) use parts::foreign_weight_files;
pub use parts::{
    LayoutEntry, MANIFEST_FORMAT, Manifest, PARTS_DIR, PartWriter, STAGED_FILES, WrittenFile,
    WrittenShard, check_part_folder, manifest_name, sha256_file,
};
pub use pickle_writer::{PickledTensor, state_dict_pickle};
pub use preflight::preflight;
pub use safetensors::SafetensorsWriter;
pub(crate) use sharded::{INDEX, index_text};
pub use sharded::{ShardedSafetensorsWriter, check_output_folder, split as split_shards};
pub use torch_zip::TorchZipWriter;

use crate::direct_io::AlignedBuf;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor of the output, as planned.
#[derive(Clone, Debug, PartialEq)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutTensor {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * self.dtype.size() as u64
    }
}

/// Bytes owned elsewhere (a memory-mapped input, say) that a writer may read on another
/// thread without a copy; `done` is told when a range has been written.
pub trait SharedBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
    fn done(&self, _start: usize, _len: usize) {}
    /// The file the bytes are read from, byte 0 = `bytes()[0]`, when there is one: a
    /// writer may then copy ranges in the kernel without touching them.
    fn file(&self) -> Option<&std::fs::File> {
        None
    }
    /// Reads `bytes()[start..start + len]` into `buf` and says where they landed; a
    /// file-backed source reads with a positioned (ideally direct) read instead of
    /// touching its map. Errors name the source.
    fn read_at(
        &self,
        start: usize,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> std::io::Result<std::ops::Range<usize>> {
        let src = self.bytes().get(start..start + len).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
        })?;
        buf.reserve(len);
        buf.as_mut_slice()[..len].copy_from_slice(src);
        Ok(0..len)
    }
}

/// The interface every writer offers. Calls come in plan order:
/// `begin(t0) write* end  begin(t1) write* end … finish`.
pub trait TensorSink: Send {
    /// Starts the next planned tensor; `t` must be the next tensor of the plan.
    fn begin(&mut self, t: &OutTensor) -> Result<()>;
    /// Appends bytes of the current tensor.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Appends bytes the caller no longer needs (lets a pipelined sink skip a copy).
    fn write_owned(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.write(&bytes)
    }
    /// Appends `src.bytes()[start..start + len]` (any size: read a piece at a time); a
    /// pipelined sink passes the reference to its writer thread instead of copying.
    /// This default reads 8 MiB at a time with `SharedBytes::read_at`: bounded memory
    /// however big the range, and no pages of a mapped source left resident.
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        let mut buf = AlignedBuf::default();
        let mut at = 0;
        while at < len {
            let n = (8 << 20).min(len - at);
            let r = src
                .read_at(start + at, n, &mut buf)
                .map_err(|e| Error::Plan(format!("copying a tensor failed: {e}")))?;
            self.write(&buf.as_slice()[r])?;
            at += n;
        }
        src.done(start, len);
        Ok(())
    }
    /// A buffer to fill and pass to `write_owned`; a pipelined sink hands back recycled
    /// ones, so big buffers are not allocated (and page-faulted) for every piece. It may
    /// hold old bytes: set its length (`resize`) and overwrite them.
    fn buffer(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// Ends the current tensor; all of its bytes must have arrived.
    fn end(&mut self) -> Result<()>;
    /// Whether the format can store a planned tensor as a view of an earlier one's storage
    /// (PyTorch zip: tied weights, as `torch.save` writes them). Known when the sink is made.
    fn shares_storage(&self) -> bool {
        false
    }
    /// Records the next planned tensor `t` as sharing the storage of planned tensor `to`
    /// (an earlier one with the same bytes, dtype and shape) instead of `begin`/`write`/
    /// `end`. Only called when [`TensorSink::shares_storage`] says so.
    fn tie(&mut self, t: &OutTensor, _to: usize) -> Result<()> {
        Err(Error::Internal(format!(
            "this output cannot store '{}' as a tied tensor",
            t.name
        )))
    }
    /// Completes the file(s) and moves them into place.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// A sink that keeps every byte written, in order, in memory (`.0`): for tests that
/// compare the bytes of backends, and for callers that want a small result in memory.
#[derive(Debug, Default)]
pub struct MemorySink(pub Vec<u8>);

impl TensorSink for MemorySink {
    fn begin(&mut self, _: &OutTensor) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Output formats, chosen from the output path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// `.pth`, `.pt`, `.bin`: a PyTorch zip checkpoint.
    TorchZip,
    /// `.safetensors`
    Safetensors,
    /// An existing folder or a path ending in `/`: HF sharded safetensors.
    ShardedSafetensors,
}

impl OutputFormat {
    pub fn from_path(path: &Path) -> Result<OutputFormat> {
        let s = path.to_string_lossy();
        if s.ends_with('/') || path.is_dir() {
            return Ok(OutputFormat::ShardedSafetensors);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("pth" | "pt" | "bin") => Ok(OutputFormat::TorchZip),
            Some("safetensors") => Ok(OutputFormat::Safetensors),
            _ => Err(Error::Usage(format!(
                "cannot tell the output format of '{s}': use a .pth/.pt/.bin file (PyTorch), a \
                 .safetensors file, or a folder ending in '/' (sharded safetensors)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::TorchZip => "torch-zip",
            OutputFormat::Safetensors => "safetensors",
            OutputFormat::ShardedSafetensors => "sharded-safetensors",
        }
    }
}

/// Options that apply to some formats.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Largest shard of a sharded output, in bytes (a bigger tensor gets a shard alone).
    pub shard_size: u64,
    /// Write around the page cache (`O_DIRECT`) where the filesystem allows: no kernel
    /// copy per byte, no output left dirty in the cache. Off: ordinary buffered writes.
    pub direct_io: bool,
    /// A folder output may go into a folder that already holds checkpoint files; those the
    /// new output does not replace are removed once it is in place.
    pub overwrite: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            shard_size: 5_000_000_000,
            direct_io: true,
            overwrite: false,
        }
    }
}

/// A file that goes beside the tensors of a folder output (an HF model folder's config,
/// tokenizer, custom code): copied from `source` as `name`. When `set` is not empty the
/// file is a JSON object whose top-level keys `set` replaces or adds (`torch_dtype` after
/// a cast). Sinks copy bytes; which files, and which keys, is the job's business.
#[derive(Clone, Debug)]
pub struct SideFile {
    pub source: PathBuf,
    pub name: String,
    pub set: Vec<(String, serde_json::Value)>,
}

/// `out` without a trailing `/` (the folder's own path).
fn dest_of(out: &Path) -> &Path {
    let dest = Path::new(
        out.to_str()
            .map(|s| s.trim_end_matches('/'))
            .unwrap_or_default(),
    );
    if dest.as_os_str().is_empty() {
        out
    } else {
        dest
    }
}

/// Checks, before any work, that `out` can be written with these options: a folder output
/// into an existing folder that holds checkpoint files needs `overwrite`.
pub fn check_output(out: &Path, opts: &SinkOptions) -> Result<()> {
    if OutputFormat::from_path(out)? == OutputFormat::ShardedSafetensors {
        check_output_folder(dest_of(out), opts.overwrite)?;
    }
    Ok(())
}

/// Opens the writer for `out`, whose format follows from its path.
pub fn create(out: &Path, plan: &[OutTensor], opts: &SinkOptions) -> Result<Box<dyn TensorSink>> {
    create_with(out, plan, opts, &[])
}

/// Opens the writer for `out`, with files to copy beside the tensors (a folder output
/// only: a single-file output has nowhere to put them, which is an error here).
pub fn create_with(
    out: &Path,
    plan: &[OutTensor],
    opts: &SinkOptions,
    side_files: &[SideFile],
) -> Result<Box<dyn TensorSink>> {
    let dest = dest_of(out);
    let format = OutputFormat::from_path(out)?;
    if format != OutputFormat::ShardedSafetensors && !side_files.is_empty() {
        return Err(Error::Plan(format!(
            "internal: files to copy beside a single-file output '{}'",
            out.display()
        )));
    }
    Ok(match format {
        OutputFormat::TorchZip => Box::new(TorchZipWriter::create(dest, plan, opts.direct_io)?),
        OutputFormat::Safetensors => {
            Box::new(SafetensorsWriter::create(dest, plan, opts.direct_io)?)
        }
        OutputFormat::ShardedSafetensors => Box::new(ShardedSafetensorsWriter::create(
            dest, plan, opts, side_files,
        )?),
    })
}

/// Opens part `plan.part` of the folder output `out` (see [`PartWriter`]); `out` must be
/// a folder output (a path ending in '/', or an existing folder).
pub fn create_part(
    out: &Path,
    full: &[OutTensor],
    opts: &SinkOptions,
    side_files: &[SideFile],
    plan: part_plan::PartPlan,
) -> Result<Box<dyn TensorSink>> {
    check_part_output(out)?;
    Ok(Box::new(PartWriter::create(
        dest_of(out),
        full,
        opts,
        side_files,
        plan,
    )?))
}

/// `--part` writes a sharded folder: any other output is a usage error.
pub fn check_part_output(out: &Path) -> Result<()> {
    if OutputFormat::from_path(out)? != OutputFormat::ShardedSafetensors {
        return Err(Error::Usage(format!(
            "--part writes shards of a folder output, and {} is one file; name a folder ending              in '/'",
            out.display()
        )));
    }
    Ok(())
}

/// `out` without a trailing '/' (the folder a folder output is).
pub fn folder_of(out: &Path) -> &Path {
    dest_of(out)
}

/// Tracks a writer's position in its plan and checks the call order and byte counts.
#[derive(Debug)]
pub(crate) struct PlanCursor {
    plan: Vec<OutTensor>,
    next: usize,
    remaining: Option<u64>,
}

impl PlanCursor {
    pub(crate) fn new(plan: &[OutTensor]) -> PlanCursor {
        PlanCursor {
            plan: plan.to_vec(),
            next: 0,
            remaining: None,
        }
    }

    pub(crate) fn plan(&self) -> &[OutTensor] {
        &self.plan
    }

    /// The name of the tensor being written (the last one begun), for messages.
    pub(crate) fn current_name(&self) -> &str {
        self.next
            .checked_sub(1)
            .and_then(|i| self.plan.get(i))
            .map_or("", |t| t.name.as_str())
    }

    /// Index of the tensor being started.
    pub(crate) fn begin(&mut self, t: &OutTensor) -> Result<usize> {
        let i = self.next;
        match self.plan.get(i) {
            Some(p) if p == t && self.remaining.is_none() => {
                self.remaining = Some(t.nbytes());
                self.next += 1;
                Ok(i)
            }
            _ => Err(Error::Internal(format!(
                "tensor '{}' written out of plan order",
                t.name
            ))),
        }
    }

    /// Moves past planned tensor `t` (stored as a tie to `to`, an earlier tensor of the same
    /// dtype and shape), and returns its index.
    pub(crate) fn skip_tied(&mut self, t: &OutTensor, to: usize) -> Result<usize> {
        let i = self.next;
        let ok = self.remaining.is_none()
            && self.plan.get(i) == Some(t)
            && to < i
            && self
                .plan
                .get(to)
                .is_some_and(|p| p.dtype == t.dtype && p.shape == t.shape);
        if !ok {
            return Err(Error::Internal(format!(
                "tensor '{}' tied out of plan order or to another shape",
                t.name
            )));
        }
        self.next += 1;
        Ok(i)
    }

    pub(crate) fn write(&mut self, n: usize) -> Result<()> {
        match &mut self.remaining {
            Some(r) if *r >= n as u64 => {
                *r -= n as u64;
                Ok(())
            }
            _ => Err(Error::Internal(
                "more bytes written than the tensor holds".into(),
            )),
        }
    }

    pub(crate) fn end(&mut self) -> Result<()> {
        match self.remaining.take() {
            Some(0) => Ok(()),
            _ => Err(Error::Internal(
                "tensor ended before all of its bytes were written".into(),
            )),
        }
    }

    pub(crate) fn check_complete(&self) -> Result<()> {
        if self.next == self.plan.len() && self.remaining.is_none() {
            Ok(())
        } else {
            Err(Error::Internal(
                "output finished before every planned tensor was written".into(),
            ))
        }
    }
}
