//! FP8 block-scaled weights (`quant_method = "fp8"`, DeepSeek-V3 / Qwen3-FP8 style):
//! `X.weight` float8_e4m3fn with `X.weight_scale_inv` f32, one scale per
//! `weight_block_size` block of the last two dimensions. Decoded as DeepSeek's
//! `weight_dequant` and transformers' `Fp8Dequantize` do: the fp8 value widened to f32,
//! times its block's scale in f32, rounded to bf16. Partial edge blocks take the ceil rule
//! (block `(r / b0, c / b1)`, a scale grid of `ceil(R / b0) × ceil(C / b1)`), as
//! `weight_dequant`'s kernel grid does.

use super::{Stored, decoded_entry, replace};
use crate::dtype::{Dtype, bf16_bits};
use crate::error::{Error, Result};
use crate::source::{Checkpoint, Decode, MappedFile, TensorEntry};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// float8_e4m3fn → f32 (exact): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; no
/// infinities, `S.1111.111` is NaN.
pub(crate) fn e4m3fn_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0x0F) as i32;
    let m = (b & 0x07) as f32;
    if e == 0x0F && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if e == 0 {
        // Subnormal: m/8 · 2^-6.
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * f32::powi(2.0, e - 7)
    }
}

/// All 256 float8_e4m3fn values as f32.
fn e4m3fn_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3fn_to_f32(b as u8)))
}

/// The config keys understood; any other is refused (it could change the decoding).
const KNOWN_KEYS: [&str; 7] = [
    "quant_method",
    "fmt",
    "activation_scheme",
    "weight_block_size",
    "modules_to_not_convert",
    "dequantize",
    "scale_fmt",
];

/// The block size the config gives: `weight_block_size` (transformers'
/// `FineGrainedFP8Config` defaults it to [128, 128] when absent).
fn block_size(path: &Path, q: &Value) -> Result<(usize, usize)> {
    let bad = |msg: String| Error::format(path, format!("quantization_config (fp8): {msg}"));
    if let Some(obj) = q.as_object() {
        for k in obj.keys() {
            if !KNOWN_KEYS.contains(&k.as_str()) {
                return Err(bad(format!(
                    "unknown key \"{k}\" (understood: {}); lorastream will not guess what it changes",
                    KNOWN_KEYS.join(", ")
                )));
            }
        }
    }
    if let Some(f) = q.get("fmt").filter(|v| !v.is_null()) {
        if f.as_str() != Some("e4m3") {
            return Err(bad(format!(
                "fmt = {f}: only \"e4m3\" (float8_e4m3fn) is decoded"
            )));
        }
    }
    if let Some(a) = q.get("activation_scheme").filter(|v| !v.is_null()) {
        if a.as_str() != Some("dynamic") {
            return Err(bad(format!(
                "activation_scheme = {a}: only \"dynamic\" is decoded (static activation scales \
                 have no place in a dequantized model)"
            )));
        }
    }
    match q.get("weight_block_size") {
        None => Ok((128, 128)),
        Some(v) => {
            let dims: Option<Vec<usize>> = v.as_array().and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect()
            });
            match dims.as_deref() {
                Some([b0, b1]) if *b0 > 0 && *b1 > 0 => Ok((*b0, *b1)),
                _ => Err(bad(format!(
                    "weight_block_size = {v}: expected two positive sizes [rows, cols] (per-tensor \
                     scales are not decoded)"
                ))),
            }
        }
    }
}

/// The stored form of one decoded FP8 block-scaled weight, as `--requantize fp8-block`
/// passes it through: the float8_e4m3fn weight and its f32 `weight_scale_inv` entries as
/// the checkpoint stores them, and the block size they were read with.
#[derive(Clone, Debug)]
pub struct Fp8Parts {
    pub weight: TensorEntry,
    pub scales: TensorEntry,
    pub block: (usize, usize),
    /// `quantization_config.scale_fmt`, when set (e.g. "ue8m0").
    pub scale_fmt: Option<String>,
}

/// One FP8 weight with its block scales.
#[derive(Debug)]
struct Fp8Block {
    weight: Stored,
    scales: Stored,
    /// The two stored entries themselves (see [`Fp8Parts`]).
    parts: Fp8Parts,
    /// Rows and columns of each matrix (the last two dimensions).
    rows: usize,
    cols: usize,
    block: (usize, usize),
    /// Scale grid of each matrix.
    srows: usize,
    scols: usize,
}

impl Fp8Block {
    fn scale(&self, mat: usize, r: usize, c: usize) -> f32 {
        self.scales.f32_at(
            mat * self.srows * self.scols + (r / self.block.0) * self.scols + c / self.block.1,
        )
    }
}

