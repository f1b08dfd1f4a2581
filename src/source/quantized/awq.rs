//! AWQ GEMM linears (`quant_method = "awq"`, `version = "gemm"`) as AutoAWQ writes them
//! and transformers (through GPTQModel's copy of the same code) reads them.
//!
//! Stored per linear `X` (AutoAWQ `awq/modules/linear/gemm.py` `WQLinear_GEMM.from_linear`
//! and `awq/utils/packing_utils.py` `dequantize_gemm`, commit 88e4c76; the same functions
//! in GPTQModel `gptqmodel/quantization/awq/utils/packing_utils.py`, commit f4c327a):
//! - `X.qweight` int32 `[in, out/8]`: output `8c + order_map[k]` at bits `4k..4k+4` of
//!   word `[i, c]`, `order_map = [0, 2, 4, 6, 1, 3, 5, 7]`;
//! - `X.qzeros` int32 `[in/group_size, out/8]`, the same order, no offset;
//! - `X.scales` (f16) `[in/group_size, out]`.
//!
//! Dequantized as `dequantize_gemm`: `(q - z) · scales` with input `i` in group
//! `i / group_size`, one rounding to the scales' dtype (see [`super::gptq`] for why an f32
//! product rounded once is torch's f16 product), transposed to the `nn.Linear` weight
//! `[out, in]`. Only 4-bit GEMM with zero points is decoded: GEMV / GEMV-fast / Marlin
//! and `zero_point = false` are refused by name (AutoAWQ's GEMM pack needs zeros).

use super::gptq::{
    Layout, NEUTRAL_KEYS, Packed, SCALE_DTYPES, check_keys, expect, find_parts, group_size,
    int_key, method_note, refuse_orphans, shape_err, str_key,
};
use super::{Stored, decoded_entry, replace};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::Checkpoint;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// Keys whose value the AWQ decoding reads or checks.
const AWQ_KEYS: [&str; 6] = [
    "bits",
    "w_bit",
    "group_size",
    "zero_point",
    "version",
    "format",
];

