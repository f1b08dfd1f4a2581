//! VB-LoRA (`peft_type: "VBLORA"`): the low-rank factors of every module are built from one
//! shared bank of short vectors, each sub-vector a softmax-weighted mix of the `topk` bank
//! vectors its logits rank highest (PEFT 0.21 `tuners/vblora/layer.py`).
//!
//! Saved: `base_model.vblora_vector_bank` `[num_vectors, vector_length]` (shared, outside
//! `base_model.model.`), and per module `<module>.vblora_logits_A` `[r, in/vl, num_vectors]`,
//! `<module>.vblora_logits_B` `[out/vl, r, num_vectors]`. PEFT's merge (f32, the factors stay
//! f32 whatever the base dtype):
//! `top, idx = logits.topk(k)` (descending), `w = softmax(top)`, `M = Σ_j w_j · bank[idx_j]`;
//! `A = M_A.reshape(r, in)`, `B = M_B.transpose(1, 2).reshape(out, r)`, `ΔW = B @ A`
//! (transposed for Conv1D / `fan_in_fan_out`), `W += ΔW`.
//!
//! Where we follow torch's arithmetic: softmax as torch's CPU kernel does it (max, `exp(x −
//! max)`, a sequential sum, one reciprocal, products), the mix summed sequentially in topk order
//! (torch's order for k ≤ 4; PEFT's default k is 2), the product summed as torch's matmul sums
//! it ([`super::torch_mm`]), and `exp` is SLEEF's `expf_u10`, the one torch's softmax kernel
//! calls (not correctly rounded: a correctly rounded `expf` is one ulp off in about 1% of the
//! weights). Every fixture case is bit-identical to PEFT.
//!
//! Refused by name: `save_only_topk_weights: true` (the logits are replaced by top-k indices and
//! weights that PEFT turns back into logits with `log`, not reproduced here), and logits whose
//! k-th and (k+1)-th largest are equal (which bank vector torch's topk keeps is its
//! implementation's choice).

use super::torch_mm::LowRank;
use super::vera::{AddLowRank, check_band_shape};
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "VBLORA",
    open,
};

const BANK: &str = "vblora_vector_bank";
const LOGITS_A: &str = "vblora_logits_A";
const LOGITS_B: &str = "vblora_logits_B";

#[derive(Debug)]
struct Vblora {
    topk: usize,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    if v.get("save_only_topk_weights").and_then(Value::as_bool) == Some(true) {
        return Err(Error::format(
            path,
            "VB-LoRA adapter saved with save_only_topk_weights: true: the logits are replaced by top-k indices and \
             weights, which PEFT turns back into logits (log of the weights) at load; lorastream does not \
             reproduce that. Save the adapter with save_only_topk_weights=False. Nothing was written.",
        ));
    }
    let topk = match v.get("topk") {
        Some(t) => t.as_u64().filter(|&t| t > 0).ok_or_else(|| {
            Error::format(path, format!("VB-LoRA topk is {t}, not a positive integer"))
        })? as usize,
        None => 2, // PEFT's default
    };
    Ok(Box::new(Vblora { topk }))
}

impl Tuner for Vblora {
    fn name(&self) -> &'static str {
        "VB-LoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        if rel == BANK {
            return SavedKey::Shared(rel);
        }
        for part in [LOGITS_A, LOGITS_B] {
            if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        let (Some(a), Some(b)) = (m.parts.get(LOGITS_A), m.parts.get(LOGITS_B)) else {
            return false;
        };
        // in = in_tiles · vl and out = out_tiles · vl for the same vl.
        match (a.shape.as_slice(), b.shape.as_slice()) {
            (&[_, it, _], &[ot, _, _]) if it > 0 && ot > 0 => {
                out_in[1].is_multiple_of(it)
                    && out_in[0].is_multiple_of(ot)
                    && out_in[1] / it == out_in[0] / ot
            }
            _ => false,
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let la = m.part(weights, LOGITS_A)?;
        let lb = m.part(weights, LOGITS_B)?;
        let bank = shared.get(BANK).ok_or_else(|| {
            Error::format(
                weights,
                format!("VB-LoRA adapter has no shared 'base_model.{BANK}' (incomplete adapter)"),
            )
        })?;
        check_float(weights, &[la, lb, bank])?;
        let w = &base.weight;
        let &[out, inn] = w.out_in_shape().as_slice() else {
            return Err(bad_part(
                weights,
                la,
                format!(
                    "VB-LoRA adapts Linear / Conv1D layers; base '{}' has shape {:?}",
                    w.entry.name, w.entry.shape
                ),
            ));
        };
        let &[nv, vl] = bank.shape.as_slice() else {
            return Err(bad_part(
                weights,
                bank,
                format!(
                    "vector bank has shape {:?}, not [num_vectors, vector_length]",
                    bank.shape
                ),
            ));
        };
        let fits = match (la.shape.as_slice(), lb.shape.as_slice()) {
            (&[r, it, na], &[ot, rb, nb]) => {
                r > 0 && rb == r && na == nv && nb == nv && it * vl == inn && ot * vl == out
            }
            _ => false,
        };
        if !fits || vl == 0 {
            return Err(bad_part(
                weights,
                la,
                format!(
                    "VB-LoRA parts do not fit base '{}' (PEFT [out, in] = [{out}, {inn}]) with the vector bank \
                     {:?}: {} {:?} (needs [r, in/vl, num_vectors]), {} {:?} (needs [out/vl, r, num_vectors])",
                    w.entry.name, bank.shape, la.name, la.shape, lb.name, lb.shape
                ),
            ));
        }
        if self.topk > nv {
            return Err(bad_part(
                weights,
                bank,
                format!(
                    "VB-LoRA topk {} exceeds the {nv} vectors of the bank",
                    self.topk
                ),
            ));
        }
        // Ties at the top-k boundary are checked here, before anything is written.
        for t in [la, lb] {
            check_no_boundary_tie(weights, t, &decode(t), nv, self.topk)?;
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(VbDelta {
                logits_a: la.clone(),
                logits_b: lb.clone(),
                bank: bank.clone(),
                topk: self.topk,
                out,
                inn,
                transposed: w.transposed,
            }),
        }])
    }
}

