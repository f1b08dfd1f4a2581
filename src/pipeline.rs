//! Ties sources, plan and sinks together for `convert`, and holds the pieces every job
//! shares: streaming one stored tensor into a sink (with an optional cast), timing and
//! peak-memory reports, and the progress bar.

use crate::direct_io::{AlignedBuf, ReadMode};
use crate::dtype::{Dtype, cast_float};
use crate::error::{Error, Result};
use crate::plan::{DtypeChoice, RenameRule, rename};
use crate::sink::{self, OutTensor, SharedBytes, SideFile, SinkOptions, TensorSink};
use crate::source::{self, MappedFile, TensorEntry};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Bytes read and handed to a sink per call when a copy is cast to another dtype; also how
/// far ahead the page cache is asked to read with `--buffered-io`.
const COPY_CHUNK: usize = 16 << 20;
/// Bytes of a strided view gathered at a time when it is copied.
const STRIDED_BAND: usize = 8 << 20;

/// Options of `convert`.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    pub dtype: DtypeChoice,
    pub renames: Vec<RenameRule>,
    /// `--exclude`: final keys to leave out.
    pub exclude: Vec<regex::Regex>,
    pub sink: SinkOptions,
    /// How big reads of the input go (`MappedFile::read_at`).
    pub reads: ReadMode,
    pub progress: bool,
    /// Told things worth a line to a person as they happen (also in the report's notes).
    pub notify: Option<fn(&str)>,
    /// Told one line per tensor as it is written, with how long it took (`--verbose`).
    pub trace: Option<fn(&str)>,
    /// `--no-copy-files`: a folder output from an HF model folder gets only the weights,
    /// not the folder's config and tokenizer files.
    pub no_copy_files: bool,
    /// `--allow-empty`: an input without tensors gives an empty output instead of an error.
    pub allow_empty: bool,
    /// `--part K/N`: write only part K of a folder output (see [`crate::partition`]).
    pub part: Option<crate::partition::Part>,
    /// `--requantize fp8-block`: FP8 block-scaled weights written as stored (fp8 + scales)
    /// instead of dequantized, config.json keeping its quantization_config.
    pub requantize: Option<crate::plan::requantize::Requantize>,
}

/// What a finished job reports (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub output: String,
    pub format: &'static str,
    pub tensors: usize,
    /// Tensors that received a LoRA delta (0 for convert).
    pub merged: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
    /// Things worth a line to a person (rename or exclude rules that matched nothing).
    pub notes: Vec<String>,
    /// `--part K/N`: this part's shards and bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part: Option<crate::partition::PartReport>,
}

/// Why an input without tensors is refused, naming what it held instead.
fn no_tensors_message(skipped: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut msg = String::from("holds no tensors, so the output would be empty");
    if skipped.is_empty() {
        msg += " (the file has no entries at all)";
    } else {
        let more = skipped.len().saturating_sub(SHOWN);
        msg += &format!(
            "; it holds only {} non-tensor entr{}: {}{}",
            skipped.len(),
            if skipped.len() == 1 { "y" } else { "ies" },
            skipped[..skipped.len().min(SHOWN)].join(", "),
            if more > 0 {
                format!(", … ({more} more; `inspect` lists all)")
            } else {
                String::new()
            }
        );
    }
    msg + ". Pass --allow-empty to write an empty output anyway"
}

/// The torch name of a floating dtype, as `torch_dtype` in config.json spells it.
fn torch_dtype_name(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::F64 => Some("float64"),
        Dtype::F32 => Some("float32"),
        Dtype::F16 => Some("float16"),
        Dtype::BF16 => Some("bfloat16"),
        _ => None,
    }
}

