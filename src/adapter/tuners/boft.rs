//! BOFT (`peft_type: "BOFT"`): butterfly-factored orthogonal fine-tuning, a block-diagonal
//! Cayley rotation of each weight row's inputs followed by a per-output scale `boft_s`
//! (PEFT 0.21 `tuners/boft/layer.py`).
//!
//! Saved: `<module>.boft_R`, `[N, blocks, b, b]` (unconstrained; PEFT takes its skew part),
//! and `<module>.boft_s`, `[out, 1]` (Linear) or `[1, out]` (Conv2d). Merge, as PEFT does it,
//! all in f32: `Q = 0.5·(R - Rᵀ)`, `R_b = solve(I + Q, I - Q, left=False)` per block (the LU
//! solve OFT uses, `super::oft::cayley`), the block-diagonal matrix times the butterfly
//! permutations (identity for one factor, exact), then `W ← (M · Wᵀ)ᵀ · s` (a Conv2d weight
//! viewed `[out, in·k·k]`), rounded once into the weight's dtype.
//!
//! PEFT forces one butterfly factor (`N = 1`) unless its CUDA extension compiles (it then
//! also saves `N > 1` factors and chains their permuted products); such adapters cannot be
//! loaded by PEFT on a CPU and are refused here by name. Where we differ: as for OFT, MKL's
//! triangular solves are not reproduced bit for bit (see fixtures/tuner_rows/boft.py's
//! ULP_OVERRIDE). Transformers Conv1D and non-square kernels are refused.

use super::oft::{BandRotation, Cayley, cayley, cfg_usize};
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
    peft_type: "BOFT",
    open,
};

#[derive(Debug)]
struct Boft {
    block_size: usize,
    block_num: usize,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let t = Boft {
        block_size: cfg_usize(v, "boft_block_size", 4, path)?,
        block_num: cfg_usize(v, "boft_block_num", 0, path)?,
    };
    if (t.block_size == 0) == (t.block_num == 0) {
        // PEFT's BOFTConfig and update_layer reject this pair too.
        return Err(Error::format(
            path,
            format!(
                "BOFT config has boft_block_size = {} and boft_block_num = {}: exactly one of \
                 them must be non-zero",
                t.block_size, t.block_num
            ),
        ));
    }
    Ok(Box::new(t))
}

impl Boft {
    /// (factors, blocks, block size) of a saved `boft_R` that fits `in_features` inputs
    /// under the config's block size or count.
    fn layout(&self, r: &TensorEntry, in_features: usize) -> Option<(usize, usize, usize)> {
        let &[n, d, h, h2] = r.shape.as_slice() else {
            return None;
        };
        let config_fits = if self.block_size != 0 {
            h == self.block_size
        } else {
            d == self.block_num
        };
        (h == h2 && d * h == in_features && config_fits).then_some((n, d, h))
    }
}

impl Tuner for Boft {
    // PEFT wraps nn.Linear / Conv only: a 2-D weight is stored [out, in].
    fn adapts_conv1d(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "BOFT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in ["boft_R", "boft_s"] {
            if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        let (Some(r), Some(s)) = (m.parts.get("boft_R"), m.parts.get("boft_s")) else {
            return false;
        };
        self.layout(r, out_in[1]).is_some() && s.numel() == out_in[0]
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let r = m.part(weights, "boft_R")?;
        let s = m.part(weights, "boft_s")?;
        check_float(weights, &[r, s])?;
        let w = &base.weight;
        let shape = w.entry.shape.as_slice();
        let refuse = |t: &TensorEntry, why: String| bad_part(weights, t, why);
        if w.transposed {
            return Err(refuse(
                r,
                format!(
                    "base '{}' {shape:?} is stored [in, out] (a transformers Conv1D / \
                     fan_in_fan_out); lorastream merges BOFT on Linear and Conv2d weights only",
                    w.entry.name
                ),
            ));
        }
        let (out, cols, conv) = match shape {
            [o, c] => (*o, *c, false),
            [o, c, kh, kw] if kh == kw => (*o, c * kh * kw, true),
            _ => {
                return Err(refuse(
                    r,
                    format!(
                        "base '{}' has shape {shape:?}; BOFT merges Linear [out, in] and Conv2d \
                         [out, in, k, k] (square kernel) weights",
                        w.entry.name
                    ),
                ));
            }
        };
        let Some((n, d, h)) = self.layout(r, cols) else {
            return Err(refuse(
                r,
                format!(
                    "has shape {:?}, but base '{}' {shape:?} has {cols} inputs: BOFT needs \
                     [1, blocks, b, b] with blocks·b = {cols} and boft_block_size = {} / \
                     boft_block_num = {}",
                    r.shape, w.entry.name, self.block_size, self.block_num
                ),
            ));
        };
        if n != 1 {
            return Err(refuse(
                r,
                format!(
                    "holds {n} butterfly factors (boft_n_butterfly_factor = {n}): PEFT saves \
                     and merges more than one only with its CUDA extension and cannot load \
                     them on a CPU; lorastream merges BOFT with one factor"
                ),
            ));
        }
        let s_ok = if conv {
            s.shape == [1, out]
        } else {
            s.shape == [out, 1]
        };
        if !s_ok {
            return Err(refuse(
                s,
                format!(
                    "has shape {:?}, but base '{}' {shape:?} needs {:?}",
                    s.shape,
                    w.entry.name,
                    if conv { [1, out] } else { [out, 1] }
                ),
            ));
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Butterfly {
                r: r.clone(),
                s: s.clone(),
                blocks: d,
                block: h,
            }),
        }])
    }
}

