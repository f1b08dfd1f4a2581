//! `SafetensorsWriter`: one safetensors file. The header is computed from the plan and
//! written first (padded with spaces to a multiple of 8, as torch does); tensor data then
//! streams in plan order. A writer opened with `Hashing::AsWritten` (the shards of a part,
//! `--part K/N`) also keeps the size and SHA-256 of every byte it hands the file, in file
//! order, so the part records its shard's hash without reading back what it wrote.

use super::atomic::TempOutput;
use super::direct_file::{DirectFileWriter, SharedReadAt};
use super::{OutTensor, PlanCursor, SharedBytes, TensorSink};
use crate::direct_io::{self, AlignedBuf};
use crate::error::{Error, Result};
use sha2::Digest;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

pub struct SafetensorsWriter {
    out: DirectFileWriter,
    /// None when the file is part of a sharded output, whose folder is the atomic unit.
    temp: Option<TempOutput>,
    path: std::path::PathBuf,
    cursor: PlanCursor,
    /// `Hashing::AsWritten`: the hash of the bytes written so far, their count, and the
    /// buffers copied tensors are read through on their way to the hash and the file.
    hash: Option<FileHash>,
}

/// The running SHA-256 of a file written front to back (see `Hashing::AsWritten`).
struct FileHash {
    sha: sha2::Sha256,
    bytes: u64,
    bufs: [AlignedBuf; 2],
}

/// Whether a writer keeps the size and SHA-256 of its file (`close_hashed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hashing {
    Off,
    /// Of every byte as it is handed to the file: copied tensors then go through memory
    /// (read, hashed, written) instead of the kernel's file-to-file copy or a helper
    /// thread, which never show their bytes. The hash is of what was meant to be written,
    /// so a later full read (`stitch`) that finds other bytes names the shard.
    AsWritten,
}

/// Copied tensors reach the hash in pieces of this size (two in flight: one being read
/// while the other is hashed and written), as `DirectFileWriter` streams them.
const HASH_PIECE: usize = 4 << 20;

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
        let (temp, mut w) = TempOutput::create(dest, |p| {
            Self::create_in(p, dest, plan, direct, Hashing::Off)
        })?;
        w.temp = Some(temp);
        Ok(w)
    }

    /// A plain file at `path` (the caller owns atomicity), named `shown` in messages (its
    /// final name, when `path` is a temp name the caller renames); `hashing` says whether
    /// `close_hashed` gives its size and SHA-256 (see `Hashing`).
    pub(crate) fn create_in(
        path: &Path,
        shown: &Path,
        plan: &[OutTensor],
        direct: bool,
        hashing: Hashing,
    ) -> Result<SafetensorsWriter> {
        let head = header(plan, shown)?;
        let mut out = DirectFileWriter::create(path, direct).map_err(|e| Error::io(shown, e))?;
        out.write_all(&head).map_err(|e| Error::io(shown, e))?;
        let hash = (hashing == Hashing::AsWritten).then(|| FileHash {
            sha: sha2::Sha256::new_with_prefix(&head),
            bytes: head.len() as u64,
            bufs: Default::default(),
        });
        Ok(SafetensorsWriter {
            out,
            temp: None,
            path: shown.to_path_buf(),
            cursor: PlanCursor::new(plan),
            hash,
        })
    }

    /// Flushes and fsyncs (`DirectFileWriter::finish`); commits when standalone (rename,
    /// then fsync of the folder), so the output is on disk before success is reported.
    pub(crate) fn close(self) -> Result<()> {
        self.close_hashed().map(|_| ())
    }

    /// `close`, giving the size and hex SHA-256 of the file written when it was opened
    /// with `Hashing::AsWritten` (None otherwise).
    pub(crate) fn close_hashed(self) -> Result<Option<(u64, String)>> {
        self.cursor.check_complete()?;
        self.out.finish().map_err(|e| Error::io(&self.path, e))?;
        if let Some(t) = self.temp {
            t.commit()?;
        }
        Ok(self
            .hash
            .map(|h| (h.bytes, super::part_plan::hex(&h.sha.finalize()))))
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
        if let Some(h) = &mut self.hash {
            let out = &mut self.out;
            let read = |at: u64, n: usize, buf: &mut AlignedBuf| src.read_at(at as usize, n, buf);
            direct_io::stream_range(&read, start as u64, len, HASH_PIECE, &mut h.bufs, |b| {
                h.sha.update(b);
                h.bytes += b.len() as u64;
                out.write_all(b)
            })
            .map_err(|e| Error::tensor(&self.path, &name, format!("copying: {e}")))?;
            src.done(start, len);
            return Ok(());
        }
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
        if let Some(h) = &mut self.hash {
            h.sha.update(bytes);
            h.bytes += bytes.len() as u64;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    /// Bytes in memory as a copy source (the default `read_at`: no file to copy from).
    struct Held(Vec<u8>);
    impl SharedBytes for Held {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
    }

    /// A file opened with `Hashing::AsWritten` records the size and SHA-256 a full read of
    /// it gives, and has the same bytes as one written without hashing, in both write
    /// modes, for written and copied tensors alike: copies of a few bytes, of several
    /// pieces, and of more than the size `DirectFileWriter` copies on a helper thread.
    #[test]
    fn a_hashed_file_records_what_a_full_read_of_it_gives() {
        let sizes = [3usize, 9 << 20, (33 << 20) + 5];
        let plan: Vec<OutTensor> = (0..sizes.len() * 2)
            .map(|i| OutTensor {
                name: format!("t{i}"),
                dtype: Dtype::U8,
                shape: vec![sizes[i / 2]],
            })
            .collect();
        let src: Arc<dyn SharedBytes> = Arc::new(Held(
            (0..(40usize << 20)).map(|i| (i * 31 % 251) as u8).collect(),
        ));
        let root = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let mut files = Vec::new();
            for hashed in [false, true] {
                let path = root.path().join(format!("{direct}-{hashed}.safetensors"));
                let hashing = if hashed {
                    Hashing::AsWritten
                } else {
                    Hashing::Off
                };
                let mut w =
                    SafetensorsWriter::create_in(&path, &path, &plan, direct, hashing).unwrap();
                for (i, t) in plan.iter().enumerate() {
                    w.begin(t).unwrap();
                    if i % 2 == 0 {
                        w.write(&src.bytes()[7..7 + sizes[i / 2]]).unwrap();
                    } else {
                        w.write_shared(&src, 11 + i, sizes[i / 2]).unwrap();
                    }
                    w.end().unwrap();
                }
                let got = w.close_hashed().unwrap();
                assert_eq!(got.is_some(), hashed);
                if let Some(got) = got {
                    assert_eq!(got, crate::sink::sha256_file(&path).unwrap());
                }
                files.push(std::fs::read(&path).unwrap());
            }
            assert!(files[0] == files[1], "direct {direct}: bytes differ");
        }
    }
}
