//! The extension module `lorastream._lorastream`: the lorastream command line, compiled
//! into the Python process. `run` executes one command (always with `--json`) on a worker
//! thread with the GIL released and hands back its one JSON object; the Python package
//! (python/lorastream) builds the arguments from keyword arguments and turns the object
//! into a dict or a `LorastreamError`. Going through the CLI's own parser and `run` keeps
//! every check, default and output byte identical to the binary's. `main` is the
//! `lorastream` console command itself.
//!
//! Ctrl-C: while `run` waits it checks Python's signals every few milliseconds; on
//! KeyboardInterrupt it sets the library's cancel flag (`lorastream::cancel`), waits for
//! the run to stop (its unfinished output is removed as on any error), clears the flag and
//! raises the KeyboardInterrupt.
//!
//! Recipes (`run`): the jobs are child processes, and this process's executable is the
//! Python interpreter, so the Python package passes the program that runs a job (the
//! interpreter running this package's `lorastream` command). The runner installs no
//! signal handlers here (Python keeps its own); the cancel flag reaches it instead and it
//! sends SIGINT to the running jobs, which remove their unfinished output.

// The binary's `main` and its printing are only used by `cli_main`; the rest of the file
// is what `run` calls.
#[allow(dead_code)]
#[path = "../../../src/main.rs"]
mod cli;

use pyo3::prelude::*;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// How often a waiting `run` looks for a KeyboardInterrupt: short enough that Ctrl-C feels
/// immediate, long enough to cost nothing.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// One command's outcome: whether it succeeded and its `--json` object.
type Outcome = (bool, String);

/// The program and the arguments before a job's command that run a recipe's jobs: the
/// executable of this process is the Python interpreter, not lorastream, so the Python
/// package names the program (see `lorastream._job_program`).
type Program = (PathBuf, Vec<OsString>);

/// Parses and runs `args` without printing (the arguments carry `--json`, so the command
/// returns its one object as text; `run`, a recipe: its JSON lines, one per job and the
/// summary last, joined by newlines). Arguments clap refuses are a usage failure, as the
/// binary reports them with `--json`.
fn execute(args: &[OsString], program: Option<Program>) -> Outcome {
    let (command, order, shard_size_given) = match cli::parse(args) {
        Ok(p) => p,
        Err(e) => {
            let v =
                lorastream::error::failure_json("usage", &cli::usage_message(&e), None, None, 2);
            return (false, v.to_string());
        }
    };
    let mut lines: Vec<String> = Vec::new();
    let mut collect = |line: &str| lines.push(line.to_string());
    // Python's own signal handling stays: a KeyboardInterrupt reaches the recipe runner
    // as a cancel (see `run`), which it forwards to its jobs.
    let mut host = cli::RecipeHost {
        program,
        catch_signals: false,
        emit: &mut collect,
    };
    let result = cli::run_hosted(command, order, shard_size_given, &mut host);
    drop(host);
    match result {
        // A recipe: ok when every job was (the command's exit code 0).
        Ok(done) if !lines.is_empty() => (done.code == 0, lines.join("\n")),
        Ok(done) => (true, done.stdout),
        Err(failed) => (false, failed.error.to_json(failed.code).to_string()),
    }
}

/// Runs one lorastream command (`args`: the program name first, `--json` among them)
/// with the GIL released and returns `(ok, json_text)`: the report or the failure
/// object, as the command prints them (a recipe: its JSON lines). KeyboardInterrupt
/// cancels the run (a recipe's running jobs get SIGINT), removes its unfinished output
/// and is raised once the run has stopped. `program`: what runs a recipe's jobs.
#[pyfunction]
#[pyo3(signature = (args, program=None))]
fn run(py: Python<'_>, args: Vec<OsString>, program: Option<Program>) -> PyResult<Outcome> {
    let (tx, rx) = mpsc::channel::<Outcome>();
    std::thread::Builder::new()
        .name("lorastream".into())
        .spawn(move || {
            // The receiver may be gone only if this thread outlived `run`, which it does not.
            let _ = tx.send(execute(&args, program));
        })
        .map_err(|e| {
            pyo3::exceptions::PyRuntimeError::new_err(format!("cannot start a thread: {e}"))
        })?;
    let mut rx = rx;
    loop {
        // The receiver moves in and out: it is Send but not Sync, and the GIL-free closure
        // must be Send.
        let (got, back) = py.detach(move || (rx.recv_timeout(SIGNAL_POLL), rx));
        rx = back;
        match got {
            Ok(outcome) => return Ok(outcome),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                // The worker panicked (its message is on stderr): a bug, reported as one.
                let v = lorastream::error::failure_json(
                    "internal",
                    "internal error: the run panicked",
                    None,
                    None,
                    1,
                );
                return Ok((false, v.to_string()));
            }
        }
        if let Err(interrupt) = py.check_signals() {
            lorastream::cancel::request();
            // Whatever the run ends with (interrupted, or finished just before it saw the
            // flag), the KeyboardInterrupt is what the caller gets.
            let _ = py.detach(move || rx.recv());
            lorastream::cancel::clear();
            return Err(interrupt);
        }
    }
}

/// The `lorastream` command: runs `args` (the program name first) exactly as the binary
/// does, printing on this process's stdout and stderr, and returns the exit code. It
/// installs the binary's signal handlers: Ctrl-C removes unfinished output and ends the
/// process with 130, as the binary does (`run`: forwards them to its jobs, which
/// `program` runs).
#[pyfunction]
#[pyo3(signature = (args, program=None))]
fn main(py: Python<'_>, args: Vec<OsString>, program: Option<Program>) -> u8 {
    cli::install_signal_handlers(&args);
    py.detach(|| cli::cli_main(&args, program))
}

#[pymodule]
fn _lorastream(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Every error kind with what it means, as the README lists them.
    let kinds: Vec<(&str, &str)> = lorastream::error::KINDS.to_vec();
    m.add("KINDS", kinds)?;
    Ok(())
}
