//! The `merge` job: opens components, plans, checks, and streams every planned tensor
//! through the compute backend into the sink.

use crate::adapter::Adapter;
use crate::compute::cpu::CpuBackend;
use crate::compute::cuda::CudaBackend;
use crate::compute::{DeltaBackend, NoDeltas, Source, Task, WorkItem};
use crate::direct_io::ReadMode;
use crate::error::{Error, Result};
use crate::pipeline::{merge_side_files, peak_rss_bytes, progress_bar, write_pipelined};
use crate::plan::coverage::{self, AdapterCoverage};
use crate::plan::merge::{Component, MergeSettings, plan_with_notes};
use crate::plan::merge_types::{Job, JobSource};
use crate::plan::report::{PlannedTensor, describe};
use crate::sink::{self, OutTensor, SinkOptions, TensorSink};
use crate::source;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where deltas are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl Device {
    pub fn parse(s: &str) -> Option<Device> {
        match s {
            "auto" => Some(Device::Auto),
            "cpu" => Some(Device::Cpu),
            "cuda" => Some(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda),
        }
    }
}

/// Everything `merge` takes.
#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// `--base [NAME=]PATH`, in order.
    pub bases: Vec<(Option<String>, PathBuf)>,
    /// `--lora [NAME=]PATH`, in order.
    pub loras: Vec<(Option<String>, PathBuf)>,
    /// `--lora …:WEIGHT`: per entry of `loras` (same index), its weight for `--combine`
    /// (`settings.combine`); missing entries have none.
    pub lora_weights: Vec<Option<f64>>,
    /// The order of components in the output; components not listed follow in the order
    /// they are first named in `bases`, then `loras`.
    pub component_order: Vec<Option<String>>,
    pub settings: MergeSettings,
    pub expect_keys_from: Option<PathBuf>,
    /// `--allow-missing-keys`: keys of `expect_keys_from` the output lacks are listed in a
    /// note instead of failing (output keys the reference lacks still fail).
    pub allow_missing_keys: bool,
    /// `--allow-non-finite`: write merges that create inf/NaN instead of failing.
    pub allow_non_finite: bool,
    pub threads: Option<usize>,
    pub device: Device,
    pub sink: SinkOptions,
    /// How big reads of the inputs go (see `MappedFile::read_at`).
    pub reads: ReadMode,
    pub dry_run: bool,
    pub progress: bool,
    /// `--no-copy-files`: a folder output gets only the weights, not the base folder's
    /// config and tokenizer files (see [`merge_side_files`]).
    pub no_copy_files: bool,
    /// Told things worth one line to a person as they happen (the CLI prints them on
    /// stderr); they also land in the report's `notes`.
    pub notify: Option<fn(&str)>,
    /// Told one line per tensor as it is written, with how long it took (`--verbose`).
    pub trace: Option<fn(&str)>,
    /// `--part K/N`: write only part K of a folder output (see [`crate::partition`]).
    pub part: Option<crate::partition::Part>,
}

/// One adapter of a component: its folder and how many of its tensors the output uses
/// (always all of them in a report: an unused one fails the plan).
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    pub path: String,
    #[serde(flatten)]
    pub coverage: AdapterCoverage,
}

#[derive(Clone, Debug, Serialize)]
pub struct ComponentReport {
    pub name: Option<String>,
    pub base: Option<String>,
    pub adapters: Vec<AdapterReport>,
    pub tensors: usize,
    pub merged: usize,
    pub bytes: u64,
}

/// What `merge` reports (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    pub output: String,
    pub format: &'static str,
    pub dry_run: bool,
    pub device: String,
    pub tensors: usize,
    pub merged: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
    pub components: Vec<ComponentReport>,
    pub notes: Vec<String>,
    /// Dry runs: every output tensor, where it comes from and what is applied to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Vec<PlannedTensor>>,
    /// `--part K/N`: this part's shards and bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part: Option<crate::partition::PartReport>,
}