/// Refuses logits whose k-th and (k+1)-th largest are equal (torch's tie-break decides).
fn check_no_boundary_tie(
    weights: &Path,
    t: &TensorEntry,
    logits: &[f32],
    nv: usize,
    k: usize,
) -> Result<()> {
    if k >= nv {
        return Ok(());
    }
    for (n, row) in logits.chunks(nv).enumerate() {
        let (sel, _) = topk(row, k);
        let kth = row[sel[k - 1]];
        if row
            .iter()
            .enumerate()
            .any(|(i, &x)| x == kth && !sel.contains(&i))
        {
            return Err(bad_part(
                weights,
                t,
                format!(
                    "logits row {n} has a tie at the top-{k} boundary (value {kth}): which bank vector PEFT keeps \
                     depends on torch's topk; lorastream refuses rather than guess"
                ),
            ));
        }
    }
    Ok(())
}

/// Indices of the k largest (descending; among equal values the lower index first) and the
/// values.
fn topk(row: &[f32], k: usize) -> (Vec<usize>, Vec<f32>) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    let vals = idx.iter().map(|&i| row[i]).collect();
    (idx, vals)
}

/// torch's CPU softmax over a short last dim: max, `exp(x − max)` with SLEEF's `expf_u10`
/// (the vectorised exp torch's kernel calls), sequential sum, one reciprocal, products.
fn softmax(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter_mut().for_each(|x| *x = sleef_expf(*x - max));
    let mut sum = 0f32;
    for (i, x) in v.iter().enumerate() {
        sum = if i == 0 { *x } else { sum + x };
    }
    let inv = 1.0 / sum;
    v.iter_mut().for_each(|x| *x *= inv);
}

/// SLEEF 3's `xexpf` (u10) as compiled with FMA: `q = rint(d / ln 2)`, a two-part
/// reduction, a degree-6 polynomial, scaling by `2^q` in two steps. Differs from a correctly
/// rounded `expf` in about 1% of inputs by one ulp; torch's softmax gives these bits (checked
/// on 2·10⁶ rows against torch 2.15: no difference).
#[allow(clippy::excessive_precision)]
fn sleef_expf(d: f32) -> f32 {
    if d.is_nan() {
        return d;
    }
    if d < -104.0 {
        return 0.0;
    }
    if d > 1e10 {
        return f32::INFINITY;
    }
    // SLEEF's R_LN2f is log2(e) rounded to f32.
    let q = (d * std::f32::consts::LOG2_E).round_ties_even() as i32;
    let qf = q as f32;
    let s = qf.mul_add(-0.693_145_751_953_125, d);
    let s = qf.mul_add(-1.428_606_765_330_187_045e-6, s);
    let mut u = 0.000_198_527_617_612_853_646_278_381_f32;
    for c in [
        0.001_393_043_552_525_341_510_772_71_f32,
        0.008_333_360_776_305_198_669_433_59,
        0.041_666_485_369_205_474_853_515_6,
        0.166_666_671_633_720_397_949_219,
        0.5,
    ] {
        u = u.mul_add(s, c);
    }
    let u = 1.0 + (s * s).mul_add(u, s);
    // ldexp2k: two power-of-two factors so that neither over- nor underflows on its own.
    let h = q >> 1;
    u * pow2i(h) * pow2i(q - h)
}

/// 2^q for q in the normal exponent range (SLEEF's `pow2i`).
fn pow2i(q: i32) -> f32 {
    f32::from_bits(((q + 127).clamp(0, 255) as u32) << 23)
}

/// `Σ_j softmax(top)_j · bank[idx_j]` for each row of logits: `[rows, vl]`.
fn mix(logits: &[f32], bank: &[f32], nv: usize, vl: usize, k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len() / nv * vl);
    for row in logits.chunks(nv) {
        let (idx, mut w) = topk(row, k);
        softmax(&mut w);
        let mut acc = vec![0f32; vl];
        for (j, (&i, &wj)) in idx.iter().zip(&w).enumerate() {
            for (a, &b) in acc.iter_mut().zip(&bank[i * vl..(i + 1) * vl]) {
                let p = wj * b;
                *a = if j == 0 { p } else { *a + p };
            }
        }
        out.extend(acc);
    }
    out
}

