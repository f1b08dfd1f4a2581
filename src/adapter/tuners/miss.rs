//! MiSS / Bone (`peft_type: "MISS"`): a shared block added to every `r`-column slice of the
//! weight, or (`init_weights: "bat"`) block-affine terms that depend on the weight itself
//! (PEFT 0.21 `tuners/miss/layer.py`, `MissLinear.merge`).
//!
//! Saved: `<module>.miss_block`, by `init_weights` (PEFT's `miss_fn`):
//! - `true` / `false` (default MiSS): `[r, out]`; PEFT's `get_delta_weight_miss` returns the
//!   whole new weight `W[o, c] + block[c % r, o]` (the columns past the last whole slice get
//!   the first rows of the block, the same formula), in f32, then `.to(W.dtype)`.
//! - `"mini"`: `[r, mini_r]`, repeated `out / mini_r` times along `out` first, so
//!   `W[o, c] + block[c % r, o % mini_r]`.
//! - `"bat"`: `[out / r, r, r]`; with `W_ij` the `r × r` block of rows `i·r…` and columns
//!   `j·r…` and `M_i` = `block[i]`, `ΔW_ij = W_ij @ M_i + M_i` in f32, then `W += ΔW`
//!   (one rounding into W's dtype). A row of ΔW needs only the same row of W, so bands of
//!   any size work. torch's batched matmul of these small blocks sums the products in
//!   order without fused multiply-adds, which is what is done here (bit-exact on the
//!   fixtures, r = 2 and 5).
//!
//! MiSS wraps `nn.Linear` only; a weight stored `[in, out]` is refused.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, split_part,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "MISS",
    open,
};

/// PEFT's `miss_fn` (the config's `init_weights`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Default,
    Mini,
    Bat,
}

#[derive(Debug)]
struct Miss {
    kind: Kind,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let kind = match v.get("init_weights") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Kind::Default,
        Some(Value::String(s)) if s == "bat" => Kind::Bat,
        Some(Value::String(s)) if s == "mini" => Kind::Mini,
        Some(other) => {
            return Err(Error::format(
                path,
                format!(
                    "init_weights is {other}; PEFT's MiSS knows true, false, \"bat\" and \"mini\" \
                     (they decide how miss_block merges)"
                ),
            ));
        }
    };
    Ok(Box::new(Miss { kind }))
}

impl Miss {
    /// Whether `block` fits a weight `[out, in]`; `Err` says why not.
    fn check(
        &self,
        block: &TensorEntry,
        out: usize,
        inp: usize,
    ) -> std::result::Result<(), String> {
        let s = block.shape.as_slice();
        match (self.kind, s) {
            (Kind::Default, [r, o]) if *r > 0 && *o == out && *r <= inp => Ok(()),
            (Kind::Mini, [r, m]) if *r > 0 && *m > 0 && out.is_multiple_of(*m) && *r <= inp => {
                Ok(())
            }
            (Kind::Bat, [n, r, r2])
                if *r > 0
                    && r == r2
                    && out.is_multiple_of(*r)
                    && inp.is_multiple_of(*r)
                    && *n == out / r =>
            {
                Ok(())
            }
            (k, _) => Err(format!(
                "miss_block has shape {s:?}, which does not fit a weight [{out}, {inp}] for \
                 init_weights {} (PEFT saves {})",
                match k {
                    Kind::Default => "true/false",
                    Kind::Mini => "\"mini\"",
                    Kind::Bat => "\"bat\"",
                },
                match k {
                    Kind::Default => "[r, out]",
                    Kind::Mini => "[r, mini_r] with out divisible by mini_r",
                    Kind::Bat => "[out / r, r, r] with out and in divisible by r",
                }
            )),
        }
    }
}

impl Tuner for Miss {
    fn name(&self) -> &'static str {
        "MiSS"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &["miss_block"])
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        m.parts
            .get("miss_block")
            .is_some_and(|b| self.check(b, out_in[0], out_in[1]).is_ok())
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let block = m.part(weights, "miss_block")?;
        check_float(weights, &[block])?;
        let w = &base.weight;
        let [out, inp] = w.entry.shape.as_slice() else {
            return Err(bad_part(
                weights,
                block,
                format!(
                    "base '{}' has shape {:?}; PEFT's MiSS adapts 2-D nn.Linear weights only",
                    w.entry.name, w.entry.shape
                ),
            ));
        };
        if w.transposed {
            return Err(bad_part(
                weights,
                block,
                format!(
                    "base '{}' is stored [in, out] (Conv1D / fan_in_fan_out); PEFT's MiSS adapts \
                     nn.Linear only, so lorastream refuses it",
                    w.entry.name
                ),
            ));
        }
        self.check(block, *out, *inp).map_err(|e| {
            bad_part(
                weights,
                block,
                format!("{e}; base '{}' is {:?}", w.entry.name, w.entry.shape),
            )
        })?;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Block {
                block: block.clone(),
                kind: self.kind,
            }),
        }])
    }
}