/// Splits `NAME=PATH` (NAME: letters, digits, `_`, `-`, `.`, not starting with a digit);
/// anything else is a plain path. A spec that is itself an existing path (a folder
/// literally named `a=b`) is that path: a file that is there wins over a reading that
/// names a component (`merge` says so in a note; write `NAME=a=b` to name it).
pub fn split_named(spec: &str) -> (Option<String>, PathBuf) {
    if Path::new(spec).exists() {
        return (None, PathBuf::from(spec));
    }
    split_syntax(spec)
}

/// `NAME=PATH` by syntax alone.
fn split_syntax(spec: &str) -> (Option<String>, PathBuf) {
    if let Some((name, path)) = spec.split_once('=') {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            && !name.starts_with(|c: char| c.is_ascii_digit() || c == '.');
        if ok && !path.is_empty() {
            return (Some(name.to_string()), PathBuf::from(path));
        }
    }
    (None, PathBuf::from(spec))
}

/// Opens the components in the order they were first named; `notes` gets what was read
/// differently from how it was written (a path that looks like NAME=PATH, a file inside an
/// adapter folder).
fn open_components(opts: &MergeOptions, notes: &mut Vec<String>) -> Result<Vec<Component>> {
    // Only unnamed specs: in `llm=a=b` the user named the component already.
    for (_, p) in opts
        .bases
        .iter()
        .chain(&opts.loras)
        .filter(|(n, _)| n.is_none())
    {
        let spec = p.to_string_lossy();
        if let (Some(name), rest) = split_syntax(&spec)
            && p.exists()
        {
            notes.push(format!(
                "'{spec}' is an existing path, so it is read as that path, not as component '{name}' \
                 with path '{}'; write {name}={spec} to give it a name",
                rest.display()
            ));
        }
    }
    let mut order: Vec<Option<String>> = Vec::new();
    let mut note = |n: &Option<String>| {
        if !order.contains(n) {
            order.push(n.clone());
        }
    };
    let named = opts.bases.iter().chain(&opts.loras).map(|(n, _)| n);
    for n in opts
        .component_order
        .iter()
        .filter(|n| named.clone().any(|m| m == *n))
    {
        note(n);
    }
    for n in named {
        note(n);
    }
    if order.is_empty() {
        return Err(Error::Usage(
            "merge needs at least one --base or --lora".into(),
        ));
    }
    check_input_paths(opts)?;
    let mut comps = Vec::new();
    for name in order {
        let bases: Vec<&PathBuf> = opts
            .bases
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, p)| p)
            .collect();
        if bases.len() > 1 {
            return Err(Error::Usage(format!(
                "component {} has {} --base paths; give one per component",
                name.as_deref().unwrap_or("(unnamed)"),
                bases.len()
            )));
        }
        let base = bases.first().map(|p| source::open(p)).transpose()?;
        let adapters = opts
            .loras
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n == name)
            .map(|(i, (_, p))| {
                let (dir, note) = source::adapter_dir(p);
                notes.extend(note);
                let mut ad = Adapter::open(&dir)?;
                ad.weight = opts.lora_weights.get(i).copied().flatten();
                Ok(ad)
            })
            .collect::<Result<Vec<_>>>()?;
        base.iter().for_each(|b| b.set_read_mode(opts.reads));
        adapters.iter().for_each(|a| a.set_read_mode(opts.reads));
        let model_config = match &base {
            Some(b) => source::model_config(&b.path)?,
            None => None,
        };
        comps.push(Component {
            name,
            base,
            adapters,
            model_config,
        });
    }
    Ok(comps)
}

