//! `--requantize fp8-block`: an output in the FP8 block-scaled layout of its input
//! (`X.weight` float8_e4m3fn + `X.weight_scale_inv` f32 per `weight_block_size` block), so
//! vLLM, SGLang and transformers load it as they loaded the base. The plan decides here
//! which output tensors there are: an unmerged FP8 weight becomes two copies of what the
//! checkpoint stores (its fp8 bytes and its scales, byte for byte); a merged one keeps its
//! merge job (computed in the output dtype, bf16 by default) and is listed as an
//! [`Fp8Requant`], which compute (`compute/fp8_block.rs`) turns into the fp8 weight and
//! its scales as it streams. Everything that would make the result not what transformers'
//! own quantizer writes is refused here, by name, before anything is written.

use super::merge_types::{Job, JobSource};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::sink::OutTensor;
use crate::source::quantized::Fp8Parts;
use crate::source::{TensorData, TensorEntry};

/// What `--requantize` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requantize {
    /// FP8 block-scaled, the input's own layout.
    Fp8Block,
}

impl Requantize {
    pub fn parse(s: &str) -> Option<Requantize> {
        match s {
            "fp8-block" => Some(Requantize::Fp8Block),
            _ => None,
        }
    }
}

/// A merged weight written FP8 block-scaled: its merge job's output (`input`, the dtype
/// compute produces) quantized into `weight` (float8_e4m3fn) and `scales` (f32, one per
/// `block` of the last two dimensions), the scales written right after the weight.
#[derive(Clone, Debug)]
pub struct Fp8Requant {
    pub input: OutTensor,
    pub weight: OutTensor,
    pub scales: OutTensor,
    pub block: (usize, usize),
}

/// The FP8 stored form behind a decoded entry, when it is a whole FP8 block-scaled weight.
pub fn fp8_parts(t: &TensorEntry) -> Option<&Fp8Parts> {
    match &t.data {
        TensorData::Decoded { decoder, offset: 0 } => {
            decoder.fp8_block().filter(|p| p.weight.shape == t.shape)
        }
        _ => None,
    }
}

/// The name of the scales of output weight `name` (transformers' `Fp8Quantize`:
/// `X.weight` → `X.weight_scale_inv`).
pub fn scales_name(name: &str) -> String {
    format!("{name}_scale_inv")
}

/// `--requantize fp8-block` needs scales stored as plain f32 (`scale_fmt` unset or
/// "float"): the
/// ue8m0 variant rounds them to powers of two, which is not decoded or written here.
fn check_scale_fmt(t: &TensorEntry, p: &Fp8Parts) -> Result<()> {
    match &p.scale_fmt {
        // "float" is FineGrainedFP8Config's default: plain f32 scales.
        None => Ok(()),
        Some(f) if f == "float" => Ok(()),
        Some(f) => Err(Error::tensor(
            t.file.path(),
            &t.name,
            format!(
                "--requantize fp8-block: the base's quantization_config has scale_fmt = \"{f}\"; \
                 only plain f32 scales (no scale_fmt) are re-quantized; drop --requantize to \
                 write the dequantized weights"
            ),
        )),
    }
}

/// The copies that pass an unmerged FP8 weight through as stored: its fp8 bytes under the
/// job's name and its scales under [`scales_name`].
fn pass_through(j: &Job, p: &Fp8Parts) -> [Job; 2] {
    let copy = |name: String, t: &TensorEntry| Job {
        out: OutTensor {
            name,
            dtype: t.dtype,
            shape: t.shape.clone(),
        },
        source: JobSource::Copy(t.clone()),
        component: j.component,
        tied_to: None,
    };
    [
        copy(j.out.name.clone(), &p.weight),
        copy(scales_name(&j.out.name), &p.scales),
    ]
}

/// Rewrites `jobs` (final names, before ties are marked) for `--requantize fp8-block`:
/// unmerged FP8 weights become pass-through copies, merged ones are returned as
/// [`Fp8Requant`]s. Refuses a run with no FP8 block-scaled weight at all, merged weights
/// whose shape is not whole blocks, and non-float merge outputs.
pub fn expand(jobs: Vec<Job>, keep_lora: bool) -> Result<(Vec<Job>, Vec<Fp8Requant>)> {
    if keep_lora {
        return Err(Error::Usage(
            "--requantize fp8-block writes a merged model; --keep-lora writes PeftModel's \
             keys, which no FP8 loader reads: use one or the other"
                .into(),
        ));
    }
    let mut out = Vec::with_capacity(jobs.len());
    let mut requant = Vec::new();
    let mut found = false;
    for j in jobs {
        let (t, merged) = match &j.source {
            JobSource::Copy(t) => (t, false),
            JobSource::Merge { base, .. } => (base, true),
        };
        let Some(p) = fp8_parts(t).cloned() else {
            out.push(j);
            continue;
        };
        check_scale_fmt(t, &p)?;
        found = true;
        if merged {
            requant.push(requant_of(&j, t, &p)?);
            out.push(j);
        } else {
            out.extend(pass_through(&j, &p));
        }
    }
    if !found {
        return Err(Error::Usage(
            "--requantize fp8-block: no --base holds FP8 block-scaled weights (float8_e4m3fn \
             X.weight with X.weight_scale_inv and quantization_config.quant_method \"fp8\"); \
             it re-quantizes into the layout of such a base only. Drop --requantize"
                .into(),
        ));
    }
    Ok((out, requant))
}

