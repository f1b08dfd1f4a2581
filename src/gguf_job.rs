//! `convert X.gguf out.gguf`: a GGUF rewritten as a GGUF. The metadata section is copied
//! byte for byte and every tensor keeps its stored bytes, unless `--gguf-type` re-encodes
//! it: then its values (decoded as the source reads them) are encoded into the new type
//! as `gguf.quants.quantize` does. A GGUF output needs a GGUF input: the metadata
//! llama.cpp needs (architecture, hyperparameters, tokenizer) exists only there.

use crate::error::{Error, Result};
use crate::pipeline::{ConvertOptions, Report, copy_tensor, peak_rss_bytes, progress_bar};
use crate::plan::{DtypeChoice, rename};
use crate::sink::gguf::{GgufHeader, GgufInput, GgufOut, GgufWriter};
use crate::sink::{OutTensor, SharedBytes, TensorSink};
use crate::source::gguf::{self, GgufFile, TensorInfo, quants::GgmlType};
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
    GgmlType::from_name(s)
        .filter(|t| t.encodes())
        .ok_or_else(|| {
            format!(
                "unknown or unwritable GGUF type '{s}': use one of {}",
                GgmlType::encodable_names()
            )
        })
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

/// Streams tensor `t` of `file` into `out` as planned by `o`: a copy of its stored bytes,
/// or its values (decoded where stored quantized) for the writer to encode.
pub fn write_tensor(
    file: &Arc<MappedFile>,
    t: &TensorInfo,
    o: &GgufOut,
    out: &mut dyn TensorSink,
) -> Result<()> {
    let entry = gguf::entry(file, t)?;
    let planned = OutTensor {
        name: o.name.clone(),
        dtype: entry.dtype,
        shape: entry.shape.clone(),
    };
    out.begin(&planned)?;
    match o.input {
        GgufInput::Stored => {
            let shared: Arc<dyn SharedBytes> = file.clone();
            out.write_shared(&shared, t.start, t.nbytes)?;
        }
        GgufInput::Values(_) => copy_tensor(&entry, entry.dtype, out)?,
    }
    out.end()?;
    entry.release();
    Ok(())
}

/// `convert INPUT.gguf OUTPUT.gguf [--gguf-type T]`.
pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    to: Option<GgmlType>,
) -> Result<Report> {
    let start = Instant::now();
    if opts.dtype != DtypeChoice::Keep {
        return Err(Error::Usage(
            "--dtype does not apply to a GGUF output: use --gguf-type F32|F16|BF16|Q8_0|…".into(),
        ));
    }
    let ckpt_format = crate::source::open(input)?.format;
    if ckpt_format != SourceFormat::Gguf {
        return Err(Error::Usage(format!(
            "{}: a GGUF output needs a GGUF input (its metadata — architecture, hyperparameters, \
             tokenizer — exists only there); convert HF checkpoints with llama.cpp's convert_hf_to_gguf.py",
            input.display()
        )));
    }
    let (file, g) = gguf::open(input)?;
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
    let mut out = GgufWriter::create(output, &header_of(&file, &g), &plan, opts.sink.direct_io)?;
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
