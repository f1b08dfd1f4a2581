//! MXFP4 experts (`quant_method = "mxfp4"`, gpt-oss): `P_blocks` uint8
//! `[experts, rows, groups, 16]` (two e2m1 codes per byte, the first in the low nibble) and
//! `P_scales` uint8 `[experts, rows, groups]` (e8m0 exponents, bias 127), one scale per 32
//! values. Decoded exactly as transformers' `convert_moe_packed_tensors`: `lut[code]`
//! times `2^(scale - 127)` (torch.ldexp: the product in f32), rounded to bf16, and returned
//! in its layout `[experts, groups · 32, rows]` (the transpose of the stored rows) under
//! the un-suffixed name `P`.

use super::{Stored, decoded_entry, replace};
use crate::dtype::{Dtype, bf16_bits};
use crate::error::{Error, Result};
use crate::source::{Checkpoint, Decode, MappedFile};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// transformers' `FP4_VALUES` (e2m1).
const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// `2^e` in f32 as `torch.pow(2.0, e)` gives it: exact (subnormal below 2^-126), infinite
/// from 2^128.
fn pow2(e: i32) -> f32 {
    if e >= 128 {
        f32::INFINITY
    } else if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else if e >= -149 {
        f32::from_bits(1u32 << (e + 149))
    } else {
        0.0
    }
}

#[derive(Debug)]
struct Mxfp4 {
    blocks: Stored,
    scales: Stored,
    experts: usize,
    rows: usize,
    groups: usize,
    /// Bytes per group (16 in gpt-oss).
    per_group: usize,
}

impl Decode for Mxfp4 {
    fn decode_into(&self, from: usize, out: &mut [u8]) {
        let (b, s) = (self.blocks.bytes(), self.scales.bytes());
        let k_all = self.groups * self.per_group * 2;
        for (j, e) in out.chunks_exact_mut(2).enumerate() {
            // Output [expert, k, row].
            let i = from + j;
            let r = i % self.rows;
            let k = (i / self.rows) % k_all;
            let ex = i / (self.rows * k_all);
            let (g, within) = (k / (self.per_group * 2), k % (self.per_group * 2));
            let grp = (ex * self.rows + r) * self.groups + g;
            let byte = b[grp * self.per_group + within / 2];
            let code = if within % 2 == 0 {
                byte & 0x0F
            } else {
                byte >> 4
            };
            let v = FP4_VALUES[code as usize] * pow2(s[grp] as i32 - 127);
            e.copy_from_slice(&bf16_bits(v).to_le_bytes());
        }
    }
    fn stored_form(&self) -> String {
        format!("mxfp4 (e2m1, e8m0 scale per {} values)", self.per_group * 2)
    }
    fn stored_bytes(&self) -> u64 {
        (self.blocks.len + self.scales.len) as u64
    }
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
        vec![self.blocks.range(), self.scales.range()]
    }
}

pub(super) fn apply(ckpt: &mut Checkpoint, cfg: &Path, q: &Value) -> Result<()> {
    if let Some(obj) = q.as_object() {
        const KNOWN: [&str; 3] = ["quant_method", "modules_to_not_convert", "dequantize"];
        if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(Error::format(
                cfg,
                format!(
                    "quantization_config (mxfp4): unknown key \"{k}\" (understood: {}); lorastream \
                     will not guess what it changes",
                    KNOWN.join(", ")
                ),
            ));
        }
    }
    let by_name: HashMap<&str, usize> = ckpt
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut decoded = HashMap::new();
    let mut consumed = HashSet::new();
    for t in &ckpt.tensors {
        let Some(p) = t.name.strip_suffix("_blocks") else {
            continue;
        };
        let bad = |msg: String| Error::tensor(t.file.path(), &t.name, msg);
        let sname = format!("{p}_scales");
        let Some(&si) = by_name.get(sname.as_str()) else {
            return Err(bad(format!("MXFP4 blocks without their scales '{sname}'")));
        };
        let s = &ckpt.tensors[si];
        if t.dtype != Dtype::U8 || s.dtype != Dtype::U8 {
            return Err(bad(format!(
                "MXFP4 blocks and scales must be uint8 (are {} and {})",
                t.dtype, s.dtype
            )));
        }
        if t.shape.len() != 4 || s.shape[..] != t.shape[..3] {
            return Err(bad(format!(
                "shape {:?} with scales {:?}: expected blocks [experts, rows, groups, bytes] and \
                 scales [experts, rows, groups] (convert_moe_packed_tensors' layout)",
                t.shape, s.shape
            )));
        }
        if by_name.contains_key(p) {
            return Err(bad(format!(
                "decodes to '{p}', which the checkpoint also holds"
            )));
        }
        let (experts, rows, groups, per_group) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3]);
        let dec = Mxfp4 {
            blocks: Stored::of(t)?,
            scales: Stored::of(s)?,
            experts,
            rows,
            groups,
            per_group,
        };
        let shape = vec![dec.experts, groups * per_group * 2, rows];
        decoded.insert(
            t.name.clone(),
            decoded_entry(t, p, Dtype::BF16, shape, Arc::new(dec)),
        );
        consumed.insert(sname);
    }
    for t in &ckpt.tensors {
        if t.name.ends_with("_scales") && !consumed.contains(&t.name) && !t.dtype.is_float() {
            return Err(Error::tensor(
                t.file.path(),
                &t.name,
                "MXFP4 scales with no '_blocks' tensor beside them",
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
    fn powers_of_two() {
        assert_eq!(pow2(0), 1.0);
        assert_eq!(pow2(-127), f32::from_bits(0x0040_0000));
        assert_eq!(pow2(127), 2f32.powi(127));
        assert_eq!(pow2(128), f32::INFINITY);
    }

    /// 2 experts × 3 rows × 1 group of 2 bytes: output [2, 4, 3], the stored rows become
    /// columns; low nibble first.
    #[test]
    fn transposed_layout_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["router"]}}"#,
        )
        .unwrap();
        let blocks: Vec<u8> = (0..12u8).map(|i| i.wrapping_mul(37)).collect();
        let scales: Vec<u8> = vec![127, 128, 126, 130, 120, 127];
        write_st(
            dir.path(),
            "model.safetensors",
            &[
                (
                    "e.gate_up_proj_blocks",
                    "U8",
                    vec![2, 3, 1, 2],
                    blocks.clone(),
                ),
                ("e.gate_up_proj_bias", "F32", vec![2, 3], vec![0; 24]),
                ("e.gate_up_proj_scales", "U8", vec![2, 3, 1], scales.clone()),
            ],
        );
        let ck = open(dir.path()).unwrap();
        let names: Vec<_> = ck.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["e.gate_up_proj", "e.gate_up_proj_bias"]);
        let t = &ck.tensors[0];
        assert_eq!((t.dtype, t.shape.clone()), (Dtype::BF16, vec![2, 4, 3]));
        let mut want = Vec::new();
        for ex in 0..2 {
            for k in 0..4 {
                for r in 0..3 {
                    let byte = blocks[(ex * 3 + r) * 2 + k / 2];
                    let code = if k % 2 == 0 { byte & 15 } else { byte >> 4 };
                    let v = FP4_VALUES[code as usize] * 2f32.powi(scales[ex * 3 + r] as i32 - 127);
                    want.push(f32::from_bits((bf16_bits(v) as u32) << 16));
                }
            }
        }
        assert_eq!(bf16s(&t.bytes()), want);
        let mut band = Vec::new();
        t.gather(5, 9, &mut band);
        assert_eq!(bf16s(&band), want[5..14]);
    }
}
