//! Loading the CUDA libraries and opening a device, without a panic on a machine that has
//! neither: cudarc panics where a library is missing, so libcuda and libnvrtc are looked
//! for first (`is_culib_present`), then the devices are counted, and only then is a
//! context created. Every failure is a one-line reason (`--device auto` prints it).

use cudarc::driver::{CudaContext, sys as drv_sys};
use cudarc::nvrtc::sys as nvrtc_sys;
use std::sync::Arc;

/// Whether libnvrtc can be loaded (cudarc panics on first use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library names cudarc would use.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// Whether the CUDA driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: as above.
    unsafe { drv_sys::is_culib_present() }
}

/// The version of the libnvrtc that would be used, e.g. (12, 8).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    r.result().ok().map(|_| (major, minor))
}

/// An opened device: its context (cudarc's event tracking off), name and compute
/// capability.
pub(super) struct Device {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    pub major: i32,
    pub minor: i32,
}

/// Opens GPU `ordinal`, or says why not in one line.
pub(super) fn open_device(ordinal: usize) -> std::result::Result<Device, String> {
    let count = CudaContext::device_count()
        .map_err(|e| format!("CUDA driver error: {}", one_line(&e.to_string())))?;
    if count <= 0 {
        return Err("no CUDA device".into());
    }
    if ordinal >= count as usize {
        return Err(format!(
            "there is no cuda:{ordinal}; {count} CUDA device(s) present"
        ));
    }
    if !nvrtc_present() {
        return Err(
            "libnvrtc not found: install the CUDA toolkit or put libnvrtc.so.12 on LD_LIBRARY_PATH"
                .into(),
        );
    }
    let derr = driver_error;
    let ctx = CudaContext::new(ordinal).map_err(|e| derr("cannot open the device", e))?;
    // Streams are ordered by our own events; cudarc's per-buffer tracking would add
    // waits of its own.
    // SAFETY: called before any buffer exists; every cross-stream use waits on an event
    // (`buffers.rs`, `pipeline.rs`), and buffers are only freed when all streams are idle.
    unsafe { ctx.disable_event_tracking() };
    let name = ctx.name().unwrap_or_else(|_| "GPU".into());
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| derr("compute capability", e))?;
    Ok(Device {
        ctx,
        name,
        major,
        minor,
    })
}

/// A driver error as `what: message`, in one line.
pub(super) fn driver_error(what: &str, e: cudarc::driver::DriverError) -> String {
    format!("{what}: {}", one_line(&e.to_string()))
}

/// Whitespace folded, at most 300 bytes: messages from the driver and NVRTC can span
/// pages.
pub(super) fn one_line(s: &str) -> String {
    let mut out: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > 300 {
        let mut cut = 300;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}
