//! AdaLoRA (`peft_type: "ADALORA"`): an SVD-shaped LoRA, `B · diag(E) · A`, whose rank
//! training prunes (PEFT 0.21 `tuners/adalora/layer.py`, `model.py`).
//!
//! Saved per module: `lora_A [r, in·k…]`, `lora_E [r, 1]`, `lora_B [out, r]`; `ranknum`
//! (the rank the scale divides by) is not saved: PEFT sets it to `init_r` when it builds
//! the module. With `rank_pattern` in the config (`{"<module>.lora_E": [bool; init_r]}`,
//! written by training's rank allocation) PEFT saved only the kept rows/columns, and on
//! loading rebuilds the module with `sum(mask)` ranks but copies the old `ranknum` back, so
//! `ranknum` stays `init_r` (a module with no kept rank merges a zero delta); the saved
//! tensors must have `sum(mask)` ranks, the mask `init_r` entries. Those rebuilt modules'
//! parameters are made in the base weight's dtype and the saved values loaded into them, so
//! on a 16-bit base PEFT rounds their factors to it (measured: bit-identical only so).
//! PEFT's merge, in f32:
//!
//! `ΔW = transpose(B @ (A * E), fan_in_fan_out) * scaling / (ranknum + 1e-5)`, evaluated
//! left to right (`scaling = lora_alpha` if > 0, else the module's rank; both scalars and
//! `1e-5` in f32 as torch uses them; `ranknum` is init_r rounded through the base weight's
//! dtype, as PEFT holds that parameter in it while loading), Conv2d the same reshaped to `[out, in, kh, kw]`;
//! then `W += ΔW` in place. Here `A * E` is made once, and the rows of ΔW a band needs with
//! one GEMM (MKL's `mm` sums each element as sequential fused multiply-adds, as
//! `matrixmultiply` does). PEFT's AdaLoRA adapts nn.Linear, transformers Conv1D (stored
//! `[in, out]`, settled by the plan like a LoRA's) and nn.Conv2d; `use_dora` and LoftQ are
//! refused (PEFT refuses them too); `use_rslora` and `lora_bias` do nothing in AdaLoRA.

use super::loha::{Mat, Product, expect_shape, matmul, split_part};
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, factor_pair_fits,
};
use crate::dtype::round_through;
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "ADALORA",
    open,
};

const PARTS: [&str; 4] = ["lora_A", "lora_E", "lora_B", "ranknum"];

#[derive(Debug)]
struct AdaLora {
    init_r: usize,
    lora_alpha: f64,
    /// Module name -> kept ranks (`rank_pattern`, keys less `.lora_E`).
    rank_pattern: BTreeMap<String, Vec<bool>>,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    Ok(Box::new(parse(v, path)?))
}

/// What `PeftModel.state_dict()` holds of an AdaLoRA adapter beyond its saved tensors
/// (`--keep-lora`): `init_r`, the value of every module's `ranknum` (not saved; PEFT fills
/// it with `float(init_r)` in a parameter made in the base weight's dtype), and the modules
/// `rank_pattern` rebuilds on load (their parameters are made in the base weight's dtype and
/// the saved values loaded into them, so on a 16-bit base their state_dict values are the
/// saved ones rounded to it, then upcast to f32 like every adapter tensor).
pub fn state_dict_facts(v: &Value, path: &Path) -> Result<(usize, Vec<String>)> {
    let a = parse(v, path)?;
    Ok((a.init_r, a.rank_pattern.into_keys().collect()))
}

fn parse(v: &Value, path: &Path) -> Result<AdaLora> {
    let fail = |msg: String| Error::format(path, msg);
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(fail(
            "AdaLoRA with use_dora: PEFT refuses it (\"ADALORA does not support DoRA\")".into(),
        ));
    }
    if v.get("loftq_config")
        .and_then(Value::as_object)
        .is_some_and(|o| !o.is_empty())
    {
        return Err(fail(
            "AdaLoRA with loftq_config: PEFT refuses it (\"ADALORA does not support LOFTQ\")"
                .into(),
        ));
    }
    let init_r = match v.get("init_r") {
        None | Some(Value::Null) => 12,
        Some(x) => x
            .as_u64()
            .ok_or_else(|| fail(format!("init_r is {x}, not a non-negative integer")))?
            as usize,
    };
    let lora_alpha = match v.get("lora_alpha") {
        None | Some(Value::Null) => 8.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| fail(format!("lora_alpha is {x}, not a number")))?,
    };
    let mut rank_pattern = BTreeMap::new();
    match v.get("rank_pattern") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, mask) in map {
                // PEFT: `".".join(name.split(".")[0:-1])` — the module is the key less
                // its last component (`lora_E`).
                let Some((module, _)) = k.rsplit_once('.') else {
                    return Err(fail(format!(
                        "rank_pattern key '{k}' is not '<module>.lora_E' as PEFT saves it"
                    )));
                };
                let bits = mask
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_bool).collect::<Option<Vec<bool>>>())
                    .ok_or_else(|| {
                        fail(format!(
                            "rank_pattern['{k}'] is not a list of true/false (the kept ranks PEFT saves)"
                        ))
                    })?;
                if bits.len() != init_r {
                    return Err(fail(format!(
                        "rank_pattern['{k}'] has {} entries but init_r is {init_r}: PEFT selects \
                         the kept ranks of init_r ones",
                        bits.len()
                    )));
                }
                rank_pattern.insert(module.to_string(), bits);
            }
        }
        Some(other) => {
            return Err(fail(format!(
                "rank_pattern is {other}, not an object of kept-rank lists"
            )));
        }
    }
    Ok(AdaLora {
        init_r,
        lora_alpha,
        rank_pattern,
    })
}