/// The re-quantization of merged job `j` of FP8 base tensor `base`.
fn requant_of(j: &Job, base: &TensorEntry, p: &Fp8Parts) -> Result<Fp8Requant> {
    let bad = |msg: String| Error::tensor(base.file.path(), &base.name, msg);
    if !matches!(j.out.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return Err(bad(format!(
            "--requantize fp8-block quantizes a bf16, f16 or f32 merge; this one is {}",
            j.out.dtype
        )));
    }
    let (b0, b1) = p.block;
    let nd = j.out.shape.len();
    let whole =
        nd >= 2 && j.out.shape[nd - 2].is_multiple_of(b0) && j.out.shape[nd - 1].is_multiple_of(b1);
    if !whole {
        return Err(bad(format!(
            "--requantize fp8-block: shape {:?} is not whole {b0}x{b1} blocks \
             (weight_block_size); transformers' Fp8Quantize leaves such a weight unquantized, \
             so its FP8 layout would not load as this checkpoint's. Drop --requantize to \
             write the dequantized merge",
            j.out.shape
        )));
    }
    let mut grid = j.out.shape.clone();
    grid[nd - 2] /= b0;
    grid[nd - 1] /= b1;
    Ok(Fp8Requant {
        input: j.out.clone(),
        weight: OutTensor {
            name: j.out.name.clone(),
            dtype: Dtype::F8E4M3,
            shape: j.out.shape.clone(),
        },
        scales: OutTensor {
            name: scales_name(&j.out.name),
            dtype: Dtype::F32,
            shape: grid,
        },
        block: p.block,
    })
}

/// The tensors the sink is told of: every job's output, a re-quantized one as its fp8
/// weight followed by its scales; and for each job its index in that list.
pub fn sink_plan(jobs: &[Job], requant: &[Fp8Requant]) -> (Vec<OutTensor>, Vec<usize>) {
    let mut plan = Vec::with_capacity(jobs.len() + requant.len());
    let mut index = Vec::with_capacity(jobs.len());
    for j in jobs {
        index.push(plan.len());
        match requant.iter().find(|r| r.input.name == j.out.name) {
            Some(r) => {
                plan.push(r.weight.clone());
                plan.push(r.scales.clone());
            }
            None => plan.push(j.out.clone()),
        }
    }
    (plan, index)
}

/// For `convert --requantize fp8-block`: each tensor of `tensors` with its output name
/// (in order), every FP8 block-scaled weight replaced by its stored fp8 weight and scales;
/// the flag says the entry is written as stored (no `--dtype` cast).
pub fn convert_sources<'a>(
    tensors: impl Iterator<Item = (String, &'a TensorEntry)>,
) -> Result<Vec<(String, TensorEntry, bool)>> {
    let mut out = Vec::new();
    let mut found = false;
    for (name, t) in tensors {
        match fp8_parts(t) {
            Some(p) => {
                check_scale_fmt(t, p)?;
                found = true;
                let scales = scales_name(&name);
                out.push((name, p.weight.clone(), true));
                out.push((scales, p.scales.clone(), true));
            }
            None => out.push((name, t.clone(), false)),
        }
    }
    if !found {
        return Err(Error::Usage(
            "--requantize fp8-block: the input holds no FP8 block-scaled weights (float8_e4m3fn \
             X.weight with X.weight_scale_inv and quantization_config.quant_method \"fp8\"); \
             drop --requantize"
                .into(),
        ));
    }
    Ok(out)
}

/// The dry-run plan (`merge --dry-run --json`) as the sink would get it: each
/// re-quantized weight as its fp8 tensor (`apply` says so), followed by its scales.
pub fn describe(
    planned: Vec<super::report::PlannedTensor>,
    requant: &[Fp8Requant],
) -> Vec<super::report::PlannedTensor> {
    let mut out = Vec::with_capacity(planned.len() + requant.len());
    for mut p in planned {
        match requant.iter().find(|r| r.input.name == p.name) {
            Some(r) => {
                p.dtype = r.weight.dtype.to_string();
                p.bytes = r.weight.nbytes();
                p.apply = "merge+requantize";
                let scales = super::report::PlannedTensor {
                    name: r.scales.name.clone(),
                    dtype: r.scales.dtype.to_string(),
                    shape: r.scales.shape.clone(),
                    bytes: r.scales.nbytes(),
                    apply: "requantize",
                    steps: Vec::new(),
                    ..p.clone()
                };
                out.push(p);
                out.push(scales);
            }
            None => out.push(p),
        }
    }
    out
}
