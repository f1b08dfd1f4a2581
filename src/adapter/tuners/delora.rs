//! DeLoRA (`peft_type: "DELORA"`): a LoRA-like low-rank delta whose rank-one terms are
//! normalised and scaled by a learned bound λ and by the norms of the base weight's columns
//! (PEFT 0.21 `tuners/delora/layer.py`).
//!
//! Saved per module: `delora_A` `[r, in]`, `delora_B` `[out, r]`, `delora_lambda` `[1]` and
//! `delora_w_norm` `[in]` (the base weight's column norms, taken by PEFT when the adapter
//! was created and kept as a persistent buffer; PEFT's merge uses these saved norms, not
//! the weight it merges into, and so does lorastream). PEFT's merge, in f32:
//!
//! ```text
//! An = clamp(‖A[k, :]‖, 1e-4), Bn = clamp(‖B[:, k]‖, 1e-4)
//! d  = λ / r / (An · Bn)
//! ΔW = (B · diag(d)) @ A · w_norm[None, :]      then  W += ΔW.to(W.dtype)
//! ```
//!
//! Reproduced operation by operation: `B @ diag(d)` is the rounded product `B[i, k]·d[k]`,
//! the `@ A` product accumulates over k in order with fused multiply-adds (as torch's CPU
//! sgemm does for these shapes), the column norms of B accumulate sequentially in f32
//! (torch's strided reduction), the row norms of A follow torch's vectorised order
//! ([`torch_row_norm`]), and ΔW is rounded into the weight's dtype before the add; all
//! checked bit for bit against PEFT on the fixtures. This matters: a 1-ulp change of one
//! norm moves ΔW by an ulp of the *terms*, which after the cancellation in `@ A` is up to
//! hundreds of ulps of a small merged value (measured: 256 with correctly rounded norms).
//! torch's orders are those of its x86 CPU build (sgemm with FMA, 8-lane norm); `r` is the
//! saved A's row count (PEFT's `r`, `rank_pattern` included). PEFT's DeLoRA wraps
//! `nn.Linear` only; a weight stored `[in, out]` is refused.

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
    peft_type: "DELORA",
    open,
};

const PARTS: [&str; 4] = ["delora_A", "delora_B", "delora_lambda", "delora_w_norm"];

#[derive(Debug)]
struct Delora;

fn open(_v: &Value, _path: &Path) -> Result<Box<dyn Tuner>> {
    // `r` / `rank_pattern` are the saved factors' shapes; `delora_lambda` /
    // `lambda_pattern` only initialise the saved λ. Nothing else enters the merge.
    Ok(Box::new(Delora))
}

/// The parts of one module with their dims `(r, out, in)`, shapes checked against each other.
struct Parts<'m> {
    a: &'m TensorEntry,
    b: &'m TensorEntry,
    lambda: &'m TensorEntry,
    w_norm: &'m TensorEntry,
    r: usize,
    out: usize,
    inp: usize,
}

fn parts<'m>(weights: &Path, m: &'m SavedModule) -> Result<Parts<'m>> {
    let a = m.part(weights, "delora_A")?;
    let b = m.part(weights, "delora_B")?;
    let lambda = m.part(weights, "delora_lambda")?;
    let w_norm = m.part(weights, "delora_w_norm")?;
    let (r, inp) = match a.shape.as_slice() {
        [r, i] if *r > 0 => (*r, *i),
        s => {
            return Err(bad_part(
                weights,
                a,
                format!("has shape {s:?}, not [r, in]"),
            ));
        }
    };
    let out = match b.shape.as_slice() {
        [o, k] if *k == r => *o,
        s => {
            return Err(bad_part(
                weights,
                b,
                format!(
                    "has shape {s:?}, not [out, {r}] (delora_A is {:?})",
                    a.shape
                ),
            ));
        }
    };
    if lambda.numel() != 1 {
        return Err(bad_part(
            weights,
            lambda,
            format!("has shape {:?}, not [1]", lambda.shape),
        ));
    }
    if w_norm.shape != [inp] {
        return Err(bad_part(
            weights,
            w_norm,
            format!(
                "has shape {:?}, not [{inp}] (delora_A is {:?})",
                w_norm.shape, a.shape
            ),
        ));
    }
    Ok(Parts {
        a,
        b,
        lambda,
        w_norm,
        r,
        out,
        inp,
    })
}