/// The group size (`None` = all inputs) the config gives, after checking the rest.
fn awq_settings(cfg: &Path, q: &Value) -> Result<Option<usize>> {
    let m = "awq";
    check_keys(
        cfg,
        q,
        m,
        &[
            &NEUTRAL_KEYS,
            &AWQ_KEYS,
            &["do_fuse", "fuse_max_seq_len", "modules_to_fuse"],
        ],
    )?;
    let bad = |msg: String| Error::format(cfg, format!("{}: {msg}", method_note(m)));
    let bits = int_key(cfg, q, "bits", int_key(cfg, q, "w_bit", 4, m)?, m)?;
    if bits != 4 {
        return Err(bad(format!(
            "bits = {bits}: only 4-bit AWQ (WQLinear_GEMM) is decoded"
        )));
    }
    let v = str_key(cfg, q, "version", m)?;
    let f = str_key(cfg, q, "format", m)?;
    let version = match (v, f) {
        (Some(a), Some(b)) if a != b => {
            return Err(bad(format!(
                "version = \"{a}\" but format = \"{b}\": the config does not settle the packing"
            )));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => "gemm".to_string(),
    };
    if version != "gemm" {
        return Err(bad(format!(
            "version = \"{version}\": only the GEMM packing is decoded (GEMV, GEMV-fast, Marlin \
             and other kernel layouts are not)"
        )));
    }
    if let Some(z) = q.get("zero_point").filter(|v| !v.is_null()) {
        if z.as_bool() != Some(true) {
            return Err(bad(format!(
                "zero_point = {z}: only zero-point AWQ (the GEMM pack stores zeros) is decoded"
            )));
        }
    }
    group_size(cfg, q, m)
}

/// Replaces every AWQ linear (`X.qweight`, `X.qzeros`, `X.scales`) by its dequantized
/// `X.weight`; refuses what does not fit, by name.
pub(super) fn apply(ckpt: &mut Checkpoint, cfg: &Path, q: &Value) -> Result<()> {
    let m = "awq";
    let gs = awq_settings(cfg, q)?;
    let mut decoded = HashMap::new();
    let mut consumed = HashSet::new();
    for (p, _) in find_parts(ckpt, cfg, m, &[])? {
        let qw = expect(p.qweight, &[Dtype::I32], 2, "qweight", m)?;
        let qz = expect(p.qzeros, &[Dtype::I32], 2, "qzeros", m)?;
        let sc = expect(p.scales, &SCALE_DTYPES, 2, "scales", m)?;
        let (in_f, out_f) = (qw[0], qw[1] * 8);
        let g = gs.unwrap_or(in_f);
        if in_f == 0 || in_f % g != 0 {
            return Err(shape_err(
                p.qweight,
                m,
                format!(
                    "shape {qw:?}: {in_f} inputs are not a positive multiple of group_size {g}"
                ),
            ));
        }
        let groups = in_f / g;
        if qz != [groups, out_f / 8] {
            return Err(shape_err(
                p.qzeros,
                m,
                format!(
                    "shape {qz:?} does not fit qweight {qw:?}: expected [{groups}, {}] \
                     (in / group_size, out / 8)",
                    out_f / 8
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
        let dec = Packed {
            qweight: Stored::of(p.qweight)?,
            qzeros: Stored::of(p.qzeros)?,
            scales: Stored::of(p.scales)?,
            scale_dtype: p.scales.dtype,
            bits: 4,
            in_f,
            out_f,
            layout: Layout::Awq { group_size: g },
            form: format!("AWQ GEMM 4-bit, group {g}"),
            extra_bytes: 0,
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
        for t in [p.qzeros, p.scales] {
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

    /// AutoAWQ's `from_linear` pack loop, for `[rows, cols]` codes.
    fn pack_cols(codes: &[Vec<u32>]) -> Vec<u32> {
        const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
        let cols = codes[0].len() / 8;
        let mut w = vec![0u32; codes.len() * cols];
        for (r, row) in codes.iter().enumerate() {
            for c in 0..cols {
                for (k, &j) in ORDER.iter().enumerate() {
                    w[r * cols + c] |= row[c * 8 + j] << (4 * k);
                }
            }
        }
        w
    }

    /// 8 inputs × 16 outputs, group 4: every output of the interleave decoded by hand.
    #[test]
    fn awq_order_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        config(
            dir.path(),
            r#"{"quant_method": "awq", "bits": 4, "group_size": 4, "zero_point": true, "version": "GEMM"}"#,
        );
        let (inn, out, groups) = (8usize, 16usize, 2usize);
        let codes: Vec<Vec<u32>> = (0..inn)
            .map(|i| (0..out).map(|o| ((i * 3 + o * 5) % 16) as u32).collect())
            .collect();
        let zeros: Vec<Vec<u32>> = (0..groups)
            .map(|g| (0..out).map(|o| ((g * 7 + o) % 16) as u32).collect())
            .collect();
        let scales: Vec<f32> = (0..groups * out).map(|k| 1.0 / (k as f32 + 3.0)).collect();
        let sc16: Vec<u8> = scales
            .iter()
            .flat_map(|&s| half::f16::from_f32(s).to_bits().to_le_bytes())
            .collect();
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                ("l.qweight", "I32", vec![8, 2], i32s(&pack_cols(&codes))),
                ("l.qzeros", "I32", vec![2, 2], i32s(&pack_cols(&zeros))),
                ("l.scales", "F16", vec![2, 16], sc16),
            ],
        );
        let ck = open(dir.path()).unwrap();
        let t = &ck.tensors[0];
        assert_eq!((t.name.as_str(), t.dtype), ("l.weight", Dtype::F16));
        assert_eq!(t.shape, vec![16, 8]);
        let got: Vec<u16> = t
            .bytes()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        for o in 0..out {
            for i in 0..inn {
                let g = i / 4;
                let s = half::f16::from_bits(half::f16::from_f32(scales[g * out + o]).to_bits());
                let want =
                    half::f16::from_f32(s.to_f32() * (codes[i][o] as f32 - zeros[g][o] as f32));
                assert_eq!(got[o * inn + i], want.to_bits(), "({o}, {i})");
            }
        }
        // A band from the middle decodes the same elements.
        let mut band = Vec::new();
        t.gather(37, 20, &mut band);
        assert_eq!(band, t.bytes()[74..114]);
    }

    #[test]
    fn refusals_name_version_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = |qz: Vec<usize>| -> Vec<(&'static str, &'static str, Vec<usize>, Vec<u8>)> {
            vec![
                ("l.qweight", "I32", vec![8, 2], vec![0; 64]),
                (
                    "l.qzeros",
                    "I32",
                    qz.clone(),
                    vec![0; qz.iter().product::<usize>() * 4],
                ),
                ("l.scales", "F16", vec![2, 16], vec![0; 64]),
            ]
        };
        let ok = r#"{"quant_method": "awq", "bits": 4, "group_size": 4}"#;
        let mut with_act = tensors(vec![2, 2]);
        with_act.push(("mlp.act.scales", "F16", vec![4], vec![0; 8]));
        let cases = vec![
            (
                r#"{"quant_method": "awq", "bits": 4, "group_size": 4, "version": "gemv"}"#,
                tensors(vec![2, 2]),
                "\"gemv\"",
            ),
            (
                r#"{"quant_method": "awq", "bits": 8, "group_size": 4}"#,
                tensors(vec![2, 2]),
                "bits = 8",
            ),
            (
                r#"{"quant_method": "awq", "bits": 4, "group_size": 4, "zero_point": false}"#,
                tensors(vec![2, 2]),
                "zero_point",
            ),
            (ok, tensors(vec![1, 2]), "l.qzeros"),
            (ok, with_act, "mlp.act.scales"),
        ];
        for (q, t, want) in cases {
            config(dir.path(), q);
            write_st(dir.path(), "model.safetensors", &t);
            let e = open(dir.path()).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("\"awq\""), "{want}: {e}");
        }
    }
}