#[derive(Debug)]
struct Block {
    block: TensorEntry,
    kind: Kind,
}

struct Prepared {
    block: Vec<f32>,
    kind: Kind,
    /// Block rows `r`, and for default / mini the block's columns (out, or mini_r).
    r: usize,
    width: usize,
    cols: usize,
}

impl TensorChange for Block {
    fn tuner(&self) -> &'static str {
        "MiSS"
    }
    fn effect(&self) -> Effect {
        match self.kind {
            Kind::Bat => Effect::Transform,
            _ => Effect::Delta,
        }
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.block]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let block = decode(&self.block);
        let s = &self.block.shape;
        let (r, width) = match (self.kind, s.as_slice()) {
            (Kind::Bat, [_, r, _]) => (*r, *r),
            (_, [r, w]) => (*r, *w),
            _ => (0, 0),
        };
        if r == 0 || (self.kind == Kind::Bat && !base.cols.is_multiple_of(r)) {
            return Err(Error::Internal(format!(
                "MiSS block {s:?} for '{}' ({} x {})",
                base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(Prepared {
            block,
            kind: self.kind,
            r,
            width,
            cols: base.cols,
        }))
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let r = self.r;
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let o = row0 + i;
            match self.kind {
                Kind::Default | Kind::Mini => {
                    // block[c % r, o % width] (width = out for default MiSS).
                    let col = o % self.width;
                    for (c, w) in row.iter_mut().enumerate() {
                        *w += self.block[(c % r) * self.width + col];
                    }
                }
                Kind::Bat => {
                    let m = &self.block[(o / r) * r * r..(o / r + 1) * r * r];
                    let a = o % r;
                    let mut d = vec![0f32; r];
                    for slice in row.chunks_mut(r) {
                        for (b, db) in d.iter_mut().enumerate() {
                            let mut acc = 0f32;
                            for (c, &x) in slice.iter().enumerate() {
                                acc += x * m[c * r + b];
                            }
                            *db = acc + m[a * r + b];
                        }
                        for (x, db) in slice.iter_mut().zip(&d) {
                            *x += db;
                        }
                    }
                }
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

    fn run(kind: Kind, block: TensorEntry, w: &[f32], shape: &[usize]) -> Result<Vec<f32>> {
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", shape, w),
                transposed: false,
            },
            bias: None,
        };
        let m = SavedModule {
            name: "lin0".into(),
            parts: [("miss_block".to_string(), block)].into(),
        };
        let ch = Miss { kind }.changes(Path::new("a"), &m, &BTreeMap::new(), &base)?;
        run_in_memory(&*ch[0].change, &base.weight.entry, 1)
    }

    #[test]
    fn default_mini_and_bat_like_peft() {
        // Default, r = 2, W [2, 3] (one column past the last whole slice).
        let b = entry("lin0.miss_block", &[2, 2], &[1.0, 2.0, 10.0, 20.0]);
        let got = run(Kind::Default, b, &[0.0; 6], &[2, 3]).unwrap();
        assert_eq!(got, [1.0, 10.0, 1.0, 2.0, 20.0, 2.0]);
        // Mini, r = 1, mini_r = 1: one value everywhere.
        let b = entry("lin0.miss_block", &[1, 1], &[5.0]);
        assert_eq!(run(Kind::Mini, b, &[1.0; 4], &[2, 2]).unwrap(), [6.0; 4]);
        // Bat, r = 2, W = I (2 x 2): ΔW = I·M + M = 2M.
        let b = entry("lin0.miss_block", &[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let got = run(Kind::Bat, b, &[1.0, 0.0, 0.0, 1.0], &[2, 2]).unwrap();
        assert_eq!(got, [3.0, 4.0, 6.0, 9.0]);
        // A block that does not fit names itself and the base.
        let b = entry("lin0.miss_block", &[1, 2, 2], &[0.0; 4]);
        let e = run(Kind::Bat, b, &[0.0; 6], &[2, 3])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.miss_block") && e.contains("lin0.weight"),
            "{e}"
        );
    }
}
