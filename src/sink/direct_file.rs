//! `DirectFileWriter`: the file under every writer. Bytes collect in one page-aligned
//! staging buffer that goes to disk in whole blocks with `O_DIRECT`, so writing a 15 GB
//! checkpoint costs no kernel copy into the page cache and leaves no 15 GB of dirty cache
//! behind (see `direct_io` for the measurements). The last partial block is padded and the
//! file truncated to its length at the end. Full staging buffers are written on helper
//! threads, two at a time, while the next one fills (`write_behind.rs`: why two).
//!
//! It implements `Write + Seek` because the zip crate seeks back to fill in a record's
//! CRC: a write below the staged range is a small positioned write through the ordinary
//! descriptor (coherent: the blocks it touches were already written).
//!
//! Big copies of unchanged input ranges run on a helper thread
//! ([`DirectFileWriter::append_copy`]): the block-aligned middle of the range is
//! read and written there while the caller goes on appending what follows, so a 1 GB
//! embedding copied at the start of a merge does not hold up the computed tensors behind
//! it. The partial blocks at both ends go through the staging buffer as usual.
//!
//! Where the filesystem refuses `O_DIRECT` (at open, or EINVAL on the first write), or
//! when asked to, the same buffer is written with ordinary positioned writes, and copies
//! of unchanged input ranges use `copy_file_range` as `cp` does.

use super::write_behind::{WriteBehind, write_blocks};
use crate::direct_io::{self, ALIGN, AlignedBuf, ReadAt};
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Staging buffer size: big enough that the device sees large requests.
const STAGING: usize = 8 << 20;

/// Copies at least this big run on a helper thread (`append_copy`).
const BACKGROUND_MIN: usize = 32 << 20;

/// A reader a helper thread can own: `ReadAt` behind an `Arc`.
pub type SharedReadAt =
    Arc<dyn Fn(u64, usize, &mut AlignedBuf) -> io::Result<std::ops::Range<usize>> + Send + Sync>;

pub struct DirectFileWriter {
    /// Ordinary descriptor: patches below the staged range, the final length, fallback.
    file: File,
    /// `O_DIRECT` descriptor, while direct writes work.
    direct: Option<File>,
    /// Writes the full staging buffers while direct writes work; kept after a refusal
    /// until `finish` so the writes it has are waited for.
    behind: Option<WriteBehind>,
    staging: AlignedBuf,
    /// Where copied ranges are read to (two: one being read while the other is written).
    bounce: [AlignedBuf; 2],
    /// Bytes of `staging` in use.
    staged: usize,
    /// File offset of `staging[0]` (a multiple of ALIGN while writing directly).
    base: u64,
    /// Where the next write goes.
    pos: u64,
    /// Length of the file as written so far.
    len: u64,
    /// The copy running on a helper thread, if any.
    background: Option<Background>,
}

/// A copy on a helper thread: cancelled and joined if the writer is dropped unfinished,
/// so it never goes on writing into an abandoned file.
struct Background {
    handle: std::thread::JoinHandle<io::Result<()>>,
    cancel: Arc<AtomicBool>,
    /// What is being copied, for its errors (they surface at the next join).
    label: String,
}

impl DirectFileWriter {
    /// Creates (truncates) `path`; `direct` asks for `O_DIRECT` where the filesystem has it.
    pub fn create(path: &Path, direct: bool) -> io::Result<DirectFileWriter> {
        let file = File::create(path)?;
        let direct = if direct {
            direct_io::open_direct_write(path)
        } else {
            None
        };
        let behind = match &direct {
            Some(d) => Some(WriteBehind::new(d, &file)?),
            None => None,
        };
        Ok(DirectFileWriter {
            file,
            direct,
            behind,
            staging: AlignedBuf::with_capacity(STAGING),
            bounce: Default::default(),
            staged: 0,
            base: 0,
            pos: 0,
            len: 0,
            background: None,
        })
    }

