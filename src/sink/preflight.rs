//! Checks on the output location, run before a merge starts writing (and by `--dry-run`,
//! so a dry run that passes has checked what a real run would hit first): the output
//! format is known, the destination folder exists and takes a new file (a probe file is
//! created and removed there), and the filesystem has room for the planned bytes.

use super::{OutTensor, OutputFormat};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Headers, the index and per-tensor alignment padding, on top of the tensor bytes: a
/// generous bound (safetensors pads its header to a page; zip entries add a few hundred
/// bytes each).
fn overhead(tensors: usize) -> u64 {
    (1 << 20) + 4096 * tensors as u64
}

/// The path writers create (`out` less a trailing '/') and the folder it goes in.
fn destination(out: &Path) -> (PathBuf, PathBuf) {
    let trimmed = out
        .to_str()
        .map(|s| s.trim_end_matches('/'))
        .filter(|s| !s.is_empty())
        .map_or_else(|| out.to_path_buf(), PathBuf::from);
    let parent = match trimmed.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    (trimmed, parent)
}

/// Bytes available to this user on the filesystem holding `dir` (None if unknown).
fn available_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path; `st` is plain data written by statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Fails (naming the folder) unless an output of `plan` can be written at `out`.
pub fn preflight(out: &Path, plan: &[OutTensor]) -> Result<()> {
    // An output name of no known format is a usage error, before anything else.
    OutputFormat::from_path(out)?;
    let (dest, parent) = destination(out);
    if !parent.is_dir() {
        return Err(Error::io(
            &parent,
            std::io::Error::new(std::io::ErrorKind::NotFound, "output folder does not exist"),
        ));
    }
    // What an existing folder output may hold is `check_output_folder`'s question.
    let probe = parent.join(format!(".lorastream-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| Error::Io {
            // Not `Error::io`: a folder that exists but refuses new files (ENOENT from
            // /proc, say) is no "does not exist".
            path: parent.clone(),
            source: std::io::Error::new(
                e.kind(),
                format!("cannot create a file in the output folder: {e}"),
            ),
        })?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    let needed = plan.iter().map(OutTensor::nbytes).sum::<u64>() + overhead(plan.len());
    if let Some(free) = available_bytes(&parent) {
        if free < needed {
            return Err(Error::Plan(format!(
                "{}: not enough free space for {}: it needs about {needed} bytes, the filesystem has \
                 {free} available. Nothing was written",
                parent.display(),
                dest.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    fn plan(bytes: usize) -> Vec<OutTensor> {
        vec![OutTensor {
            name: "w".into(),
            dtype: Dtype::U8,
            shape: vec![bytes],
        }]
    }

    #[test]
    fn checks_folder_space_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        preflight(&dir.path().join("o.safetensors"), &plan(10)).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe left"
        );
        let e = preflight(&dir.path().join("missing/o.pth"), &plan(10)).unwrap_err();
        assert!(e.to_string().contains("missing: does not exist"), "{e}");
        let e = preflight(&dir.path().join("o.pth"), &plan(usize::MAX / 4)).unwrap_err();
        assert!(e.to_string().contains("not enough free space"), "{e}");
        let shards = dir.path().join("shards");
        std::fs::create_dir(&shards).unwrap();
        preflight(&dir.path().join("shards/"), &plan(10)).unwrap();
        assert!(
            preflight(&dir.path().join("o.txt"), &plan(1))
                .unwrap_err()
                .is_usage()
        );
    }

    #[test]
    fn unwritable_folder_is_refused() {
        // /proc takes no new files, not even from root (tests may run as root, where a
        // read-only mode would not stop the probe).
        let e = preflight(Path::new("/proc/o.safetensors"), &plan(1)).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("cannot create a file in the output folder") && e.contains("/proc"),
            "{e}"
        );
    }
}
