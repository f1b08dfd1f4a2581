//! Reading and writing around the page cache (`O_DIRECT`), shared by sources and sinks:
//! page-aligned buffers, descriptors that bypass the cache, and positioned reads that
//! fall back to ordinary ones where a filesystem refuses.
//!
//! Why bypass the cache: a merge reads every byte of the model once and writes every byte
//! once. Through the page cache that costs the CPU a kernel copy (or a page fault) per page
//! in each direction — measured on the benchmark VM at ≈ 0.7 CPU-s per GB read and ≈ 0.7
//! per GB written, against ≈ 0.06 and ≈ 0.09 with `O_DIRECT`, at the same or better wall
//! time — and it fills the cache with tens of GB nobody reads again. On 2 cores that is
//! CPU the GEMM needs. Written by hand: `O_DIRECT` needs buffers, offsets and lengths
//! aligned to the device's block size, and no maintained crate offers an aligned buffer
//! with positioned direct reads and a fallback for filesystems without `O_DIRECT`.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

/// Alignment of direct buffers, offsets and lengths: 4 KiB satisfies every common block
/// device (512 B or 4 KiB logical blocks) and is the page size.
pub const ALIGN: usize = 4096;

/// How big reads of an input go (`MappedFile::read_at`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadMode {
    /// Around the page cache, unless most of the file is in the cache already (just
    /// downloaded or read): then from the cache, which is faster than the disk.
    #[default]
    Auto,
    /// Around the page cache whenever the filesystem allows.
    Direct,
    /// Through the page cache.
    Buffered,
}

impl ReadMode {
    fn to_u8(self) -> u8 {
        match self {
            ReadMode::Auto => 0,
            ReadMode::Direct => 1,
            ReadMode::Buffered => 2,
        }
    }

    fn from_u8(v: u8) -> ReadMode {
        match v {
            1 => ReadMode::Direct,
            2 => ReadMode::Buffered,
            _ => ReadMode::Auto,
        }
    }
}

/// A [`ReadMode`] that threads can share and change.
#[derive(Debug, Default)]
pub struct AtomicReadMode(std::sync::atomic::AtomicU8);