#[derive(Debug)]
struct VbDelta {
    logits_a: TensorEntry,
    logits_b: TensorEntry,
    bank: TensorEntry,
    topk: usize,
    out: usize,
    inn: usize,
    transposed: bool,
}

impl VbDelta {
    /// PEFT's `B` `[out, r]` and `A` `[r, in]`.
    fn factors(&self) -> (Vec<f32>, Vec<f32>, usize) {
        let (nv, vl) = (self.bank.shape[0], self.bank.shape[1]);
        let bank = decode(&self.bank);
        let r = self.logits_a.shape[0];
        // A: [r, in_t, vl] -> [r, in].
        let a = mix(&decode(&self.logits_a), &bank, nv, vl, self.topk);
        // B: [out_t, r, vl] -> transpose(1, 2) -> [out_t, vl, r] -> [out, r].
        let mb = mix(&decode(&self.logits_b), &bank, nv, vl, self.topk);
        let ot = self.logits_b.shape[0];
        let mut b = vec![0f32; self.out * r];
        for t in 0..ot {
            for j in 0..r {
                for v in 0..vl {
                    b[(t * vl + v) * r + j] = mb[(t * r + j) * vl + v];
                }
            }
        }
        (b, a, r)
    }
}

impl TensorChange for VbDelta {
    fn tuner(&self) -> &'static str {
        "VB-LoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.logits_a, &self.logits_b, &self.bank]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (b, a, r) = self.factors();
        let lr = LowRank::new(&b, &a, self.out, r, self.inn, self.transposed);
        check_band_shape("VB-LoRA", base, &lr)?;
        Ok(Box::new(AddLowRank(lr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;

    fn entry(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        TensorEntry::in_memory(
            Path::new("t"),
            name,
            Dtype::F32,
            shape.to_vec(),
            bytemuck::cast_slice(v),
        )
        .unwrap()
    }

    #[test]
    fn builds_the_factors_from_the_top_k_bank_vectors() {
        // Bank of 3 vectors of length 1; r = 1, in = 2, out = 1, topk = 1: each entry is the
        // bank vector its logits rank highest (softmax of one value is 1).
        let bank = entry("base_model.vblora_vector_bank", &[3, 1], &[2.0, 3.0, 5.0]);
        let shared: BTreeMap<String, TensorEntry> = [(BANK.to_string(), bank)].into();
        let la = entry(
            "lin0.vblora_logits_A",
            &[1, 2, 3],
            &[0.0, 1.0, 0.5, 9.0, 0.0, 0.0],
        );
        let lb = entry("lin0.vblora_logits_B", &[1, 1, 3], &[0.0, 0.0, 1.0]);
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(LOGITS_A.to_string(), la), (LOGITS_B.to_string(), lb)].into(),
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[1, 2], &[1.0, 1.0]),
                transposed: false,
            },
            bias: None,
        };
        let t = Vblora { topk: 1 };
        assert!(t.fits(&m, [1, 2]));
        let ch = t.changes(Path::new("a"), &m, &shared, &base).unwrap();
        // A = [3, 2], B = [5] -> ΔW = [15, 10]
        assert_eq!(
            run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap(),
            [16.0, 11.0]
        );
        // topk 2: weights softmax([1, 0.5]) mix bank[1] and bank[2].
        let (idx, mut w) = topk(&[0.0, 1.0, 0.5], 2);
        assert_eq!(idx, [1, 2]);
        softmax(&mut w);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-7 && w[0] > w[1]);
        // A tie at the boundary is refused, naming the tensor.
        let e = Vblora { topk: 1 }
            .changes(
                Path::new("a"),
                &SavedModule {
                    name: "lin0".into(),
                    parts: [
                        (
                            LOGITS_A.to_string(),
                            entry(
                                "lin0.vblora_logits_A",
                                &[1, 2, 3],
                                &[1.0, 1.0, 0.0, 9.0, 0.0, 0.0],
                            ),
                        ),
                        (
                            LOGITS_B.to_string(),
                            entry("lin0.vblora_logits_B", &[1, 1, 3], &[0.0, 0.0, 1.0]),
                        ),
                    ]
                    .into(),
                },
                &shared,
                &base,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.vblora_logits_A") && e.contains("tie"),
            "{e}"
        );
        // SLEEF's exp where it is not correctly rounded (exp(x) = 0.836104335…, torch gives
        // 0.8361044, the f32 above it), and where it is.
        let x = -0.047_854_25_f32 - 0.131_147_58_f32;
        assert_eq!(sleef_expf(x), 0.836_104_4);
        assert_eq!(sleef_expf(0.0), 1.0);
        assert_eq!(sleef_expf(-200.0), 0.0);
        let cfg = serde_json::json!({"save_only_topk_weights": true});
        assert!(
            open(&cfg, Path::new("c"))
                .unwrap_err()
                .to_string()
                .contains("save_only_topk_weights")
        );
    }
}
