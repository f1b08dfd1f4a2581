//! bitsandbytes checkpoints as `save_pretrained` writes them.
//!
//! 4-bit (`Params4bit`): `X.weight` (two 4-bit codes per byte, the first element in the
//! high nibble), `X.weight.absmax` (f32, or uint8 with double quantization),
//! `X.weight.quant_map`, with double quantization `X.weight.nested_absmax` and
//! `X.weight.nested_quant_map`, and `X.weight.quant_state.bitsandbytes__{nf4,fp4}` (the
//! JSON of `QuantState.as_dict(packed=True)`'s non-tensor items as uint8). Decoded as
//! bitsandbytes' reference `_dequantize_4bit_compute` (and its CUDA kernel) does: blocks of
//! `blocksize` run over the flattened tensor; value = code[q] · absmax[block] in f32,
//! rounded to the state's dtype; a double-quantized absmax is
//! `nested_quant_map[a] · nested_absmax[block / nested_blocksize] + nested_offset` in f32.
//! (bitsandbytes 0.50's CPU C kernel blocks each row instead, which differs when the last
//! dimension is not a multiple of blocksize; the quantizer and CUDA kernels do not.)
//!
//! 8-bit (`Int8Params`, LLM.int8()): `X.weight` int8 with row scales `X.SCB` (f32) and
//! `X.weight_format`; decoded as `int8_vectorwise_dequant`: `q · SCB[row] · (1/127)` in
//! f32, giving f32 (what transformers' `dequantize` returns).
//!
//! Both decode in the state's own dtype (so a merge adds the delta to exactly the weight
//! bitsandbytes dequantizes, as PEFT does), but their output defaults to bf16, the
//! quantized bases' default output dtype (`default_output_dtype`); `--dtype` picks another.

