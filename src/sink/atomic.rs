//! Outputs appear whole or not at all: every writer works on a temp file (or folder)
//! beside the destination and renames it into place only on success. Dropping an
//! uncommitted output deletes it, and Ctrl-C deletes every output still in progress before
//! the process exits.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Temp paths in progress, for the Ctrl-C handler.
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Installs a Ctrl-C / SIGTERM handler that removes unfinished outputs, then exits
/// with status 130. Call once from a binary; calling it again is harmless.
pub fn install_interrupt_cleanup() {
    let _ = ctrlc::set_handler(|| {
        let list = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
        for p in list.iter() {
            remove_any(p);
        }
        eprintln!("error: interrupted; unfinished output removed");
        std::process::exit(130);
    });
}

fn remove_any(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
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
    /// Reserves a temp path beside `dest` (a file or a folder, the caller creates it).
    pub fn new(dest: &Path) -> Result<TempOutput> {
        let name = dest
            .file_name()
            .ok_or_else(|| {
                Error::Usage(format!("output path '{}' has no file name", dest.display()))
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::io(
                &parent,
                std::io::Error::new(std::io::ErrorKind::NotFound, "output folder does not exist"),
            ));
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = parent.join(format!(".{name}.lorastream-tmp-{}-{n}", std::process::id()));
        IN_PROGRESS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(temp.clone());
        Ok(TempOutput {
            dest: dest.to_path_buf(),
            temp,
            done: false,
        })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The final destination.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the temp output into place. A destination folder must be empty (it is
    /// replaced); a destination file is replaced.
    pub fn commit(mut self) -> Result<()> {
        let mut list = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
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
            let mut list = IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner());
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
}
