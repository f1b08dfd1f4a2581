//! Outputs appear whole or not at all, and are on disk when a run says it succeeded:
//! every writer works on a temp file (or folder) beside the destination, fsyncs it and
//! renames it into place only on success, then fsyncs the folder that holds the new name.
//! Dropping an uncommitted output deletes it; SIGINT, SIGTERM, SIGHUP and SIGQUIT delete
//! every output still in progress before the process exits with 128 + the signal.
//!
//! A run killed with SIGKILL (or by a power cut) cannot clean up. Temp names carry the
//! host and the process id (`.NAME.lorastream-tmp-HOST-PID-N`), so the next run writing
//! the same output removes the temp files of processes that no longer exist on this host
//! (and never those of a live run, nor of a run on another host sharing the volume).

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// Temp paths in progress, for the signal handler.
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// What temp names carry between the output's name and the owner.
const MARKER: &str = ".lorastream-tmp-";

/// The signals that end a run from outside: Ctrl-C, a scheduler's or `timeout`'s stop, a
/// dropped terminal or ssh session, Ctrl-\.
const STOP_SIGNALS: [(i32, &str); 4] = [
    (libc::SIGINT, "SIGINT"),
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGQUIT, "SIGQUIT"),
];

/// Installs handlers for SIGINT, SIGTERM, SIGHUP and SIGQUIT that remove unfinished
/// outputs, print one line on stderr and exit with 128 + the signal (130, 143, 129, 131).
/// Call once from a binary; calling it again is harmless. The handling runs on a thread
/// of its own (signal-hook's iterator), so it may take locks and touch the filesystem.
pub fn install_interrupt_cleanup() {
    INSTALL.call_once(|| {
        let Ok(mut signals) =
            signal_hook::iterator::Signals::new(STOP_SIGNALS.iter().map(|(s, _)| *s))
        else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    stop(sig);
                }
            });
    });
}

/// Removes every output in progress and exits. The lock is held until the process is
/// gone, so no new temp output can be registered (and left behind) meanwhile.
fn stop(sig: i32) -> ! {
    let list = lock();
    for p in list.iter() {
        remove_any(p);
    }
    let name = STOP_SIGNALS
        .iter()
        .find(|(s, _)| *s == sig)
        .map_or("a signal", |(_, n)| n);
    let what = if list.is_empty() {
        String::new()
    } else {
        "; unfinished output removed".to_string()
    };
    // Not eprintln!: after a dropped ssh session stderr may be gone, and a failed print
    // must not keep the process from exiting.
    let message = format!("interrupted by {name}{what}");
    let _ = writeln!(std::io::stderr(), "error: {message}");
    // With --json a script still reads exactly one object on stdout.
    if crate::error::json_output() {
        let code = u8::try_from(128 + sig).unwrap_or(u8::MAX);
        let report = crate::error::failure_json("interrupted", &message, None, None, code);
        let _ = writeln!(std::io::stdout(), "{report}");
    }
    std::process::exit(128 + sig);
}

fn lock() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `make`, which creates a file inside an output in progress (a shard in a temp
/// folder), while the signal handler is held off, so it cannot remove the folder while
/// the file appears in it.
pub(crate) fn creating<T>(make: impl FnOnce() -> T) -> T {
    let _held = lock();
    make()
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// This host's name as it goes into temp names (characters other than letters, digits,
/// `.` and `_` become `_`, so the name parses back).
fn host_tag() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // or truncates, and we stop at the first NUL either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The temp name of output `name`, for this process.
fn temp_name(name: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}{MARKER}{}-{}-{n}", host_tag(), std::process::id())
}

/// The output name, host and process id a temp name carries; None for other names.
fn parse_temp_name(file_name: &str) -> Option<(&str, &str, i32)> {
    let rest = file_name.strip_prefix('.')?;
    let at = rest.rfind(MARKER)?;
    let (name, tail) = (&rest[..at], &rest[at + MARKER.len()..]);
    let (head, n) = tail.rsplit_once('-')?;
    let (host, pid) = head.rsplit_once('-')?;
    if name.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((name, host, pid.parse().ok()?))
}

/// Whether process `pid` exists (on this host): kill(pid, 0) fails with ESRCH only for
/// a process that does not. EPERM means it exists but belongs to someone else.
fn process_exists(pid: i32) -> bool {
    if pid <= 0 {
        return true; // not a process id we wrote: leave it alone
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes, from folder `dir`, temp outputs left by runs that were killed without a chance
/// to clean up: those of output `name` (any output when None) whose process no longer
/// exists on this host. Returns what was removed.
pub(crate) fn remove_stale(dir: &Path, name: Option<&str>) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let host = host_tag();
    let mut removed = Vec::new();
    for entry in rd.flatten() {
        let file_name = entry.file_name();
        let Some((of, h, pid)) = file_name.to_str().and_then(parse_temp_name) else {
            continue;
        };
        if name.is_some_and(|n| n != of) || h != host || process_exists(pid) {
            continue;
        }
        let p = entry.path();
        remove_any(&p);
        removed.push(p);
    }
    removed
}

/// fsyncs a folder, so the names created, renamed or removed in it are on disk.
/// Filesystems that cannot sync a folder (EINVAL) keep their names by other means.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    match f.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.map_err(|e| Error::io(dir, e)),
    }
}