/// `--device`: cpu; cuda[:N] (an error when that GPU is not usable); auto (the GPU when one
/// is usable, else the CPU, with a note saying why).
fn backend(opts: &MergeOptions) -> Result<(Box<dyn DeltaBackend>, Option<String>)> {
    match opts.device {
        Device::Cpu => Ok((Box::new(CpuBackend::new(opts.threads)?), None)),
        Device::Cuda(n) => match CudaBackend::new(n, opts.threads) {
            Ok(b) => Ok((Box::new(b), None)),
            Err(why) => Err(Error::Device(format!(
                "--device cuda:{n}: no usable CUDA GPU ({why}); use --device cpu or auto"
            ))),
        },
        Device::Auto => match CudaBackend::new(0, opts.threads) {
            Ok(b) => Ok((Box::new(b), None)),
            Err(why) => {
                let note = format!("no usable CUDA GPU ({why}); merging on the CPU");
                Ok((Box::new(CpuBackend::new(opts.threads)?), Some(note)))
            }
        },
    }
}

/// Plans, checks and (unless dry-run) writes the merged checkpoint.
pub fn merge(out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    if let Some(part) = opts.part {
        return merge_part(out, opts, part);
    }
    let format = sink::OutputFormat::from_path(out)?;
    sink::check_output(out, &opts.sink)?;
    let (side, note) = if format == sink::OutputFormat::ShardedSafetensors && !opts.no_copy_files {
        let names: Vec<_> = opts
            .bases
            .iter()
            .chain(&opts.loras)
            .map(|(n, _)| n)
            .collect();
        merge_side_files(
            &opts.bases,
            &names,
            &opts.settings,
            out,
            opts.sink.overwrite,
        )?
    } else {
        (Vec::new(), None)
    };
    let mut report = merge_into(opts, |plan_out| {
        // The same checks for dry and real runs: a dry run that passes will not fail here.
        sink::preflight(out, plan_out)?;
        if opts.dry_run {
            return Ok(None);
        }
        Ok(Some(Target {
            sink: sink::create_with(out, plan_out, &opts.sink, &side)?,
            produce: vec![Produce::All; plan_out.len()],
        }))
    })?;
    if let Some(n) = note.filter(|_| !opts.dry_run) {
        if let Some(notify) = opts.notify {
            notify(&n);
        }
        report.notes.push(n);
    }
    report.output = out.display().to_string();
    report.format = format.name();
    Ok(report)
}

/// What a run produces of one planned tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Produce {
    /// Every byte, as `merge` writes it.
    All,
    /// Only these rows (indices of the first dimension, increasing), one after another.
    Rows(Vec<usize>),
    /// Nothing: the sink is not told of the tensor at all.
    Skip,
}

/// Where a run's tensors go: a sink, and what to produce of each planned tensor (in
/// plan order, one entry per tensor).
pub struct Target {
    pub sink: Box<dyn TensorSink>,
    pub produce: Vec<Produce>,
}

