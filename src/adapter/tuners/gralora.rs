//! GraLoRA (`peft_type: "GRALORA"`): granular LoRA, `k × k` blocks of the weight each with
//! its own rank-`r/k` product, plus an optional ordinary LoRA part (`hybrid_r`), PEFT 0.21
//! `tuners/gralora/layer.py`.
//!
//! Saved per module: `gralora_A` `[k, in/k, r]`, `gralora_B` `[k, r, out/k]`, and with
//! `hybrid_r > 0` `gralora_A_general.weight` `[hybrid_r, in]` and `gralora_B_general.weight`
//! `[out, hybrid_r]`. PEFT's `get_delta_weight` (scatter, permute, einsum) works out to, for
//! output `o` in block `j = o / (out/k)` (`o' = o % (out/k)`) and input `l` in block
//! `n = l / (in/k)` (`i = l % (in/k)`), with `s = r/k`:
//!
//! `ΔW[o, l] = Σ_{t<s} A[n, i, j·s + t] · B[j, n·s + t, o']`  (+ `(B_general @ A_general)[o, l]`),
//!
//! then `ΔW · alpha / (r + hybrid_r)` (in f32, PEFT's factors are f32), transposed for a
//! Conv1D (`fan_in_fan_out`), and `W += ΔW` in place (one rounding into the weight's dtype,
//! the engine's). The rows of ΔW are formed per band, never whole. Each sum runs over its
//! products in order with fused multiply-adds, which is what torch's einsum (MKL batched
//! GEMM) does on every test row with more than one output per block (bit-identical to PEFT).
//! Where we differ: with one output column per block MKL takes a GEMV-like path that sums
//! in another order; that row (`gralora_k = 1`, out = 1) is 2 ulp from PEFT, recorded as
//! ULP_OVERRIDE in fixtures/tuner_rows/gralora.py.
//!
//! Refused by name: `r`, `hybrid_r` or `gralora_k` in the config that disagree with the
//! saved shapes, dimensions not divisible by `k` (PEFT refuses them too), non-Linear layers.

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
    peft_type: "GRALORA",
    open,
};

#[derive(Debug)]
struct Gralora {
    r: usize,
    hybrid_r: usize,
    k: usize,
    /// `alpha / (r + hybrid_r)`, as PEFT's Python float meets an f32 tensor.
    scale: f32,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let int = |key: &str, default: u64| -> Result<usize> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default as usize),
            Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::format(
                    path,
                    format!("GRALORA {key} is {x}, not a non-negative integer"),
                )
            }),
        }
    };
    let (r, hybrid_r, k) = (int("r", 32)?, int("hybrid_r", 0)?, int("gralora_k", 2)?);
    let alpha = match v.get("alpha") {
        None | Some(Value::Null) => 64.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::format(path, format!("GRALORA alpha is {x}, not a number")))?,
    };
    if r == 0 || k == 0 || r % k != 0 {
        return Err(Error::format(
            path,
            format!(
                "GRALORA r = {r} and gralora_k = {k}: r must be a positive multiple of gralora_k"
            ),
        ));
    }
    Ok(Box::new(Gralora {
        r,
        hybrid_r,
        k,
        scale: (alpha / (r + hybrid_r) as f64) as f32,
    }))
}

