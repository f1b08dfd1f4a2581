//! RoAd (`peft_type: "ROAD"`): 2x2 scaled rotations that mix pairs of *output* rows within
//! groups of `group_size` rows, applied to the weight and the bias (PEFT 0.21
//! `tuners/road/layer.py`).
//!
//! Saved: `<module>.road_theta` and `<module>.road_alpha`, 1-D, of `out / 2` (`road_1`:
//! shared by both rows of a pair), `out` (`road_2`) or `2·out` (`road_4`: separate angles and
//! scales for the cosine and sine halves) values. With `h = group_size / 2`, row `r` at
//! position `j` of its group, `c = α·cos θ`, `s = α·sin θ` (per row, f32):
//! `R[r][r] = c[r]`, and `R[r][r+h] = -s[r]` (`j < h`) or `R[r][r-h] = s[r]` (`j ≥ h`).
//! Merge, as PEFT does it: `R` rounded into the weight's dtype, `W ← R·W` and, with a bias,
//! `b ← R·b`, products in the weight's dtype (f32 sums; a half dtype's products are exact in
//! f32), rounded once. Each output row is one or two products, summed in column order (the
//! smaller column first, FMA for the second), as MKL's sgemm does (the bias's matrix-vector
//! product rounds both products and adds them, as its sgemv does); rows of a group stay in
//! one band (`row_block = group_size`).
//!
//! Where we differ: PEFT's f32 `cos`/`sin` are SLEEF's (within 1 ulp, not always correctly
//! rounded); we use the platform's. Only `nn.Linear` is adapted (PEFT's only RoAd layer), so
//! a transformers Conv1D weight is refused.

use super::oft::cfg_usize;
use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "ROAD",
    open,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Road1,
    Road2,
    Road4,
}

impl Variant {
    /// Saved values per module of `out` outputs.
    fn size(self, out: usize) -> usize {
        match self {
            Variant::Road1 => out / 2,
            Variant::Road2 => out,
            Variant::Road4 => out * 2,
        }
    }
}

#[derive(Debug)]
struct Road {
    variant: Variant,
    group: usize,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let variant = match v.get("variant") {
        None | Some(Value::Null) => Variant::Road1,
        Some(Value::String(s)) if s == "road_1" => Variant::Road1,
        Some(Value::String(s)) if s == "road_2" => Variant::Road2,
        Some(Value::String(s)) if s == "road_4" => Variant::Road4,
        Some(other) => {
            return Err(Error::format(
                path,
                format!("RoAd variant {other} is not one of PEFT's road_1, road_2, road_4"),
            ));
        }
    };
    let group = cfg_usize(v, "group_size", 64, path)?;
    if group == 0 || !group.is_multiple_of(2) {
        return Err(Error::format(
            path,
            format!("RoAd group_size {group} is not a positive even number (PEFT refuses it too)"),
        ));
    }
    Ok(Box::new(Road { variant, group }))
}

impl Road {
    fn parts<'m>(
        &self,
        weights: &Path,
        m: &'m SavedModule,
    ) -> Result<(&'m TensorEntry, &'m TensorEntry)> {
        Ok((
            m.part(weights, "road_theta")?,
            m.part(weights, "road_alpha")?,
        ))
    }

    fn fits_out(&self, theta: &TensorEntry, alpha: &TensorEntry, out: usize) -> bool {
        let n = self.variant.size(out);
        out.is_multiple_of(self.group) && theta.shape == [n] && alpha.shape == [n]
    }

    /// Per-row `(c, s)` (`α·cos θ`, `α·sin θ`) as PEFT's `_prepare_cols`.
    fn cols(&self, theta: &[f32], alpha: &[f32], out: usize) -> (Vec<f32>, Vec<f32>) {
        let g = self.group;
        let h = g / 2;
        let mut c = vec![0f32; out];
        let mut s = vec![0f32; out];
        for r in 0..out {
            let (grp, j) = (r / g, r % g);
            let (ct, st, a1, a2) = match self.variant {
                // `reshape(-1, h).repeat_interleave(2, dim=0)`: both halves of a group
                // share the group's h values.
                Variant::Road1 => {
                    let k = grp * h + j % h;
                    (theta[k], theta[k], alpha[k], alpha[k])
                }
                Variant::Road2 => (theta[r], theta[r], alpha[r], alpha[r]),
                Variant::Road4 => {
                    let k = grp * 2 * g + j;
                    (theta[k], theta[k + g], alpha[k], alpha[k + g])
                }
            };
            c[r] = a1 * ct.cos();
            s[r] = a2 * st.sin();
        }
        (c, s)
    }
}