/// The merge, pointed at any sink: opens, plans and checks as `merge` does, then asks
/// `target` (given the planned output tensors) where to stream them; `None` streams
/// nothing (a dry run). The report's `output` and `format` are left for the caller.
pub fn merge_into(
    opts: &MergeOptions,
    target: impl FnOnce(&[OutTensor]) -> Result<Option<Target>>,
) -> Result<MergeReport> {
    let start = Instant::now();
    let mut notes = Vec::new();
    let mut comps = open_components(opts, &mut notes)?;
    if let Some(naming) = &opts.settings.gguf {
        crate::plan::gguf_names::components_to_gguf(&mut comps, naming)?;
    }
    let jobs = plan_with_notes(&comps, &opts.settings, &mut notes)?;
    if let Some(reference) = &opts.expect_keys_from {
        notes.extend(check_expected_keys(
            &jobs,
            reference,
            opts.allow_missing_keys,
        )?);
    }
    if let Some(notify) = opts.notify {
        notes.iter().for_each(|n| notify(n));
    }
    // What the sink holds: the jobs' outputs, with --requantize's merged weights as fp8
    // weight + scales (plan/requantize.rs); `sink_index` maps jobs to it.
    let (plan_out, sink_index) = crate::plan::requantize::sink_plan(&jobs, jobs.requantized());
    let target = target(&plan_out)?;
    if target.is_none()
        && let Some(trace) = opts.trace
    {
        for j in jobs.iter() {
            trace(&format!("would {}", describe_job(j)));
        }
    }
    // The backend is chosen only when a delta is to be computed: a run that only copies
    // (--keep-lora, a base without adapters, --dry-run) neither probes the GPU nor tells
    // that it would merge on the CPU.
    let needs_deltas = target.as_ref().is_some_and(|t| {
        jobs.iter()
            .zip(&t.produce)
            .any(|(j, p)| *p != Produce::Skip && matches!(j.source, JobSource::Merge { .. }))
    });
    let backend = if needs_deltas || matches!(opts.device, Device::Cuda(_)) {
        let (mut backend, note) = backend(opts)?;
        backend.set_check_non_finite(!opts.allow_non_finite);
        if let (Some(n), Some(notify)) = (&note, opts.notify) {
            notify(n);
        }
        notes.extend(note);
        Some(backend)
    } else {
        None
    };
    let device = match (&backend, opts.device) {
        (Some(b), _) => b.describe(),
        (None, Device::Cpu) => "cpu".to_string(),
        // A dry run probes no GPU; a copy-only run computes nothing.
        (None, _) if jobs.iter().any(Job::is_merged) => "auto".into(),
        (None, _) => "none".into(),
    };
    let cover = coverage::count(&comps, &jobs);
    if let Some(Target { sink, produce }) = target {
        if produce.len() != plan_out.len() {
            return Err(Error::Internal("one Produce per planned tensor".into()));
        }
        // One entry per job: a re-quantized weight's scales come with it (and --part,
        // which could split them, is refused with --requantize).
        let produce: Vec<Produce> = sink_index.iter().map(|&i| produce[i].clone()).collect();
        // A run that computes nothing walks its copies and ties without a backend.
        let backend: &dyn DeltaBackend = backend.as_deref().unwrap_or(&NoDeltas);
        // The bytes this run writes (a part skips the others' tensors).
        let to_write = jobs
            .iter()
            .map(|j| &j.out)
            .zip(&produce)
            .filter(|(_, p)| **p != Produce::Skip)
            .map(|(t, _)| t.nbytes())
            .sum();
        let bar = progress_bar(opts.progress, to_write);
        write_pipelined(sink, |sink| {
            // Tied jobs the sink stores as views of an earlier one are not computed.
            let shares = sink.shares_storage();
            // The work list, and the planned tensor of each of its items.
            let (work, planned): (Vec<WorkItem>, Vec<usize>) = jobs
                .iter()
                .enumerate()
                .filter_map(|(i, j)| {
                    let rows = match &produce[i] {
                        Produce::Skip => return None,
                        Produce::All => None,
                        Produce::Rows(r) => Some(&r[..]),
                    };
                    let task = match (j.tied_to, shares, rows) {
                        (Some(to), true, None) => Task::Tie { to },
                        _ => Task::Write {
                            from: Source::of(&jobs, i),
                            rows,
                        },
                    };
                    Some((WorkItem { out: &j.out, task }, i))
                })
                .unzip();
            let mut requantizer;
            let sink: &mut dyn TensorSink = if jobs.requantized().is_empty() {
                sink
            } else {
                requantizer = crate::compute::fp8_block::Requantizer::new(
                    sink,
                    jobs.requantized(),
                    sink_index.clone(),
                    opts.threads,
                )?;
                &mut requantizer
            };
            backend.run(&work, sink, &mut |k, took| {
                let j = &jobs[planned[k]];
                bar.inc(j.out.nbytes());
                let Some(trace) = opts.trace else {
                    return;
                };
                let line = match work[k].task {
                    Task::Tie { to } => {
                        let first = jobs.get(to).map_or("?", |t| t.out.name.as_str());
                        format!("tie {} to {first} (one storage)", j.out.name)
                    }
                    Task::Write { .. } => {
                        let ms = took.as_secs_f64() * 1e3;
                        format!("{} in {ms:.1} ms", describe_job(j))
                    }
                };
                bar.suspend(|| trace(&line));
            })
        })?;
        bar.finish_and_clear();
    }
    let components = comps
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            let mine: Vec<&Job> = jobs.iter().filter(|j| j.component == ci).collect();
            ComponentReport {
                name: c.name.clone(),
                base: c.base.as_ref().map(|b| b.path.display().to_string()),
                adapters: c
                    .adapters
                    .iter()
                    .zip(&cover[ci])
                    .map(|(a, cov)| AdapterReport {
                        path: a.dir.display().to_string(),
                        coverage: *cov,
                    })
                    .collect(),
                tensors: mine.len(),
                merged: mine.iter().filter(|j| j.is_merged()).count(),
                bytes: mine.iter().map(|j| j.out.nbytes()).sum(),
            }
        })
        .collect();
    Ok(MergeReport {
        output: String::new(),
        format: "",
        dry_run: opts.dry_run,
        device,
        tensors: plan_out.len(),
        merged: jobs.iter().filter(|j| j.is_merged()).count(),
        bytes: plan_out.iter().map(|t| t.nbytes()).sum(),
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        components,
        notes,
        plan: opts
            .dry_run
            .then(|| crate::plan::requantize::describe(describe(&jobs), jobs.requantized())),
        part: None,
    })
}

