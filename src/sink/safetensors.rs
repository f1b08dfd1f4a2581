//! `SafetensorsWriter`: one safetensors file. The header is computed from the plan and
//! written first (padded with spaces to a multiple of 8, as torch does); tensor data then
//! streams in plan order.

use super::atomic::TempOutput;
use super::direct_file::{DirectFileWriter, SharedReadAt};
use super::{OutTensor, PlanCursor, SharedBytes, TensorSink};
use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

pub struct SafetensorsWriter {
    out: DirectFileWriter,
    /// None when the file is part of a sharded output, whose folder is the atomic unit.
    temp: Option<TempOutput>,
    path: std::path::PathBuf,
    cursor: PlanCursor,
}

/// The header bytes (length prefix included) for `plan`.
pub fn header(plan: &[OutTensor], path: &Path) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    map.insert("__metadata__".into(), meta.into());
    let mut offset = 0u64;
    for t in plan {
        if !t.dtype.in_safetensors() {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "safetensors cannot store dtype {}; write a .pth instead",
                    t.dtype
                ),
            ));
        }
        let end = offset + t.nbytes();
        let prev = map.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        if prev.is_some() || t.name == "__metadata__" {
            return Err(Error::tensor(path, &t.name, "appears twice in the output"));
        }
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::format(path, e.to_string()))?;
    // Pad with spaces (allowed by the format) so the data starts on a 4 KiB page: page
    // aligned tensors copy file to file on the kernel's fast path and map cleanly.
    while !(8 + json.len()).is_multiple_of(4096) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    Ok(out)
}

impl SafetensorsWriter {
    /// A standalone file at `dest`, written atomically; `direct`: bypass the page cache
    /// where the filesystem allows (see `DirectFileWriter`).
    pub fn create(dest: &Path, plan: &[OutTensor], direct: bool) -> Result<SafetensorsWriter> {
        let (temp, mut w) = TempOutput::create(dest, |p| Self::create_in(p, dest, plan, direct))?;
        w.temp = Some(temp);
        Ok(w)
    }

    /// A plain file at `path` (the caller owns atomicity), named `shown` in messages (its
    /// final name, when `path` is a temp name the caller renames).
    pub(crate) fn create_in(
        path: &Path,
        shown: &Path,
        plan: &[OutTensor],
        direct: bool,
    ) -> Result<SafetensorsWriter> {
        let head = header(plan, shown)?;
        let mut out = DirectFileWriter::create(path, direct).map_err(|e| Error::io(shown, e))?;
        out.write_all(&head).map_err(|e| Error::io(shown, e))?;
        Ok(SafetensorsWriter {
            out,
            temp: None,
            path: shown.to_path_buf(),
            cursor: PlanCursor::new(plan),
        })
    }

    /// Flushes and fsyncs (`DirectFileWriter::finish`); commits when standalone (rename,
    /// then fsync of the folder), so the output is on disk before success is reported.
    pub(crate) fn close(self) -> Result<()> {
        self.cursor.check_complete()?;
        self.out.finish().map_err(|e| Error::io(&self.path, e))?;
        match self.temp {
            Some(t) => t.commit(),
            None => Ok(()),
        }
    }
}

impl TensorSink for SafetensorsWriter {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        self.cursor.begin(t).map(|_| ())
    }
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        self.cursor.write(len)?;
        // Same bytes, same place: `append_copy` picks the cheapest way (a helper thread, the
        // kernel's file-to-file copy, or the staging buffer).
        let name = self.cursor.current_name().to_string();
        let reader = Arc::clone(src);
        let read: SharedReadAt = Arc::new(move |at, n, buf| reader.read_at(at as usize, n, buf));
        self.out
            .append_copy(
                src.file(),
                read,
                start as u64,
                len,
                &format!("tensor '{name}'"),
            )
            .map_err(|e| Error::tensor(&self.path, &name, format!("copying: {e}")))?;
        src.done(start, len);
        Ok(())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.cursor.write(bytes.len())?;
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }
    fn end(&mut self) -> Result<()> {
        self.cursor.end()
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.close()
    }
}
