//! `GgufWriter`: one GGUF file, laid out as the `gguf` package's GGUFWriter and ggml's
//! gguf.cpp lay it out (header, the metadata key/values, tensor infos, zero padding to the
//! alignment, then each tensor's data padded to the alignment), so a file rewritten with
//! its own metadata bytes and stored tensor bytes is the same file byte for byte.
//!
//! Each planned tensor either receives its stored ggml bytes as they are
//! ([`GgufInput::Stored`], a copy) or the values of a floating dtype
//! ([`GgufInput::Values`]), which the writer encodes block by block into the planned ggml
//! type exactly as `gguf.quants.quantize` does.

use super::atomic::TempOutput;
use super::direct_file::DirectFileWriter;
use super::{OutTensor, TensorSink};
use crate::dtype::{Dtype, decode_f32};
use crate::error::{Error, Result};
use crate::source::gguf::quants::{self, GgmlType};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the GGUF's header carries besides its tensors.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: u64,
    pub kv_count: u64,
    /// The key/value section, already serialized (copied from the input GGUF).
    pub kv_bytes: Vec<u8>,
}

/// How a planned tensor's bytes arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GgufInput {
    /// As stored in the planned ggml type (copied from an input GGUF).
    Stored,
    /// Values of this floating dtype, row-major, to encode into the planned type.
    Values(Dtype),
}

/// One tensor of the output GGUF.
#[derive(Clone, Debug)]
pub struct GgufOut {
    pub name: String,
    /// ggml order (`ne[0]` contiguous).
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    pub input: GgufInput,
}