impl Tuner for Delora {
    fn name(&self) -> &'static str {
        "DeLoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in PARTS {
            if let Some(module) = rel.strip_suffix(part).and_then(|r| r.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        parts(Path::new(""), m).is_ok_and(|p| [p.out, p.inp] == out_in)
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let p = parts(weights, m)?;
        check_float(weights, &[p.a, p.b, p.lambda, p.w_norm])?;
        let w = &base.weight;
        if w.transposed || w.entry.shape != [p.out, p.inp] {
            return Err(bad_part(
                weights,
                p.a,
                format!(
                    "delora_A {:?} / delora_B {:?} make a [{}, {}] delta; base '{}' is {:?}{} \
                     (PEFT's DeLoRA adapts nn.Linear weights [out, in] only)",
                    p.a.shape,
                    p.b.shape,
                    p.out,
                    p.inp,
                    w.entry.name,
                    w.entry.shape,
                    if w.transposed {
                        " stored [in, out]"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Delta {
                a: p.a.clone(),
                b: p.b.clone(),
                lambda: p.lambda.clone(),
                w_norm: p.w_norm.clone(),
                r: p.r,
            }),
        }])
    }
}

#[derive(Debug)]
struct Delta {
    a: TensorEntry,
    b: TensorEntry,
    lambda: TensorEntry,
    w_norm: TensorEntry,
    r: usize,
}

struct Prepared {
    /// `B · diag(d)`, `[out, r]`.
    bd: Vec<f32>,
    a: Vec<f32>,
    w_norm: Vec<f32>,
    r: usize,
    cols: usize,
    dtype: crate::dtype::Dtype,
}

impl TensorChange for Delta {
    fn tuner(&self) -> &'static str {
        "DeLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.a, &self.b, &self.lambda, &self.w_norm]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (a, b, w_norm) = (decode(&self.a), decode(&self.b), decode(&self.w_norm));
        let lambda = decode(&self.lambda)[0];
        let (r, inp) = (self.r, base.cols);
        if a.len() != r * inp || b.len() != base.rows * r || w_norm.len() != inp {
            return Err(Error::Internal(format!(
                "DeLoRA factors do not fit '{}' ({} x {})",
                base.base.name, base.rows, base.cols
            )));
        }
        let an: Vec<f32> = a
            .chunks(inp)
            .map(|row| torch_row_norm(row).max(1e-4))
            .collect();
        // ‖B[:, k]‖: sequential f32 sum of rounded squares, as torch's strided reduction.
        let bn: Vec<f32> = (0..r)
            .map(|k| {
                let mut s = 0f32;
                for i in 0..base.rows {
                    let x = b[i * r + k];
                    s += x * x;
                }
                s.sqrt().max(1e-4)
            })
            .collect();
        let scale = lambda / r as f32;
        let d: Vec<f32> = an.iter().zip(&bn).map(|(x, y)| scale / (x * y)).collect();
        let bd: Vec<f32> = b
            .chunks(r)
            .flat_map(|row| row.iter().zip(&d).map(|(x, y)| x * y).collect::<Vec<_>>())
            .collect();
        Ok(Box::new(Prepared {
            bd,
            a,
            w_norm,
            r,
            cols: inp,
            dtype: base.dtype(),
        }))
    }
}

/// `‖row‖₂` in torch's CPU order for a contiguous f32 row (`Tensor.norm(dim=-1)`, torch
/// 2.15): squares summed into 8 lanes (rounded products, then adds), the lanes folded left,
/// then the rest in groups of 4 (rounded squares added in order), the last 0–3 with
/// fused multiply-adds. Matched bit for bit against torch for every length 1–255.
fn torch_row_norm(row: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    let mut s = lanes[0];
    for &l in &lanes[1..] {
        s += l;
    }
    let rest = chunks.remainder();
    let mut fours = rest.chunks_exact(4);
    for c in &mut fours {
        for &x in c {
            s += x * x;
        }
    }
    for &x in fours.remainder() {
        s = x.mul_add(x, s);
    }
    s.sqrt()
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let mut delta = vec![0f32; self.cols];
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let bd = &self.bd[(row0 + i) * self.r..(row0 + i + 1) * self.r];
            delta.iter_mut().for_each(|x| *x = 0.0);
            for (k, &c) in bd.iter().enumerate() {
                let a = &self.a[k * self.cols..(k + 1) * self.cols];
                for (x, &y) in delta.iter_mut().zip(a) {
                    *x = c.mul_add(y, *x);
                }
            }
            for (x, &n) in delta.iter_mut().zip(&self.w_norm) {
                *x *= n;
            }
            crate::dtype::round_through(self.dtype, &mut delta);
            for (w, &x) in row.iter_mut().zip(&delta) {
                *w += x;
            }
        }
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
    fn row_norm_covers_lanes_fours_and_tail() {
        assert_eq!(torch_row_norm(&[3.0, 4.0]), 5.0);
        // 8 lanes + one group of 4 + 3 fused: 15 ones.
        assert_eq!(torch_row_norm(&[1.0; 15]), 15f32.sqrt());
        assert_eq!(torch_row_norm(&[]), 0.0);
    }

    #[test]
    fn normalised_rank_one_terms_scaled_by_column_norms() {
        // r = 1: ΔW = λ · b aᵀ / (‖a‖ ‖b‖) · w_norm, here with ‖a‖ = 5, ‖b‖ = 1.
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                ("delora_A", entry("lin0.delora_A", &[1, 2], &[3.0, 4.0])),
                (
                    "delora_B",
                    entry("lin0.delora_B", &[3, 1], &[1.0, 0.0, 0.0]),
                ),
                ("delora_lambda", entry("lin0.delora_lambda", &[1], &[10.0])),
                (
                    "delora_w_norm",
                    entry("lin0.delora_w_norm", &[2], &[1.0, 0.5]),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[3, 2], &[0.0; 6]),
                transposed: false,
            },
            bias: None,
        };
        assert!(Delora.fits(&m, [3, 2]) && !Delora.fits(&m, [2, 3]));
        let ch = Delora
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [6.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        // The wrong base names both.
        let mut t = base.clone();
        t.weight.entry = entry("lin0.weight", &[2, 3], &[0.0; 6]);
        let e = Delora
            .changes(Path::new("a"), &m, &BTreeMap::new(), &t)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.delora_A") && e.contains("lin0.weight"),
            "{e}"
        );
    }
}