    /// Whether writes currently bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes the staged bytes, whole blocks only when direct (a partial block stays
    /// staged, moved to the front of the next buffer, unless `last`, when it is padded
    /// out). Direct writes are handed to the helpers (`WriteBehind`), which write them
    /// while the next buffer fills.
    fn flush_staged(&mut self, last: bool) -> io::Result<()> {
        if self.staged == 0 {
            return Ok(());
        }
        // The device wanted another alignment (or the fs changed its mind): a helper wrote
        // that buffer through the page cache; everything after goes that way too.
        if self
            .behind
            .as_ref()
            .is_some_and(WriteBehind::direct_refused)
        {
            self.direct = None;
        }
        if let (Some(_), Some(behind)) = (&self.direct, &mut self.behind) {
            let n = if last {
                direct_io::align_up(self.staged)
            } else {
                self.staged / ALIGN * ALIGN
            };
            if n == 0 {
                return Ok(());
            }
            // Padding of the last block: zeros, cut off again by set_len in finish.
            self.staging.as_mut_slice()[self.staged..n].fill(0);
            let kept = self.staged.saturating_sub(n);
            let mut next = behind.buffer(STAGING)?;
            next.as_mut_slice()[..kept].copy_from_slice(&self.staging.as_slice()[n..n + kept]);
            let full = std::mem::replace(&mut self.staging, next);
            behind.submit(full, n, self.base)?;
            self.staged = kept;
            self.base += n as u64;
            return Ok(());
        }
        self.file
            .write_all_at(&self.staging.as_slice()[..self.staged], self.base)?;
        self.base += self.staged as u64;
        self.staged = 0;
        Ok(())
    }

    /// Appends `len` bytes of an input from `offset`, read by `read` (a positioned,
    /// ideally direct, read into an aligned buffer), choosing how:
    /// - writing directly, 32 MiB or more: the block-aligned middle is written on a helper
    ///   thread while the caller goes on appending (one such copy at a time; `finish` and
    ///   seek-back writes wait for it); `label` names what is copied in its errors;
    /// - writing through the cache, with the input's open file `src`: `copy_file_range`,
    ///   the kernel copying file to file as `cp` does;
    /// - otherwise through the staging buffer, the next piece read while one is written.
    pub fn append_copy(
        &mut self,
        src: Option<&File>,
        read: SharedReadAt,
        mut offset: u64,
        mut len: usize,
        label: &str,
    ) -> io::Result<()> {
        let appending = self.pos == self.base + self.staged as u64;
        if self.direct.is_some() && appending && len >= BACKGROUND_MIN {
            return self.copy_in_background(read, offset, len, label);
        }
        if let (None, true, Some(src)) = (&self.direct, appending, src) {
            // Through the cache every staged byte is written, so the file ends at `base`.
            self.flush_staged(false)?;
            let copied = copy_range(src, offset, &self.file, self.base, len);
            self.base += copied as u64;
            self.pos = self.base;
            self.len = self.len.max(self.pos);
            offset += copied as u64;
            len -= copied;
        }
        self.stream(&*read, offset, len)
    }

