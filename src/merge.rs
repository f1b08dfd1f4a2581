//! The `merge` job: opens components, plans, checks, and streams every planned tensor
//! through the compute backend into the sink.

use crate::adapter::Adapter;
use crate::compute::DeltaBackend;
use crate::compute::cpu::CpuBackend;
use crate::compute::cuda::CudaBackend;
use crate::compute::rows::copy_rows;
use crate::direct_io::ReadMode;
use crate::error::{Error, Result};
use crate::pipeline::{
    copy_tensor, merge_side_files, peak_rss_bytes, progress_bar, write_pipelined,
};
use crate::plan::merge::{Component, MergeSettings, plan};
use crate::plan::merge_types::{Job, JobSource};
use crate::sink::{self, OutTensor, SinkOptions, TensorSink};
use crate::source;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// With `--buffered-io`, how much of a copied tensor coming next the page cache is asked to
/// start reading while the current job runs (merges read ahead in the backend).
const PREFETCH_BYTES: usize = 16 << 20;

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
    /// The order of components in the output; components not listed follow in the order
    /// they are first named in `bases`, then `loras`.
    pub component_order: Vec<Option<String>>,
    pub settings: MergeSettings,
    pub expect_keys_from: Option<PathBuf>,
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
}

#[derive(Clone, Debug, Serialize)]
pub struct ComponentReport {
    pub name: Option<String>,
    pub base: Option<String>,
    pub adapters: Vec<String>,
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
}

/// Splits `NAME=PATH` (NAME: letters, digits, `_`, `-`, `.`, not starting with a digit);
/// anything else is a plain path.
pub fn split_named(spec: &str) -> (Option<String>, PathBuf) {
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

/// Opens the components in the order they were first named.
fn open_components(opts: &MergeOptions) -> Result<Vec<Component>> {
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
            .filter(|(n, _)| *n == name)
            .map(|(_, p)| Adapter::open(p))
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
    let comps = open_components(opts)?;
    let jobs = plan(&comps, &opts.settings)?;
    if let Some(reference) = &opts.expect_keys_from {
        check_expected_keys(&jobs, reference)?;
    }
    let (backend, note) = backend(opts)?;
    if let (Some(n), Some(notify)) = (&note, opts.notify) {
        notify(n);
    }
    let plan_out: Vec<OutTensor> = jobs.iter().map(|j| j.out.clone()).collect();
    if let Some(Target { sink, produce }) = target(&plan_out)? {
        if produce.len() != jobs.len() {
            return Err(Error::Plan(
                "internal: one Produce per planned tensor".into(),
            ));
        }
        let bar = progress_bar(opts.progress, plan_out.iter().map(|t| t.nbytes()).sum());
        write_pipelined(sink, |sink| {
            // Tied jobs the sink stores as views of an earlier one are not computed.
            let shares = sink.shares_storage();
            let computed = |j: &&Job| !(shares && j.tied_to.is_some());
            for (i, j) in jobs.iter().enumerate() {
                let rows = match &produce[i] {
                    Produce::Skip => continue,
                    Produce::All => None,
                    Produce::Rows(r) => Some(r),
                };
                if let (Some(to), true, None) = (j.tied_to, shares, rows) {
                    sink.tie(&j.out, to)?;
                    bar.inc(j.out.nbytes());
                    continue;
                }
                // Read ahead only for what comes next in full.
                let next = (i + 1..jobs.len())
                    .find(|&k| produce[k] != Produce::Skip && computed(&&jobs[k]))
                    .filter(|&k| produce[k] == Produce::All)
                    .map(|k| &jobs[k].source);
                if let Some(JobSource::Copy(t)) = next {
                    t.prefetch(PREFETCH_BYTES);
                }
                sink.begin(&j.out)?;
                match (&j.source, rows) {
                    (JobSource::Copy(t), None) => copy_tensor(t, j.out.dtype, sink)?,
                    (JobSource::Copy(t), Some(r)) => copy_rows(t, r, j.out.dtype, sink)?,
                    (JobSource::Merge { base, steps }, Some(r)) => {
                        backend.merge_rows(base, steps, r, j.out.dtype, sink)?
                    }
                    (JobSource::Merge { base, steps }, None) => {
                        let next = match next {
                            Some(JobSource::Merge { base, steps }) => Some((base, &steps[..])),
                            _ => None,
                        };
                        backend.merge_before(base, steps, next, j.out.dtype, sink)?
                    }
                }
                sink.end()?;
                bar.inc(j.out.nbytes());
            }
            Ok(())
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
                    .map(|a| a.dir.display().to_string())
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
        device: backend.describe(),
        tensors: jobs.len(),
        merged: jobs.iter().filter(|j| j.is_merged()).count(),
        bytes: plan_out.iter().map(|t| t.nbytes()).sum(),
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        components,
        notes: note.into_iter().collect(),
    })
}

/// `--expect-keys-from`: every output key must exist in the reference (with the same
/// shape when the reference is a checkpoint). A `.txt` reference lists one key per line.
fn check_expected_keys(jobs: &[Job], reference: &Path) -> Result<()> {
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
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(50);
    Err(Error::Plan(format!(
        "{n} output key(s) do not match {} (a loader with strict=False would silently drop them); nothing was written:\n{}{}",
        reference.display(),
        problems.join("\n"),
        if n > 50 {
            format!("\n  … and {} more", n - 50)
        } else {
            String::new()
        }
    )))
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
    fn devices() {
        assert_eq!(Device::parse("cuda:1"), Some(Device::Cuda(1)));
        assert_eq!(Device::parse("gpu"), None);
    }
}
