//! GPTQ packed-integer linears (`quant_method = "gptq"`) as GPTQModel writes and reads them,
//! and the packed-int decoder AWQ shares ([`Packed`]).
//!
//! Stored per linear `X` (GPTQModel `nn_modules/qlinear/__init__.py`, `pack_original` and
//! `dequantize_weight`, commit f4c327a; AutoGPTQ `qlinear_cuda_old.py`, commit 9f7d370):
//! - `X.qweight` int32 `[in·bits/32, out]`: code of input `i`, output `o` in word
//!   `[i / (32/bits), o]` at bit `bits·(i % (32/bits))`;
//! - `X.qzeros` int32 `[groups, out·bits/32]`: zero of group `g`, output `o` in word
//!   `[g, o / (32/bits)]` at bit `bits·(o % (32/bits))`;
//! - `X.scales` (f16) `[groups, out]`, `groups = ceil(in / group_size)`;
//! - `X.g_idx` int32 `[in]`: the group of each input (act-order / `desc_act` permutes it).
//!
//! `checkpoint_format = "gptq"` (v1, the default) stores every zero minus one, subtracted
//! from the packed word (`convert_gptq_v2_to_v1_format_module`: `qzeros -= 0x11111111` for
//! 4 bits); GPTQModel's loader (which transformers uses) adds the constant back to the
//! int32 word (`convert_gptq_v1_to_v2_format_module`, wrapping, carries included) before
//! unpacking, and so does this decoder. (AutoGPTQ's old kernel added 1 per field without
//! carries; the two differ only where a stored v1 field is `2^bits - 1`, i.e. an
//! asymmetric zero of 0.) `gptq_v2` stores the zeros as they are.
//!
//! Dequantized as `dequantize_weight` computes it: `scales[g_idx[i], o] · (q - z)` with
//! `q - z` an exact small integer and one rounding to the scales' dtype (the f16 product
//! of an 11-bit scale and an integer below 2^9 is exact in f32, so an f32 multiply rounded
//! to f16 is bit-identical to torch's f16 multiply). The entry is `X.weight` in
//! `nn.Linear` layout `[out, in]`, of the scales' dtype. 2-, 4- and 8-bit codes are
//! decoded; 3-bit (fields straddling words), GPTQModel's planar formats and non-int32
//! packing words are refused by name.

use super::{Stored, decoded_entry, replace};
use crate::dtype::{Dtype, decode_f32, encode_f32};
use crate::error::{Error, Result};
use crate::source::{Checkpoint, Decode, MappedFile, TensorEntry};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Config keys that describe calibration, kernels or provenance: they do not change how
/// the stored tensors decode. Any key outside these and the decoding ones is refused.
pub(super) const NEUTRAL_KEYS: [&str; 38] = [
    "quant_method",
    "damp_percent",
    "damp_auto_increment",
    "static_groups",
    "true_sequential",
    "sym",
    "desc_act",
    "act_group_aware",
    "model_name_or_path",
    "model_file_base_name",
    "meta",
    "lm_head",
    "quantizer",
    "tokenizer",
    "dataset",
    "backend",
    "use_exllama",
    "exllama_config",
    "disable_exllama",
    "use_cuda_fp16",
    "max_input_length",
    "cache_block_outputs",
    "model_seqlen",
    "block_name_to_quantize",
    "module_name_preceding_first_block",
    "modules_in_block_to_quantize",
    "modules_to_not_convert",
    "batch_size",
    "pad_token_id",
    "mse",
    "v2",
    "v2_alpha",
    "hyb_act",
    "gptaq",
    "foem",
    "fail_safe",
    "offload_to_disk",
    "offload_to_disk_path",
];

/// Keys whose value the GPTQ decoding reads or checks.
const GPTQ_KEYS: [&str; 8] = [
    "bits",
    "group_size",
    "checkpoint_format",
    "format",
    "pack_dtype",
    "dynamic",
    "is_marlin_format",
    "rotation",
];