/// One line about a job for `--verbose`: what happens to which tensor.
fn describe_job(j: &Job) -> String {
    let what = match &j.source {
        JobSource::Merge { .. } => "merge",
        JobSource::Copy(_) => "copy",
    };
    format!(
        "{what} {} ({}, {:?}, {})",
        j.out.name,
        j.out.dtype,
        j.out.shape,
        indicatif::HumanBytes(j.out.nbytes())
    )
}

/// Usage errors in the input paths, before anything is opened: a PEFT adapter folder
/// given as `--base` (its tensors would be copied as if they were model weights), and the
/// same adapter folder given twice for one component (it would be merged twice).
fn check_input_paths(opts: &MergeOptions) -> Result<()> {
    for (name, path) in &opts.bases {
        let folder = if path.is_dir() {
            Some(path.as_path())
        } else {
            path.file_name()
                .and_then(|f| f.to_str())
                .filter(|f| f.starts_with("adapter_model."))
                .and(path.parent())
        };
        if folder.is_some_and(|d| d.join("adapter_config.json").is_file()) {
            let spec = match name {
                Some(n) => format!("{n}={}", path.display()),
                None => path.display().to_string(),
            };
            return Err(Error::Usage(format!(
                "--base {spec} is a PEFT adapter (it has adapter_config.json): pass it with --lora {spec}, \
                 and give the model it was trained on as --base"
            )));
        }
    }
    let mut seen: Vec<(&Option<String>, PathBuf, &Path)> = Vec::new();
    for (name, path) in &opts.loras {
        // Canonical paths: `dir`, `./dir`, `dir/`, a symlink to it and a file inside it
        // (`dir/adapter_model.safetensors`, read as the folder) are one adapter.
        let (dir, _) = source::adapter_dir(path);
        let canon = std::fs::canonicalize(&dir).unwrap_or(dir);
        if let Some((_, _, first)) = seen.iter().find(|(n, c, _)| *n == name && *c == canon) {
            return Err(Error::Usage(format!(
                "component {}: the adapter {} is given twice (--lora {} and --lora {}); it would be \
                 merged twice. Give each adapter once",
                name.as_deref().unwrap_or("(unnamed)"),
                canon.display(),
                first.display(),
                path.display()
            )));
        }
        seen.push((name, canon, path));
    }
    Ok(())
}

