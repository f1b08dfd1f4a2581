//! `TorchZipWriter`: a PyTorch zip checkpoint written as the tensors arrive.
//!
//! Each tensor becomes a stored (uncompressed), 64-byte-aligned record `archive/data/<i>`
//! with a real CRC32; the pickle that describes them goes last (torch does not care about
//! entry order), so nothing but the small per-tensor metadata is held in memory. The `zip`
//! crate writes zip64 records where sizes or counts need them. We do not write
//! `.format_version`: with it, some torch load paths assume miniz's exact layout.

use super::atomic::TempOutput;
use super::direct_file::DirectFileWriter;
use super::pickle_writer::{PickledTensor, state_dict_pickle};
use super::{OutTensor, PlanCursor, SharedBytes, TensorSink};
use crate::direct_io::{self, AlignedBuf};
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

const FOLDER: &str = "archive";

pub struct TorchZipWriter {
    zip: ZipWriter<DirectFileWriter>,
    /// Where shared input ranges are read to (two: one read while the other is written).
    bounce: [AlignedBuf; 2],
    temp: TempOutput,
    cursor: PlanCursor,
    /// Planned tensor index → the earlier tensor whose storage it shares (tied weights).
    ties: std::collections::HashMap<usize, usize>,
}

fn record_options(nbytes: u64) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .with_alignment(64)
        .large_file(nbytes >= u32::MAX as u64)
}

impl TorchZipWriter {
    /// `direct`: bypass the page cache where the filesystem allows (`DirectFileWriter`).
    pub fn create(dest: &Path, plan: &[OutTensor], direct: bool) -> Result<TorchZipWriter> {
        let (temp, f) = TempOutput::create(dest, |p| {
            DirectFileWriter::create(p, direct).map_err(|e| Error::io(dest, e))
        })?;
        Ok(TorchZipWriter {
            zip: ZipWriter::new(f),
            bounce: Default::default(),
            temp,
            cursor: PlanCursor::new(plan),
            ties: Default::default(),
        })
    }

    fn zip_err(&self, e: zip::result::ZipError) -> Error {
        Error::format(self.temp.dest(), format!("writing the zip failed: {e}"))
    }

    fn entry(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.zip
            .start_file(
                format!("{FOLDER}/{name}"),
                record_options(data.len() as u64),
            )
            .map_err(|e| self.zip_err(e))?;
        self.zip
            .write_all(data)
            .map_err(|e| Error::io(self.temp.dest(), e))
    }
}

impl TensorSink for TorchZipWriter {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        let i = self.cursor.begin(t)?;
        self.zip
            .start_file(format!("{FOLDER}/data/{i}"), record_options(t.nbytes()))
            .map_err(|e| self.zip_err(e))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.cursor.write(bytes.len())?;
        self.zip
            .write_all(bytes)
            .map_err(|e| Error::io(self.temp.dest(), e))
    }

    /// Read with a positioned read rather than through the source's map: no page faults,
    /// nothing left resident (the zip crate must see the bytes anyway, for the CRC).
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        self.cursor.write(len)?;
        let read = |at: u64, n: usize, buf: &mut AlignedBuf| src.read_at(at as usize, n, buf);
        let zip = &mut self.zip;
        direct_io::stream_range(&read, start as u64, len, 8 << 20, &mut self.bounce, |b| {
            zip.write_all(b)
        })
        .map_err(|e| {
            let name = self.cursor.current_name();
            Error::tensor(self.temp.dest(), name, format!("copying: {e}"))
        })?;
        src.done(start, len);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        self.cursor.end()
    }

    fn shares_storage(&self) -> bool {
        true
    }

    /// A tied tensor gets no record of its own: its pickle entry names the storage of the
    /// tensor it is tied to, so `torch.load` gives both one storage, as `torch.save` would.
    fn tie(&mut self, t: &OutTensor, to: usize) -> Result<()> {
        let i = self.cursor.skip_tied(t, to)?;
        // Follow chains so every key names a storage that has a record.
        let root = self.ties.get(&to).copied().unwrap_or(to);
        self.ties.insert(i, root);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.cursor.check_complete()?;
        let tensors: Vec<PickledTensor<'_>> = self
            .cursor
            .plan()
            .iter()
            .enumerate()
            .map(|(i, t)| PickledTensor {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                key: self.ties.get(&i).copied().unwrap_or(i).to_string(),
            })
            .collect();
        let pkl = state_dict_pickle(&tensors);
        drop(tensors);
        self.entry("data.pkl", &pkl)?;
        self.entry("byteorder", b"little")?;
        self.entry("version", b"3\n")?;
        let this = *self;
        let dest = this.temp.dest().to_path_buf();
        let file = this
            .zip
            .finish()
            .map_err(|e| Error::format(&dest, format!("writing the zip failed: {e}")))?;
        // Flushed and fsynced, then renamed and the folder fsynced (commit).
        file.finish().map_err(|e| Error::io(&dest, e))?;
        this.temp.commit()
    }
}
