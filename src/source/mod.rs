//! Sources: read-only views of tensors inside checkpoint files.
//!
//! A [`Checkpoint`] lists [`TensorEntry`]s in file order; each entry knows its dtype,
//! shape and where its bytes live in which [`MappedFile`]. Headers and small tensors are
//! read zero-copy from the file's memory map; big ranges are streamed with
//! [`MappedFile::read_at`] (positioned reads around the page cache into reusable buffers),
//! which costs no page faults and leaves nothing resident. Pages touched through the map
//! are handed back with [`TensorEntry::release`], so resident memory stays flat however big
//! the model is. Sources know nothing of plans or writers.

pub mod gguf;
mod layout;
mod legacy;
mod model_config;
pub mod pickle;
pub mod quantized;
mod safetensors;
mod torch_zip;
mod walk;

pub use layout::{AdapterFiles, adapter_dir, open, open_adapter};
pub use model_config::{ModelConfig, model_config, model_folder_files};

use crate::direct_io::{self, AlignedBuf, AtomicReadMode, ReadMode};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A file mapped read-only into memory.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    /// Kept open so writers can copy ranges in the kernel (`copy_file_range`).
    file: std::fs::File,
    map: Option<Mmap>,
    /// A second descriptor with `O_DIRECT`, opened on the first big read; None inside
    /// when the filesystem refuses it, or (`ReadMode::Auto`) when the file is mostly in
    /// the page cache already.
    direct: OnceLock<Option<std::fs::File>>,
    /// Set by [`MappedFile::set_read_mode`]; `Buffered` after a refused direct read.
    mode: AtomicReadMode,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Arc<MappedFile>> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        MappedFile::map(path, file, OnceLock::new())
    }

    /// Maps `file` (named `path` in messages) read-only.
    fn map(
        path: &Path,
        file: std::fs::File,
        direct: OnceLock<Option<std::fs::File>>,
    ) -> Result<Arc<MappedFile>> {
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // An empty file cannot be mapped; treat it as zero bytes.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only. If another process truncates the file while we
            // read it we get SIGBUS, the same hazard every mmap-based loader (safetensors,
            // torch mmap=True) accepts.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?)
        };
        Ok(Arc::new(MappedFile {
            path: path.to_path_buf(),
            file,
            map,
            direct,
            mode: AtomicReadMode::default(),
        }))
    }

    /// Bytes made in memory (a factor expanded from a compact form, say) behind the same
    /// interface as a file: an anonymous in-memory file (memfd), mapped read-only. `path`
    /// names where the bytes came from, for messages; reads never open it.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Arc<MappedFile>> {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a NUL-terminated literal; the returned descriptor is checked.
        let fd = unsafe { libc::memfd_create(c"lorastream".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.write_all(bytes).map_err(|e| Error::io(path, e))?;
        // Decided up front: no direct reads (they would open `path`, another file).
        MappedFile::map(path, file, OnceLock::from(None))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file behind the map.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops the resident pages of `range` (they are re-read from the page cache if
    /// touched again). Pages shared with a neighbour are kept.
    pub fn release(&self, start: usize, len: usize) {
        let Some(map) = &self.map else { return };
        let page = page_size();
        let first = start.div_ceil(page) * page;
        let end = (start + len).min(map.len()) / page * page;
        if end > first {
            // SAFETY: the mapping is a read-only shared file mapping, so DONTNEED only drops
            // clean pages; later reads fault them back in from the file.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
            };
        }
    }

    /// How big reads ([`MappedFile::read_at`]) go; `ReadMode::Auto` by default.
    pub fn set_read_mode(&self, mode: ReadMode) {
        self.mode.set(mode);
    }

    /// Whether more than half of the file is in the page cache (one `mincore` call). The
    /// kernel may answer "no" for files the caller does not own; then reads go direct.
    fn mostly_cached(&self) -> bool {
        let Some(map) = &self.map else { return false };
        let pages = map.len().div_ceil(page_size());
        let mut resident = vec![0u8; pages];
        // SAFETY: `map` is a live mapping of map.len() bytes starting on a page boundary,
        // and `resident` has one byte per page of it, as mincore requires.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                resident.as_mut_ptr(),
            )
        };
        rc == 0 && resident.iter().filter(|&&b| b & 1 == 1).count() * 2 > pages
    }

    /// Reads bytes `[start, start + len)` into `buf` with a positioned read (bypassing
    /// the page cache as the read mode says and the filesystem allows) and returns where
    /// in `buf` they are.
    /// For streaming big ranges: unlike touching the map, this costs no page faults and
    /// leaves nothing resident. Falls back to reading through the cache when a direct
    /// read is refused.
    pub fn read_at(
        &self,
        start: usize,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> std::io::Result<std::ops::Range<usize>> {
        if start
            .checked_add(len)
            .is_none_or(|end| end > self.bytes().len())
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        let mode = self.mode.get();
        let direct = if mode == ReadMode::Buffered {
            None
        } else {
            self.direct
                .get_or_init(|| {
                    if mode == ReadMode::Auto && self.mostly_cached() {
                        None
                    } else {
                        direct_io::open_direct_read(&self.path)
                    }
                })
                .as_ref()
        };
        if direct.is_some() {
            match direct_io::read_range(direct, &self.file, start as u64, len, buf) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The device wants another alignment: read through the cache from now on.
                    self.set_read_mode(ReadMode::Buffered);
                }
                other => return other,
            }
        }
        direct_io::read_range(None, &self.file, start as u64, len, buf)
    }

    /// Asks the kernel to start reading `range` now, so a later touch does not wait. Only
    /// with buffered reads: direct reads skip the cache, so reading ahead into it would
    /// read every byte twice.
    pub fn prefetch(&self, start: usize, len: usize) {
        if self.mode.get() != ReadMode::Buffered {
            return;
        }
        let Some(map) = &self.map else { return };
        let end = (start + len).min(map.len());
        if end > start {
            let _ = map.advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

/// Computes a tensor's elements from a stored form that is not the elements themselves:
/// quantized blocks with their scales, packed integers, a format's own encoding. A source
/// that reads such a format validates everything up front (sizes, the scales' shapes,
/// every field its decoding reads) when it opens the file, so decoding cannot fail and
/// the rest of the program sees an ordinary tensor of the entry's dtype and shape, read
/// a band at a time like any other.
pub trait Decode: Send + Sync + std::fmt::Debug {
    /// Writes the entry-dtype bytes of logical elements `[from, from + n)` (row-major),
    /// `n = out.len() / dtype size`, into `out`. The range is inside the tensor.
    fn decode_into(&self, from: usize, out: &mut [u8]);
    /// What is stored, for `inspect` and messages (e.g. `float8_e4m3fn, 128x128 block scales`).
    fn stored_form(&self) -> String;
    /// Bytes the stored form occupies in its files.
    fn stored_bytes(&self) -> u64;
    /// The file ranges decoding reads, `(file, start, len)`: read ahead and released with
    /// the tensor.
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)>;
    /// An FP8 block-scaled weight's stored entries (for `--requantize fp8-block`, which
    /// passes unmerged ones through as stored); `None` for every other stored form.
    fn fp8_block(&self) -> Option<&quantized::Fp8Parts> {
        None
    }
    /// The dtype a floating output of this entry takes under `--dtype keep`, when it is
    /// not the entry's own dtype (bf16 for bitsandbytes' weights: see
    /// [`crate::plan::DtypeChoice::apply_to`]).
    fn default_output_dtype(&self) -> Option<Dtype> {
        None
    }
}

/// Where a tensor's elements are inside its file.
#[derive(Clone, Debug)]
pub enum TensorData {
    /// `len` bytes at `start`, in row-major order.
    Contiguous { start: usize, len: usize },
    /// A strided view of a storage starting at byte `base`: element `idx` (multi-index) is
    /// at element `offset + Σ idx[i]·strides[i]`. Bounds were checked when the entry was
    /// made.
    Strided {
        base: usize,
        offset: usize,
        strides: Vec<usize>,
    },
    /// Computed by `decoder` from a stored form (see [`Decode`]); element `i` of this
    /// entry is element `offset + i` of the decoder's tensor (row views of it).
    Decoded {
        decoder: Arc<dyn Decode>,
        offset: usize,
    },
}

/// One tensor of a checkpoint.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub file: Arc<MappedFile>,
    pub data: TensorData,
}