/// The files of the HF model folder `base` was read from (see
/// [`source::model_folder_files`]) that a folder output gets, so it loads with
/// `from_pretrained` like the original. When `dtype` casts, config.json's `torch_dtype`
/// (and `dtype`, which transformers 5 writes) say the new dtype; a config with neither gets
/// `torch_dtype`, which both transformers 4 and 5 read. A file of the same name already in
/// the output folder `out` (a README of the repo it is a clone of) is kept unless
/// `overwrite`. Also returns a note saying what was copied and kept; nothing (and no note)
/// when `base` is not in a model folder. With `requantized` (`--requantize fp8-block`) the
/// output is quantized as the base is, so its `quantization_config` stays.
pub fn model_side_files(
    base: &Path,
    dtype: DtypeChoice,
    out: &Path,
    overwrite: bool,
    requantized: bool,
) -> Result<(Vec<SideFile>, Option<String>)> {
    let files = source::model_folder_files(base)?;
    if files.is_empty() {
        return Ok((Vec::new(), None));
    }
    let cast_to = match dtype {
        DtypeChoice::To(d) => torch_dtype_name(d),
        DtypeChoice::Keep => None,
    };
    let mut set = Vec::new();
    if let (Some(name), Some(cfg)) = (cast_to, source::model_config(base)?) {
        let keys: Vec<&str> = ["torch_dtype", "dtype"]
            .into_iter()
            .filter(|k| cfg.json.get(*k).is_some())
            .collect();
        let keys = if keys.is_empty() {
            vec!["torch_dtype"]
        } else {
            keys
        };
        set = keys
            .into_iter()
            .map(|k| (k.to_string(), serde_json::Value::from(name)))
            .collect();
    }
    // A dequantized base: config.json must no longer say the weights are quantized.
    let dequantized = if requantized {
        Vec::new()
    } else {
        source::quantized::config_changes(base)?
    };
    if !dequantized.is_empty() && cast_to.is_none() {
        // The decoded weights' dtype (bf16 for fp8 and mxfp4; the state's for bitsandbytes)
        // is what the output holds; say so when the config names another.
        if let (Some(name), Some(cfg)) = (
            source::quantized::decoded_dtype_name(base)?,
            source::model_config(base)?,
        ) {
            let mut keys: Vec<&str> = ["torch_dtype", "dtype"]
                .into_iter()
                .filter(|k| cfg.json.get(*k).is_some())
                .collect();
            if keys.is_empty() {
                keys.push("torch_dtype");
            }
            set.extend(
                keys.into_iter()
                    .map(|k| (k.to_string(), serde_json::Value::from(name))),
            );
        }
    }
    set.extend(dequantized);
    let mut names = Vec::new();
    let mut kept = Vec::new();
    let side: Vec<SideFile> = files
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            if !overwrite && out.join(&name).exists() {
                kept.push(name);
                return None;
            }
            names.push(name.clone());
            let set = if name == "config.json" {
                set.clone()
            } else {
                Vec::new()
            };
            Some(SideFile {
                source: p,
                name,
                set,
            })
        })
        .collect();
    let mut note = format!(
        "copied {} beside the weights (from {}",
        if names.is_empty() {
            "nothing".to_string()
        } else {
            names.join(", ")
        },
        base.display()
    );
    if names.iter().any(|n| n == "config.json") {
        for (k, v) in &set {
            if v.is_null() {
                note += &format!("; config.json {k} removed (the weights are dequantized)");
            } else {
                note += &format!("; config.json {k} = {v}");
            }
        }
    }
    note += "; --no-copy-files leaves them out)";
    if !kept.is_empty() {
        note += &format!(
            "; kept {} already in {} (--overwrite replaces them)",
            kept.join(", "),
            out.display()
        );
    }
    Ok((side, Some(note)))
}