impl AdaLora {
    /// The module's saved rank: the kept ranks of `rank_pattern`, else `init_r`.
    fn rank(&self, module: &str) -> usize {
        self.rank_pattern
            .get(module)
            .map_or(self.init_r, |m| m.iter().filter(|&&b| b).count())
    }
}

impl Tuner for AdaLora {
    fn name(&self) -> &'static str {
        "AdaLoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &PARTS)
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        factor_pair_fits(m, "lora_B", "lora_A", out_in)
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        if let Some(t) = m.parts.get("ranknum") {
            return Err(bad_part(
                weights,
                t,
                "is a saved ranknum; PEFT 0.21 neither saves nor loads one (it uses init_r), so \
                 which value this adapter was trained with is not settled",
            ));
        }
        let w = &base.weight;
        let shape = w.out_in_shape();
        if shape.len() != 2 && shape.len() != 4 {
            return Err(Error::tensor(
                weights,
                &m.name,
                format!(
                    "AdaLoRA adapts nn.Linear, transformers Conv1D and nn.Conv2d weights; base '{}' has shape {:?}",
                    w.entry.name, w.entry.shape
                ),
            ));
        }
        let r = self.rank(&m.name);
        let (a, e, b) = (
            m.part(weights, "lora_A")?,
            m.part(weights, "lora_E")?,
            m.part(weights, "lora_B")?,
        );
        let out = shape[0];
        let cols: usize = shape[1..].iter().product();
        let why = if self.rank_pattern.contains_key(&m.name) {
            format!("r = {r} kept ranks of rank_pattern['{}.lora_E']", m.name)
        } else {
            format!("r = init_r {} (no rank_pattern entry)", self.init_r)
        };
        expect_shape(weights, a, &[r, cols], &w.entry, &why)?;
        expect_shape(weights, e, &[r, 1], &w.entry, &why)?;
        expect_shape(weights, b, &[out, r], &w.entry, &why)?;
        check_float(weights, &[a, e, b])?;
        // PEFT: `scaling = lora_alpha if lora_alpha > 0 else float(r)` with the module's
        // rank; ranknum stays init_r (copied back after a rank_pattern resize), held in
        // the base dtype (rounded in `prepare`).
        let scaling = if self.lora_alpha > 0.0 {
            self.lora_alpha
        } else {
            r as f64
        };
        let ranknum = self.init_r as f32;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Svd {
                a: a.clone(),
                e: e.clone(),
                b: b.clone(),
                r,
                transposed: w.transposed,
                scaling: scaling as f32,
                ranknum,
                resized: self.rank_pattern.contains_key(&m.name),
            }),
        }])
    }
}

/// `W += transpose(B @ (A * E)) * scaling / (ranknum + 1e-5)`.
#[derive(Debug)]
struct Svd {
    a: TensorEntry,
    e: TensorEntry,
    b: TensorEntry,
    r: usize,
    /// Stored `[in, out]` (Conv1D): ΔW's transpose.
    transposed: bool,
    scaling: f32,
    /// `init_r` as an f32; PEFT's `ranknum` parameter lives in the base weight's dtype
    /// while the adapter is built (an init_r of 257 is 256 on a bf16 base).
    ranknum: f32,
    /// In `rank_pattern`: PEFT rebuilt the module while loading, its new parameters in the
    /// base weight's dtype, and loaded the saved values into those (rounded to that dtype)
    /// before casting them back to f32.
    resized: bool,
}

struct PreparedSvd {
    /// `A * E`, `[r, in·k…]`.
    ae: Vec<f32>,
    /// `B`, `[out, r]`.
    b: Vec<f32>,
    r: usize,
    /// PEFT's out and in·k… (the stored dims, swapped when transposed).
    out: usize,
    inn: usize,
    transposed: bool,
    scaling: f32,
    denom: f32,
}