impl Tuner for Gralora {
    fn name(&self) -> &'static str {
        "GraLoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for p in [
            "gralora_A_general.weight",
            "gralora_B_general.weight",
            "gralora_A",
            "gralora_B",
        ] {
            if let Some(module) = rel.strip_suffix(p).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part: p };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        match (m.parts.get("gralora_A"), m.parts.get("gralora_B")) {
            (Some(a), Some(b)) => match (a.shape.as_slice(), b.shape.as_slice()) {
                (&[k, i, _], &[k2, _, o]) => k == k2 && k * o == out_in[0] && k * i == out_in[1],
                _ => false,
            },
            _ => false,
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let a = m.part(weights, "gralora_A")?;
        let b = m.part(weights, "gralora_B")?;
        let w = &base.weight;
        let &[out, inp] = w.out_in_shape().as_slice() else {
            return Err(bad_part(
                weights,
                a,
                format!(
                    "GraLoRA adapts Linear / Conv1D weights, but base '{}' has shape {:?}",
                    w.entry.name, w.entry.shape
                ),
            ));
        };
        let (k, r) = (self.k, self.r);
        if out % k != 0 || inp % k != 0 {
            return Err(bad_part(
                weights,
                a,
                format!(
                    "base '{}' [{out}, {inp}] does not split into gralora_k = {k} blocks (PEFT refuses it too)",
                    w.entry.name
                ),
            ));
        }
        if a.shape != [k, inp / k, r] || b.shape != [k, r, out / k] {
            return Err(bad_part(
                weights,
                a,
                format!(
                    "{:?} with gralora_B {:?} does not fit base '{}' [{out}, {inp}] with gralora_k = {k}, r = {r} \
                     (needs [{k}, {}, {r}] and [{k}, {r}, {}])",
                    a.shape,
                    b.shape,
                    w.entry.name,
                    inp / k,
                    out / k
                ),
            ));
        }
        let general = match (
            m.parts.get("gralora_A_general.weight"),
            m.parts.get("gralora_B_general.weight"),
        ) {
            (None, None) if self.hybrid_r == 0 => None,
            (Some(ag), Some(bg)) if self.hybrid_r > 0 => {
                let h = self.hybrid_r;
                if ag.shape != [h, inp] || bg.shape != [out, h] {
                    return Err(bad_part(
                        weights,
                        ag,
                        format!(
                            "{:?} with gralora_B_general {:?} does not fit base '{}' [{out}, {inp}] with hybrid_r = {h}",
                            ag.shape, bg.shape, w.entry.name
                        ),
                    ));
                }
                Some((ag.clone(), bg.clone()))
            }
            _ => {
                return Err(bad_part(
                    weights,
                    a,
                    format!(
                        "hybrid_r = {} in adapter_config.json, but module '{}' has parts {:?}",
                        self.hybrid_r,
                        m.name,
                        m.parts.keys().collect::<Vec<_>>()
                    ),
                ));
            }
        };
        let mut parts = vec![a, b];
        if let Some((ag, bg)) = &general {
            parts.extend([ag, bg]);
        }
        check_float(weights, &parts)?;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Granular {
                a: a.clone(),
                b: b.clone(),
                general,
                k,
                r,
                out,
                inp,
                transposed: w.transposed,
                scale: self.scale,
            }),
        }])
    }
}

/// `W + ΔW` with GraLoRA's ΔW.
#[derive(Debug)]
struct Granular {
    a: TensorEntry,
    b: TensorEntry,
    general: Option<(TensorEntry, TensorEntry)>,
    k: usize,
    r: usize,
    out: usize,
    inp: usize,
    /// Stored `[in, out]` (Conv1D).
    transposed: bool,
    scale: f32,
}

struct PreparedGranular {
    a: Vec<f32>,
    b: Vec<f32>,
    general: Option<(Vec<f32>, Vec<f32>, usize)>,
    k: usize,
    r: usize,
    out: usize,
    inp: usize,
    transposed: bool,
    scale: f32,
}