impl Tuner for Road {
    // PEFT wraps nn.Linear / Conv only: a 2-D weight is stored [out, in].
    fn adapts_conv1d(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "RoAd"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for part in ["road_theta", "road_alpha"] {
            if let Some(module) = rel.strip_suffix(part).and_then(|m| m.strip_suffix('.')) {
                return SavedKey::Part { module, part };
            }
        }
        SavedKey::Full
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        match (m.parts.get("road_theta"), m.parts.get("road_alpha")) {
            (Some(t), Some(a)) => self.fits_out(t, a, out_in[0]),
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
        let (theta, alpha) = self.parts(weights, m)?;
        check_float(weights, &[theta, alpha])?;
        let w = &base.weight;
        let shape = w.entry.shape.as_slice();
        let refuse = |why: String| bad_part(weights, theta, why);
        if w.transposed || shape.len() != 2 {
            return Err(refuse(format!(
                "base '{}' {shape:?}{}: PEFT's RoAd adapts only nn.Linear [out, in] weights",
                w.entry.name,
                if w.transposed {
                    " is stored [in, out] (a transformers Conv1D / fan_in_fan_out)"
                } else {
                    ""
                }
            )));
        }
        let out = shape[0];
        if !self.fits_out(theta, alpha, out) {
            return Err(refuse(format!(
                "road_theta {:?} / road_alpha {:?} do not fit base '{}' {shape:?}: {:?} with \
                 {out} outputs needs {} values each and group_size {} dividing {out}",
                theta.shape,
                alpha.shape,
                w.entry.name,
                self.variant,
                self.variant.size(out),
                self.group
            )));
        }
        let (c, s) = self.cols(&decode(theta), &decode(alpha), out);
        let rot = Rotation {
            theta: theta.clone(),
            alpha: alpha.clone(),
            c,
            s,
            group: self.group,
            // PEFT's `road_R.to(weight.dtype)`, also for the bias.
            dtype: w.entry.dtype,
            fused: true,
        };
        let bias_rot = Rotation {
            theta: theta.clone(),
            alpha: alpha.clone(),
            c: rot.c.clone(),
            s: rot.s.clone(),
            group: self.group,
            dtype: w.entry.dtype,
            // `R @ b` is a matrix-vector product: MKL's sgemv adds the two rounded
            // products (measured on PEFT's f32 merges), where sgemm fuses the second.
            fused: false,
        };
        let mut changes = vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(rot),
        }];
        if let Some(b) = &base.bias {
            if b.shape != [out] {
                return Err(refuse(format!(
                    "base bias '{}' has shape {:?}, not [{out}]",
                    b.name, b.shape
                )));
            }
            changes.push(Change {
                target: b.name.clone(),
                change: Arc::new(bias_rot),
            });
        }
        Ok(changes)
    }
}

#[derive(Debug)]
struct Rotation {
    theta: TensorEntry,
    alpha: TensorEntry,
    c: Vec<f32>,
    s: Vec<f32>,
    group: usize,
    dtype: Dtype,
    /// The second product fused into the sum (sgemm) rather than rounded and added (sgemv).
    fused: bool,
}

struct Prepared {
    c: Vec<f32>,
    s: Vec<f32>,
    group: usize,
    cols: usize,
    fused: bool,
}