/// The refusal prefix every GPTQ/AWQ message carries, so the method is always named.
pub(super) fn method_note(method: &str) -> String {
    format!("quantization_config.quant_method = \"{method}\"")
}

/// Refuses keys not in `known` (naming the key and the config file).
pub(super) fn check_keys(cfg: &Path, q: &Value, method: &str, known: &[&[&str]]) -> Result<()> {
    if let Some(obj) = q.as_object() {
        for k in obj.keys() {
            if !known.iter().any(|list| list.contains(&k.as_str())) {
                return Err(Error::format(
                    cfg,
                    format!(
                        "{}: unknown key \"{k}\" in quantization_config; lorastream will not guess \
                         whether it changes how the packed weights decode",
                        method_note(method)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// An integer config value (`default` when absent or null).
pub(super) fn int_key(cfg: &Path, q: &Value, key: &str, default: i64, method: &str) -> Result<i64> {
    match q.get(key).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(v) => v.as_i64().ok_or_else(|| {
            Error::format(
                cfg,
                format!(
                    "{}: quantization_config.{key} = {v} is not an integer",
                    method_note(method)
                ),
            )
        }),
    }
}

/// A string config value, lower-cased (`None` when absent or null).
pub(super) fn str_key(cfg: &Path, q: &Value, key: &str, method: &str) -> Result<Option<String>> {
    match q.get(key).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_ascii_lowercase()))
            .ok_or_else(|| {
                Error::format(
                    cfg,
                    format!(
                        "{}: quantization_config.{key} = {v} is not a string",
                        method_note(method)
                    ),
                )
            }),
    }
}

/// `group_size` (-1 = one group over all inputs) as `None`, else the positive size.
pub(super) fn group_size(cfg: &Path, q: &Value, method: &str) -> Result<Option<usize>> {
    match int_key(cfg, q, "group_size", 128, method)? {
        -1 => Ok(None),
        g if g > 0 => Ok(usize::try_from(g).ok()),
        g => Err(Error::format(
            cfg,
            format!(
                "{}: quantization_config.group_size = {g}: expected -1 or a positive size",
                method_note(method)
            ),
        )),
    }
}

/// How codes and zeros are laid out in their words.
#[derive(Debug)]
pub(super) enum Layout {
    /// GPTQ: codes packed along the input dimension, zeros along the output dimension,
    /// groups from `g_idx`, and `zero_add` added (wrapping) to each zero word first (the
    /// v1 offset; 0 for v2).
    Gptq { g_idx: Vec<u32>, zero_add: u32 },
    /// AWQ GEMM: codes and zeros packed along the output dimension in the
    /// `[0, 2, 4, 6, 1, 3, 5, 7]` order, input `i` in group `i / group_size`.
    Awq { group_size: usize },
}

/// The field of output `o % 8` in an AWQ word: the inverse of AutoAWQ's pack
/// `order_map = [0, 2, 4, 6, 1, 3, 5, 7]` (its `AWQ_REVERSE_ORDER`).
const AWQ_REVERSE_ORDER: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// One packed-integer linear: decodes to `[out, in]` of the scales' dtype.
#[derive(Debug)]
pub(super) struct Packed {
    pub qweight: Stored,
    pub qzeros: Stored,
    pub scales: Stored,
    pub scale_dtype: Dtype,
    pub bits: u32,
    pub in_f: usize,
    pub out_f: usize,
    pub layout: Layout,
    /// For `stored_form`: e.g. `GPTQ 4-bit (v1 zeros), group 32, act-order`.
    pub form: String,
    pub extra_bytes: usize,
}

fn word(s: &Stored, i: usize) -> u32 {
    let b = &s.bytes()[i * 4..i * 4 + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl Packed {
    /// Scale `k` of the scales tensor, widened to f32 (exact).
    fn scale(&self, k: usize) -> f32 {
        let es = self.scale_dtype.size();
        let mut s = [0f32; 1];
        decode_f32(
            self.scale_dtype,
            &self.scales.bytes()[k * es..(k + 1) * es],
            &mut s,
        );
        s[0]
    }

    /// Pushes the f32 values `scale · (q - z)` of output row `o`, inputs `i0..i1`. Each
    /// packed word and each group's scale and zero is read once per run of inputs
    /// sharing it, not once per element.
    fn row_into(&self, o: usize, i0: usize, i1: usize, vals: &mut Vec<f32>) {
        let maxq = (1u32 << self.bits) - 1;
        let pf = (32 / self.bits) as usize;
        // (group, scale, zero) of the last group seen.
        let mut cached: Option<(usize, f32, i32)> = None;
        let mut group = |g: usize, zero: &dyn Fn(usize) -> u32| -> (f32, i32) {
            match cached {
                Some((cg, s, z)) if cg == g => (s, z),
                _ => {
                    let (s, z) = (self.scale(g * self.out_f + o), zero(g) as i32);
                    cached = Some((g, s, z));
                    (s, z)
                }
            }
        };
        match &self.layout {
            Layout::Gptq { g_idx, zero_add } => {
                let zshift = self.bits * (o % pf) as u32;
                let zero = |g: usize| {
                    (word(&self.qzeros, g * (self.out_f / pf) + o / pf).wrapping_add(*zero_add)
                        >> zshift)
                        & maxq
                };
                let mut i = i0;
                while i < i1 {
                    // The inputs of one packed word.
                    let w = word(&self.qweight, (i / pf) * self.out_f + o);
                    let stop = ((i / pf + 1) * pf).min(i1);
                    for (ii, &g) in g_idx.iter().enumerate().take(stop).skip(i) {
                        let q = (w >> (self.bits * (ii % pf) as u32)) & maxq;
                        let (s, z) = group(g as usize, &zero);
                        // One rounding: the product is exact in f32 for f16/bf16 scales.
                        vals.push(s * (q as i32 - z) as f32);
                    }
                    i = stop;
                }
            }
            Layout::Awq { group_size } => {
                let cols = self.out_f / 8;
                let shift = 4 * AWQ_REVERSE_ORDER[o % 8];
                let zero = |g: usize| (word(&self.qzeros, g * cols + o / 8) >> shift) & 0xF;
                for i in i0..i1 {
                    let q = (word(&self.qweight, i * cols + o / 8) >> shift) & 0xF;
                    let (s, z) = group(i / group_size, &zero);
                    vals.push(s * (q as i32 - z) as f32);
                }
            }
        }
    }
}

impl Decode for Packed {
    fn decode_into(&self, from: usize, out: &mut [u8]) {
        let es = self.scale_dtype.size();
        let n = out.len() / es;
        let mut vals = Vec::with_capacity(n.min(8192));
        let mut done = 0;
        while done < n {
            vals.clear();
            // Up to 8192 elements, whole rows or the part of one row the band holds.
            let e = from + done;
            let (o, i0) = (e / self.in_f, e % self.in_f);
            let i1 = (i0 + (n - done).min(8192)).min(self.in_f);
            self.row_into(o, i0, i1, &mut vals);
            let run = vals.len();
            encode_f32(
                self.scale_dtype,
                &vals,
                &mut out[done * es..(done + run) * es],
            );
            done += run;
        }
    }
    fn stored_form(&self) -> String {
        format!("{}, {} scales", self.form, self.scale_dtype)
    }
    fn stored_bytes(&self) -> u64 {
        (self.qweight.len + self.qzeros.len + self.scales.len + self.extra_bytes) as u64
    }
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
        vec![
            self.qweight.range(),
            self.qzeros.range(),
            self.scales.range(),
        ]
    }
}

/// The tensors of one packed linear `X`, found by name.
pub(super) struct Parts<'a> {
    pub prefix: String,
    pub qweight: &'a TensorEntry,
    pub qzeros: &'a TensorEntry,
    pub scales: &'a TensorEntry,
}

/// The linears of `ckpt`: every `X.qweight` with its `X.qzeros` and `X.scales` (refused
/// by name when one is missing, or when `X.weight` is stored too), plus the names of the
/// other tensors `extra` (e.g. `g_idx`) of each, required.
pub(super) fn find_parts<'a>(
    ckpt: &'a Checkpoint,
    cfg: &Path,
    method: &str,
    extra: &[&str],
) -> Result<Vec<(Parts<'a>, Vec<&'a TensorEntry>)>> {
    let by_name: HashMap<&str, &TensorEntry> =
        ckpt.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut found = Vec::new();
    for t in &ckpt.tensors {
        let Some(prefix) = t.name.strip_suffix(".qweight") else {
            continue;
        };
        let need = |suffix: &str| {
            let name = format!("{prefix}.{suffix}");
            by_name.get(name.as_str()).copied().ok_or_else(|| {
                Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!(
                        "{}: packed weight without its '{name}': it cannot be dequantized",
                        method_note(method)
                    ),
                )
            })
        };
        let weight = format!("{prefix}.weight");
        if let Some(w) = by_name.get(weight.as_str()) {
            return Err(Error::tensor(
                w.file.path(),
                &w.name,
                format!(
                    "{}: stored beside the packed '{}', which dequantizes to this same name: \
                     the checkpoint does not say which is the weight",
                    method_note(method),
                    t.name
                ),
            ));
        }
        let parts = Parts {
            prefix: prefix.to_string(),
            qweight: t,
            qzeros: need("qzeros")?,
            scales: need("scales")?,
        };
        let extras = extra.iter().map(|s| need(s)).collect::<Result<Vec<_>>>()?;
        found.push((parts, extras));
    }
    if found.is_empty() {
        return Err(Error::format(
            cfg,
            format!(
                "{}, but no tensor of the checkpoint ends in '.qweight': the config and the \
                 tensors disagree, so lorastream cannot tell how the weights are stored",
                method_note(method)
            ),
        ));
    }
    Ok(found)
}

/// Checks a tensor's dtype and rank; its 2-D (or 1-D) shape.
pub(super) fn expect(
    t: &TensorEntry,
    dtypes: &[Dtype],
    rank: usize,
    what: &str,
    method: &str,
) -> Result<Vec<usize>> {
    if !dtypes.contains(&t.dtype) || t.shape.len() != rank {
        let names: Vec<&str> = dtypes.iter().map(|d| d.name()).collect();
        return Err(Error::tensor(
            t.file.path(),
            &t.name,
            format!(
                "{}: {what} must be a {rank}-D {} tensor; it is {} {:?}",
                method_note(method),
                names.join("/"),
                t.dtype,
                t.shape
            ),
        ));
    }
    Ok(t.shape.clone())
}

pub(super) const SCALE_DTYPES: [Dtype; 3] = [Dtype::F16, Dtype::BF16, Dtype::F32];

/// A shape refusal naming the tensor.
pub(super) fn shape_err(t: &TensorEntry, method: &str, msg: String) -> Error {
    Error::tensor(
        t.file.path(),
        &t.name,
        format!("{}: {msg}", method_note(method)),
    )
}

/// Refuses tensors a packed format has that no `X.qweight` consumed (orphan zeros, scales,
/// group indices: AWQ's activation `scales` of `ScaledActivation` among them).
pub(super) fn refuse_orphans(
    ckpt: &Checkpoint,
    consumed: &HashSet<String>,
    method: &str,
) -> Result<()> {
    for t in &ckpt.tensors {
        for suffix in [".qzeros", ".scales", ".g_idx"] {
            if t.name.ends_with(suffix) && !consumed.contains(&t.name) {
                return Err(Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!(
                        "{}: no '.qweight' beside it uses it (an activation scale or a stray \
                         quantization tensor): lorastream will not copy it as a weight nor drop it",
                        method_note(method)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The GPTQ decoding settings the config gives: bits and the v1 zero offset word.
fn gptq_settings(cfg: &Path, q: &Value) -> Result<(u32, Option<usize>, u32, &'static str)> {
    let m = "gptq";
    check_keys(cfg, q, m, &[&NEUTRAL_KEYS, &GPTQ_KEYS])?;
    let bad = |msg: String| Error::format(cfg, format!("{}: {msg}", method_note(m)));
    let bits = match q.get("bits").filter(|v| !v.is_null()) {
        None => return Err(bad("quantization_config has no \"bits\"".into())),
        Some(_) => int_key(cfg, q, "bits", 0, m)?,
    };
    let bits = match bits {
        2 | 4 | 8 => bits as u32,
        3 => {
            return Err(bad(
                "bits = 3: GPTQ's 3-bit packing (codes straddling int32 words) is not decoded \
                 (2, 4 and 8 are)"
                    .into(),
            ));
        }
        b => {
            return Err(bad(format!(
                "bits = {b}: only 2-, 4- and 8-bit GPTQ packing is decoded"
            )));
        }
    };
    let gs = group_size(cfg, q, m)?;
    let cf = str_key(cfg, q, "checkpoint_format", m)?;
    let f = str_key(cfg, q, "format", m)?;
    let format = match (cf, f) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(format!(
                "checkpoint_format = \"{a}\" but format = \"{b}\": the config does not settle \
                 how the zeros are stored"
            )));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => "gptq".to_string(),
    };
    let (zero_add, label) = match format.as_str() {
        // One added to every field of the word: Σ 1 << (bits·k).
        "gptq" => (
            (0..32 / bits).fold(0u32, |acc, k| acc | (1 << (bits * k))),
            "v1 zeros",
        ),
        "gptq_v2" => (0, "v2 zeros"),
        other => {
            return Err(bad(format!(
                "checkpoint_format = \"{other}\": only \"gptq\" (v1) and \"gptq_v2\" packing is \
                 decoded (marlin, bitblas, planar and other kernel layouts are not)"
            )));
        }
    };
    if let Some(p) = str_key(cfg, q, "pack_dtype", m)? {
        if p != "int32" && p != "torch.int32" {
            return Err(bad(format!(
                "pack_dtype = \"{p}\": only int32 packing words are decoded"
            )));
        }
    }
    if let Some(d) = q.get("dynamic").filter(|v| !v.is_null()) {
        if d.as_object().is_none_or(|o| !o.is_empty()) {
            return Err(bad(format!(
                "dynamic = {d}: per-module bits/group_size overrides are not decoded"
            )));
        }
    }
    if let Some(v) = q.get("is_marlin_format").filter(|v| !v.is_null()) {
        if v.as_bool() != Some(false) {
            return Err(bad(format!(
                "is_marlin_format = {v}: the Marlin layout is not decoded"
            )));
        }
    }
    if let Some(v) = q.get("rotation").filter(|v| !v.is_null()) {
        return Err(bad(format!(
            "rotation = {v}: a rotated (Hadamard) model is not a plain linear once dequantized"
        )));
    }
    Ok((bits, gs, zero_add, label))
}

/// Replaces every GPTQ linear (`X.qweight`, `X.qzeros`, `X.scales`, `X.g_idx`) by its
/// dequantized `X.weight`; refuses what does not fit, by name.
pub(super) fn apply(ckpt: &mut Checkpoint, cfg: &Path, q: &Value) -> Result<()> {
    let m = "gptq";
    let (bits, gs, zero_add, label) = gptq_settings(cfg, q)?;
    let pf = (32 / bits) as usize;
    let mut decoded = HashMap::new();
    let mut consumed = HashSet::new();
    for (p, extras) in find_parts(ckpt, cfg, m, &["g_idx"])? {
        let gi = extras[0];
        let qw = expect(p.qweight, &[Dtype::I32], 2, "qweight", m)?;
        let qz = expect(p.qzeros, &[Dtype::I32], 2, "qzeros", m)?;
        let sc = expect(p.scales, &SCALE_DTYPES, 2, "scales", m)?;
        let gshape = expect(gi, &[Dtype::I32], 1, "g_idx", m)?;
        let (in_f, out_f) = (gshape[0], qw[1]);
        if in_f % pf != 0 || qw[0] != in_f / pf {
            return Err(shape_err(
                p.qweight,
                m,
                format!(
                    "shape {qw:?} does not hold {in_f} inputs (g_idx length) at {bits} bits: \
                     expected [{in_f} / {pf}, out]"
                ),
            ));
        }
        let groups = match gs {
            Some(g) => in_f.div_ceil(g),
            None => 1,
        };
        if out_f % pf != 0 || qz != [groups, out_f / pf] {
            return Err(shape_err(
                p.qzeros,
                m,
                format!(
                    "shape {qz:?} does not fit qweight {qw:?}: expected [{groups}, {}] \
                     (ceil({in_f} / group_size), out / {pf})",
                    out_f / pf
                ),
            ));
        }
        if sc != [groups, out_f] {
            return Err(shape_err(
                p.scales,
                m,
                format!("shape {sc:?} does not fit qweight {qw:?}: expected [{groups}, {out_f}]"),
            ));
        }
        let gstored = Stored::of(gi)?;
        let mut g_idx = Vec::with_capacity(in_f);
        for k in 0..in_f {
            let g = word(&gstored, k) as i32;
            if g < 0 || g as usize >= groups {
                return Err(shape_err(
                    gi,
                    m,
                    format!("g_idx[{k}] = {g} is not a group index below {groups}"),
                ));
            }
            g_idx.push(g as u32);
        }
        let act_order = g_idx
            .iter()
            .enumerate()
            .any(|(i, &g)| gs.map_or(g != 0, |s| g as usize != i / s));
        let dec = Packed {
            qweight: Stored::of(p.qweight)?,
            qzeros: Stored::of(p.qzeros)?,
            scales: Stored::of(p.scales)?,
            scale_dtype: p.scales.dtype,
            bits,
            in_f,
            out_f,
            layout: Layout::Gptq { g_idx, zero_add },
            form: format!(
                "GPTQ {bits}-bit ({label}), group {}{}",
                gs.map_or("all".to_string(), |g| g.to_string()),
                if act_order { ", act-order g_idx" } else { "" }
            ),
            extra_bytes: gstored.len,
        };
        let name = format!("{}.weight", p.prefix);
        decoded.insert(
            p.qweight.name.clone(),
            decoded_entry(
                p.qweight,
                &name,
                p.scales.dtype,
                vec![out_f, in_f],
                Arc::new(dec),
            ),
        );
        for t in [p.qzeros, p.scales, gi] {
            consumed.insert(t.name.clone());
        }
    }
    refuse_orphans(ckpt, &consumed, m)?;
    replace(ckpt, decoded, &consumed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use crate::source::open;

    fn config(dir: &Path, q: &str) {
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"model_type": "llama", "quantization_config": {q}}}"#),
        )
        .unwrap();
    }

    fn i32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Packs codes `[in, out]` as GPTQModel's `pack_original` does (2/4/8 bits).
    fn pack_rows(codes: &[Vec<u32>], bits: u32) -> Vec<u32> {
        let pf = (32 / bits) as usize;
        let (inn, out) = (codes.len(), codes[0].len());
        let mut w = vec![0u32; inn / pf * out];
        for r in 0..inn / pf {
            for j in 0..pf {
                for o in 0..out {
                    w[r * out + o] |= codes[r * pf + j][o] << (bits as usize * j);
                }
            }
        }
        w
    }

    type Tensor = (&'static str, &'static str, Vec<usize>, Vec<u8>);

    /// 16 inputs × 8 outputs at 4 bits, group 8, act-order g_idx, v1 zeros including a
    /// zero of 0 (so the v1 word offset borrows), decoded by hand.
    #[test]
    #[allow(clippy::needless_range_loop)] // indices mirror the [group][output] layout
    fn gptq_v1_act_order_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        config(
            dir.path(),
            r#"{"quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": true, "sym": false, "checkpoint_format": "gptq"}"#,
        );
        let (inn, out, groups) = (16usize, 8usize, 2usize);
        let codes: Vec<Vec<u32>> = (0..inn)
            .map(|i| (0..out).map(|o| ((i * 7 + o * 3) % 16) as u32).collect())
            .collect();
        let zeros: Vec<Vec<u32>> = (0..groups)
            .map(|g| (0..out).map(|o| ((g * 5 + o * 2) % 16) as u32).collect())
            .collect();
        assert!(zeros.iter().flatten().any(|&z| z == 0));
        let g_idx: Vec<u32> = (0..inn as u32).map(|i| (i * 5 % 16) / 8).collect();
        let mut qz = vec![0u32; groups];
        for g in 0..groups {
            for o in 0..out {
                qz[g] |= zeros[g][o] << (4 * o);
            }
            qz[g] = qz[g].wrapping_sub(0x1111_1111);
        }
        let scales: Vec<f32> = (0..groups * out).map(|k| 0.25 + k as f32 * 0.125).collect();
        let sc16: Vec<u8> = scales
            .iter()
            .flat_map(|&s| half::f16::from_f32(s).to_bits().to_le_bytes())
            .collect();
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.qweight", "I32", vec![2, 8], i32s(&pack_rows(&codes, 4))),
                ("l.qzeros", "I32", vec![2, 1], i32s(&qz)),
                ("l.scales", "F16", vec![2, 8], sc16),
                ("l.g_idx", "I32", vec![16], i32s(&g_idx)),
                ("l.bias", "F16", vec![8], vec![0; 16]),
            ],
        );
        let ck = open(dir.path()).unwrap();
        let names: Vec<_> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l.weight", "l.bias"]);
        let t = &ck.tensors[0];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::F16, vec![8, 16]));
        let got: Vec<f32> = t
            .bytes()
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect();
        for o in 0..out {
            for i in 0..inn {
                let g = g_idx[i] as usize;
                let want = half::f16::from_f32(
                    scales[g * out + o] * (codes[i][o] as f32 - zeros[g][o] as f32),
                )
                .to_f32();
                assert_eq!(got[o * inn + i], want, "({o}, {i})");
            }
        }
        let (form, _) = super::super::stored_summary(t).unwrap();
        assert!(form.contains("act-order") && form.contains("v1"), "{form}");
    }

    #[test]
    fn refusals_name_tensor_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"quant_method": "gptq", "bits": 4, "group_size": 8}"#;
        let good =
            |qz: Vec<usize>, g: usize| -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
                vec![
                    ("l.qweight", "I32", vec![2, 8], vec![0; 64]),
                    (
                        "l.qzeros",
                        "I32",
                        qz.clone(),
                        vec![0; qz.iter().product::<usize>() * 4],
                    ),
                    ("l.scales", "F16", vec![2, 8], vec![0; 32]),
                    ("l.g_idx", "I32", vec![g], vec![0; g * 4]),
                ]
            };
        let cases: Vec<(&str, Vec<Tensor>, &str)> = vec![
            (
                r#"{"quant_method": "gptq", "bits": 3}"#,
                good(vec![2, 1], 16),
                "bits = 3",
            ),
            (
                r#"{"quant_method": "gptq", "bits": 4, "group_size": 8, "checkpoint_format": "marlin"}"#,
                good(vec![2, 1], 16),
                "\"marlin\"",
            ),
            (
                r#"{"quant_method": "gptq", "bits": 4, "frobnicate": 1}"#,
                good(vec![2, 1], 16),
                "\"frobnicate\"",
            ),
            (ok, good(vec![2, 2], 16), "l.qzeros"),
            (ok, good(vec![2, 1], 12), "l.qweight"),
            (ok, good(vec![2, 1], 16)[..3].to_vec(), "'l.g_idx'"),
            (ok, vec![good(vec![2, 1], 16)[0].clone()], "'l.qzeros'"),
        ];
        for (q, tensors, want) in cases {
            config(dir.path(), q);
            write_st(dir.path(), "model.safetensors", &tensors);
            let e = open(dir.path()).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("\"gptq\""), "{want}: {e}");
        }
        // A g_idx entry outside the groups.
        config(dir.path(), ok);
        let mut t = good(vec![2, 1], 16);
        t[3].3[4] = 9;
        write_st(dir.path(), "model.safetensors", &t);
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("l.g_idx") && e.contains("g_idx[1] = 9"), "{e}");
    }
}
