//! `WriteBehind`: whole aligned blocks written at given offsets on helper threads, up to
//! [`IN_FLIGHT`] at once, for `DirectFileWriter`'s direct writes.
//!
//! Why: one `O_DIRECT` write at a time leaves the device idle between one write's
//! completion and the next one's submission (the caller is copying the next buffer
//! meanwhile), and gives it a single request to work on. On the virtio disk the CPU
//! benchmarks ran on (`bench/RESULTS-cpu-epyc-run3.md`), two 8 MiB writes in flight
//! wrote 1.4-2× faster than one, measured side by side with `dd oflag=direct`; three or
//! four were no better than two. The caller fills its next buffer while these are written;
//! buffers come back for reuse, so a writer holds at most `IN_FLIGHT + 1`: its own and
//! `IN_FLIGHT` made here.
//!
//! Writes go to disjoint ranges, so their order does not matter; a caller that writes
//! over a range again (a patch below what it handed out) first waits for the writes that
//! overlap it ([`WriteBehind::wait_overlapping`]). The first failure is kept and returned by
//! the next call; `drain` returns it at the latest. A write the device refuses with
//! `EINVAL` (an alignment the filesystem does not take directly) is written through the
//! ordinary descriptor instead, and every later one too; the owner learns it from
//! [`WriteBehind::direct_refused`] and stops handing out direct writes.

use crate::direct_io::AlignedBuf;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Writes in flight at once (and helper threads).
pub(crate) const IN_FLIGHT: usize = 2;

/// One write handed to a helper: `buf[..len]` at file offset `at`.
struct Job {
    buf: AlignedBuf,
    len: usize,
    at: u64,
}

/// A finished write: its buffer back, and how it went.
struct Done {
    buf: AlignedBuf,
    at: u64,
    result: io::Result<()>,
}

pub(crate) struct WriteBehind {
    /// None once dropping: the helpers stop when it closes.
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    helpers: Vec<JoinHandle<()>>,
    /// (offset, length) of every write handed out and not yet reported done.
    in_flight: Vec<(u64, usize)>,
    /// Buffers back from finished writes.
    free: Vec<AlignedBuf>,
    /// Buffers made so far (in flight, free, or lent to the caller).
    made: usize,
    /// The first write that failed; returned by every call from then on.
    failed: Option<io::Error>,
    /// Set by a helper once the device refused a direct write.
    refused: Arc<AtomicBool>,
}

impl WriteBehind {
    /// Helpers writing through `direct` (an `O_DIRECT` descriptor) and, once that is
    /// refused, through `buffered` (the same file, ordinary).
    pub(crate) fn new(direct: &File, buffered: &File) -> io::Result<WriteBehind> {
        let (jobs, job_rx) = sync_channel::<Job>(0);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done) = channel::<Done>();
        let refused = Arc::new(AtomicBool::new(false));
        let mut helpers = Vec::with_capacity(IN_FLIGHT);
        for i in 0..IN_FLIGHT {
            let (direct, buffered) = (direct.try_clone()?, buffered.try_clone()?);
            let (job_rx, done_tx, refused) =
                (Arc::clone(&job_rx), done_tx.clone(), Arc::clone(&refused));
            helpers.push(
                std::thread::Builder::new()
                    .name(format!("lorastream-write-{i}"))
                    .spawn(move || helper(&job_rx, &done_tx, &direct, &buffered, &refused))?,
            );
        }
        Ok(WriteBehind {
            jobs: Some(jobs),
            done,
            helpers,
            in_flight: Vec::with_capacity(IN_FLIGHT),
            free: Vec::new(),
            made: 0,
            failed: None,
            refused,
        })
    }

    /// Whether a direct write was refused (EINVAL): everything handed out was still
    /// written, through the ordinary descriptor, but the owner should write that way now.
    pub(crate) fn direct_refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// A buffer of at least `cap` bytes to fill next: one back from a finished write, a new
    /// one while fewer than `IN_FLIGHT` were made, else the next to finish.
    pub(crate) fn buffer(&mut self, cap: usize) -> io::Result<AlignedBuf> {
        self.check()?;
        if self.free.is_empty() && self.made < IN_FLIGHT {
            self.made += 1;
            return Ok(AlignedBuf::with_capacity(cap));
        }
        while self.free.is_empty() {
            self.wait_one()?;
        }
        let mut buf = self.free.pop().unwrap_or_default();
        buf.reserve(cap);
        Ok(buf)
    }

    /// Hands `buf[..len]` (whole blocks) to a helper, to be written at `at`; waits while
    /// `IN_FLIGHT` writes are already out.
    pub(crate) fn submit(&mut self, buf: AlignedBuf, len: usize, at: u64) -> io::Result<()> {
        self.check()?;
        while self.in_flight.len() >= IN_FLIGHT {
            self.wait_one()?;
        }
        let Some(jobs) = &self.jobs else {
            return Err(io::Error::other("the writing threads have stopped"));
        };
        jobs.send(Job { buf, len, at })
            .map_err(|_| io::Error::other("the writing threads have stopped"))?;
        self.in_flight.push((at, len));
        Ok(())
    }

    /// Waits until no write in flight touches [from, to).
    pub(crate) fn wait_overlapping(&mut self, from: u64, to: u64) -> io::Result<()> {
        while self
            .in_flight
            .iter()
            .any(|&(at, len)| at < to && from < at + len as u64)
        {
            self.wait_one()?;
        }
        self.check()
    }

    /// Waits for every write handed out; the first failure, if any.
    pub(crate) fn drain(&mut self) -> io::Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        self.check()
    }

    fn check(&mut self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    /// Takes the next finished write's report.
    fn wait_one(&mut self) -> io::Result<()> {
        let d = self
            .done
            .recv()
            .map_err(|_| io::Error::other("a writing thread stopped unexpectedly"))?;
        if let Some(i) = self.in_flight.iter().position(|&(at, _)| at == d.at) {
            self.in_flight.swap_remove(i);
        }
        self.free.push(d.buf);
        if let Err(e) = d.result {
            self.failed.get_or_insert(e);
        }
        self.check()
    }
}

