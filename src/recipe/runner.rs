//! Running a recipe's jobs: each job is a child process of this same executable
//! (`lorastream merge … --json`; a host whose executable is not lorastream, the Python
//! package, names the program in `RunOptions`), run in the recipe's folder, one at a
//! time or up to `--jobs N` at once, lowest index first; a job whose input is an earlier
//! job's output waits for that job (and is not run when it failed).
//!
//! Children, not threads: every job gets the command line's own behaviour (its checks,
//! its atomic outputs, its exit codes, its signal cleanup) and its own memory, and one
//! job's crash cannot take the batch with it. Each child runs in a process group of its
//! own, so a Ctrl-C reaches the runner only, which forwards it: SIGINT, SIGTERM, SIGHUP
//! and SIGQUIT go to every running child (each removes its unfinished output and exits
//! 128+N), no new job starts, the runner waits for them, prints the summary and exits
//! 128+N. A second signal kills the children outright. On Linux a child also gets
//! SIGTERM when the runner itself dies (SIGKILL), so no orphan keeps writing. A host that
//! keeps its own signal handling (`catch_signals: false`) stops the run with
//! `crate::cancel::request`, which the runner forwards to the jobs as a SIGINT.
//!
//! Resume records (see [`super::record`]) are written by the runner, not the children:
//! `started` before a child starts, `complete` once it succeeded.

use super::parse::{Job, Recipe};
use super::record::{self, State, Verdict};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to run a recipe.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Jobs at a time (at least 1).
    pub jobs: usize,
    /// After a failure, start the remaining jobs anyway.
    pub keep_going: bool,
    /// Say what would run and what would be skipped; run nothing.
    pub dry_run: bool,
    /// Run every job, complete or not.
    pub force: bool,
    /// One JSON line per job and one for the summary on stdout.
    pub json: bool,
    /// The program the jobs run (this executable).
    pub exe: PathBuf,
    /// Arguments given to `exe` before the job's command. Empty for the command line; a
    /// host whose executable is not lorastream (the Python package: the interpreter)
    /// names the program here (`python -c …`).
    pub exe_args: Vec<std::ffi::OsString>,
    /// Catch SIGINT, SIGTERM, SIGHUP and SIGQUIT and forward them to the jobs (the
    /// command line). A host that keeps its own signal handling (the Python package)
    /// turns this off and stops a run through [`crate::cancel::request`] instead, which
    /// the runner forwards to the jobs as SIGINT; either way it polls the cancel flag.
    pub catch_signals: bool,
}

/// The end of a run.
#[derive(Clone, Debug)]
pub struct Summary {
    pub jobs: usize,
    pub ok: usize,
    pub skipped: usize,
    pub failed: usize,
    pub not_run: usize,
    /// The exit code: 0 every job ok or skipped, 1 a job failed or was not run, 128+N
    /// stopped by signal N.
    pub exit_code: u8,
}

#[derive(Clone, Debug, PartialEq)]
enum St {
    Pending,
    Running,
    Ok,
    Skipped,
    Failed,
    NotRun,
}

/// A job in progress.
struct Running {
    index: usize,
    child: Child,
    started: Instant,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<()>,
    /// The inputs' identity when it started (the record's, if it succeeds).
    inputs: Option<Vec<record::FileId>>,
}

/// Stop signals and the children they are forwarded to.
struct Stopper {
    signal: Arc<AtomicI32>,
    /// Pids of the running children. Held while a child is started or reaped, so a
    /// forwarded signal never misses a new child nor hits a reaped (reusable) pid.
    pids: Arc<Mutex<Vec<i32>>>,
    handle: Option<signal_hook::iterator::Handle>,
    thread: Option<JoinHandle<()>>,
}

const STOP_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