    /// The helper-thread path of `append_copy` (direct, appending, at least 32 MiB).
    fn copy_in_background(
        &mut self,
        read: SharedReadAt,
        offset: u64,
        len: usize,
        label: &str,
    ) -> io::Result<()> {
        self.join_background()?;
        let a = ALIGN as u64;
        let (start, end) = (self.pos, self.pos + len as u64);
        let (first, last) = (start.div_ceil(a) * a, end / a * a);
        let head = (first - start) as usize;
        let tail = (end - last) as usize;
        self.stream(&*read, offset, head)?;
        // Everything staged now ends on a block boundary: write it all.
        self.flush_staged(false)?;
        let Some(direct) = self.direct.as_ref().filter(|_| self.staged == 0) else {
            // Direct writes were just refused: copy the rest here, through the cache.
            return self.stream(&*read, offset + head as u64, len - head);
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let mut blocks = BlockWriter {
            direct: direct.try_clone()?,
            buffered: self.file.try_clone()?,
            refused: AtomicBool::new(false),
            cancel: Arc::clone(&cancel),
        };
        let (from, n) = (offset + head as u64, (last - first) as usize);
        let reader = Arc::clone(&read);
        self.background = Some(Background {
            handle: std::thread::spawn(move || blocks.copy(&*reader, from, n, first)),
            cancel,
            label: label.to_string(),
        });
        self.base = last;
        self.pos = last;
        self.len = self.len.max(last);
        self.staged = 0;
        self.stream(&*read, offset + (len - tail) as u64, tail)
    }

    /// Appends `len` bytes read by `read` from `offset` through the staging buffer.
    fn stream(&mut self, read: &ReadAt<'_>, offset: u64, len: usize) -> io::Result<()> {
        let mut bufs = std::mem::take(&mut self.bounce);
        let r = direct_io::stream_range(read, offset, len, STAGING / 2, &mut bufs, |b| {
            self.write_all(b)
        });
        self.bounce = bufs;
        r
    }

    fn join_background(&mut self) -> io::Result<()> {
        let Some(b) = self.background.take() else {
            return Ok(());
        };
        b.handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the copying thread panicked")))
            .map_err(|e| io::Error::new(e.kind(), format!("copying {}: {e}", b.label)))
    }

    /// Writes everything out, sets the file's length and fsyncs it: a run that reports
    /// success has its output on disk (O_DIRECT writes skip the cache but not the
    /// metadata, the length and the block map, so they need the fsync too).
    pub fn finish(mut self) -> io::Result<()> {
        self.join_background()?;
        self.flush_staged(true)?;
        if let Some(behind) = &mut self.behind {
            behind.drain()?;
        }
        self.file.set_len(self.len)?;
        self.file.sync_all()
    }
}

impl Drop for DirectFileWriter {
    /// Dropped unfinished (an error elsewhere): stop the helper thread before going.
    fn drop(&mut self) {
        if let Some(b) = self.background.take() {
            b.cancel.store(true, Ordering::Relaxed);
            let _ = b.handle.join();
        }
    }
}

impl Write for DirectFileWriter {
    fn write(&mut self, mut bytes: &[u8]) -> io::Result<usize> {
        let total = bytes.len();
        // Below the staged range (a seek back): patch in place through the cache, once a
        // copy that may still be writing down there is done.
        if self.pos < self.base {
            self.join_background()?;
            let n = ((self.base - self.pos) as usize).min(bytes.len());
            if let Some(behind) = &mut self.behind {
                behind.wait_overlapping(self.pos, self.pos + n as u64)?;
            }
            self.file.write_all_at(&bytes[..n], self.pos)?;
            self.pos += n as u64;
            self.len = self.len.max(self.pos);
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            let at = (self.pos - self.base) as usize;
            if at >= self.staging.capacity() {
                // A seek past the staged range: stage the gap as zeros.
                self.staging.as_mut_slice()[self.staged..].fill(0);
                self.staged = self.staging.capacity();
                self.flush_staged(false)?;
                continue;
            }
            if at > self.staged {
                self.staging.as_mut_slice()[self.staged..at].fill(0);
            }
            let n = bytes.len().min(self.staging.capacity() - at);
            self.staging.as_mut_slice()[at..at + n].copy_from_slice(&bytes[..n]);
            self.staged = self.staged.max(at + n);
            self.pos += n as u64;
            self.len = self.len.max(self.pos);
            bytes = &bytes[n..];
            if self.staged == self.staging.capacity() {
                self.flush_staged(false)?;
            }
        }
        Ok(total)
    }

    /// Staged bytes wait for a whole buffer; `finish` writes them.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for DirectFileWriter {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek to a negative position")
        })?;
        Ok(self.pos)
    }
}