/// `--expect-keys-from`: the output keys must be the reference's keys, both ways: every
/// output key exists in the reference (with the same shape when the reference is a
/// checkpoint), and every reference key is in the output — a forgotten or misspelt
/// component, which a `strict=False` load hides. A `.txt` reference lists one key per
/// line. With `allow_missing`, reference keys the output lacks are returned as a note.
fn check_expected_keys(
    jobs: &[Job],
    reference: &Path,
    allow_missing: bool,
) -> Result<Option<String>> {
    let is_text = reference.extension().and_then(|e| e.to_str()) == Some("txt");
    let expected: HashMap<String, Option<Vec<usize>>> = if is_text {
        let text = std::fs::read_to_string(reference).map_err(|e| Error::io(reference, e))?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| (l.to_string(), None))
            .collect()
    } else {
        source::open(reference)?
            .tensors
            .into_iter()
            .map(|t| (t.name, Some(t.shape)))
            .collect()
    };
    let mut problems = Vec::new();
    let produced: std::collections::HashSet<&str> =
        jobs.iter().map(|j| j.out.name.as_str()).collect();
    let mut missing: Vec<&str> = expected
        .keys()
        .map(String::as_str)
        .filter(|k| !produced.contains(k))
        .collect();
    missing.sort_unstable();
    for j in jobs {
        match expected.get(&j.out.name) {
            None => problems.push(format!("  {} (not in the reference)", j.out.name)),
            Some(Some(shape)) if *shape != j.out.shape => problems.push(format!(
                "  {} (shape {:?} here, {:?} in the reference)",
                j.out.name, j.out.shape, shape
            )),
            _ => {}
        }
    }
    let listed = |keys: &[String]| {
        let n = keys.len();
        let mut s = keys[..n.min(50)].join("\n");
        if n > 50 {
            s.push_str(&format!("\n  … and {} more", n - 50));
        }
        s
    };
    let missing_lines: Vec<String> = missing
        .iter()
        .map(|k| format!("  {k} (in the reference, not in the output)"))
        .collect();
    let reference = reference.display();
    if problems.is_empty() && (missing.is_empty() || allow_missing) {
        return Ok((!missing.is_empty()).then(|| {
            format!(
                "--allow-missing-keys: {} key(s) of {reference} are not in the output:\n{}",
                missing.len(),
                listed(&missing_lines)
            )
        }));
    }
    let mut msg = String::new();
    if !problems.is_empty() {
        msg.push_str(&format!(
            "{} output key(s) do not match {reference} (a loader with strict=False would silently \
             drop them):\n{}\n",
            problems.len(),
            listed(&problems)
        ));
    }
    if !missing.is_empty() && !allow_missing {
        msg.push_str(&format!(
            "{} key(s) of {reference} are not in the output (a forgotten or misspelt component or \
             --exclude? a loader with strict=False would leave them as initialised):\n{}\n\
             Pass --allow-missing-keys if a partial output is meant.\n",
            missing.len(),
            listed(&missing_lines)
        ));
    }
    msg.push_str("Nothing was written.");
    Err(Error::Plan(msg))
}