impl AtomicReadMode {
    pub fn get(&self) -> ReadMode {
        ReadMode::from_u8(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
    pub fn set(&self, m: ReadMode) {
        self.0
            .store(m.to_u8(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Rounds `n` up to a multiple of [`ALIGN`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A zero-initialised byte buffer whose start is [`ALIGN`]-aligned; it only grows, so one
/// buffer reused for every read costs one allocation.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for AlignedBuf {}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf {
            ptr: NonNull::dangling(),
            cap: 0,
        }
    }
}

impl AlignedBuf {
    pub fn with_capacity(cap: usize) -> AlignedBuf {
        let mut b = AlignedBuf::default();
        b.reserve(cap);
        b
    }

    /// Capacity in bytes (a multiple of [`ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Makes the capacity at least `cap` (rounded up to [`ALIGN`]); the contents are not
    /// kept when it grows.
    pub fn reserve(&mut self, cap: usize) {
        if cap <= self.cap {
            return;
        }
        // Sizes come from file lengths; one that cannot be rounded up could never be
        // allocated either.
        let Some(layout) = cap
            .checked_next_multiple_of(ALIGN)
            .and_then(|c| Layout::from_size_align(c, ALIGN).ok())
        else {
            std::alloc::handle_alloc_error(Layout::new::<u8>());
        };
        let cap = layout.size();
        // SAFETY: the layout has a non-zero size (cap > self.cap >= 0 and rounded up).
        let p = unsafe { alloc_zeroed(layout) };
        let Some(p) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout);
        };
        self.free();
        self.ptr = p;
        self.cap = cap;
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: ptr was allocated with exactly this layout in `reserve`.
            unsafe {
                dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            };
            self.cap = 0;
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap initialised bytes (zeroed at allocation), or
        // dangling with cap = 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// Opens `path` for reading with `O_DIRECT`; None where the filesystem refuses it.
pub fn open_direct_read(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Opens the existing file `path` for writing with `O_DIRECT`; None where refused.
pub fn open_direct_write(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the count.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads bytes `[start, start + len)` of a file into `buf`; returns where in `buf` they
/// are. With `direct`, the read covers the aligned blocks around the range; an error
/// from it (EINVAL: the device wants another alignment) is returned for the caller to
/// retry with `direct = None`, which reads through the page cache.
pub fn read_range(
    direct: Option<&File>,
    buffered: &File,
    start: u64,
    len: usize,
    buf: &mut AlignedBuf,
) -> io::Result<Range<usize>> {
    let eof = || {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file ended early (was it truncated while being read?)",
        )
    };
    match direct {
        Some(f) => {
            let first = start - start % ALIGN as u64;
            let skip = (start - first) as usize;
            let total = align_up(skip + len);
            buf.reserve(total);
            let got = read_full_at(f, &mut buf.as_mut_slice()[..total], first)?;
            if got < skip + len {
                return Err(eof());
            }
            Ok(skip..skip + len)
        }
        None => {
            buf.reserve(len);
            let got = read_full_at(buffered, &mut buf.as_mut_slice()[..len], start)?;
            if got < len {
                return Err(eof());
            }
            Ok(0..len)
        }
    }
}

/// Reads `len` bytes at an offset of some source into a buffer; says where they landed.
pub type ReadAt<'a> = dyn Fn(u64, usize, &mut AlignedBuf) -> io::Result<Range<usize>> + Sync + 'a;

/// Streams bytes `[offset, offset + len)` of a source through `consume` in pieces of at
/// most `piece` bytes, reading the next piece on a helper thread while `consume` handles
/// the current one: a copy then takes about max(read, write) instead of their sum.
pub fn stream_range(
    read: &ReadAt<'_>,
    offset: u64,
    len: usize,
    piece: usize,
    bufs: &mut [AlignedBuf; 2],
    mut consume: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let piece = piece.max(1);
    let [a, b] = bufs;
    let (mut cur, mut next) = (a, b);
    let mut done = 0;
    let mut at = read(offset, piece.min(len), cur)?;
    while done < len {
        let n = piece.min(len - done);
        let (n_off, n_len) = (offset + (done + n) as u64, piece.min(len - done - n));
        let (consumed, read_next) = std::thread::scope(|s| {
            let reader = (n_len > 0).then(|| {
                let next = &mut *next;
                s.spawn(move || read(n_off, n_len, next))
            });
            let consumed = consume(&cur.as_slice()[at.clone()]);
            let read_next = reader.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("the reading thread panicked")))
            });
            (consumed, read_next)
        });
        consumed?;
        if let Some(r) = read_next {
            at = r?;
        }
        std::mem::swap(&mut cur, &mut next);
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn streamed_ranges_arrive_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = sample(3 * ALIGN + 77);
        std::fs::write(&path, &data).unwrap();
        let plain = File::open(&path).unwrap();
        let direct = open_direct_read(&path);
        let read = |off: u64, len: usize, buf: &mut AlignedBuf| {
            read_range(direct.as_ref(), &plain, off, len, buf)
                .or_else(|_| read_range(None, &plain, off, len, buf))
        };
        let mut bufs = [AlignedBuf::default(), AlignedBuf::default()];
        for (off, len, piece) in [
            (0, data.len(), 1000),
            (5, 3 * ALIGN, ALIGN),
            (9, 0, 7),
            (1, 10, 100),
        ] {
            let mut got = Vec::new();
            stream_range(&read, off as u64, len, piece, &mut bufs, |b| {
                got.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(got, &data[off..off + len]);
        }
        let fail = |_: u64, _: usize, _: &mut AlignedBuf| -> io::Result<Range<usize>> {
            Err(io::Error::other("disk on fire"))
        };
        let e = stream_range(&fail, 0, 10, 4, &mut bufs, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("disk on fire"));
    }

    #[test]
    fn aligned_buffer_is_aligned_and_grows() {
        let mut b = AlignedBuf::default();
        assert_eq!(b.capacity(), 0);
        assert!(b.as_slice().is_empty());
        b.reserve(10);
        assert_eq!(b.capacity(), ALIGN);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        b.reserve(3 * ALIGN + 1);
        assert_eq!(b.capacity(), 4 * ALIGN);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn ranges_read_back_exactly_direct_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = sample(5 * ALIGN + 123);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let plain = File::open(&path).unwrap();
        let direct = open_direct_read(&path);
        let mut buf = AlignedBuf::default();
        for (start, len) in [
            (0, 1),
            (0, data.len()),
            (1, ALIGN),
            (ALIGN - 1, 2),
            (3 * ALIGN + 5, 2 * ALIGN - 5 + 123),
            (data.len() - 1, 1),
            (17, 0),
        ] {
            for d in [direct.as_ref(), None] {
                let r = match read_range(d, &plain, start as u64, len, &mut buf) {
                    Ok(r) => r,
                    // A filesystem that takes O_DIRECT at open but not these alignments.
                    Err(e) if d.is_some() && e.raw_os_error() == Some(libc::EINVAL) => continue,
                    Err(e) => panic!("{e}"),
                };
                assert_eq!(&buf.as_slice()[r], &data[start..start + len]);
            }
        }
        // Past the end: an error, not a short answer.
        for d in [direct.as_ref(), None] {
            let e = read_range(d, &plain, (data.len() - 3) as u64, 4, &mut buf).unwrap_err();
            if d.is_none() || e.raw_os_error() != Some(libc::EINVAL) {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            }
        }
    }
}
