//! Quantized checkpoints read as the tensors they stand for: FP8 block-scaled weights,
//! bitsandbytes 4-bit / 8-bit, MXFP4 experts, GPTQ and AWQ packed integers. Each format is recognised by its tensors and
//! `config.json`'s `quantization_config`; everything its decoding reads is validated when
//! the checkpoint is opened, and each quantized weight (with its scales and state tensors)
//! becomes one ordinary entry of the dequantized dtype and shape, decoded band by band
//! ([`super::Decode`]). A quantization the config names but this module does not decode,
//! or a tensor a recognised format leaves unexplained, is refused by name: packed data is
//! never passed on as if it were weights.

mod awq;
mod bnb;
mod fp8;
mod gptq;
mod mxfp4;

pub use fp8::Fp8Parts;
#[cfg(test)]
pub(crate) use fp8::e4m3fn_to_f32;

use super::{Checkpoint, MappedFile, TensorData, TensorEntry};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `quant_method`s decoded here.
pub const DECODED_METHODS: [&str; 5] = ["fp8", "bitsandbytes", "mxfp4", "gptq", "awq"];

/// What `config.json` beside `given` says about quantization: its path and
/// `quantization_config`, when there is one.
pub fn quantization_config(given: &Path) -> Result<Option<(PathBuf, Value)>> {
    Ok(super::model_config(given)?.and_then(|c| {
        c.json
            .get("quantization_config")
            .filter(|q| !q.is_null())
            .cloned()
            .map(|q| (c.path.clone(), q))
    }))
}

/// Replaces the quantized tensors of `ckpt` by decoded entries (in the position of each
/// weight), or refuses them by name. A checkpoint with no quantization is left as it is.
pub(crate) fn apply(ckpt: &mut Checkpoint) -> Result<()> {
    let qc = quantization_config(&ckpt.path)?;
    let method = match &qc {
        Some((path, q)) => Some(
            q.get("quant_method")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        "quantization_config has no \"quant_method\" string: cannot tell how its \
                         weights are stored",
                    )
                })?
                .to_ascii_lowercase(),
        ),
        None => None,
    };
    match (method.as_deref(), &qc) {
        (Some("fp8"), Some((path, q))) => fp8::apply(ckpt, path, q),
        (Some("bitsandbytes"), Some((path, q))) => bnb::apply(ckpt, Some((path, q))),
        (Some("mxfp4"), Some((path, q))) => mxfp4::apply(ckpt, path, q),
        (Some("gptq"), Some((path, q))) => gptq::apply(ckpt, path, q),
        (Some("awq"), Some((path, q))) => awq::apply(ckpt, path, q),
        (Some(other), Some((path, _))) => Err(Error::format(
            path,
            format!(
                "quantization_config.quant_method = \"{other}\": lorastream does not decode this \
                 quantization (it decodes {}), and copying its packed tensors as weights would \
                 be wrong; dequantize it with its own library first",
                DECODED_METHODS.join(", ")
            ),
        )),
        _ => {
            // No config says so, but the tensors may still be quantized.
            if ckpt.tensors.iter().any(|t| bnb::is_state_tensor(&t.name)) {
                // bitsandbytes' state tensors describe themselves fully.
                return bnb::apply(ckpt, None);
            }
            refuse_unexplained(ckpt)
        }
    }
}