impl Decode for Fp8Block {
    fn decode_into(&self, from: usize, out: &mut [u8]) {
        let lut = e4m3fn_table();
        let w = self.weight.bytes();
        let n = out.len() / 2;
        let per_mat = self.rows * self.cols;
        let mut i = from;
        let mut k = 0;
        while k < n {
            let (mat, rem) = (i / per_mat, i % per_mat);
            let (r, c0) = (rem / self.cols, rem % self.cols);
            // The rest of this row's block of columns, or of the request: one scale.
            let block_end = ((c0 / self.block.1 + 1) * self.block.1).min(self.cols);
            let run = (block_end - c0).min(n - k);
            let scale = self.scale(mat, r, c0);
            for (o, &q) in out[k * 2..(k + run) * 2]
                .chunks_exact_mut(2)
                .zip(&w[i..i + run])
            {
                o.copy_from_slice(&bf16_bits(lut[q as usize] * scale).to_le_bytes());
            }
            i += run;
            k += run;
        }
        // Decoding runs front to back: the stored bytes just read are not needed again
        // soon, so they leave resident memory now rather than with the whole tensor.
        self.weight.release(from, n);
    }
    fn stored_form(&self) -> String {
        format!(
            "float8_e4m3fn, {}x{} block scales (f32)",
            self.block.0, self.block.1
        )
    }
    fn stored_bytes(&self) -> u64 {
        (self.weight.len + self.scales.len) as u64
    }
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
        vec![self.weight.range(), self.scales.range()]
    }
    fn fp8_block(&self) -> Option<&Fp8Parts> {
        Some(&self.parts)
    }
}

