//! Cancelling runs from inside the process. The command line stops on a signal by exiting
//! (see `sink::install_interrupt_cleanup`); a host that must go on living after a cancel
//! (the Python package, on KeyboardInterrupt) calls [`request`] instead: every run in
//! progress then fails with [`Error::Interrupted`] at its next piece of output, and the
//! usual error path removes its unfinished output (the `TempOutput`s are dropped).
//! Checked where every writing job passes often (`pipeline::write_pipelined`, once per
//! piece on both of its threads) and per tensor in `diff`.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a cancel was requested and not cleared since. Process-wide: a Ctrl-C means
/// "stop", for every run the process has going.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every run in progress to stop.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Lets runs go on again; the host calls it once the cancelled runs have returned.
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}

/// Whether a cancel is pending.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// `Err(Interrupted)` when a cancel is pending.
pub fn check() -> Result<()> {
    if requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

// Tested in tests/cancel.rs: a test binary of its own, since the flag is process-wide and
// would fail the runs of other tests running alongside.