impl TensorChange for Granular {
    fn tuner(&self) -> &'static str {
        "GraLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = vec![&self.a, &self.b];
        if let Some((ag, bg)) = &self.general {
            v.extend([ag, bg]);
        }
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (rows, cols) = if self.transposed {
            (self.inp, self.out)
        } else {
            (self.out, self.inp)
        };
        if base.rows != rows || base.cols != cols {
            return Err(Error::Internal(format!(
                "GraLoRA change for [{}, {}] on '{}' ({} x {})",
                self.out, self.inp, base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(PreparedGranular {
            a: decode(&self.a),
            b: decode(&self.b),
            general: self
                .general
                .as_ref()
                .map(|(ag, bg)| (decode(ag), decode(bg), ag.shape[0])),
            k: self.k,
            r: self.r,
            out: self.out,
            inp: self.inp,
            transposed: self.transposed,
            scale: self.scale,
        }))
    }
}

impl PreparedGranular {
    /// ΔW[o, l] before scaling (the block product, then the hybrid part added).
    fn delta(&self, o: usize, l: usize) -> f32 {
        let (k, r) = (self.k, self.r);
        let s = r / k;
        let (bo, bi) = (self.out / k, self.inp / k);
        let (j, o2) = (o / bo, o % bo);
        let (n, i) = (l / bi, l % bi);
        let a = &self.a[(n * bi + i) * r + j * s..][..s];
        // Fused multiply-adds in order: MKL's GEMM kernel (see the module comment).
        let mut acc = 0f32;
        for (t, &x) in a.iter().enumerate() {
            acc = x.mul_add(self.b[(j * r + n * s + t) * bo + o2], acc);
        }
        if let Some((ag, bg, h)) = &self.general {
            let mut g = 0f32;
            for t in 0..*h {
                g = bg[o * h + t].mul_add(ag[t * self.inp + l], g);
            }
            acc += g;
        }
        acc
    }
}

impl BandChange for PreparedGranular {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let cols = if self.transposed { self.out } else { self.inp };
        for (ri, row) in band.chunks_mut(cols).enumerate() {
            let stored_row = row0 + ri;
            for (c, x) in row.iter_mut().enumerate() {
                let (o, l) = if self.transposed {
                    (c, stored_row)
                } else {
                    (stored_row, c)
                };
                *x += self.delta(o, l) * self.scale;
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

    /// PEFT's scatter / permute / einsum written out literally, for the test.
    fn peft_delta(a: &[f32], b: &[f32], k: usize, r: usize, out: usize, inp: usize) -> Vec<f32> {
        let s = r / k;
        let (bi, bo) = (inp / k, out / k);
        // scattered[l, n, :] = A[n, i, :] for n = block(l)
        let mut sc = vec![0f32; inp * k * r];
        for l in 0..inp {
            let (n, i) = (l / bi, l % bi);
            for t in 0..r {
                sc[(l * k + n) * r + t] = a[(n * bi + i) * r + t];
            }
        }
        // view [in, k, k, s] -> permute(0, 2, 1, 3) -> [in, k, r]
        let mut x = vec![0f32; inp * k * r];
        for l in 0..inp {
            for n in 0..k {
                for j in 0..k {
                    for t in 0..s {
                        x[(l * k + j) * r + n * s + t] = sc[((l * k + n) * k + j) * s + t];
                    }
                }
            }
        }
        // einsum ikr,kro->iko, reshape [in, out], .T
        let mut d = vec![0f32; out * inp];
        for l in 0..inp {
            for j in 0..k {
                for o2 in 0..bo {
                    let mut acc = 0f32;
                    for rr in 0..r {
                        acc += x[(l * k + j) * r + rr] * b[(j * r + rr) * bo + o2];
                    }
                    d[(j * bo + o2) * inp + l] = acc;
                }
            }
        }
        d
    }

    #[test]
    fn block_products_match_peft_einsum() {
        let (k, r, out, inp) = (2, 4, 4, 6);
        let a: Vec<f32> = (0..k * (inp / k) * r)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let b: Vec<f32> = (0..k * r * (out / k))
            .map(|i| (i as f32 * 0.91).cos())
            .collect();
        let want = peft_delta(&a, &b, k, r, out, inp);
        let t = Gralora {
            r,
            hybrid_r: 0,
            k,
            scale: 0.5,
        };
        let m = SavedModule {
            name: "lin".into(),
            parts: [
                (
                    "gralora_A".to_string(),
                    entry("lin.gralora_A", &[k, inp / k, r], &a),
                ),
                (
                    "gralora_B".to_string(),
                    entry("lin.gralora_B", &[k, r, out / k], &b),
                ),
            ]
            .into(),
        };
        for transposed in [false, true] {
            let shape = if transposed { [inp, out] } else { [out, inp] };
            let base = ModuleBase {
                weight: BaseTensor {
                    entry: entry("lin.weight", &shape, &vec![0.; out * inp]),
                    transposed,
                },
                bias: None,
            };
            let ch = t
                .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
                .unwrap();
            let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
            for o in 0..out {
                for l in 0..inp {
                    let g = if transposed {
                        got[l * out + o]
                    } else {
                        got[o * inp + l]
                    };
                    let w = want[o * inp + l] * 0.5;
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                        "{o},{l}: {g} vs {w}"
                    );
                }
            }
        }
        // hybrid_r in the config without the general parts is refused by name.
        let t = Gralora {
            r,
            hybrid_r: 2,
            k,
            scale: 0.5,
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin.weight", &[out, inp], &vec![0.; out * inp]),
                transposed: false,
            },
            bias: None,
        };
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hybrid_r = 2") && e.contains("lin.gralora_A"),
            "{e}"
        );
    }
}