/// For `merge`: the base folder's files for a folder output (see [`model_side_files`]),
/// and a note saying what is copied or why not. `bases` are the `--base` specs, `names`
/// the component name of every `--base` and `--lora`; `out` and `overwrite` as there. Copied only when every component
/// is unnamed (so there is one) and merged, with its base in an HF model folder: then the
/// output has the base's keys and its config.json describes them. A NAME= prefix puts
/// NAME. before every key and --keep-lora writes PeftModel's keys, which that
/// config.json does not describe.
pub fn merge_side_files(
    bases: &[(Option<String>, std::path::PathBuf)],
    names: &[&Option<String>],
    settings: &crate::plan::merge::MergeSettings,
    out: &Path,
    overwrite: bool,
) -> Result<(Vec<SideFile>, Option<String>)> {
    let mut in_folder = None;
    for (_, p) in bases {
        if !source::model_folder_files(p)?.is_empty() {
            in_folder = Some(p);
            break;
        }
    }
    let Some(base) = in_folder else {
        return Ok((Vec::new(), None));
    };
    let why_not = if settings.keep_lora {
        Some("--keep-lora writes PeftModel's keys")
    } else if names.iter().any(|n| n.is_some()) {
        Some("the output's keys are prefixed NAME.")
    } else {
        None
    };
    match why_not {
        Some(why) => {
            let note = format!(
                "config and tokenizer files of {} not copied: {why}, which its config.json \
                 does not describe",
                base.display()
            );
            Ok((Vec::new(), Some(note)))
        }
        None => model_side_files(
            base,
            settings.dtype,
            out,
            overwrite,
            settings.requantize.is_some(),
        ),
    }
}