impl Drop for WriteBehind {
    /// Closes the queue and joins the helpers: each finishes at most the write it is in,
    /// so none goes on writing into a file its owner has given up.
    fn drop(&mut self) {
        self.jobs = None;
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A helper thread: writes the jobs it takes until the queue closes.
fn helper(
    jobs: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
    direct: &File,
    buffered: &File,
    refused: &AtomicBool,
) {
    loop {
        // The lock is held only while waiting for a job; the other helper waits for the lock.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(p) => p.into_inner().recv(),
        };
        let Ok(job) = job else { return };
        let bytes = &job.buf.as_slice()[..job.len];
        let result = write_blocks(direct, buffered, refused, bytes, job.at);
        let report = Done {
            buf: job.buf,
            at: job.at,
            result,
        };
        if done.send(report).is_err() {
            return;
        }
    }
}

/// Writes `bytes` at `at` directly, or through `buffered` once the device refused that
/// (also the background copies' writes, `direct_file.rs`).
pub(crate) fn write_blocks(
    direct: &File,
    buffered: &File,
    refused: &AtomicBool,
    bytes: &[u8],
    at: u64,
) -> io::Result<()> {
    if !refused.load(Ordering::Relaxed) {
        match direct.write_all_at(bytes, at) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                refused.store(true, Ordering::Relaxed)
            }
            other => return other,
        }
    }
    buffered.write_all_at(bytes, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct_io::{ALIGN, open_direct_write};

    /// Blocks handed out of order, more than `IN_FLIGHT` at once, with buffers reused, land
    /// where they were sent; a patch after `wait_overlapping` is not overwritten.
    #[test]
    fn blocks_land_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let direct = open_direct_write(&path).unwrap_or_else(|| file.try_clone().unwrap());
        let mut w = WriteBehind::new(&direct, &file).unwrap();
        let n = 8;
        let mut want = vec![0u8; n * 3 * ALIGN];
        for i in [3, 0, 7, 1, 6, 2, 5, 4] {
            let mut b = w.buffer(3 * ALIGN).unwrap();
            let fill = (i * 37 + 1) as u8;
            b.as_mut_slice()[..3 * ALIGN].fill(fill);
            want[i * 3 * ALIGN..(i + 1) * 3 * ALIGN].fill(fill);
            w.submit(b, 3 * ALIGN, (i * 3 * ALIGN) as u64).unwrap();
            assert!(w.in_flight.len() <= IN_FLIGHT);
            assert!(w.made <= IN_FLIGHT, "buffers are reused");
        }
        w.wait_overlapping(10, 20).unwrap();
        assert!(w.in_flight.iter().all(|&(at, _)| at != 0));
        file.write_all_at(b"patch", 10).unwrap();
        want[10..15].copy_from_slice(b"patch");
        w.drain().unwrap();
        assert!(w.in_flight.is_empty());
        drop(w);
        assert!(std::fs::read(&path).unwrap() == want);
    }

    /// A failed write is returned by a later call, and by every call after it.
    #[test]
    fn a_failed_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"x").unwrap();
        // Read-only descriptors: every write fails (EBADF), direct or not.
        let ro = File::open(&path).unwrap();
        let mut w = WriteBehind::new(&ro, &ro).unwrap();
        let b = w.buffer(ALIGN).unwrap();
        w.submit(b, ALIGN, 0).unwrap();
        let e = w.drain().unwrap_err();
        let bad_fd = format!("os error {}", libc::EBADF);
        assert!(e.to_string().contains(&bad_fd), "{e}");
        assert!(w.buffer(ALIGN).is_err());
        assert!(
            w.submit(AlignedBuf::with_capacity(ALIGN), ALIGN, 0)
                .is_err()
        );
        assert!(!w.direct_refused());
    }
}
