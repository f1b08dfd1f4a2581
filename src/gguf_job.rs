//! `convert X.gguf out.gguf`: a GGUF rewritten as a GGUF. The metadata section is copied
//! byte for byte and every tensor keeps its stored bytes, unless `--gguf-type` re-encodes
//! it: then its values (decoded as the source reads them) are encoded into the new type
//! as `gguf.quants.quantize` does. A GGUF output needs a GGUF input: the metadata
//! llama.cpp needs (architecture, hyperparameters, tokenizer) exists only there.
//! `merge --base X.gguf --lora A --out Y.gguf`: the ordinary merge engine with the plan
//! mapping the adapter's HF modules to the GGUF's tensors (`plan::gguf_names`), its merged
//! tensors encoded into the GGUF writer and every other tensor copied as stored.

use crate::error::{Error, Result};
use crate::merge::{MergeOptions, MergeReport, Produce, Target, merge_into};
use crate::pipeline::{ConvertOptions, Report, copy_tensor, peak_rss_bytes, progress_bar};
use crate::plan::gguf_names::{self, GgufNaming};
use crate::plan::{DtypeChoice, rename};
use crate::sink::gguf::{GgufHeader, GgufInput, GgufOut, GgufWriter};
use crate::sink::{OutTensor, SharedBytes, TensorSink};
use crate::source::gguf::{self, GgufFile, TensorInfo, Value, quants::GgmlType};
use crate::source::{MappedFile, SourceFormat};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Whether `path` names a GGUF output.
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Parses `--gguf-type NAME`: one of the types lorastream writes.
pub fn parse_gguf_type(s: &str) -> std::result::Result<GgmlType, String> {
    match GgmlType::from_name(s) {
        Some(t) if t.encodes() => Ok(t),
        // A known type lorastream does not write: say why, and what to do instead.
        Some(t) => Err(t.why_not_encoded()),
        None => Err(format!(
            "unknown GGUF type '{s}': use one of {}",
            GgmlType::encodable_names()
        )),
    }
}

/// The ggml type tensor `t` is written in: `to` for tensors of two or more dimensions
/// (llama.cpp keeps 1-D tensors, norms and biases, in their own type), else its own.
pub fn target_type(t: &TensorInfo, to: Option<GgmlType>) -> GgmlType {
    match to {
        Some(to) if t.ne.len() >= 2 => to,
        _ => t.ty,
    }
}

/// The header of an output that keeps `g`'s metadata as it is.
pub fn header_of(file: &MappedFile, g: &GgufFile) -> GgufHeader {
    GgufHeader {
        version: g.version,
        alignment: g.alignment,
        kv_count: g.kvs.len() as u64,
        kv_bytes: file.bytes()[g.kv_bytes.clone()].to_vec(),
    }
}

/// llama.cpp's `general.file_type` (`LlamaFileType`, "mostly T, except 1-D tensors") for
/// an output whose tensors of two or more dimensions are all `to`.
fn file_type_of(to: GgmlType) -> Option<u32> {
    Some(match to {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::BF16 => 32,
        // llama.cpp's LLAMA_FTYPE_MOSTLY_TQ1_0 / _TQ2_0 / _MXFP4_MOE (gguf-py LlamaFileType).
        GgmlType::TQ1_0 => 36,
        GgmlType::TQ2_0 => 37,
        GgmlType::MXFP4 => 38,
        _ => return None,
    })
}

/// `head` with `general.file_type` (when the input has it, as a UINT32) saying `to`: the
/// value is patched in place, so every other metadata byte stays the input's.
fn with_file_type(mut head: GgufHeader, g: &GgufFile, to: GgmlType) -> GgufHeader {
    let kv = g
        .kvs
        .iter()
        .find(|k| k.key == "general.file_type" && matches!(k.value, Value::U32(_)));
    if let (Some(kv), Some(ft)) = (kv, file_type_of(to)) {
        let at = kv.value_at - g.kv_bytes.start;
        if let Some(b) = head.kv_bytes.get_mut(at..at + 4) {
            b.copy_from_slice(&ft.to_le_bytes());
        }
    }
    head
}

/// Streams tensor `t` of `file` into `out` as planned by `o`: a copy of its stored bytes,
/// or its values (decoded where stored quantized) for the writer to encode.
pub fn write_tensor(
    file: &Arc<MappedFile>,
    t: &TensorInfo,
    o: &GgufOut,
    out: &mut dyn TensorSink,
) -> Result<()> {
    match o.input {
        // A stored copy never reads the values, so it needs no decoder: a GGUF round-trips
        // even with tensors of a type lorastream cannot dequantize (Q8_1, Q1_0).
        GgufInput::Stored => {
            out.begin(&OutTensor {
                name: o.name.clone(),
                dtype: gguf::value_dtype(t.ty),
                shape: t.shape(),
            })?;
            let shared: Arc<dyn SharedBytes> = file.clone();
            out.write_shared(&shared, t.start, t.nbytes)?;
            out.end()
        }
        GgufInput::Values(_) => {
            let entry = gguf::entry(file, t)?;
            out.begin(&OutTensor {
                name: o.name.clone(),
                dtype: entry.dtype,
                shape: entry.shape.clone(),
            })?;
            copy_tensor(&entry, entry.dtype, out)?;
            out.end()?;
            entry.release();
            Ok(())
        }
    }
}