/// Converts any readable checkpoint into the format `output`'s path names.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<Report> {
    let start = Instant::now();
    let format = sink::OutputFormat::from_path(output)?;
    match opts.part {
        // The other parts' shards are expected there: checked once the plan is known.
        Some(_) => sink::check_part_output(output)?,
        None => sink::check_output(output, &opts.sink)?,
    }
    if opts.requantize.is_some() && opts.part.is_some() {
        return Err(Error::Usage(
            "--requantize fp8-block does not go with --part (a weight and its scales must be \
             written by one run); convert in one run"
                .into(),
        ));
    }
    let ckpt = source::open(input)?;
    ckpt.set_read_mode(opts.reads);
    if ckpt.tensors.is_empty() && !opts.allow_empty {
        return Err(Error::format(input, no_tensors_message(&ckpt.skipped)));
    }
    let named = ckpt
        .tensors
        .iter()
        .map(|t| (rename::apply(&opts.renames, &t.name), t))
        .filter(|(name, _)| !rename::excluded(&opts.exclude, name));
    // --requantize fp8-block: FP8 weights as stored, each followed by its scales.
    let requantized = match opts.requantize {
        Some(crate::plan::requantize::Requantize::Fp8Block) => {
            crate::plan::requantize::convert_sources(named)?
        }
        None => named.map(|(n, t)| (n, t.clone(), false)).collect(),
    };
    let (plan, sources): (Vec<OutTensor>, Vec<&TensorEntry>) = requantized
        .iter()
        .map(|(name, t, as_stored)| {
            let o = OutTensor {
                name: name.clone(),
                // Stored fp8 weights and their f32 scales are copied as they are.
                dtype: if *as_stored {
                    t.dtype
                } else {
                    opts.dtype.apply_to(t)
                },
                shape: t.shape.clone(),
            };
            (o, t)
        })
        .unzip();
    let keys: Vec<String> = ckpt.tensors.iter().map(|t| t.name.clone()).collect();
    let notes = rename::unused(&opts.renames, &opts.exclude, &keys);
    if let Some(notify) = opts.notify {
        notes.iter().for_each(|n| notify(n));
    }
    rename::check_unique(
        plan.iter()
            .zip(&sources)
            .map(|(o, t)| (o.name.as_str(), t.name.as_str())),
    )?;
    let part_plan = match opts.part {
        Some(part) => Some(convert_plan(input, output, &plan, opts, part)?),
        None => None,
    };
    let writes = part_plan.as_ref().map(|p| p.writes(plan.len()));
    // Of the parts, part 0 copies the files beside the weights.
    let side_files_here = opts.part.is_none_or(|p| p.index == 0);
    let (side, note) = if format == sink::OutputFormat::ShardedSafetensors
        && !opts.no_copy_files
        && side_files_here
    {
        model_side_files(
            input,
            opts.dtype,
            output,
            opts.sink.overwrite,
            opts.requantize.is_some(),
        )?
    } else {
        (Vec::new(), None)
    };
    if let (Some(n), Some(notify)) = (&note, opts.notify) {
        notify(n);
    }
    let part_report = part_plan.as_ref().map(|p| p.report());
    let out = match part_plan {
        Some(p) => sink::create_part(output, &plan, &opts.sink, &side, p)?,
        None => sink::create_with(output, &plan, &opts.sink, &side)?,
    };
    let to_write = plan
        .iter()
        .enumerate()
        .filter(|(i, _)| writes.as_ref().is_none_or(|w| w[*i]))
        .map(|(_, t)| t.nbytes())
        .sum();
    let bar = progress_bar(opts.progress, to_write);
    let dtypes: Vec<Dtype> = plan.iter().map(|o| o.dtype).collect();
    let ties = crate::plan::merge::tied_copies(&sources, &dtypes);
    write_pipelined(out, |out| {
        // Tied weights (one storage in the input) stay one storage where the format can.
        let shares = out.shares_storage();
        for (i, (t, o)) in sources.iter().zip(&plan).enumerate() {
            // Another part's tensor: not read at all.
            if writes.as_ref().is_some_and(|w| !w[i]) {
                continue;
            }
            if let (Some(to), true) = (ties[i], shares) {
                out.tie(o, to)?;
                bar.inc(o.nbytes());
                continue;
            }
            if let Some(next) = sources.get(i + 1) {
                next.prefetch(COPY_CHUNK);
            }
            let t0 = Instant::now();
            out.begin(o)?;
            copy_tensor(t, o.dtype, out)?;
            out.end()?;
            bar.inc(o.nbytes());
            if let Some(trace) = opts.trace {
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let line = format!(
                    "copy {} ({}, {:?}, {}) in {ms:.1} ms",
                    o.name,
                    o.dtype,
                    o.shape,
                    indicatif::HumanBytes(o.nbytes())
                );
                bar.suspend(|| trace(&line));
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(Report {
        output: output.display().to_string(),
        format: format.name(),
        tensors: plan.len(),
        merged: 0,
        bytes: plan.iter().map(|t| t.nbytes()).sum(),
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        notes: notes.into_iter().chain(note).collect(),
        part: part_report,
    })
}

/// Streams a stored tensor into the sink, cast to `to` (a floating tensor to another
/// floating dtype; anything else must keep its dtype). Bytes are read a chunk at a time
/// with positioned reads (or copied by the kernel), so a 10 GB tensor costs one chunk of
/// memory.
pub fn copy_tensor(t: &TensorEntry, to: Dtype, out: &mut dyn TensorSink) -> Result<()> {
    if to != t.dtype && !(to.is_float() && t.dtype.is_float()) {
        return Err(Error::tensor(
            t.file.path(),
            &t.name,
            format!("cannot cast {} to {to}", t.dtype),
        ));
    }
    let es = t.dtype.size();
    let chunk = COPY_CHUNK - COPY_CHUNK % es; // whole elements, so casts never split one
    match t.contiguous_range() {
        Some((start, len)) => {
            if to == t.dtype {
                // One piece, however big: the writer reads the range itself, reading ahead
                // as it writes (or has the kernel copy it), and the producer moves on.
                let shared: Arc<dyn SharedBytes> = t.file.clone();
                return out.write_shared(&shared, start, len);
            }
            let mut cast_buf = Vec::new();
            let mut read_buf = AlignedBuf::default();
            let mut at = 0;
            while at < len {
                let n = chunk.min(len - at);
                t.file.prefetch(start + at + n, chunk.min(len - at - n));
                let r = t.file.read_at(start + at, n, &mut read_buf).map_err(|e| {
                    Error::tensor(t.file.path(), &t.name, format!("reading failed: {e}"))
                })?;
                write_piece(t.dtype, to, &read_buf.as_slice()[r], &mut cast_buf, out)?;
                at += n;
            }
        }
        None => {
            // A strided view, gathered a band at a time: memory stays one chunk however
            // many elements the view claims.
            let band = (STRIDED_BAND / es).max(1);
            let mut piece = Vec::with_capacity(band * es);
            let mut cast_buf = Vec::new();
            let mut at = 0;
            while at < t.numel() {
                piece.clear();
                t.gather(at, band, &mut piece);
                write_piece(t.dtype, to, &piece, &mut cast_buf, out)?;
                at += band;
            }
        }
    }
    Ok(())
}

fn write_piece(
    from: Dtype,
    to: Dtype,
    piece: &[u8],
    buf: &mut Vec<u8>,
    out: &mut dyn TensorSink,
) -> Result<()> {
    if from == to {
        out.write(piece)
    } else {
        buf.clear();
        cast_float(from, to, piece, buf);
        out.write(buf)
    }
}

/// A mapped input shared with the writer thread: written straight from the map, its
/// pages released once written.
impl SharedBytes for MappedFile {
    fn bytes(&self) -> &[u8] {
        MappedFile::bytes(self)
    }
    fn done(&self, start: usize, len: usize) {
        self.release(start, len);
    }
    fn file(&self) -> Option<&std::fs::File> {
        Some(MappedFile::file(self))
    }
    fn read_at(
        &self,
        start: usize,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> std::io::Result<std::ops::Range<usize>> {
        MappedFile::read_at(self, start, len, buf).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("reading {} failed: {e}", self.path().display()),
            )
        })
    }
}

/// Messages from the producing thread (reading, computing) to the writing thread.
enum Piece {
    Begin(OutTensor),
    Tie(OutTensor, usize),
    Data(Vec<u8>),
    Shared(Arc<dyn SharedBytes>, usize, usize),
    End,
    Finish,
}

/// A sink that hands everything to the writer thread through a bounded queue; the writer
/// returns data buffers through `free` for reuse.
struct QueueSink {
    tx: std::sync::mpsc::SyncSender<Piece>,
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    /// The writer's own answer, asked before it moved to its thread.
    shares_storage: bool,
}

impl QueueSink {
    fn send(&mut self, p: Piece) -> Result<()> {
        // The producer (reading, computing) stops at its next piece once a run is cancelled.
        crate::cancel::check()?;
        // A closed queue means the writer stopped on an error, which `write_pipelined` reports.
        self.tx
            .send(p)
            .map_err(|_| Error::Plan("writer stopped".into()))
    }
}

impl TensorSink for QueueSink {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        self.send(Piece::Begin(t.clone()))
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut buf = self.buffer();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.send(Piece::Data(buf))
    }
    fn write_owned(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.send(Piece::Data(bytes))
    }
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        self.send(Piece::Shared(Arc::clone(src), start, len))
    }
    fn buffer(&mut self) -> Vec<u8> {
        // Not cleared: a caller that sets the length itself then overwrites old bytes
        // instead of zeroing the whole buffer first.
        self.free.try_recv().unwrap_or_default()
    }
    fn end(&mut self) -> Result<()> {
        self.send(Piece::End)
    }
    fn shares_storage(&self) -> bool {
        self.shares_storage
    }
    fn tie(&mut self, t: &OutTensor, to: usize) -> Result<()> {
        self.send(Piece::Tie(t.clone(), to))
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        self.send(Piece::Finish)
    }
}