impl TensorEntry {
    /// A tensor whose bytes were made in memory (see [`MappedFile::from_bytes`]), named
    /// `name` and reported as coming from `path`.
    pub fn in_memory(
        path: &Path,
        name: &str,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: &[u8],
    ) -> Result<TensorEntry> {
        if checked_nbytes(&shape, dtype) != Some(bytes.len()) {
            return Err(Error::tensor(
                path,
                name,
                "internal: bytes made in memory do not fit the shape",
            ));
        }
        Ok(TensorEntry {
            name: name.to_string(),
            dtype,
            shape,
            file: MappedFile::from_bytes(path, bytes)?,
            data: TensorData::Contiguous {
                start: 0,
                len: bytes.len(),
            },
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor when contiguous (validated not to overflow when the entry was made).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The tensor's bytes in row-major order: borrowed from the map when contiguous,
    /// gathered into a new buffer for strided views (whose size the reader bounded: see
    /// `torch_zip::MAX_OVERLAPPING_VIEW_BYTES`). Streaming code uses
    /// [`TensorEntry::gather`] instead, a band at a time.
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.data {
            TensorData::Contiguous { start, len } => {
                Cow::Borrowed(&self.file.bytes()[*start..*start + *len])
            }
            TensorData::Strided { .. } | TensorData::Decoded { .. } => {
                let mut out = Vec::new();
                self.gather(0, self.numel(), &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Appends the bytes of elements `[from, from + n)` (row-major order) to `out`: a band
    /// of a strided view, so a big view is copied in bounded memory. Elements past the end
    /// are not there to append.
    pub fn gather(&self, from: usize, n: usize, out: &mut Vec<u8>) {
        let all = self.file.bytes();
        let es = self.dtype.size();
        let numel = self.numel();
        let n = n.min(numel.saturating_sub(from));
        if n == 0 {
            return;
        }
        let (base, offset, strides) = match &self.data {
            TensorData::Contiguous { start, .. } => {
                let at = start + from * es;
                out.extend_from_slice(&all[at..at + n * es]);
                return;
            }
            TensorData::Decoded { decoder, offset } => {
                let at = out.len();
                out.resize(at + n * es, 0);
                decoder.decode_into(offset + from, &mut out[at..]);
                return;
            }
            TensorData::Strided {
                base,
                offset,
                strides,
            } => (*base, *offset, strides),
        };
        out.reserve(n * es);
        let dims = self.shape.len();
        // The multi-index of element `from`.
        let mut idx = vec![0usize; dims];
        let mut rest = from;
        for d in (0..dims).rev() {
            idx[d] = rest % self.shape[d];
            rest /= self.shape[d];
        }
        let (inner, inner_stride) = match dims {
            0 => (1, 1),
            _ => (self.shape[dims - 1], strides[dims - 1]),
        };
        let mut left = n;
        while left > 0 {
            let elem = offset + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
            // The rest of the innermost row, or of the band.
            let run = (inner - idx.last().copied().unwrap_or(0)).min(left);
            let at = base + elem * es;
            if inner_stride == 1 {
                out.extend_from_slice(&all[at..at + run * es]);
            } else {
                for j in 0..run {
                    let a = at + j * inner_stride * es;
                    out.extend_from_slice(&all[a..a + es]);
                }
            }
            left -= run;
            if dims == 0 || left == 0 {
                break;
            }
            // Odometer increment by `run` on the innermost dimension, carrying outward.
            idx[dims - 1] += run;
            let mut d = dims - 1;
            while idx[d] >= self.shape[d] && d > 0 {
                idx[d] = 0;
                d -= 1;
                idx[d] += 1;
            }
        }
    }

    /// Byte range of a contiguous slice `[start, start+len)` of the tensor's data, for
    /// streaming a large tensor in pieces. None for strided views.
    pub fn contiguous_range(&self) -> Option<(usize, usize)> {
        match self.data {
            TensorData::Contiguous { start, len } => Some((start, len)),
            TensorData::Strided { .. } | TensorData::Decoded { .. } => None,
        }
    }

    /// Reads bytes `[from, from + len)` of a contiguous tensor into `buf` (see
    /// [`MappedFile::read_at`]) and returns where in `buf` they are; a decoded tensor is
    /// decoded into `buf` (whole elements only); None for strided views, which are read
    /// through [`TensorEntry::bytes`].
    pub fn read_into(
        &self,
        from: usize,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Option<Result<std::ops::Range<usize>>> {
        if let TensorData::Decoded { decoder, offset } = &self.data {
            let es = self.dtype.size();
            if !from.is_multiple_of(es)
                || !len.is_multiple_of(es)
                || from.checked_add(len).is_none_or(|end| end > self.nbytes())
            {
                return Some(Err(Error::tensor(
                    self.file.path(),
                    &self.name,
                    "internal: decoded read not on whole elements inside the tensor",
                )));
            }
            buf.reserve(len);
            decoder.decode_into(offset + from / es, &mut buf.as_mut_slice()[..len]);
            return Some(Ok(0..len));
        }
        let (start, n) = self.contiguous_range()?;
        if from.checked_add(len).is_none_or(|end| end > n) {
            return Some(Err(Error::tensor(
                self.file.path(),
                &self.name,
                "internal: read past the end of the tensor",
            )));
        }
        Some(self.file.read_at(start + from, len, buf).map_err(|e| {
            Error::tensor(self.file.path(), &self.name, format!("reading failed: {e}"))
        }))
    }

    /// Starts reading the first `len` bytes of the tensor ahead of use.
    pub fn prefetch(&self, len: usize) {
        match &self.data {
            TensorData::Contiguous { start, len: n } => self.file.prefetch(*start, (*n).min(len)),
            // The same share of every stored range (quantized data and its scales).
            TensorData::Decoded { decoder, .. } => {
                let share = len as f64 / self.nbytes().max(1) as f64;
                for (f, start, n) in decoder.stored_ranges() {
                    f.prefetch(start, ((n as f64 * share).ceil() as usize).min(n));
                }
            }
            TensorData::Strided { .. } => {}
        }
    }

    /// Tells the kernel the tensor's pages are no longer needed.
    pub fn release(&self) {
        match &self.data {
            TensorData::Contiguous { start, len } => self.file.release(*start, *len),
            TensorData::Decoded { decoder, .. } => {
                for (f, start, n) in decoder.stored_ranges() {
                    f.release(start, n);
                }
            }
            TensorData::Strided { .. } => {}
        }
    }
}

/// What kind of files a checkpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    Safetensors,
    TorchZip,
    /// torch < 1.6 (or `_use_new_zipfile_serialization=False`): pickles, then raw storages.
    TorchLegacy,
    /// llama.cpp's GGUF (one file: metadata, then tensors, many block-quantized).
    Gguf,
}

impl SourceFormat {
    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Safetensors => "safetensors",
            SourceFormat::TorchZip => "torch-zip",
            SourceFormat::TorchLegacy => "torch-legacy",
            SourceFormat::Gguf => "gguf",
        }
    }
}

/// All tensors of one checkpoint (one file, a sharded set, or a folder's weights).
#[derive(Debug)]
pub struct Checkpoint {
    /// The path the user gave.
    pub path: PathBuf,
    pub format: SourceFormat,
    pub files: Vec<Arc<MappedFile>>,
    /// In file order (shards in index order, tensors by position within each file).
    pub tensors: Vec<TensorEntry>,
    /// Names of non-tensor entries that were skipped (e.g. `epoch` in a training save).
    pub skipped: Vec<String>,
}

impl Checkpoint {
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// How big reads of the checkpoint's files go; see [`MappedFile::read_at`].
    pub fn set_read_mode(&self, mode: ReadMode) {
        for f in &self.files {
            f.set_read_mode(mode);
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Checks that `shape` has a representable element count and byte size.
pub(crate) fn checked_nbytes(shape: &[usize], dtype: Dtype) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?
        .checked_mul(dtype.size())
}

#[cfg(test)]
mod read_tests {
    use super::*;

    /// Bytes made in memory read back in every read mode, and never from `path`.
    #[test]
    fn in_memory_tensors_read_in_every_mode() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let t = TensorEntry::in_memory(
            Path::new("/no/such/file"),
            "t",
            Dtype::U8,
            vec![100, 100],
            &data,
        )
        .unwrap();
        assert_eq!(&t.bytes()[..], &data[..]);
        for mode in [ReadMode::Auto, ReadMode::Direct, ReadMode::Buffered] {
            t.file.set_read_mode(mode);
            let mut buf = AlignedBuf::default();
            let r = t.read_into(10, 5000, &mut buf).unwrap().unwrap();
            assert_eq!(&buf.as_slice()[r], &data[10..5010], "{mode:?}");
        }
        assert!(TensorEntry::in_memory(Path::new("x"), "t", Dtype::F32, vec![3], &[0; 8]).is_err());
    }

    /// Bands of strided views gathered at any split equal the element-by-element answer:
    /// transposes, slices with an offset, broadcast (stride 0) and scalar views.
    #[test]
    fn gathered_bands_match_element_by_element() {
        let data: Vec<u8> = (0..=255u8).collect();
        let file = MappedFile::from_bytes(Path::new("f"), &data).unwrap();
        let cases: [(&[usize], &[usize], usize); 6] = [
            (&[4, 6], &[1, 4], 0),
            (&[3, 5], &[16, 2], 7),
            (&[2, 3, 4], &[0, 4, 1], 3),
            (&[5, 7], &[0, 0], 9),
            (&[], &[], 11),
            (&[3, 1, 4], &[20, 999, 1], 1),
        ];
        for (shape, strides, offset) in cases {
            let t = TensorEntry {
                name: "t".into(),
                dtype: Dtype::U16,
                shape: shape.to_vec(),
                file: file.clone(),
                data: TensorData::Strided {
                    base: 2,
                    offset,
                    strides: strides.to_vec(),
                },
            };
            let n = t.numel();
            let mut want = Vec::new();
            for flat in 0..n {
                let (mut rest, mut elem) = (flat, offset);
                for d in (0..shape.len()).rev() {
                    elem += (rest % shape[d]) * strides[d];
                    rest /= shape[d];
                }
                want.extend_from_slice(&data[2 + elem * 2..2 + elem * 2 + 2]);
            }
            assert_eq!(&t.bytes()[..], &want[..], "{shape:?} {strides:?}");
            for band in [1, 2, 3, 5, 7, n.max(1)] {
                let mut got = Vec::new();
                let mut at = 0;
                while at < n {
                    t.gather(at, band, &mut got);
                    at += band;
                }
                assert_eq!(got, want, "{shape:?} {strides:?} band {band}");
            }
            let mut past = Vec::new();
            t.gather(n, 5, &mut past);
            assert!(past.is_empty());
        }
    }

    /// A file truncated after it was opened gives an error naming the problem, not a
    /// SIGBUS (which touching the map would), in every read mode.
    #[test]
    fn reads_of_a_file_truncated_under_us_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for mode in [ReadMode::Auto, ReadMode::Direct, ReadMode::Buffered] {
            std::fs::write(&path, &data).unwrap();
            let f = MappedFile::open(&path).unwrap();
            f.set_read_mode(mode);
            let mut buf = AlignedBuf::default();
            let r = f.read_at(10, 5000, &mut buf).unwrap();
            assert_eq!(&buf.as_slice()[r], &data[10..5010]);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(4096)
                .unwrap();
            let e = f.read_at(4000, 5000, &mut buf).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{mode:?}");
            assert!(f.read_at(0, data.len() + 1, &mut buf).is_err());
        }
    }

    /// Element i decodes to the f32 value `i + bias`, read from a one-byte stored form.
    #[derive(Debug)]
    struct Counting {
        file: Arc<MappedFile>,
        bias: f32,
    }

    impl Decode for Counting {
        fn decode_into(&self, from: usize, out: &mut [u8]) {
            for (k, e) in out.chunks_exact_mut(4).enumerate() {
                e.copy_from_slice(&((from + k) as f32 + self.bias).to_le_bytes());
            }
        }
        fn stored_form(&self) -> String {
            "counting".into()
        }
        fn stored_bytes(&self) -> u64 {
            1
        }
        fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
            vec![(self.file.clone(), 0, 1)]
        }
    }

    #[test]
    fn decoded_tensors_read_like_stored_ones() {
        let file = MappedFile::from_bytes(Path::new("q.bin"), &[7]).unwrap();
        let t = TensorEntry {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![3, 5],
            file: file.clone(),
            data: TensorData::Decoded {
                decoder: Arc::new(Counting { file, bias: 0.5 }),
                offset: 0,
            },
        };
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let all: Vec<f32> = (0..15).map(|i| i as f32 + 0.5).collect();
        assert_eq!(f32s(&t.bytes()), all);
        assert!(t.contiguous_range().is_none());
        let mut out = vec![9u8];
        t.gather(4, 3, &mut out);
        assert_eq!(out[0], 9);
        assert_eq!(f32s(&out[1..]), all[4..7]);
        // Past the end: only what is there.
        out.clear();
        t.gather(13, 10, &mut out);
        assert_eq!(f32s(&out), all[13..]);
        let mut buf = AlignedBuf::default();
        let r = t.read_into(20, 20, &mut buf).unwrap().unwrap();
        assert_eq!(f32s(&buf.as_slice()[r]), all[5..10]);
        assert!(t.read_into(2, 4, &mut buf).unwrap().is_err());
        assert!(t.read_into(40, 40, &mut buf).unwrap().is_err());
        // A row view decodes its own row.
        let row = crate::compute::rows::row_view(&t, 2).unwrap();
        assert_eq!(row.shape, vec![1, 5]);
        assert_eq!(f32s(&row.bytes()), all[10..15]);
        t.prefetch(8);
        t.release();
    }
}