/// Whole aligned blocks written at given offsets, directly while the device takes it.
struct BlockWriter {
    direct: File,
    buffered: File,
    /// Set once the device refused a direct write (`write_behind::write_blocks`).
    refused: AtomicBool,
    /// Set when the writer that started the copy is dropped unfinished.
    cancel: Arc<AtomicBool>,
}

impl BlockWriter {
    fn write(&mut self, blocks: &[u8], at: u64) -> io::Result<()> {
        write_blocks(&self.direct, &self.buffered, &self.refused, blocks, at)
    }

    /// Copies `len` bytes (whole blocks) read by `read` from `from` to the file at `at`
    /// (block-aligned), through an aligned buffer of its own.
    fn copy(&mut self, read: &ReadAt<'_>, from: u64, len: usize, mut at: u64) -> io::Result<()> {
        let mut staging = AlignedBuf::with_capacity(STAGING);
        let mut bufs = [AlignedBuf::default(), AlignedBuf::default()];
        let mut filled = 0;
        direct_io::stream_range(read, from, len, STAGING / 2, &mut bufs, |mut b| {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            while !b.is_empty() {
                let n = b.len().min(STAGING - filled);
                staging.as_mut_slice()[filled..filled + n].copy_from_slice(&b[..n]);
                filled += n;
                b = &b[n..];
                if filled == STAGING {
                    self.write(&staging.as_slice()[..filled], at)?;
                    at += filled as u64;
                    filled = 0;
                }
            }
            Ok(())
        })?;
        // `len` is whole blocks, so what is left is too.
        self.write(&staging.as_slice()[..filled], at)
    }
}