impl Stopper {
    fn install(catch_signals: bool) -> Stopper {
        let signal = Arc::new(AtomicI32::new(0));
        let count = Arc::new(AtomicUsize::new(0));
        let pids: Arc<Mutex<Vec<i32>>> = Arc::new(Mutex::new(Vec::new()));
        let mut s = Stopper {
            signal: signal.clone(),
            pids: pids.clone(),
            handle: None,
            thread: None,
        };
        if !catch_signals {
            return s;
        }
        let Ok(mut signals) = signal_hook::iterator::Signals::new(STOP_SIGNALS) else {
            return s;
        };
        s.handle = Some(signals.handle());
        s.thread = std::thread::Builder::new()
            .name("recipe-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    signal.store(sig, Ordering::SeqCst);
                    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                    let forward = if n > 1 { libc::SIGKILL } else { sig };
                    let list = pids.lock().unwrap_or_else(|p| p.into_inner());
                    for &pid in list.iter() {
                        // SAFETY: kill(2) on a child we have not reaped yet (the list is
                        // updated under this lock when a child is reaped).
                        unsafe {
                            libc::kill(pid, forward);
                        }
                    }
                }
            })
            .ok();
        s
    }

    fn stopped(&self) -> i32 {
        self.signal.load(Ordering::SeqCst)
    }

    /// A cancel requested inside the process (`crate::cancel`) stops the run as a SIGINT
    /// would: once, forwarded to every running job, no new job started.
    fn poll_cancel(&self) {
        if !crate::cancel::requested() || self.stopped() != 0 {
            return;
        }
        let pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .signal
            .compare_exchange(0, libc::SIGINT, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            for &pid in pids.iter() {
                // SAFETY: kill(2) on a child not reaped yet (reaping takes this lock).
                unsafe {
                    libc::kill(pid, libc::SIGINT);
                }
            }
        }
    }

    fn close(mut self) {
        if let Some(h) = self.handle.take() {
            h.close();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One line on stderr; a closed stderr is no reason to fail.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn size(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// Runs `recipe`; `emit` gets each JSON line (with `json`). Text reports go to stderr.
pub fn run(recipe: &Recipe, opts: &RunOptions, emit: &mut dyn FnMut(&str)) -> Summary {
    if opts.dry_run {
        return dry_run(recipe, opts, emit);
    }
    let t0 = Instant::now();
    let jobs = &recipe.jobs;
    let n = jobs.len();
    let width = opts.jobs.max(1);
    let mut state = vec![St::Pending; n];
    let mut running: Vec<Running> = Vec::new();
    let mut finished = 0usize;
    let stopper = Stopper::install(opts.catch_signals);
    let mut interrupted = 0usize;
    loop {
        stopper.poll_cancel();
        let failed_any = state.contains(&St::Failed);
        let stopping = stopper.stopped() != 0 || (failed_any && !opts.keep_going);
        if !stopping {
            for i in 0..n {
                if running.len() >= width {
                    break;
                }
                if state[i] != St::Pending {
                    continue;
                }
                let job = &jobs[i];
                if let Some(d) = job
                    .after
                    .iter()
                    .find(|&&d| matches!(state[d], St::Failed | St::NotRun))
                {
                    state[i] = St::NotRun;
                    if !opts.json {
                        say(&format!(
                            "[{}/{n}] not run  {}: it reads the output of '{}', which failed",
                            finished, job.name, jobs[*d].name
                        ));
                    }
                    continue;
                }
                if job
                    .after
                    .iter()
                    .any(|&d| matches!(state[d], St::Pending | St::Running))
                {
                    continue;
                }
                let verdict = if opts.force {
                    Verdict::Run("--force".into())
                } else {
                    record::check(job)
                };
                match verdict {
                    Verdict::Skip(rec) => {
                        state[i] = St::Skipped;
                        finished += 1;
                        report_skip(job, &rec, finished, n, opts, emit);
                    }
                    Verdict::Run(_) => match start(recipe, job, &stopper, opts) {
                        Ok(r) => {
                            state[i] = St::Running;
                            running.push(r);
                        }
                        Err(message) => {
                            state[i] = St::Failed;
                            finished += 1;
                            let v = lorastream_failure(&message, 1);
                            report_done(job, "failed", 0.0, 1, &v, finished, n, opts, emit);
                        }
                    },
                }
            }
        }
        if running.is_empty() && (stopping || !state.contains(&St::Pending)) {
            break;
        }
        // Reap the children that are done, under the pid lock (see `Stopper::pids`).
        let mut done: Vec<(Running, std::process::ExitStatus)> = Vec::new();
        {
            let mut pids = stopper.pids.lock().unwrap_or_else(|p| p.into_inner());
            let mut k = 0;
            while k < running.len() {
                match running[k].child.try_wait() {
                    Ok(Some(status)) => {
                        let r = running.swap_remove(k);
                        let pid = r.child.id() as i32;
                        pids.retain(|&p| p != pid);
                        done.push((r, status));
                    }
                    Ok(None) => k += 1,
                    Err(_) => k += 1,
                }
            }
        }
        done.sort_by_key(|(r, _)| r.index);
        for (r, status) in done {
            finished += 1;
            let ok = finish(recipe, r, status, finished, n, opts, emit);
            let (i, outcome) = ok;
            state[i] = outcome.0;
            if outcome.1 {
                interrupted += 1;
            }
        }
        if !running.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let sig = stopper.stopped();
    stopper.close();
    for s in state.iter_mut().filter(|s| **s == St::Pending) {
        *s = St::NotRun;
    }
    let count = |w: St| state.iter().filter(|s| **s == w).count();
    let names = |w: St| -> Vec<&str> {
        jobs.iter()
            .zip(&state)
            .filter(|(_, s)| **s == w)
            .map(|(j, _)| j.name.as_str())
            .collect()
    };
    let (ok, skipped, failed, not_run) = (
        count(St::Ok),
        count(St::Skipped),
        count(St::Failed),
        count(St::NotRun),
    );
    let exit_code = if sig != 0 {
        u8::try_from(128 + sig).unwrap_or(u8::MAX)
    } else if failed + not_run > 0 {
        1
    } else {
        0
    };
    let seconds = t0.elapsed().as_secs_f64();
    let signal_name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        _ => "",
    };
    if opts.json {
        let mut v = json!({
            "ok": exit_code == 0,
            "recipe": recipe.path.display().to_string(),
            "jobs": n,
            "succeeded": ok,
            "skipped": skipped,
            "failed": failed,
            "not_run": not_run,
            "failed_jobs": names(St::Failed),
            "not_run_jobs": names(St::NotRun),
            "seconds": seconds,
        });
        if sig != 0 {
            v["interrupted"] = json!(signal_name);
        }
        v["exit_code"] = json!(exit_code);
        emit(&v.to_string());
    } else {
        let mut line = format!(
            "{}: {n} jobs: {ok} ok, {skipped} skipped (complete), {failed} failed, {not_run} not \
             run, in {seconds:.2}s",
            recipe.path.display()
        );
        if sig != 0 {
            line += &format!(
                "; interrupted by {signal_name} ({interrupted} job{} stopped)",
                if interrupted == 1 { "" } else { "s" }
            );
        } else if failed > 0 && !opts.keep_going && not_run > 0 {
            line += "; stopped after the failure (--keep-going runs the rest)";
        }
        say(&line);
    }
    Summary {
        jobs: n,
        ok,
        skipped,
        failed,
        not_run,
        exit_code,
    }
}

/// Starts `job`'s child after writing its `started` record. Err: why it could not start.
fn start(
    recipe: &Recipe,
    job: &Job,
    stopper: &Stopper,
    opts: &RunOptions,
) -> Result<Running, String> {
    let exe = opts.exe.as_path();
    let inputs = record::inputs_of(job).ok();
    let rec_path = record::path_of(job);
    let out_exists = job.output_path.as_deref().is_some_and(|o| o.exists());
    let claimed = rec_path.as_deref().is_some_and(|p| p.exists());
    // The output is the recipe's own when a record claims it or it is not there yet;
    // only then may this run replace a folder output (see record.rs).
    let ours = claimed || !out_exists;
    if let Some(p) = rec_path.as_deref().filter(|_| ours) {
        let rec = record::new(job, State::Started, inputs.clone().unwrap_or_default());
        if let Err(e) = record::write(p, &rec) {
            // Not fatal: the job may still run; a re-run just cannot tell it finished.
            if let Some(parent) = p.parent().filter(|d| d.is_dir()) {
                say(&format!(
                    "warning: job '{}': cannot write {} in {}: {e}",
                    job.name,
                    p.display(),
                    parent.display()
                ));
            }
        }
    }
    let mut extra = vec!["--json"];
    if claimed
        && out_exists
        && job.folder_output()
        && !job.shared_output
        && !job.has_flag("--overwrite")
    {
        extra.push("--overwrite");
    }
    let mut cmd = Command::new(exe);
    cmd.args(&opts.exe_args)
        .arg(&job.command)
        .args(job.args(&extra))
        .current_dir(&recipe.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    child_setup(&mut cmd);
    let mut pids = stopper.pids.lock().unwrap_or_else(|p| p.into_inner());
    if stopper.stopped() != 0 {
        return Err("not started: the run was interrupted".into());
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    pids.push(child.id() as i32);
    drop(pids);
    let mut out = child.stdout.take();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err = child.stderr.take();
    let prefix = format!("[{}] ", job.name);
    let stderr = std::thread::spawn(move || {
        if let Some(e) = err {
            for line in BufReader::new(e).lines() {
                let Ok(line) = line else { break };
                say(&format!("{prefix}{line}"));
            }
        }
    });
    Ok(Running {
        index: job.index,
        child,
        started: Instant::now(),
        stdout,
        stderr,
        inputs,
    })
}

/// Process group of its own (the runner forwards signals); on Linux, SIGTERM when the
/// runner dies.
fn child_setup(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    {
        // SAFETY: between fork and exec only async-signal-safe calls: prctl and getppid.
        let parent = std::process::id() as i32;
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // The runner may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(143);
                }
                Ok(())
            });
        }
    }
}

/// A failure object of the same shape as the command line's.
fn lorastream_failure(message: &str, code: u8) -> Value {
    crate::error::failure_json("io", message, None, None, code)
}

/// Collects a finished child: its report, its record, its line. Returns the job's index,
/// its state and whether a signal stopped it.
fn finish(
    recipe: &Recipe,
    r: Running,
    status: std::process::ExitStatus,
    finished: usize,
    n: usize,
    opts: &RunOptions,
    emit: &mut dyn FnMut(&str),
) -> (usize, (St, bool)) {
    use std::os::unix::process::ExitStatusExt;
    let job = &recipe.jobs[r.index];
    let seconds = r.started.elapsed().as_secs_f64();
    let stdout = r.stdout.join().unwrap_or_default();
    let _ = r.stderr.join();
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    let report: Value = stdout
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
        .unwrap_or_else(|| {
            let why = match status.signal() {
                Some(s) => format!("the job was killed by signal {s}"),
                None => format!("the job exited with {code} and printed no report"),
            };
            lorastream_failure(&why, u8::try_from(code).unwrap_or(1))
        });
    let ok = code == 0 && report["ok"] == true;
    let stopped = !ok && code > 128 && STOP_SIGNALS.contains(&(code - 128));
    // A job that wrote nothing (`dry_run = true` in the job) has nothing to record.
    let wrote = report["dry_run"] != true;
    if ok && wrote {
        write_complete(job, r.inputs, &report);
    } else if job.output_path.as_deref().is_some_and(|o| !o.exists())
        && let Some(p) = record::path_of(job)
    {
        // A failed job leaves no output (outputs are atomic), so nothing to claim.
        let _ = std::fs::remove_file(p);
    }
    let status = if ok {
        "ok"
    } else if stopped {
        "interrupted"
    } else {
        "failed"
    };
    report_done(job, status, seconds, code, &report, finished, n, opts, emit);
    (r.index, (if ok { St::Ok } else { St::Failed }, stopped))
}

/// Writes the `complete` record of a job that succeeded, if its inputs did not change
/// while it ran.
fn write_complete(job: &Job, before: Option<Vec<record::FileId>>, report: &Value) {
    let Some(path) = record::path_of(job) else {
        return;
    };
    let now = record::inputs_of(job).ok();
    match (before, now) {
        (Some(b), Some(a)) if a == b => {
            let mut rec = record::new(job, State::Complete, a);
            rec.outputs = record::outputs_of(job);
            rec.report = report.clone();
            if let Err(e) = record::write(&path, &rec) {
                say(&format!(
                    "warning: job '{}' succeeded but its record {} cannot be written ({e}): a \
                     re-run will run it again",
                    job.name,
                    path.display()
                ));
            }
        }
        _ => say(&format!(
            "warning: job '{}': an input changed while it ran, so it is not recorded as \
             complete (a re-run runs it again)",
            job.name
        )),
    }
}

fn report_skip(
    job: &Job,
    rec: &record::Record,
    finished: usize,
    n: usize,
    opts: &RunOptions,
    emit: &mut dyn FnMut(&str),
) {
    if opts.json {
        let v = json!({
            "job": job.name,
            "index": job.index,
            "command": job.command,
            "status": "skipped",
            "reason": "complete: same inputs and options",
            "seconds": 0.0,
            "exit_code": 0,
            "report": rec.report,
        });
        emit(&v.to_string());
    } else {
        say(&format!(
            "[{finished}/{n}] skipped  {}: complete (same inputs and options)",
            job.name
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn report_done(
    job: &Job,
    status: &str,
    seconds: f64,
    code: i32,
    report: &Value,
    finished: usize,
    n: usize,
    opts: &RunOptions,
    emit: &mut dyn FnMut(&str),
) {
    if opts.json {
        let v = json!({
            "job": job.name,
            "index": job.index,
            "command": job.command,
            "status": status,
            "seconds": seconds,
            "exit_code": code,
            "report": report,
        });
        emit(&v.to_string());
        return;
    }
    if status == "ok" {
        let wrote = match (report["output"].as_str(), report["tensors"].as_u64()) {
            (Some(o), Some(t)) => format!(
                ": {} {o} ({t} tensors, {})",
                if report["dry_run"] == true {
                    "dry run, would write"
                } else {
                    "wrote"
                },
                size(report["bytes"].as_u64().unwrap_or(0))
            ),
            _ => String::new(),
        };
        say(&format!(
            "[{finished}/{n}] ok       {} ({seconds:.2}s){wrote}",
            job.name
        ));
    } else {
        let message = report["error"]["message"].as_str().unwrap_or("no message");
        say(&format!(
            "[{finished}/{n}] {:<8} {} (exit {code}, {seconds:.2}s): {message}\n    {}",
            status.to_uppercase(),
            job.name,
            job.command_line()
        ));
    }
}

/// `--dry-run`: what would run, what would be skipped, and why.
fn dry_run(recipe: &Recipe, opts: &RunOptions, emit: &mut dyn FnMut(&str)) -> Summary {
    let mut runs = vec![false; recipe.jobs.len()];
    let (mut would_run, mut would_skip) = (0, 0);
    for job in &recipe.jobs {
        let verdict = if opts.force {
            Verdict::Run("--force".into())
        } else if let Some(&d) = job.after.iter().find(|&&d| runs[d]) {
            Verdict::Run(format!(
                "it reads the output of '{}', which runs first",
                recipe.jobs[d].name
            ))
        } else {
            record::check(job)
        };
        let (status, reason) = match &verdict {
            Verdict::Run(why) => {
                runs[job.index] = true;
                would_run += 1;
                ("would_run", why.clone())
            }
            Verdict::Skip(_) => {
                would_skip += 1;
                (
                    "would_skip",
                    "complete: same inputs and options".to_string(),
                )
            }
        };
        if opts.json {
            let v = json!({
                "job": job.name,
                "index": job.index,
                "command": job.command,
                "status": status,
                "reason": reason,
                "command_line": job.command_line(),
            });
            emit(&v.to_string());
        } else {
            let word = if status == "would_run" {
                "run "
            } else {
                "skip"
            };
            say(&format!(
                "{word}  {}: {reason}\n      {}",
                job.name,
                job.command_line()
            ));
        }
    }
    let n = recipe.jobs.len();
    if opts.json {
        emit(
            &json!({
                "ok": true,
                "recipe": recipe.path.display().to_string(),
                "dry_run": true,
                "jobs": n,
                "would_run": would_run,
                "would_skip": would_skip,
                "exit_code": 0,
            })
            .to_string(),
        );
    } else {
        say(&format!(
            "{}: {n} jobs: {would_run} would run, {would_skip} would be skipped (dry run: nothing \
             ran)",
            recipe.path.display()
        ));
    }
    Summary {
        jobs: n,
        ok: 0,
        skipped: would_skip,
        failed: 0,
        not_run: would_run,
        exit_code: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_object_has_the_command_lines_shape() {
        let v = lorastream_failure("cannot start x", 1);
        assert_eq!(v["ok"], false);
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["error"]["message"], "cannot start x");
    }
}