impl TensorChange for Svd {
    fn tuner(&self) -> &'static str {
        "AdaLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.a, &self.e, &self.b]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let r = self.r;
        let mut ae = decode(&self.a);
        let mut e = decode(&self.e);
        let mut b = decode(&self.b);
        if self.resized {
            for v in [&mut ae, &mut e, &mut b] {
                round_through(base.dtype(), v);
            }
        }
        let (out, inn) = if self.transposed {
            (base.cols, base.rows)
        } else {
            (base.rows, base.cols)
        };
        if ae.len() != r * inn || e.len() != r || b.len() != out * r {
            return Err(Error::Internal(format!(
                "AdaLoRA factors do not fit '{}' ({} x {}, r {r})",
                base.base.name, base.rows, base.cols
            )));
        }
        // `lora_A * lora_E`: each row of A times its singular value.
        for (row, s) in ae.chunks_mut(inn.max(1)).zip(&e) {
            row.iter_mut().for_each(|x| *x *= s);
        }
        Ok(Box::new(PreparedSvd {
            ae,
            b,
            r,
            out,
            inn,
            transposed: self.transposed,
            scaling: self.scaling,
            denom: {
                let mut rn = [self.ranknum];
                round_through(base.dtype(), &mut rn);
                rn[0] + 1e-5f32
            },
        }))
    }
}

impl BandChange for PreparedSvd {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let r = self.r;
        let cols = if self.transposed { self.out } else { self.inn };
        let m = band.len() / cols.max(1);
        let mut delta = vec![0f32; m * cols];
        let (left, right) = if self.transposed {
            // Stored rows are inputs i: ΔWᵀ[i, o] = Σ_k (A·E)[k, i] · B[o, k].
            (
                Mat {
                    data: &self.ae[row0..],
                    rs: 1,
                    cs: self.inn,
                },
                Mat {
                    data: &self.b,
                    rs: 1,
                    cs: r,
                },
            )
        } else {
            (
                Mat {
                    data: &self.b[row0 * r..],
                    rs: r,
                    cs: 1,
                },
                Mat {
                    data: &self.ae,
                    rs: self.inn,
                    cs: 1,
                },
            )
        };
        matmul(Product::Fma, m, r, cols, left, right, &mut delta);
        for (w, d) in band.iter_mut().zip(&delta) {
            *w += (d * self.scaling) / self.denom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;
    use serde_json::json;

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

    fn vals(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
    }

    fn module(r: usize, out: usize, inn: usize) -> (SavedModule, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (a, e, b) = (vals(r * inn, 1.0), vals(r, 2.0), vals(out * r, 3.0));
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                ("lora_A".to_string(), entry("lin0.lora_A", &[r, inn], &a)),
                ("lora_E".to_string(), entry("lin0.lora_E", &[r, 1], &e)),
                ("lora_B".to_string(), entry("lin0.lora_B", &[out, r], &b)),
            ]
            .into(),
        };
        (m, a, e, b)
    }

    #[test]
    fn kept_ranks_and_ranknum_follow_peft_in_both_layouts() {
        // init_r 3, rank_pattern keeps 2: saved tensors have 2 ranks, ranknum stays 3.
        let cfg = json!({"init_r": 3, "lora_alpha": 6,
            "rank_pattern": {"lin0.lora_E": [true, false, true]}});
        let t = open(&cfg, Path::new("c")).unwrap();
        let (out, inn, r) = (4, 3, 2);
        let (m, a, e, b) = module(r, out, inn);
        let denom = 3f32 + 1e-5f32;
        let delta = |o: usize, i: usize| {
            let s = (0..r).fold(0f32, |acc, k| {
                b[o * r + k].mul_add(a[k * inn + i] * e[k], acc)
            });
            (s * 6.0) / denom
        };
        for transposed in [false, true] {
            let shape = if transposed { [inn, out] } else { [out, inn] };
            let w = vals(12, 0.5);
            let base = ModuleBase {
                weight: BaseTensor {
                    entry: entry("lin0.weight", &shape, &w),
                    transposed,
                },
                bias: None,
            };
            let ch = t
                .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
                .unwrap();
            let want: Vec<f32> = (0..12)
                .map(|x| {
                    let (i0, i1) = (x / shape[1], x % shape[1]);
                    let d = if transposed {
                        delta(i1, i0)
                    } else {
                        delta(i0, i1)
                    };
                    w[x] + d
                })
                .collect();
            for band in [1, 2, 4] {
                assert_eq!(
                    run_in_memory(&*ch[0].change, &base.weight.entry, band).unwrap(),
                    want
                );
            }
        }
        // Without the rank_pattern entry the module must have init_r ranks.
        let t = open(&json!({"init_r": 3}), Path::new("c")).unwrap();
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[out, inn], &vals(12, 0.5)),
                transposed: false,
            },
            bias: None,
        };
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin0.lora_A") && e.contains("init_r"), "{e}");
        // A mask whose length is not init_r, and DoRA, are refused.
        let bad = json!({"init_r": 4, "rank_pattern": {"lin0.lora_E": [true]}});
        assert!(
            open(&bad, Path::new("c"))
                .unwrap_err()
                .to_string()
                .contains("init_r")
        );
        let dora = json!({"use_dora": true});
        assert!(
            open(&dora, Path::new("c"))
                .unwrap_err()
                .to_string()
                .contains("DoRA")
        );
    }
}