/// Pieces in flight between producer and writer: bounds memory (each piece is at most one
/// copy chunk or one band group) while letting reading/computing and writing overlap.
const QUEUE_DEPTH: usize = 2;

/// Runs `produce` (reading and computing, on this thread and its workers) while a second
/// thread writes what it produces into `sink`, in order. Output bytes do not depend on
/// timing. The first error wins; on any error the sink is dropped and its temp output removed.
pub fn write_pipelined(
    sink: Box<dyn TensorSink>,
    produce: impl FnOnce(&mut dyn TensorSink) -> Result<()>,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(QUEUE_DEPTH);
    let (free_tx, free) = std::sync::mpsc::channel::<Vec<u8>>();
    let shares_storage = sink.shares_storage();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<bool> {
            let mut sink = sink;
            for piece in rx {
                // Checked here too: a writer busy with a big piece stops at the next one.
                crate::cancel::check()?;
                match piece {
                    Piece::Begin(t) => sink.begin(&t)?,
                    Piece::Tie(t, to) => sink.tie(&t, to)?,
                    Piece::Data(d) => {
                        sink.write(&d)?;
                        // The producer may have finished; then the buffer is simply dropped.
                        let _ = free_tx.send(d);
                    }
                    Piece::Shared(src, start, len) => sink.write_shared(&src, start, len)?,
                    Piece::End => sink.end()?,
                    Piece::Finish => {
                        sink.finish()?;
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        });
        let mut queue = QueueSink {
            tx,
            free,
            shares_storage,
        };
        let produced = produce(&mut queue).and_then(|()| queue.send(Piece::Finish));
        drop(queue);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the writer thread panicked".into())));
        match (produced, written) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
            (Ok(()), Ok(true)) => Ok(()),
            (Ok(()), Ok(false)) => Err(Error::Internal("output ended early".into())),
        }
    })
}