use super::{Stored, decoded_entry, replace};
use crate::dtype::{Dtype, encode_f32};
use crate::error::{Error, Result};
use crate::source::{Checkpoint, Decode, MappedFile, TensorEntry};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`, the CUDA kernel's `dDequantizeNF4`).
/// Written as bitsandbytes prints its f32 values (as doubles), so each literal parses to
/// exactly that f32.
#[allow(clippy::excessive_precision)]
const NF4: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// bitsandbytes' FP4 (e2m1) code, normalised by 6 (`get_4bit_type("fp4")`).
#[allow(clippy::excessive_precision)]
const FP4: [f32; 16] = [
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
];

/// `7.874015718698502e-3` (bitsandbytes' 1/127) as the f32 torch multiplies by.
const INV127: f32 = 7.874_016e-3;

const STATE_MARK: &str = ".quant_state.bitsandbytes__";

/// Whether `name` is a bitsandbytes state tensor (4-bit JSON state or 8-bit row scales).
pub(super) fn is_state_tensor(name: &str) -> bool {
    name.contains(STATE_MARK) || name.ends_with(".SCB")
}

/// The absmax of each 4-bit block.
#[derive(Debug)]
enum Absmax {
    Plain(Stored),
    Nested {
        q: Stored,
        code: Stored,
        absmax: Stored,
        blocksize: usize,
        offset: f32,
    },
}

impl Absmax {
    fn at(&self, b: usize) -> f32 {
        match self {
            Absmax::Plain(s) => s.f32_at(b),
            Absmax::Nested {
                q,
                code,
                absmax,
                blocksize,
                offset,
            } => code.f32_at(q.bytes()[b] as usize) * absmax.f32_at(b / blocksize) + offset,
        }
    }
    fn stored(&self) -> Vec<&Stored> {
        match self {
            Absmax::Plain(s) => vec![s],
            Absmax::Nested {
                q, code, absmax, ..
            } => vec![q, code, absmax],
        }
    }
}

#[derive(Debug)]
struct Bnb4 {
    packed: Stored,
    /// The saved quant_map and JSON state (read ahead and released with the rest).
    extra: Vec<Stored>,
    absmax: Absmax,
    code: &'static [f32; 16],
    quant_type: String,
    blocksize: usize,
    dtype: Dtype,
}

impl Decode for Bnb4 {
    fn decode_into(&self, from: usize, out: &mut [u8]) {
        let es = self.dtype.size();
        let p = self.packed.bytes();
        let mut vals = [0f32; 256];
        for (ci, chunk) in out.chunks_mut(256 * es).enumerate() {
            let n = chunk.len() / es;
            let start = from + ci * 256;
            let mut block = usize::MAX;
            let mut a = 0f32;
            for (j, v) in vals[..n].iter_mut().enumerate() {
                let i = start + j;
                if i / self.blocksize != block {
                    block = i / self.blocksize;
                    a = self.absmax.at(block);
                }
                let byte = p[i / 2];
                let nib = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0F
                };
                *v = self.code[nib as usize] * a;
            }
            encode_f32(self.dtype, &vals[..n], chunk);
        }
        // Front to back: the packed bytes just read leave resident memory now.
        let n = out.len() / es;
        self.packed.release(from / 2, n / 2);
    }
    fn stored_form(&self) -> String {
        format!(
            "bitsandbytes {} (blocksize {}{})",
            self.quant_type,
            self.blocksize,
            match &self.absmax {
                Absmax::Plain(_) => String::new(),
                Absmax::Nested { blocksize, .. } =>
                    format!(", double-quantized absmax in blocks of {blocksize}"),
            }
        )
    }
    fn stored_bytes(&self) -> u64 {
        self.all().iter().map(|s| s.len as u64).sum()
    }
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
        self.all().iter().map(|s| s.range()).collect()
    }
    fn default_output_dtype(&self) -> Option<Dtype> {
        Some(Dtype::BF16)
    }
}

impl Bnb4 {
    fn all(&self) -> Vec<&Stored> {
        let mut v = vec![&self.packed];
        v.extend(&self.extra);
        v.extend(self.absmax.stored());
        v
    }
}

#[derive(Debug)]
struct Bnb8 {
    q: Stored,
    scb: Stored,
    format: Option<Stored>,
    cols: usize,
}

impl Decode for Bnb8 {
    fn decode_into(&self, from: usize, out: &mut [u8]) {
        // `A * stats.view(-1, 1) * 7.874015718698502e-3`, each product in f32.
        let q = self.q.bytes();
        for (k, e) in out.chunks_exact_mut(4).enumerate() {
            let i = from + k;
            let v = (q[i] as i8 as f32) * self.scb.f32_at(i / self.cols) * INV127;
            e.copy_from_slice(&v.to_le_bytes());
        }
        self.q.release(from, out.len() / 4);
    }
    fn stored_form(&self) -> String {
        "bitsandbytes int8 (LLM.int8 row scales SCB)".into()
    }
    fn stored_bytes(&self) -> u64 {
        (self.q.len + self.scb.len + self.format.as_ref().map_or(0, |f| f.len)) as u64
    }
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
        let mut v = vec![self.q.range(), self.scb.range()];
        v.extend(self.format.iter().map(Stored::range));
        v
    }
    fn default_output_dtype(&self) -> Option<Dtype> {
        Some(Dtype::BF16)
    }
}

fn need<'a>(
    by_name: &HashMap<&str, &'a TensorEntry>,
    state: &TensorEntry,
    name: &str,
) -> Result<&'a TensorEntry> {
    by_name.get(name).copied().ok_or_else(|| {
        Error::tensor(
            state.file.path(),
            &state.name,
            format!("bitsandbytes state names '{name}', which is not in the checkpoint"),
        )
    })
}

fn check(t: &TensorEntry, dtype: Dtype, numel: usize) -> Result<()> {
    if t.dtype != dtype || t.numel() != numel {
        return Err(Error::tensor(
            t.file.path(),
            &t.name,
            format!(
                "is {} with {} elements; bitsandbytes' state needs {dtype} with {numel}",
                t.dtype,
                t.numel()
            ),
        ));
    }
    Ok(())
}

/// One 4-bit weight from its JSON state tensor `state` (named `W.quant_state.bitsandbytes__T`).
fn open4(
    by_name: &HashMap<&str, &TensorEntry>,
    state: &TensorEntry,
    consumed: &mut HashSet<String>,
) -> Result<(String, TensorEntry)> {
    let bad = |msg: String| Error::tensor(state.file.path(), &state.name, msg);
    let (wname, kind) = state
        .name
        .split_once(STATE_MARK)
        .ok_or_else(|| bad("not a bitsandbytes state name".into()))?;
    let code: &'static [f32; 16] = match kind {
        "nf4" => &NF4,
        "fp4" => &FP4,
        other => return Err(bad(format!("unknown 4-bit type \"{other}\" (nf4 or fp4)"))),
    };
    if state.dtype != Dtype::U8 {
        return Err(bad(format!(
            "is {}, expected the uint8 bytes of a JSON object",
            state.dtype
        )));
    }
    let sbytes = Stored::of(state)?;
    let json: Value = serde_json::from_slice(sbytes.bytes())
        .map_err(|e| bad(format!("is not the JSON bitsandbytes writes: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad("is not a JSON object".into()))?;
    const KEYS: [&str; 7] = [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(bad(format!("unknown quant_state item \"{k}\"")));
    }
    if obj.get("quant_type").and_then(Value::as_str) != Some(kind) {
        return Err(bad(format!(
            "quant_type {:?} disagrees with the tensor name's \"{kind}\"",
            obj.get("quant_type")
        )));
    }
    let blocksize = obj
        .get("blocksize")
        .and_then(Value::as_u64)
        .filter(|b| [32, 64, 128, 256, 512, 1024, 2048, 4096].contains(b))
        .ok_or_else(|| {
            bad(format!(
                "blocksize {:?} is not one bitsandbytes uses (32 … 4096)",
                obj.get("blocksize")
            ))
        })? as usize;
    let dtype = match obj.get("dtype").and_then(Value::as_str) {
        Some("bfloat16") => Dtype::BF16,
        Some("float16") => Dtype::F16,
        Some("float32") => Dtype::F32,
        other => {
            return Err(bad(format!(
                "dtype {other:?}: bitsandbytes dequantizes 4-bit to bfloat16, float16 or float32"
            )));
        }
    };
    let shape: Vec<usize> = obj
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        })
        .ok_or_else(|| bad("has no \"shape\" list".into()))?;
    let n = crate::source::checked_nbytes(&shape, Dtype::U8)
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let w = need(by_name, state, wname)?;
    // Any storage dtype (quant_storage) holds the same bytes.
    if w.nbytes() != n.div_ceil(2) {
        return Err(Error::tensor(
            w.file.path(),
            &w.name,
            format!(
                "holds {} bytes, but its 4-bit state's shape {shape:?} packs into {}",
                w.nbytes(),
                n.div_ceil(2)
            ),
        ));
    }
    let blocks = n.div_ceil(blocksize);
    let qmap = need(by_name, state, &format!("{wname}.quant_map"))?;
    check(qmap, Dtype::F32, 16)?;
    let qm = Stored::of(qmap)?;
    if (0..16).any(|i| qm.f32_at(i).to_bits() != code[i].to_bits()) {
        return Err(Error::tensor(
            qmap.file.path(),
            &qmap.name,
            format!(
                "is not bitsandbytes' {kind} code (its dequantization ignores the saved map, so a \
                 custom one cannot be honoured)"
            ),
        ));
    }
    let am = need(by_name, state, &format!("{wname}.absmax"))?;
    let nested = obj.contains_key("nested_blocksize");
    let absmax = if nested {
        let nbs = obj
            .get("nested_blocksize")
            .and_then(Value::as_u64)
            .filter(|&b| b > 0)
            .ok_or_else(|| bad("nested_blocksize is not a positive size".into()))?
            as usize;
        if obj.get("nested_dtype").and_then(Value::as_str) != Some("float32") {
            return Err(bad(format!(
                "nested_dtype {:?}: only float32 (what bitsandbytes writes) is decoded",
                obj.get("nested_dtype")
            )));
        }
        let offset =
            obj.get("nested_offset")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad("nested_offset is not a number".into()))? as f32;
        check(am, Dtype::U8, blocks)?;
        let nam = need(by_name, state, &format!("{wname}.nested_absmax"))?;
        check(nam, Dtype::F32, blocks.div_ceil(nbs))?;
        let nqm = need(by_name, state, &format!("{wname}.nested_quant_map"))?;
        check(nqm, Dtype::F32, 256)?;
        consumed.extend([nam.name.clone(), nqm.name.clone()]);
        Absmax::Nested {
            q: Stored::of(am)?,
            code: Stored::of(nqm)?,
            absmax: Stored::of(nam)?,
            blocksize: nbs,
            offset,
        }
    } else {
        check(am, Dtype::F32, blocks)?;
        Absmax::Plain(Stored::of(am)?)
    };
    consumed.extend([am.name.clone(), qmap.name.clone(), state.name.clone()]);
    let dec = Bnb4 {
        packed: Stored::of(w)?,
        extra: vec![qm, sbytes],
        absmax,
        code,
        quant_type: kind.to_string(),
        blocksize,
        dtype,
    };
    Ok((
        w.name.clone(),
        decoded_entry(w, &w.name, dtype, shape, Arc::new(dec)),
    ))
}

/// One 8-bit weight from its row scales `scb` (named `M.SCB`).
fn open8(
    by_name: &HashMap<&str, &TensorEntry>,
    scb: &TensorEntry,
    consumed: &mut HashSet<String>,
) -> Result<(String, TensorEntry)> {
    let module = scb.name.strip_suffix(".SCB").unwrap_or(&scb.name);
    let w = need(by_name, scb, &format!("{module}.weight"))?;
    if w.dtype != Dtype::I8 || w.shape.len() != 2 {
        return Err(Error::tensor(
            w.file.path(),
            &w.name,
            format!(
                "has int8 row scales ('{}') but is {} of shape {:?}, not a 2-D int8 weight",
                scb.name, w.dtype, w.shape
            ),
        ));
    }
    check(scb, Dtype::F32, w.shape[0])?;
    let format = match by_name.get(format!("{module}.weight_format").as_str()) {
        Some(f) => {
            let s = Stored::of(f)?;
            if f.dtype != Dtype::U8 || s.bytes() != [0] {
                return Err(Error::tensor(
                    f.file.path(),
                    &f.name,
                    "weight_format is not 0 (row-major): only row-major int8 weights are decoded",
                ));
            }
            consumed.insert(f.name.clone());
            Some(s)
        }
        None => None,
    };
    consumed.insert(scb.name.clone());
    let dec = Bnb8 {
        q: Stored::of(w)?,
        scb: Stored::of(scb)?,
        format,
        cols: w.shape[1],
    };
    Ok((
        w.name.clone(),
        decoded_entry(w, &w.name, Dtype::F32, w.shape.clone(), Arc::new(dec)),
    ))
}

/// Replaces every bitsandbytes weight and its state by the dequantized weight. `cfg`:
/// the config path and quantization_config, when config.json has one.
pub(super) fn apply(ckpt: &mut Checkpoint, cfg: Option<(&Path, &Value)>) -> Result<()> {
    if let Some((path, q)) = cfg {
        let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
        if !flag("load_in_4bit") && !flag("load_in_8bit") {
            return Err(Error::format(
                path,
                "quantization_config (bitsandbytes) says neither load_in_4bit nor load_in_8bit",
            ));
        }
    }
    let by_name: HashMap<&str, &TensorEntry> =
        ckpt.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut decoded = HashMap::new();
    let mut consumed = HashSet::new();
    for t in &ckpt.tensors {
        let d = if t.name.contains(STATE_MARK) {
            open4(&by_name, t, &mut consumed)?
        } else if t.name.ends_with(".SCB") {
            open8(&by_name, t, &mut consumed)?
        } else {
            continue;
        };
        decoded.insert(d.0, d.1);
    }
    // Anything left that only a bitsandbytes state has is unexplained: refuse it.
    for t in &ckpt.tensors {
        let leftover = [
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
            ".weight_format",
        ]
        .iter()
        .any(|s| t.name.ends_with(s));
        if leftover && !consumed.contains(&t.name) {
            return Err(Error::tensor(
                t.file.path(),
                &t.name,
                "a bitsandbytes state tensor with no quant_state (or SCB) that it belongs to",
            ));
        }
        if t.dtype == Dtype::I8 && t.name.ends_with(".weight") && !decoded.contains_key(&t.name) {
            return Err(Error::tensor(
                t.file.path(),
                &t.name,
                "an int8 weight in a bitsandbytes checkpoint with no row scales (SCB) beside it",
            ));
        }
    }
    if let Some((path, q)) = cfg {
        if decoded.is_empty() && !ckpt.tensors.is_empty() {
            let _ = q;
            return Err(Error::format(
                path,
                "quantization_config says bitsandbytes, but no tensor has bitsandbytes' state \
                 (X.weight.quant_state.bitsandbytes__nf4/fp4 or X.SCB)",
            ));
        }
    }
    replace(ckpt, decoded, &consumed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use crate::source::open;

    type Tensor = (&'static str, &'static str, Vec<usize>, Vec<u8>);

    fn json_u8(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    /// A 3×3 nf4 weight, blocksize 32 … the 9 elements are one block; double-quantized
    /// absmax; the last byte's low nibble is padding.
    #[test]
    fn nf4_nested_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        // codes 15, 0, 7, 8, 1, 14, 3, 12, 5 (+ pad)
        let codes = [15u8, 0, 7, 8, 1, 14, 3, 12, 5, 0];
        let packed: Vec<u8> = codes.chunks(2).map(|c| (c[0] << 4) | c[1]).collect();
        let mut nqm: Vec<f32> = (0..256).map(|i| i as f32 / 255.0).collect();
        nqm[200] = 0.75;
        let state = json_u8(serde_json::json!({"quant_type": "nf4", "blocksize": 32,
            "dtype": "float32", "shape": [3, 3], "nested_blocksize": 256,
            "nested_dtype": "float32", "nested_offset": 0.25}));
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.weight", "U8", vec![5, 1], packed),
                ("l.weight.absmax", "U8", vec![1], vec![200]),
                ("l.weight.quant_map", "F32", vec![16], f32_bytes(&NF4)),
                ("l.weight.nested_absmax", "F32", vec![1], f32_bytes(&[2.0])),
                (
                    "l.weight.nested_quant_map",
                    "F32",
                    vec![256],
                    f32_bytes(&nqm),
                ),
                (
                    "l.weight.quant_state.bitsandbytes__nf4",
                    "U8",
                    vec![state.len()],
                    state,
                ),
                ("l.bias", "F32", vec![3], f32_bytes(&[1.0, 2.0, 3.0])),
            ],
        );
        let ck = open(dir.path()).unwrap();
        let names: Vec<_> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l.weight", "l.bias"]);
        let t = &ck.tensors[0];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F32, vec![3, 3]));
        let absmax = 0.75f32 * 2.0 + 0.25;
        let want: Vec<f32> = codes[..9]
            .iter()
            .map(|&c| NF4[c as usize] * absmax)
            .collect();
        assert_eq!(f32s(&t.bytes()), want);
        let mut band = Vec::new();
        t.gather(3, 4, &mut band);
        assert_eq!(f32s(&band), want[3..7]);
    }

    /// fp4, plain absmax, blocks of 32 over the flattened tensor crossing a row boundary,
    /// bf16 output.
    #[test]
    fn fp4_blocks_run_over_the_flat_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * 48; // two rows of 48: blocks [0,32) [32,64) [64,96)
        let codes: Vec<u8> = (0..n).map(|i| (i * 7 % 16) as u8).collect();
        let packed: Vec<u8> = codes.chunks(2).map(|c| (c[0] << 4) | c[1]).collect();
        let am = [1.5f32, -3.0, 0.125];
        let state = json_u8(serde_json::json!({"quant_type": "fp4", "blocksize": 32,
            "dtype": "bfloat16", "shape": [2, 48]}));
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.weight", "U8", vec![48, 1], packed),
                ("l.weight.absmax", "F32", vec![3], f32_bytes(&am)),
                ("l.weight.quant_map", "F32", vec![16], f32_bytes(&FP4)),
                (
                    "l.weight.quant_state.bitsandbytes__fp4",
                    "U8",
                    vec![state.len()],
                    state,
                ),
            ],
        );
        let ck = open(dir.path()).unwrap();
        let t = &ck.tensors[0];
        assert_eq!(t.dtype, Dtype::BF16);
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let v = FP4[codes[i] as usize] * am[i / 32];
                f32::from_bits((crate::dtype::bf16_bits(v) as u32) << 16)
            })
            .collect();
        assert_eq!(bf16s(&t.bytes()), want);
    }

    #[test]
    fn int8_row_scales() {
        let dir = tempfile::tempdir().unwrap();
        let q: Vec<u8> = [127i8, -127, 5, 0, -1, 64]
            .iter()
            .map(|&v| v as u8)
            .collect();
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.weight", "I8", vec![2, 3], q.clone()),
                ("l.SCB", "F32", vec![2], f32_bytes(&[0.5, 3.0])),
                ("l.weight_format", "U8", vec![], vec![0]),
            ],
        );
        let ck = open(dir.path()).unwrap();
        assert_eq!(ck.tensors.len(), 1);
        let want: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &b)| (b as i8 as f32) * [0.5f32, 3.0][i / 3] * INV127)
            .collect();
        assert_eq!(f32s(&ck.tensors[0].bytes()), want);
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let st = |v: serde_json::Value| json_u8(v);
        let good = || {
            st(
                serde_json::json!({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 4]}),
            )
        };
        let cases: Vec<(Vec<Tensor>, &str)> = vec![
            // Packed bytes of another shape.
            (
                vec![
                    ("l.weight", "U8", vec![9, 1], vec![0; 9]),
                    ("l.weight.absmax", "F32", vec![1], vec![0; 4]),
                    ("l.weight.quant_map", "F32", vec![16], f32_bytes(&NF4)),
                    (
                        "l.weight.quant_state.bitsandbytes__nf4",
                        "U8",
                        vec![good().len()],
                        good(),
                    ),
                ],
                "packs into 8",
            ),
            // A custom code map.
            (
                vec![
                    ("l.weight", "U8", vec![8, 1], vec![0; 8]),
                    ("l.weight.absmax", "F32", vec![1], vec![0; 4]),
                    ("l.weight.quant_map", "F32", vec![16], f32_bytes(&FP4)),
                    (
                        "l.weight.quant_state.bitsandbytes__nf4",
                        "U8",
                        vec![good().len()],
                        good(),
                    ),
                ],
                "not bitsandbytes' nf4 code",
            ),
            // Missing absmax.
            (
                vec![
                    ("l.weight", "U8", vec![8, 1], vec![0; 8]),
                    ("l.weight.quant_map", "F32", vec![16], f32_bytes(&NF4)),
                    (
                        "l.weight.quant_state.bitsandbytes__nf4",
                        "U8",
                        vec![good().len()],
                        good(),
                    ),
                ],
                "'l.weight.absmax'",
            ),
            // An orphaned state tensor.
            (
                vec![
                    ("l.weight", "U8", vec![8, 1], vec![0; 8]),
                    ("l.weight.absmax", "F32", vec![1], vec![0; 4]),
                    ("m.weight.quant_map", "F32", vec![16], f32_bytes(&NF4)),
                    ("l.weight.quant_map", "F32", vec![16], f32_bytes(&NF4)),
                    (
                        "l.weight.quant_state.bitsandbytes__nf4",
                        "U8",
                        vec![good().len()],
                        good(),
                    ),
                ],
                "m.weight.quant_map",
            ),
        ];
        for (tensors, want) in cases {
            write_st(dir.path(), "model.safetensors", &tensors);
            let e = open(&dir.path().join("model.safetensors"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