/// Replaces every `X` + `X_scale_inv` pair by the bf16 `X`; refuses fp8 tensors without
/// scales, scales without a weight, static activation scales and grids that do not fit.
pub(super) fn apply(ckpt: &mut Checkpoint, cfg: &Path, q: &Value) -> Result<()> {
    let block = block_size(cfg, q)?;
    let scale_fmt = q
        .get("scale_fmt")
        .and_then(Value::as_str)
        .filter(|f| !f.is_empty())
        .map(str::to_string);
    let by_name: HashMap<&str, usize> = ckpt
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut decoded = HashMap::new();
    let mut consumed = HashSet::new();
    for t in &ckpt.tensors {
        let bad = |msg: String| Error::tensor(t.file.path(), &t.name, msg);
        if t.name.ends_with("input_scale") || t.name.ends_with("activation_scale") {
            return Err(bad(
                "a static activation scale: only activation_scheme \"dynamic\" checkpoints are decoded"
                    .into(),
            ));
        }
        if let Some(wname) = t.name.strip_suffix("_scale_inv") {
            let Some(&wi) = by_name.get(wname) else {
                return Err(bad(format!(
                    "block scales for '{wname}', which is not in the checkpoint"
                )));
            };
            let w = &ckpt.tensors[wi];
            let wbad = |msg: String| Error::tensor(w.file.path(), &w.name, msg);
            if w.dtype != Dtype::F8E4M3 {
                return Err(wbad(format!(
                    "has block scales ('{}') but is {}, not float8_e4m3fn (F8_E4M3)",
                    t.name, w.dtype
                )));
            }
            if t.dtype != Dtype::F32 {
                return Err(bad(format!(
                    "block scales are {}: only f32 scales (weight_scale_inv) are decoded",
                    t.dtype
                )));
            }
            let nd = w.shape.len();
            if nd < 2 || t.shape.len() != nd || t.shape[..nd - 2] != w.shape[..nd - 2] {
                return Err(bad(format!(
                    "scale shape {:?} does not fit weight '{}' of shape {:?}",
                    t.shape, w.name, w.shape
                )));
            }
            let (rows, cols) = (w.shape[nd - 2], w.shape[nd - 1]);
            let grid = (rows.div_ceil(block.0), cols.div_ceil(block.1));
            if (t.shape[nd - 2], t.shape[nd - 1]) != grid {
                return Err(bad(format!(
                    "scale grid {:?} for weight '{}' {:?} is not ceil(shape / weight_block_size {:?}) = \
                     [{}, {}] ({})",
                    &t.shape[nd - 2..],
                    w.name,
                    w.shape,
                    [block.0, block.1],
                    grid.0,
                    grid.1,
                    cfg.display()
                )));
            }
            let dec = Fp8Block {
                weight: Stored::of(w)?,
                scales: Stored::of(t)?,
                rows,
                cols,
                block,
                srows: grid.0,
                scols: grid.1,
                parts: Fp8Parts {
                    weight: w.clone(),
                    scales: t.clone(),
                    block,
                    scale_fmt: scale_fmt.clone(),
                },
            };
            decoded.insert(
                w.name.clone(),
                decoded_entry(w, &w.name, Dtype::BF16, w.shape.clone(), Arc::new(dec)),
            );
            consumed.insert(t.name.clone());
        }
    }
    for t in &ckpt.tensors {
        if matches!(
            t.dtype,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz | Dtype::F8E8M0
        ) && !decoded.contains_key(&t.name)
        {
            return Err(Error::tensor(
                t.file.path(),
                &t.name,
                format!(
                    "is {} with no '{}_scale_inv' beside it: an fp8 checkpoint's weight without its \
                     block scales cannot be dequantized",
                    t.dtype, t.name
                ),
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

    #[test]
    fn e4m3fn_values() {
        assert_eq!(e4m3fn_to_f32(0x00), 0.0);
        assert_eq!(e4m3fn_to_f32(0x38), 1.0); // e=7, m=0
        assert_eq!(e4m3fn_to_f32(0x7E), 448.0); // the largest finite
        assert_eq!(e4m3fn_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(e4m3fn_to_f32(0xB4), -0.75); // e=6, m=4: -1.5/2
        assert!(e4m3fn_to_f32(0x7F).is_nan() && e4m3fn_to_f32(0xFF).is_nan());
    }

    type Tensor = (&'static str, &'static str, Vec<usize>, Vec<u8>);

    fn config(dir: &Path, q: &str) {
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"model_type": "llama", "quantization_config": {q}}}"#),
        )
        .unwrap();
    }

    /// A 3×5 weight with 2×2 blocks (ceil grid 2×3, partial edge blocks), decoded by hand.
    #[test]
    fn block_scales_with_partial_edges() {
        let dir = tempfile::tempdir().unwrap();
        config(
            dir.path(),
            r#"{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [2, 2]}"#,
        );
        // Elements 1.0 (0x38), 1.5 (0x3C), -0.75 (0xB4) cycling.
        let codes = [0x38u8, 0x3C, 0xB4];
        let w: Vec<u8> = (0..15).map(|i| codes[i % 3]).collect();
        let scales = [0.5f32, 2.0, 3.0, 10.0, 0.1, -1.0];
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.weight", "F8_E4M3", vec![3, 5], w.clone()),
                ("l.weight_scale_inv", "F32", vec![2, 3], f32_bytes(&scales)),
                ("norm.weight", "BF16", vec![2], vec![0x80, 0x3F, 0, 0x40]),
            ],
        );
        let ck = open(dir.path()).unwrap();
        let names: Vec<_> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l.weight", "norm.weight"]);
        let t = &ck.tensors[0];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::BF16, vec![3, 5]));
        let vals = [1.0f32, 1.5, -0.75];
        let want: Vec<f32> = (0..15)
            .map(|i| {
                let (r, c) = (i / 5, i % 5);
                let v = vals[i % 3] * scales[(r / 2) * 3 + c / 2];
                f32::from_bits((bf16_bits(v) as u32) << 16)
            })
            .collect();
        assert_eq!(bf16s(&t.bytes()), want);
        // Any band gives the same elements.
        let mut band = Vec::new();
        t.gather(4, 7, &mut band);
        assert_eq!(bf16s(&band), want[4..11]);
        let (form, bytes) = super::super::stored_summary(t).unwrap();
        assert!(form.contains("2x2"), "{form}");
        assert_eq!(bytes, 15 + 24);
    }

    #[test]
    fn refusals_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<Tensor>, &str); 5] = [
            (
                r#"{"quant_method": "fp8", "weight_block_size": [2, 2]}"#,
                vec![
                    ("l.weight", "F8_E4M3", vec![3, 5], vec![0; 15]),
                    ("l.weight_scale_inv", "F32", vec![1, 3], vec![0; 12]),
                ],
                "scale grid",
            ),
            (
                r#"{"quant_method": "fp8"}"#,
                vec![("l.weight", "F8_E4M3", vec![3, 5], vec![0; 15])],
                "no 'l.weight_scale_inv'",
            ),
            (
                r#"{"quant_method": "fp8", "weight_block_size": [2, 2], "bits": 3}"#,
                vec![("n", "F32", vec![1], vec![0; 4])],
                "unknown key \"bits\"",
            ),
            (
                r#"{"quant_method": "fp8", "activation_scheme": "static"}"#,
                vec![("n", "F32", vec![1], vec![0; 4])],
                "static",
            ),
            (
                r#"{"quant_method": "gptq", "bits": 4}"#,
                vec![("l.qweight", "I32", vec![1], vec![0; 4])],
                "quant_method = \"gptq\"",
            ),
        ];
        for (q, tensors, want) in cases {
            config(dir.path(), q);
            write_st(dir.path(), "model.safetensors", &tensors);
            let e = open(dir.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // Without a config: the scales are refused rather than copied.
        std::fs::remove_file(dir.path().join("config.json")).unwrap();
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.weight", "F8_E4M3", vec![2, 2], vec![0; 4]),
                ("l.weight_scale_inv", "F32", vec![1, 1], vec![0; 4]),
            ],
        );
        let e = open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("l.weight_scale_inv") && e.contains("quantization_config"),
            "{e}"
        );
    }
}