/// The process's peak resident set size so far (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A byte-counting progress bar on stderr, drawn only when asked and stderr is a terminal.
pub fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// `convert --part K/N`: the part's plan for output tensors `plan` of `input`, after the
/// folder check.
fn convert_plan(
    input: &std::path::Path,
    output: &std::path::Path,
    plan: &[OutTensor],
    opts: &ConvertOptions,
    part: crate::partition::Part,
) -> Result<crate::partition::PartPlan> {
    let what = format!(
        "convert input={:?} dtype={:?} renames={:?} exclude={:?}",
        crate::partition::file_name_of(input),
        opts.dtype,
        opts.renames,
        opts.exclude
    );
    let pp = crate::partition::PartPlan::new(plan, opts.sink.shard_size, part, &what)?;
    crate::sink::check_part_folder(crate::sink::folder_of(output), &pp, opts.sink.overwrite)?;
    Ok(pp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{MappedFile, TensorData};
    use std::path::Path;

    /// Records the biggest single write and a checksum-free summary of what arrived.
    #[derive(Default)]
    struct Bands {
        biggest: usize,
        total: usize,
        all_same: Option<Vec<u8>>,
        ok: bool,
    }

    impl TensorSink for Bands {
        fn begin(&mut self, _: &OutTensor) -> Result<()> {
            Ok(())
        }
        fn write(&mut self, bytes: &[u8]) -> Result<()> {
            self.biggest = self.biggest.max(bytes.len());
            self.total += bytes.len();
            let first = self
                .all_same
                .get_or_insert_with(|| bytes[..4].to_vec())
                .clone();
            self.ok = (self.total == bytes.len() || self.ok)
                && bytes.chunks(first.len()).all(|c| c == &first[..c.len()]);
            Ok(())
        }
        fn end(&mut self) -> Result<()> {
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    /// Regression: a stride-0 view of a 4-byte storage was materialised whole
    /// (`TensorEntry::bytes`) before copying; claiming 2^40 elements it allocated 4 TiB and
    /// aborted. Copies now gather at most 8 MiB at a time.
    #[test]
    fn strided_views_are_copied_band_by_band() {
        let file = MappedFile::from_bytes(Path::new("x.pth"), &1.5f32.to_le_bytes()).unwrap();
        let t = TensorEntry {
            name: "expanded".into(),
            dtype: Dtype::F32,
            shape: vec![4096, 4096],
            file,
            data: TensorData::Strided {
                base: 0,
                offset: 0,
                strides: vec![0, 0],
            },
        };
        let mut sink = Bands::default();
        copy_tensor(&t, Dtype::F32, &mut sink).unwrap();
        assert_eq!(sink.total, 4096 * 4096 * 4);
        assert!(sink.biggest <= STRIDED_BAND, "{}", sink.biggest);
        assert!(sink.ok);
        assert_eq!(sink.all_same.as_deref(), Some(&1.5f32.to_le_bytes()[..]));
        let mut sink = Bands::default();
        copy_tensor(&t, Dtype::BF16, &mut sink).unwrap();
        assert_eq!(sink.total, 4096 * 4096 * 2);
        assert!(sink.biggest <= STRIDED_BAND / 2 && sink.ok);
    }
}