/// `merge --part K/N`: plans as every part does, checks the folder, and streams only this
/// part's tensors (the others are not computed) into a [`crate::sink::PartWriter`]; part 0
/// also stages the base folder's config and tokenizer files. With `dry_run` nothing is
/// written; the report's `part` says what this part would write either way.
fn merge_part(
    out: &std::path::Path,
    opts: &MergeOptions,
    part: crate::partition::Part,
) -> Result<MergeReport> {
    use crate::sink;
    if opts.settings.requantize.is_some() {
        return Err(Error::Usage(
            "--requantize fp8-block does not go with --part (a weight and its scales must be              written by one run); merge in one run"
                .into(),
        ));
    }
    let format = sink::OutputFormat::from_path(out)?;
    sink::check_part_output(out)?;
    let dir = sink::folder_of(out);
    let (side, note) = if part.index == 0 && !opts.no_copy_files {
        let names: Vec<_> = opts
            .bases
            .iter()
            .chain(&opts.loras)
            .map(|(n, _)| n)
            .collect();
        crate::pipeline::merge_side_files(
            &opts.bases,
            &names,
            &opts.settings,
            out,
            opts.sink.overwrite,
        )?
    } else {
        (Vec::new(), None)
    };
    // What fills the tensors, beyond their names, dtypes and shapes: the inputs (by file
    // name) and the options that change values.
    let named = |v: &[(Option<String>, std::path::PathBuf)]| -> Vec<(Option<String>, String)> {
        v.iter()
            .map(|(n, p)| (n.clone(), crate::partition::file_name_of(p)))
            .collect()
    };
    let what = format!(
        "merge bases={:?} loras={:?} weights={:?} settings={:?}",
        named(&opts.bases),
        named(&opts.loras),
        opts.lora_weights,
        opts.settings
    );
    let mut planned = None;
    let mut report = merge_into(opts, |plan_out| {
        let pp = crate::partition::PartPlan::new(plan_out, opts.sink.shard_size, part, &what)?;
        sink::check_part_folder(dir, &pp, opts.sink.overwrite)?;
        let writes = pp.writes(plan_out.len());
        let mine: Vec<OutTensor> = plan_out
            .iter()
            .zip(&writes)
            .filter(|(_, w)| **w)
            .map(|(t, _)| t.clone())
            .collect();
        // The same checks for dry and real runs; the room this part needs.
        sink::preflight(out, &mine)?;
        planned = Some(pp.report());
        if opts.dry_run {
            return Ok(None);
        }
        let produce = writes
            .iter()
            .map(|&w| if w { Produce::All } else { Produce::Skip })
            .collect();
        Ok(Some(Target {
            sink: sink::create_part(out, plan_out, &opts.sink, &side, pp)?,
            produce,
        }))
    })?;
    if let Some(n) = note.filter(|_| !opts.dry_run) {
        if let Some(notify) = opts.notify {
            notify(&n);
        }
        report.notes.push(n);
    }
    report.output = out.display().to_string();
    report.format = format.name();
    report.part = planned;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_specs() {
        assert_eq!(
            split_named("llm=/a/b"),
            (Some("llm".into()), PathBuf::from("/a/b"))
        );
        assert_eq!(split_named("/a/b=c"), (None, PathBuf::from("/a/b=c")));
        assert_eq!(
            split_named("visual_encoder=x"),
            (Some("visual_encoder".into()), PathBuf::from("x"))
        );
        assert_eq!(split_named("plain"), (None, PathBuf::from("plain")));
    }

    #[test]
    fn input_paths_refuse_adapter_as_base_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let ad = dir.path().join("ad");
        std::fs::create_dir(&ad).unwrap();
        std::fs::write(ad.join("adapter_config.json"), "{}").unwrap();
        let opts = |bases: Vec<PathBuf>, loras: Vec<(Option<&str>, PathBuf)>| MergeOptions {
            bases: bases.into_iter().map(|p| (None, p)).collect(),
            loras: loras
                .into_iter()
                .map(|(n, p)| (n.map(String::from), p))
                .collect(),
            ..Default::default()
        };
        let e = check_input_paths(&opts(vec![ad.clone()], vec![])).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("--lora"), "{e}");
        let twice = vec![(None, ad.clone()), (None, dir.path().join("./ad/"))];
        let e = check_input_paths(&opts(vec![], twice)).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("given twice"), "{e}");
        let apart = vec![(Some("a"), ad.clone()), (Some("b"), ad.clone())];
        check_input_paths(&opts(vec![dir.path().into()], apart)).unwrap();
        // The weights file inside the folder names the same adapter.
        std::fs::write(ad.join("adapter_model.safetensors"), "x").unwrap();
        let file = vec![
            (None, ad.clone()),
            (None, ad.join("adapter_model.safetensors")),
        ];
        assert!(
            check_input_paths(&opts(vec![], file))
                .unwrap_err()
                .is_usage()
        );
    }

    #[test]
    fn devices() {
        assert_eq!(Device::parse("cuda:1"), Some(Device::Cuda(1)));
        assert_eq!(Device::parse("gpu"), None);
    }
}