#[derive(Debug)]
struct Butterfly {
    r: TensorEntry,
    s: TensorEntry,
    blocks: usize,
    block: usize,
}

impl TensorChange for Butterfly {
    fn tuner(&self) -> &'static str {
        "BOFT"
    }
    fn effect(&self) -> Effect {
        Effect::Transform
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.r, &self.s]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (d, h) = (self.blocks, self.block);
        let scale = decode(&self.s);
        if base.cols != d * h || scale.len() != base.rows {
            return Err(Error::Internal(format!(
                "BOFT {d} x {h} blocks and {} scales for '{}' ({} x {})",
                scale.len(),
                base.base.name,
                base.rows,
                base.cols
            )));
        }
        let raw = decode(&self.r);
        let mats = raw
            .chunks(h * h)
            .map(|x| {
                // PEFT's `0.5 * (data - data.transpose(1, 2))`.
                let q: Vec<f32> = (0..h * h)
                    .map(|ij| 0.5 * (x[ij] - x[(ij % h) * h + ij / h]))
                    .collect();
                cayley(&q, h, Cayley::Solve)
            })
            .collect();
        Ok(Box::new(BandRotation::new(
            mats,
            h,
            d,
            base.cols,
            true,
            Some(scale),
        )))
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
    fn rotates_blocks_then_scales_rows() {
        // [2, 4] weight, two 2x2 blocks; R's skew part is what counts.
        let w: Vec<f32> = (0..8).map(|i| i as f32 - 3.0).collect();
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin1.weight", &[2, 4], &w),
                transposed: false,
            },
            bias: None,
        };
        let raw = [0.0f32, 0.6, 0.0, 0.0, 0.0, 0.0, -0.2, 0.0]; // [1, 2, 2, 2]
        let m = SavedModule {
            name: "lin1".into(),
            parts: [
                (
                    "boft_R".to_string(),
                    entry("lin1.boft_R", &[1, 2, 2, 2], &raw),
                ),
                (
                    "boft_s".to_string(),
                    entry("lin1.boft_s", &[2, 1], &[2.0, 0.5]),
                ),
            ]
            .into(),
        };
        let t = Boft {
            block_size: 2,
            block_num: 0,
        };
        assert!(t.fits(&m, [2, 4]) && !t.fits(&m, [4, 2]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        // Block 0: Q = [[0, .3], [-.3, 0]]; block 1: Q = [[0, .1], [-.1, 0]].
        let rot = |a: f32| {
            let d = 1.0 + a * a;
            [
                (1.0 - a * a) / d,
                -2.0 * a / d,
                2.0 * a / d,
                (1.0 - a * a) / d,
            ]
        };
        for (i, s) in [2.0f32, 0.5].iter().enumerate() {
            for (blk, r) in [rot(0.3), rot(0.1)].iter().enumerate() {
                for j in 0..2 {
                    let x: f32 = (0..2).map(|k| w[i * 4 + blk * 2 + k] * r[j * 2 + k]).sum();
                    let g = got[i * 4 + blk * 2 + j];
                    assert!((g - x * s).abs() < 1e-5, "{got:?}");
                }
            }
        }
        // More than one butterfly factor is refused by name.
        let m2 = SavedModule {
            name: "lin1".into(),
            parts: [
                (
                    "boft_R".to_string(),
                    entry("lin1.boft_R", &[2, 2, 2, 2], &[0.0; 16]),
                ),
                (
                    "boft_s".to_string(),
                    entry("lin1.boft_s", &[2, 1], &[1.0, 1.0]),
                ),
            ]
            .into(),
        };
        let e = t
            .changes(Path::new("a"), &m2, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin1.boft_R") && e.contains("butterfly"), "{e}");
    }
}