impl GgufOut {
    /// Stored bytes in the planned type; None when the row length does not fit its blocks.
    pub fn stored_bytes(&self) -> Option<u64> {
        let bs = self.ty.block_size() as u64;
        let ne0 = self.ne.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(bs) {
            return None;
        }
        self.ne.iter().skip(1).try_fold(
            (ne0 / bs).checked_mul(self.ty.type_size() as u64)?,
            |a, &d| a.checked_mul(d),
        )
    }
    /// Bytes the writer expects for it.
    fn input_bytes(&self) -> u64 {
        match self.input {
            GgufInput::Stored => self.stored_bytes().unwrap_or(0),
            GgufInput::Values(d) => self.ne.iter().product::<u64>() * d.size() as u64,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// The header bytes (up to the aligned start of the data section) for `plan`.
pub fn header_bytes(head: &GgufHeader, plan: &[GgufOut], path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(head.kv_bytes.len() + 64 * plan.len() + 64);
    out.extend(crate::source::gguf::MAGIC);
    out.extend(head.version.to_le_bytes());
    out.extend((plan.len() as u64).to_le_bytes());
    out.extend(head.kv_count.to_le_bytes());
    out.extend(&head.kv_bytes);
    let mut offset = 0u64;
    for t in plan {
        if t.ty.block_size() > 1 && !t.ty.encodes() && t.input != GgufInput::Stored {
            return Err(Error::tensor(path, &t.name, t.ty.why_not_encoded()));
        }
        let n = t.stored_bytes().ok_or_else(|| {
            Error::tensor(
                path,
                &t.name,
                format!(
                    "row length {} is not a multiple of the {} block size {}: choose another --gguf-type \
                     (F16, BF16 or F32 fit any row)",
                    t.ne.first().copied().unwrap_or(1),
                    t.ty,
                    t.ty.block_size()
                ),
            )
        })?;
        put_str(&mut out, &t.name);
        out.extend((t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.ty.id().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += n.next_multiple_of(head.alignment);
    }
    out.resize(
        (out.len() as u64).next_multiple_of(head.alignment) as usize,
        0,
    );
    Ok(out)
}

pub struct GgufWriter {
    out: DirectFileWriter,
    temp: Option<TempOutput>,
    path: PathBuf,
    plan: Vec<GgufOut>,
    alignment: u64,
    /// Index of the tensor being written + 1 (0 before the first).
    next: usize,
    /// Bytes still expected for the current tensor; None between tensors.
    remaining: Option<u64>,
    /// Input bytes of a value tensor not yet encoded (less than one block).
    pending: Vec<u8>,
    /// Stored bytes written for the current tensor.
    written: u64,
    values: Vec<f32>,
    encoded: Vec<u8>,
}

impl GgufWriter {
    /// A GGUF at `dest`, written atomically (a temp file renamed into place by `finish`).
    pub fn create(
        dest: &Path,
        head: &GgufHeader,
        plan: &[GgufOut],
        direct: bool,
    ) -> Result<GgufWriter> {
        let bytes = header_bytes(head, plan, dest)?;
        let (temp, out) = TempOutput::create(dest, |p| {
            let mut out = DirectFileWriter::create(p, direct).map_err(|e| Error::io(dest, e))?;
            out.write_all(&bytes).map_err(|e| Error::io(dest, e))?;
            Ok(out)
        })?;
        Ok(GgufWriter {
            out,
            temp: Some(temp),
            path: dest.to_path_buf(),
            plan: plan.to_vec(),
            alignment: head.alignment,
            next: 0,
            remaining: None,
            pending: Vec::new(),
            written: 0,
            values: Vec::new(),
            encoded: Vec::new(),
        })
    }

    fn current(&self) -> Result<&GgufOut> {
        self.next
            .checked_sub(1)
            .and_then(|i| self.plan.get(i))
            .ok_or_else(|| Error::Internal("GGUF bytes written outside a tensor".into()))
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        self.written += bytes.len() as u64;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }
}

impl TensorSink for GgufWriter {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        match self.plan.get(self.next) {
            Some(p) if p.name == t.name && self.remaining.is_none() => {
                self.remaining = Some(p.input_bytes());
                self.next += 1;
                self.written = 0;
                self.pending.clear();
                Ok(())
            }
            _ => Err(Error::Internal(format!(
                "tensor '{}' written out of plan order",
                t.name
            ))),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let t = self.current()?.clone();
        match &mut self.remaining {
            Some(r) if *r >= bytes.len() as u64 => *r -= bytes.len() as u64,
            _ => {
                return Err(Error::Internal(format!(
                    "more bytes written than GGUF tensor '{}' holds",
                    t.name
                )));
            }
        }
        let GgufInput::Values(dtype) = t.input else {
            return self.emit(bytes);
        };
        // Values: whole blocks are encoded as they arrive; the rest waits in `pending`.
        let (bs, ts, es) = (t.ty.block_size(), t.ty.type_size(), dtype.size());
        let block_bytes = bs * es;
        let mut src: &[u8] = bytes;
        let mut staged = std::mem::take(&mut self.pending);
        if !staged.is_empty() {
            let need = block_bytes - staged.len();
            let take = need.min(src.len());
            staged.extend_from_slice(&src[..take]);
            src = &src[take..];
            if staged.len() < block_bytes {
                self.pending = staged;
                return Ok(());
            }
        }
        let whole = src.len() / block_bytes * block_bytes;
        let mut chunks: Vec<&[u8]> = Vec::with_capacity(2);
        if !staged.is_empty() {
            chunks.push(&staged);
        }
        chunks.push(&src[..whole]);
        let mut encoded = std::mem::take(&mut self.encoded);
        for c in chunks {
            let n = c.len() / es;
            self.values.resize(n, 0.0);
            decode_f32(dtype, c, &mut self.values);
            encoded.resize(n / bs * ts, 0);
            let first = self.written / ts as u64;
            for (i, (x, o)) in self
                .values
                .chunks_exact(bs)
                .zip(encoded.chunks_exact_mut(ts))
                .enumerate()
            {
                quants::encode_block(t.ty, x, o).map_err(|e| {
                    Error::tensor(
                        &self.path,
                        &t.name,
                        format!(
                            "block {} (elements from {}) {e}; write this tensor as F32, F16 or BF16 (--gguf-type)",
                            first + i as u64,
                            (first + i as u64) * bs as u64
                        ),
                    )
                })?;
            }
            self.emit(&encoded)?;
        }
        self.encoded = encoded;
        staged.clear();
        staged.extend_from_slice(&src[whole..]);
        self.pending = staged;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let t = self.current()?.clone();
        if self.remaining.take() != Some(0) || !self.pending.is_empty() {
            return Err(Error::Internal(format!(
                "GGUF tensor '{}' ended before all of its bytes were written",
                t.name
            )));
        }
        let pad = self.written.next_multiple_of(self.alignment) - self.written;
        self.out
            .write_all(&vec![0u8; pad as usize])
            .map_err(|e| Error::io(&self.path, e))
    }

    fn finish(self: Box<Self>) -> Result<()> {
        if self.next != self.plan.len() || self.remaining.is_some() {
            return Err(Error::Internal(
                "GGUF output finished before every planned tensor was written".into(),
            ));
        }
        self.out.finish().map_err(|e| Error::io(&self.path, e))?;
        match self.temp {
            Some(t) => t.commit(),
            None => Ok(()),
        }
    }
}