/// `convert INPUT.gguf OUTPUT.gguf [--gguf-type T]`.
/// `--part` writes shards of a folder output; a GGUF is one file.
fn refuse_part(part_given: bool) -> Result<()> {
    if part_given {
        return Err(Error::Usage(
            "--part splits a folder output into shards; a .gguf output is one file (write it \
             whole, or --out a folder)"
                .into(),
        ));
    }
    Ok(())
}

pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    to: Option<GgmlType>,
) -> Result<Report> {
    refuse_part(opts.part.is_some())?;
    let start = Instant::now();
    if opts.dtype != DtypeChoice::Keep {
        return Err(Error::Usage(
            "--dtype does not apply to a GGUF output: use --gguf-type F32|F16|BF16|Q8_0|…".into(),
        ));
    }
    // Decided by the magic, not by opening the checkpoint: opening dequantizes nothing,
    // but it refuses tensor types it cannot decode, which a stored copy does not need.
    let file = if input.is_file() {
        Some(MappedFile::open(input)?).filter(|f| gguf::looks_gguf(f.bytes()))
    } else {
        None
    };
    let Some(file) = file else {
        // Not a GGUF: a readable checkpoint of another format is a usage mistake; an
        // unreadable one reports why it cannot be read.
        crate::source::open(input)?;
        return Err(Error::Usage(format!(
            "{}: a GGUF output needs a GGUF input (its metadata — architecture, hyperparameters, \
             tokenizer — exists only there); convert HF checkpoints with llama.cpp's convert_hf_to_gguf.py",
            input.display()
        )));
    };
    let g = gguf::parse(file.bytes(), input)?;
    let mut plan = Vec::new();
    let mut sources = Vec::new();
    for t in &g.tensors {
        let name = rename::apply(&opts.renames, &t.name);
        if rename::excluded(&opts.exclude, &name) {
            continue;
        }
        let ty = target_type(t, to);
        let input_kind = if ty == t.ty {
            GgufInput::Stored
        } else {
            // Re-encoding reads the values: the source must decode the stored type.
            let e = gguf::entry(&file, t)?;
            GgufInput::Values(e.dtype)
        };
        plan.push(GgufOut {
            name,
            ne: t.ne.clone(),
            ty,
            input: input_kind,
        });
        sources.push(t);
    }
    let keys: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
    let notes = rename::unused(&opts.renames, &opts.exclude, &keys);
    if let Some(notify) = opts.notify {
        notes.iter().for_each(|n| notify(n));
    }
    rename::check_unique(
        plan.iter()
            .zip(&sources)
            .map(|(o, t)| (o.name.as_str(), t.name.as_str())),
    )?;
    let mut head = header_of(&file, &g);
    if let Some(to) = to {
        head = with_file_type(head, &g, to);
    }
    let mut out = GgufWriter::create(output, &head, &plan, opts.sink.direct_io)?;
    let total: u64 = sources.iter().map(|t| t.nbytes as u64).sum();
    let bar = progress_bar(opts.progress, total);
    for (t, o) in sources.iter().zip(&plan) {
        let t0 = Instant::now();
        write_tensor(&file, t, o, &mut out)?;
        bar.inc(t.nbytes as u64);
        if let Some(trace) = opts.trace {
            let line = format!(
                "{} {} ({} -> {}, {:?}) in {:.1} ms",
                if o.input == GgufInput::Stored {
                    "copy"
                } else {
                    "encode"
                },
                o.name,
                t.ty,
                o.ty,
                t.shape(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            bar.suspend(|| trace(&line));
        }
    }
    Box::new(out).finish()?;
    bar.finish_and_clear();
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(Report {
        part: None,
        output: output.display().to_string(),
        format: "gguf",
        tensors: plan.len(),
        merged: 0,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        notes,
    })
}

/// Writes the merged tensors the engine streams into the GGUF writer and copies every
/// other tensor from the base GGUF as stored, keeping the base's tensor order.
struct MergedGguf {
    writer: GgufWriter,
    file: Arc<MappedFile>,
    infos: Vec<TensorInfo>,
    plan: Vec<GgufOut>,
    /// Next tensor of `plan` to write.
    next: usize,
}

impl MergedGguf {
    /// Copies the stored tensors before plan index `upto`.
    fn copy_until(&mut self, upto: usize) -> Result<()> {
        while self.next < upto {
            let (t, o) = (&self.infos[self.next], &self.plan[self.next]);
            if o.input != GgufInput::Stored {
                return Err(Error::Internal(format!(
                    "merged GGUF tensor '{}' was not streamed in order",
                    o.name
                )));
            }
            write_tensor(&self.file, t, o, &mut self.writer)?;
            self.next += 1;
        }
        Ok(())
    }
}

impl TensorSink for MergedGguf {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        let k = (self.next..self.plan.len())
            .find(|&k| self.plan[k].name == t.name)
            .ok_or_else(|| {
                Error::Internal(format!("tensor '{}' written out of GGUF order", t.name))
            })?;
        self.copy_until(k)?;
        self.next = k + 1;
        self.writer.begin(t)
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write(bytes)
    }
    fn end(&mut self) -> Result<()> {
        self.writer.end()
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        self.copy_until(self.plan.len())?;
        Box::new(self.writer).finish()
    }
}

/// `merge --base model.gguf --lora ADAPTER --out merged.gguf [--gguf-type T]`: the adapter
/// (trained on the HF model) is planned against the GGUF's tensors — the plan renames its
/// modules and permutes q/k rows (`plan::gguf_names`), nothing is written for it — and
/// merged by the ordinary engine into the dequantized weights it targets, each written in
/// `to` or, by default, its stored type (which must be one lorastream encodes); every
/// other tensor and all metadata are copied as stored.
pub fn merge(out: &Path, opts: &MergeOptions, to: Option<GgmlType>) -> Result<MergeReport> {
    refuse_part(opts.part.is_some())?;
    let [(None, base)] = &opts.bases[..] else {
        return Err(Error::Usage(
            "a GGUF output takes exactly one --base (a .gguf file), without a component name"
                .into(),
        ));
    };
    let [(None, lora)] = &opts.loras[..] else {
        return Err(Error::Usage(
            "a GGUF output takes exactly one --lora, without a component name or weight".into(),
        ));
    };
    let s = &opts.settings;
    if s.keep_lora || s.combine.is_some() || !s.renames.is_empty() || !s.exclude.is_empty() {
        return Err(Error::Usage(
            "--keep-lora, --combine, --rename and --exclude do not apply to a GGUF output".into(),
        ));
    }
    if s.dtype != DtypeChoice::Keep {
        return Err(Error::Usage(
            "--dtype does not apply to a GGUF output: use --gguf-type F32|F16|BF16|Q8_0|…".into(),
        ));
    }
    let ckpt = crate::source::open(base)?;
    if ckpt.format != SourceFormat::Gguf {
        return Err(Error::Usage(format!(
            "{}: a .gguf --out needs a .gguf --base (its metadata exists only there)",
            base.display()
        )));
    }
    let (file, g) = gguf::open(base)?;
    let naming = GgufNaming::of(&g, base)?;
    // Which GGUF tensors the merge changes decides their type and input in the header.
    let targets = gguf_names::merged_tensors(
        crate::adapter::Adapter::open(&crate::source::adapter_dir(lora).0)?,
        &naming,
        &ckpt,
    )?;
    let mut o = opts.clone();
    o.settings.gguf = Some(naming);
    // GGUF weights are [out, in] (ne[0] = in), as nn.Linear: no layout is left open.
    o.settings.layout.not_fan_in_fan_out =
        vec![regex::Regex::new(".").map_err(|e| Error::Internal(format!("regex: {e}")))?];
    let mut plan = Vec::new();
    for t in &g.tensors {
        let merged = targets.contains(&t.name);
        let ty = if merged { to.unwrap_or(t.ty) } else { t.ty };
        if merged && !ty.encodes() {
            return Err(Error::tensor(
                base,
                &t.name,
                format!(
                    "is stored as {ty}, which lorastream cannot write: choose --gguf-type {}",
                    GgmlType::encodable_names()
                ),
            ));
        }
        let input = if merged {
            GgufInput::Values(gguf::entry(&file, t)?.dtype)
        } else {
            GgufInput::Stored
        };
        plan.push(GgufOut {
            name: t.name.clone(),
            ne: t.ne.clone(),
            ty,
            input,
        });
    }
    let head = header_of(&file, &g);
    let mut report = merge_into(&o, |plan_out| {
        if o.dry_run {
            return Ok(None);
        }
        let writer = GgufWriter::create(out, &head, &plan, o.sink.direct_io)?;
        let produce = plan_out
            .iter()
            .map(|p| {
                if targets.contains(&p.name) {
                    Produce::All
                } else {
                    Produce::Skip
                }
            })
            .collect();
        Ok(Some(Target {
            sink: Box::new(MergedGguf {
                writer,
                file: file.clone(),
                infos: g.tensors.clone(),
                plan: plan.clone(),
                next: 0,
            }),
            produce,
        }))
    })?;
    report.output = out.display().to_string();
    report.format = "gguf";
    Ok(report)
}