/// Refuses tensors that only a quantized format has, in a checkpoint whose config names
/// no quantization (or that the recognised format did not consume).
fn refuse_unexplained(ckpt: &Checkpoint) -> Result<()> {
    // (suffix, what it is, whether a floating tensor of that name is one too)
    const MARKS: [(&str, &str, bool); 7] = [
        ("weight_scale_inv", "FP8 block scales", true),
        ("_blocks", "MXFP4 blocks", false),
        ("_scales", "MXFP4 scales", false),
        (".qweight", "GPTQ/AWQ packed int4", true),
        (".qzeros", "GPTQ/AWQ packed zeros", true),
        (".SCB", "bitsandbytes int8 row scales", true),
        (".g_idx", "GPTQ group index", true),
    ];
    for t in &ckpt.tensors {
        for (mark, what, float_too) in MARKS {
            if t.name.ends_with(mark) && (float_too || !t.dtype.is_float()) {
                return Err(Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!(
                        "looks like {what}, but no config.json beside the checkpoint says how it \
                         is quantized (quantization_config): lorastream will not copy packed data \
                         as weights; put the model's config.json beside it"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The file range of a stored tensor a decoder reads: contiguous (as safetensors stores
/// every tensor), else refused.
pub(crate) fn stored_range(t: &TensorEntry) -> Result<(usize, usize)> {
    t.contiguous_range().ok_or_else(|| {
        Error::tensor(
            t.file.path(),
            &t.name,
            "quantized tensor stored as a strided view: only contiguous storage is decoded",
        )
    })
}

/// A stored tensor a decoder reads: its file and byte range.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub file: Arc<MappedFile>,
    pub start: usize,
    pub len: usize,
}

impl Stored {
    pub fn of(t: &TensorEntry) -> Result<Stored> {
        let (start, len) = stored_range(t)?;
        Ok(Stored {
            file: t.file.clone(),
            start,
            len,
        })
    }
    pub fn bytes(&self) -> &[u8] {
        &self.file.bytes()[self.start..self.start + self.len]
    }
    pub fn range(&self) -> (Arc<MappedFile>, usize, usize) {
        (self.file.clone(), self.start, self.len)
    }
    /// Drops the resident map pages of bytes `[from, from + len)` of this tensor (see
    /// [`MappedFile::release`]); touching them again reads them back.
    pub fn release(&self, from: usize, len: usize) {
        self.file.release(
            self.start + from.min(self.len),
            len.min(self.len - from.min(self.len)),
        );
    }
    /// Element `i` of an f32 tensor (bounds validated at open).
    pub fn f32_at(&self, i: usize) -> f32 {
        let b = &self.bytes()[i * 4..i * 4 + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Rebuilds `ckpt.tensors`: every name in `consumed` is dropped, and each entry of
/// `decoded` (keyed by the name of the tensor whose position it takes) replaces that one.
pub(crate) fn replace(
    ckpt: &mut Checkpoint,
    mut decoded: HashMap<String, TensorEntry>,
    consumed: &std::collections::HashSet<String>,
) {
    let old = std::mem::take(&mut ckpt.tensors);
    for t in old {
        if let Some(d) = decoded.remove(&t.name) {
            ckpt.tensors.push(d);
        } else if !consumed.contains(&t.name) {
            ckpt.tensors.push(t);
        }
    }
}

/// A decoded entry named `name` of `dtype` and `shape`, reported in the file of `like`.
pub(crate) fn decoded_entry(
    like: &TensorEntry,
    name: &str,
    dtype: Dtype,
    shape: Vec<usize>,
    decoder: Arc<dyn super::Decode>,
) -> TensorEntry {
    TensorEntry {
        name: name.to_string(),
        dtype,
        shape,
        file: like.file.clone(),
        data: TensorData::Decoded { decoder, offset: 0 },
    }
}

/// The bytes of the decoded entries' stored forms: for `inspect`.
pub fn stored_summary(t: &TensorEntry) -> Option<(String, u64)> {
    match &t.data {
        TensorData::Decoded { decoder, .. } => {
            Some((decoder.stored_form(), decoder.stored_bytes()))
        }
        _ => None,
    }
}

/// For a folder output: the config.json changes that make it describe the dequantized
/// weights — `quantization_config` removed (a JSON null in the list means "remove the
/// key", see `sink`), and `torch_dtype` set to `dtype_name` when nothing else sets it.
/// Empty when the base is not quantized in a way decoded here.
pub fn config_changes(given: &Path) -> Result<Vec<(String, Value)>> {
    let Some((_, q)) = quantization_config(given)? else {
        return Ok(Vec::new());
    };
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    if !DECODED_METHODS.contains(&method.as_str()) {
        return Ok(Vec::new());
    }
    Ok(vec![("quantization_config".to_string(), Value::Null)])
}

/// The torch dtype name of the decoded weights of the quantized base at `given`, when
/// they all have one (bf16 for fp8, mxfp4 and bitsandbytes, whose weights decode in the
/// state's dtype but are written as bf16 under `--dtype keep`; the scales' dtype, f16, for
/// GPTQ and AWQ): what a folder output's config.json should say. Reads the headers again.
pub fn decoded_dtype_name(given: &Path) -> Result<Option<&'static str>> {
    let ckpt = super::open(given)?;
    let mut dtypes = ckpt.tensors.iter().filter_map(|t| match &t.data {
        TensorData::Decoded { .. } => Some(crate::plan::DtypeChoice::Keep.apply_to(t)),
        _ => None,
    });
    let Some(first) = dtypes.next() else {
        return Ok(None);
    };
    if dtypes.any(|d| d != first) {
        return Ok(None);
    }
    Ok(match first {
        Dtype::BF16 => Some("bfloat16"),
        Dtype::F16 => Some("float16"),
        Dtype::F32 => Some("float32"),
        _ => None,
    })
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// A safetensors file with `tensors` (name, dtype name, shape, bytes) in `dir`.
    pub fn write_st(
        dir: &Path,
        name: &str,
        tensors: &[(&str, &str, Vec<usize>, Vec<u8>)],
    ) -> PathBuf {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (n, d, s, b) in tensors {
            let begin = data.len();
            data.extend_from_slice(b);
            header.insert(
                n.to_string(),
                serde_json::json!({"dtype": d, "shape": s, "data_offsets": [begin, data.len()]}),
            );
        }
        let h = serde_json::to_string(&Value::Object(header)).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&data);
        let p = dir.join(name);
        std::fs::write(&p, out).unwrap();
        p
    }

    pub fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn bf16s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect()
    }

    pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}