impl TensorChange for Rotation {
    fn tuner(&self) -> &'static str {
        "RoAd"
    }
    fn effect(&self) -> Effect {
        Effect::Transform
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.theta, &self.alpha]
    }
    fn row_block(&self) -> usize {
        self.group
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        if base.rows != self.c.len() || !base.rows.is_multiple_of(self.group) {
            return Err(Error::Internal(format!(
                "RoAd rotation of {} rows for '{}' ({} x {})",
                self.c.len(),
                base.base.name,
                base.rows,
                base.cols
            )));
        }
        let mut c = self.c.clone();
        let mut s = self.s.clone();
        round_through(self.dtype, &mut c);
        round_through(self.dtype, &mut s);
        Ok(Box::new(Prepared {
            c,
            s,
            group: self.group,
            cols: base.cols,
            fused: self.fused,
        }))
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let (g, h, cols) = (self.group, self.group / 2, self.cols);
        if cols == 0 {
            return;
        }
        let rows = band.len() / cols;
        let mut out = vec![0f32; band.len()];
        for i in 0..rows {
            let r = row0 + i;
            // The band starts on a group boundary (row_block), so the partner is in it.
            let first_half = r % g < h;
            let (c, s) = (self.c[r], self.s[r]);
            let o = &mut out[i * cols..(i + 1) * cols];
            if first_half {
                let (w, p) = (&band[i * cols..(i + 1) * cols], &band[(i + h) * cols..]);
                for ((o, w), p) in o.iter_mut().zip(w).zip(p) {
                    *o = if self.fused {
                        (-s).mul_add(*p, c * w)
                    } else {
                        c * w - s * p
                    };
                }
            } else {
                let (p, w) = (&band[(i - h) * cols..], &band[i * cols..(i + 1) * cols]);
                for ((o, w), p) in o.iter_mut().zip(w).zip(p) {
                    *o = if self.fused {
                        c.mul_add(*w, s * p)
                    } else {
                        s * p + c * w
                    };
                }
            }
        }
        band.copy_from_slice(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};

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
    fn rotates_row_pairs_of_weight_and_bias() {
        // 4 outputs, group 4 (pairs rows 0-2 and 1-3), road_1: 2 angles, 2 scales.
        let w: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect(); // [4, 2]
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[4, 2], &w),
                transposed: false,
            },
            bias: Some(entry("lin0.bias", &[4], &[1.0, 2.0, 3.0, 4.0])),
        };
        let half_pi = std::f32::consts::FRAC_PI_2;
        let m = SavedModule {
            name: "lin0".into(),
            parts: [
                (
                    "road_theta".to_string(),
                    entry("lin0.road_theta", &[2], &[0.0, half_pi]),
                ),
                (
                    "road_alpha".to_string(),
                    entry("lin0.road_alpha", &[2], &[2.0, 1.0]),
                ),
            ]
            .into(),
        };
        let t = Road {
            variant: Variant::Road1,
            group: 4,
        };
        assert!(t.fits(&m, [4, 2]) && !t.fits(&m, [2, 4]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 2);
        assert_eq!(ch[0].change.row_block(), 4);
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        // Pair (0, 2): θ = 0, α = 2: both rows doubled. Pair (1, 3): θ = π/2, α = 1:
        // row 1 ← -row 3, row 3 ← row 1.
        let want = [2.0f32, 4.0, -7.0, -8.0, 10.0, 12.0, 3.0, 4.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        let bias = base.bias.clone().unwrap();
        let got = run_in_memory(&*ch[1].change, &bias, 1).unwrap();
        for (g, w) in got.iter().zip([2.0f32, -4.0, 6.0, 2.0]) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
        // A group size that does not divide the outputs is refused with both names.
        let t = Road {
            variant: Variant::Road2,
            group: 8,
        };
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lin0.road_theta") && e.contains("lin0.weight"),
            "{e}"
        );
    }
}