/// fsyncs a file that was written by path.
pub(crate) fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// The folder a path is in (`.` for a bare name).
pub(crate) fn parent_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An output being written under a temp name.
#[derive(Debug)]
pub struct TempOutput {
    dest: PathBuf,
    temp: PathBuf,
    done: bool,
}

impl TempOutput {
    /// Reserves a temp path beside `dest` (a file or a folder, the caller creates it), after
    /// removing temp outputs of `dest` that dead runs left. Prefer [`TempOutput::create`],
    /// which creates it where a signal cannot come in between.
    pub fn new(dest: &Path) -> Result<TempOutput> {
        let temp = Self::reserve(dest)?;
        lock().push(temp.clone());
        Ok(TempOutput {
            dest: dest.to_path_buf(),
            temp,
            done: false,
        })
    }

    /// Reserves a temp path beside `dest` and creates the output there with `make`, while
    /// the signal handler is held off: it then sees either no output or one it can remove
    /// whole (never a file created just after it cleaned up).
    pub fn create<T>(
        dest: &Path,
        make: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<(TempOutput, T)> {
        let temp = Self::reserve(dest)?;
        let mut list = lock();
        let made = make(&temp);
        if made.is_ok() {
            list.push(temp.clone());
        }
        drop(list);
        match made {
            Ok(v) => Ok((
                TempOutput {
                    dest: dest.to_path_buf(),
                    temp,
                    done: false,
                },
                v,
            )),
            Err(e) => {
                remove_any(&temp);
                Err(e)
            }
        }
    }

    /// The temp path for `dest`, once its folder is known to exist and stale temps of
    /// `dest` are gone.
    fn reserve(dest: &Path) -> Result<PathBuf> {
        let name = dest
            .file_name()
            .ok_or_else(|| {
                Error::Usage(format!("output path '{}' has no file name", dest.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = parent_of(dest);
        if !parent.is_dir() {
            return Err(Error::io(
                &parent,
                std::io::Error::new(std::io::ErrorKind::NotFound, "output folder does not exist"),
            ));
        }
        remove_stale(&parent, Some(&name));
        Ok(parent.join(temp_name(&name)))
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The final destination.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the temp output into place and fsyncs the folder holding it. The caller has
    /// fsynced the contents. A destination folder must be empty (it is replaced); a
    /// destination file is replaced.
    pub fn commit(self) -> Result<()> {
        let parent = parent_of(&self.dest);
        self.rename_into_place()?;
        sync_dir(&parent)
    }

    /// Renames into place without syncing the folder: for several renames in one folder
    /// that the caller syncs once after the last.
    pub(crate) fn rename_into_place(mut self) -> Result<()> {
        let mut list = lock();
        if self.temp.is_dir() && self.dest.is_dir() {
            std::fs::remove_dir(&self.dest).map_err(|e| Error::io(&self.dest, e))?;
        }
        std::fs::rename(&self.temp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        list.retain(|p| p != &self.temp);
        self.done = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.done {
            let mut list = lock();
            remove_any(&self.temp);
            list.retain(|p| p != &self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_output_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.pth");
        {
            let t = TempOutput::new(&dest).unwrap();
            std::fs::write(t.path(), b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn committed_output_replaces_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.pth");
        std::fs::write(&dest, b"old").unwrap();
        let t = TempOutput::new(&dest).unwrap();
        std::fs::write(t.path(), b"new").unwrap();
        t.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temp_names_parse_back() {
        let n = temp_name("model-00001-of-00002.safetensors");
        let (name, host, pid) = parse_temp_name(&n).unwrap();
        assert_eq!(name, "model-00001-of-00002.safetensors");
        assert_eq!(host, host_tag());
        assert_eq!(pid as u32, std::process::id());
        assert_eq!(parse_temp_name("model.safetensors"), None);
        assert_eq!(parse_temp_name(".x.lorastream-tmp-h-12-a"), None);
    }

    #[test]
    fn stale_temps_of_dead_processes_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        // A process that has exited (and been reaped): its pid no longer exists.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let host = host_tag();
        let stale = dir.path().join(format!(".out.pth{MARKER}{host}-{dead}-0"));
        let live = dir
            .path()
            .join(format!(".out.pth{MARKER}{host}-{}-7", std::process::id()));
        let other_host = dir
            .path()
            .join(format!(".out.pth{MARKER}elsewhere-{dead}-0"));
        let other_output = dir.path().join(format!(".b.pth{MARKER}{host}-{dead}-0"));
        for p in [&stale, &live, &other_host, &other_output] {
            std::fs::write(p, b"x").unwrap();
        }
        let removed = remove_stale(dir.path(), Some("out.pth"));
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists() && live.exists() && other_host.exists());
        assert!(other_output.exists());
        // A new output of the same name clears its stale temps itself.
        std::fs::write(&stale, b"x").unwrap();
        let t = TempOutput::new(&dir.path().join("out.pth")).unwrap();
        assert!(!stale.exists());
        drop(t);
        assert_eq!(remove_stale(dir.path(), None), vec![other_output.clone()]);
    }
}