/// Copies up to `len` bytes from `from` at `offset` to `to` at `at` with
/// `copy_file_range`; returns how many were copied (less than `len` when the kernel
/// refuses, e.g. across filesystems on old kernels; the caller writes the rest).
fn copy_range(from: &File, offset: u64, to: &File, at: u64, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let mut off_in = offset as libc::loff_t;
    let mut off_out = at as libc::loff_t;
    let mut done = 0usize;
    while done < len {
        // SAFETY: both descriptors are open files we own for the duration of the call;
        // the kernel reads and writes them directly, no user memory is involved.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                len - done,
                0,
            )
        };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + seed + i / 977) as u8).collect()
    }

    fn read_with(f: &File) -> SharedReadAt {
        let f = f.try_clone().unwrap();
        Arc::new(move |off, len, buf| direct_io::read_range(None, &f, off, len, buf))
    }

    /// Appends, copies, seeks back to patch (as the zip crate does) and seeks past the
    /// end, in both modes; the file must equal the same operations on a Vec.
    #[test]
    fn writes_equal_a_plain_buffer_in_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src_data = sample(3 * STAGING / 2 + 77, 5);
        std::fs::write(&src_path, &src_data).unwrap();
        let src = File::open(&src_path).unwrap();
        for direct in [true, false] {
            let path = dir.path().join(format!("out-{direct}"));
            let mut w = DirectFileWriter::create(&path, direct).unwrap();
            let mut want: Vec<u8> = Vec::new();
            let put = |w: &mut DirectFileWriter, want: &mut Vec<u8>, bytes: &[u8]| {
                let at = w.stream_position().unwrap() as usize;
                w.write_all(bytes).unwrap();
                if want.len() < at + bytes.len() {
                    want.resize(at + bytes.len(), 0);
                }
                want[at..at + bytes.len()].copy_from_slice(bytes);
            };
            put(&mut w, &mut want, &sample(100, 1));
            put(&mut w, &mut want, &sample(STAGING + 4000, 2));
            // Patch near the start (already on disk) and inside the staged range.
            w.seek(SeekFrom::Start(10)).unwrap();
            put(&mut w, &mut want, b"PATCHED");
            let end = want.len() as u64;
            w.seek(SeekFrom::Start(end - 3)).unwrap();
            put(&mut w, &mut want, b"tail-patch");
            w.seek(SeekFrom::End(0)).unwrap();
            w.append_copy(Some(&src), read_with(&src), 123, 2 * STAGING / 3, "t")
                .unwrap();
            want.extend_from_slice(&src_data[123..123 + 2 * STAGING / 3]);
            put(&mut w, &mut want, &sample(5, 3));
            // A hole: seek past the end, then write.
            w.seek(SeekFrom::Current(9000)).unwrap();
            put(&mut w, &mut want, &sample(321, 4));
            assert_eq!(w.seek(SeekFrom::End(0)).unwrap(), want.len() as u64);
            assert!(w.seek(SeekFrom::Current(-(want.len() as i64) - 1)).is_err());
            w.finish().unwrap();
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), want.len(), "direct={direct}");
            assert!(got == want, "direct={direct}: contents differ");
        }
    }

    /// A big copy on the helper thread lands exactly where a plain append would put it,
    /// with unaligned ends on both sides and writes after it; buffered, it is declined.
    #[test]
    fn background_copies_land_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src_data = sample(BACKGROUND_MIN + 3 * STAGING + 1234, 7);
        std::fs::write(&src_path, &src_data).unwrap();
        let src = File::open(&src_path).unwrap();
        let reader = read_with(&src);
        for (lead, from, n) in [
            (100, 5, BACKGROUND_MIN + STAGING + 777),
            (ALIGN, ALIGN as u64, BACKGROUND_MIN),
            (7, 0, src_data.len()),
        ] {
            let path = dir.path().join(format!("bg-{lead}-{from}"));
            let mut w = DirectFileWriter::create(&path, true).unwrap();
            let direct = w.is_direct();
            let mut want = sample(lead, 1);
            w.write_all(&want).unwrap();
            w.append_copy(Some(&src), Arc::clone(&reader), from, n, "t")
                .unwrap();
            assert_eq!(
                w.background.is_some(),
                direct,
                "on a helper thread exactly when writing directly"
            );
            want.extend_from_slice(&src_data[from as usize..from as usize + n]);
            let after = sample(STAGING + 99, 3);
            w.write_all(&after).unwrap();
            want.extend_from_slice(&after);
            w.finish().unwrap();
            assert!(
                std::fs::read(&path).unwrap() == want,
                "lead {lead}: contents differ"
            );
        }
        let mut w = DirectFileWriter::create(&dir.path().join("buffered"), false).unwrap();
        w.append_copy(Some(&src), Arc::clone(&reader), 0, BACKGROUND_MIN, "t")
            .unwrap();
        assert!(w.background.is_none(), "buffered: no helper thread");
        // A seek back into a range still being copied waits for the copy: the patch wins.
        let path = dir.path().join("patch");
        let mut w = DirectFileWriter::create(&path, true).unwrap();
        if w.is_direct() {
            w.write_all(&[1; 100]).unwrap();
            w.append_copy(Some(&src), Arc::clone(&reader), 0, BACKGROUND_MIN, "t")
                .unwrap();
            assert!(w.background.is_some());
            let end = w.seek(SeekFrom::End(0)).unwrap();
            w.seek(SeekFrom::Start(end - 1000)).unwrap();
            w.write_all(b"PATCH").unwrap();
            w.finish().unwrap();
            let got = std::fs::read(&path).unwrap();
            let at = (end - 1000) as usize;
            assert_eq!(&got[at..at + 5], b"PATCH");
        }
        // Dropped mid-copy: the helper stops; nothing hangs.
        let mut w = DirectFileWriter::create(&dir.path().join("dropped"), true).unwrap();
        let _ = w.append_copy(Some(&src), reader, 0, src_data.len(), "t");
        drop(w);
    }

    #[test]
    fn empty_and_tiny_files() {
        let dir = tempfile::tempdir().unwrap();
        for (n, direct) in [(0, true), (1, true), (4096, true), (0, false), (3, false)] {
            let path = dir.path().join(format!("f{n}{direct}"));
            let mut w = DirectFileWriter::create(&path, direct).unwrap();
            w.write_all(&sample(n, 9)).unwrap();
            w.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), sample(n, 9));
        }
    }
}
