//! IA3 (`peft_type: "IA3"`): one learned vector `ia3_l` per module that scales the weight's
//! output rows, or for `feedforward_modules` its input columns (PEFT 0.21
//! `tuners/ia3/layer.py`).
//!
//! Saved: `<module>.ia3_l`, `[out, 1]` (Linear) or `[1, out, 1…]` (Conv) for scaled outputs,
//! `[1, in]` / `[1, in, 1…]` for feed-forward modules. Merge, as PEFT does it:
//! `W = (W · ia3_l).to(W.dtype)` broadcast over the weight in PEFT's `[out, in, …]`
//! orientation (one rounding, math in f32 when the vector is f32), and for non-feed-forward
//! modules with a bias also `b = (b · ia3_l).to(b.dtype)`. On a transformers Conv1D (stored
//! `[in, out]`) PEFT transposes the vector, so the same rows/columns of `[out, in]` scale.
//! Grouped convolutions with feed-forward scaling repeat the vector per group in PEFT; they
//! are refused here.

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
    peft_type: "IA3",
    open,
};

/// Which modules scale their inputs (`feedforward_modules`).
#[derive(Debug)]
enum Feedforward {
    /// A regex: `re.fullmatch(pattern, module)`.
    Regex(regex::Regex),
    /// Names: the module name ends with one of them (PEFT's `key.endswith(target_key)`).
    Suffixes(Vec<String>),
}

#[derive(Debug)]
struct Ia3 {
    feedforward: Feedforward,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let feedforward = match v.get("feedforward_modules") {
        Some(Value::String(s)) => {
            Feedforward::Regex(regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                Error::format(
                    path,
                    format!("feedforward_modules '{s}' is not a regular expression lorastream can use: {e}"),
                )
            })?)
        }
        Some(Value::Array(a)) => Feedforward::Suffixes(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        ),
        None | Some(Value::Null) => Feedforward::Suffixes(Vec::new()),
        Some(other) => {
            return Err(Error::format(
                path,
                format!("feedforward_modules is {other}, not a string or a list"),
            ));
        }
    };
    Ok(Box::new(Ia3 { feedforward }))
}

impl Ia3 {
    fn is_feedforward(&self, module: &str) -> bool {
        match &self.feedforward {
            Feedforward::Regex(re) => re.is_match(module),
            Feedforward::Suffixes(s) => s.iter().any(|t| module.ends_with(t.as_str())),
        }
    }

    /// The vector's length, checked to be the shape PEFT gives it: `[n, 1]` / `[1, n, 1…]`
    /// (outputs) or `[1, n]` / `[1, n, 1…]` (feed-forward).
    fn length<'m>(&self, weights: &Path, m: &'m SavedModule) -> Result<(usize, &'m TensorEntry)> {
        let l = m.part(weights, "ia3_l")?;
        let ff = self.is_feedforward(&m.name);
        let s = l.shape.as_slice();
        let n = match s {
            [n, 1] if !ff => Some(*n),
            [1, n] if ff => Some(*n),
            [1, n, rest @ ..] if rest.iter().all(|&d| d == 1) && !rest.is_empty() => Some(*n),
            _ => None,
        };
        match n {
            Some(n) => Ok((n, l)),
            None => Err(bad_part(
                weights,
                l,
                format!(
                    "ia3_l has shape {s:?}, not PEFT's for a {} module ({})",
                    if ff {
                        "feed-forward"
                    } else {
                        "non-feed-forward"
                    },
                    if ff {
                        "[1, in] or [1, in, 1…]"
                    } else {
                        "[out, 1] or [1, out, 1…]"
                    }
                ),
            )),
        }
    }
}

impl Tuner for Ia3 {
    fn name(&self) -> &'static str {
        "IA3"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &["ia3_l"])
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        let Some(l) = m.parts.get("ia3_l") else {
            return false;
        };
        let n = l.numel();
        if self.is_feedforward(&m.name) {
            out_in[1] == n
        } else {
            out_in[0] == n
        }
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let (n, l) = self.length(weights, m)?;
        check_float(weights, &[l])?;
        let ff = self.is_feedforward(&m.name);
        let w = &base.weight;
        let shape = w.out_in_shape();
        let dim = if ff { 1 } else { 0 };
        if shape.len() < 2 || shape[dim] != n {
            return Err(bad_part(
                weights,
                l,
                format!(
                    "ia3_l has {n} values but base '{}' {:?} has {} {} (feed-forward: {ff})",
                    w.entry.name,
                    w.entry.shape,
                    shape.get(dim).copied().unwrap_or(0),
                    if ff { "inputs" } else { "outputs" }
                ),
            ));
        }
        // Scaled rows or columns of the *stored* tensor: PEFT's out dim is the stored
        // rows unless the weight is stored transposed.
        let rows_scaled = ff == w.transposed;
        let mut out = vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Scale {
                vector: l.clone(),
                rows: rows_scaled,
                inner: if ff && !w.transposed {
                    // [out, in, k…] flattened: each input channel spans k… columns.
                    shape[2..].iter().product()
                } else {
                    1
                },
            }),
        }];
        if !ff && let Some(b) = &base.bias {
            if b.numel() != n {
                return Err(bad_part(
                    weights,
                    l,
                    format!(
                        "ia3_l has {n} values but base bias '{}' has shape {:?}",
                        b.name, b.shape
                    ),
                ));
            }
            out.push(Change {
                target: b.name.clone(),
                change: Arc::new(Scale {
                    vector: l.clone(),
                    rows: true,
                    inner: 1,
                }),
            });
        }
        Ok(out)
    }
}

/// `W · v` with `v` broadcast over rows (`rows`: one value per stored row) or over columns
/// (one value per `inner` consecutive columns).
#[derive(Debug)]
struct Scale {
    vector: TensorEntry,
    rows: bool,
    inner: usize,
}

struct PreparedScale {
    v: Vec<f32>,
    rows: bool,
    inner: usize,
    cols: usize,
}

impl TensorChange for Scale {
    fn tuner(&self) -> &'static str {
        "IA3"
    }
    fn effect(&self) -> Effect {
        Effect::Scale
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.vector]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let v = decode(&self.vector);
        let want = if self.rows {
            base.rows
        } else {
            base.cols / self.inner.max(1)
        };
        if v.len() != want {
            return Err(Error::Internal(format!(
                "IA3 vector of {} values for '{}' ({} x {})",
                v.len(),
                base.base.name,
                base.rows,
                base.cols
            )));
        }
        Ok(Box::new(PreparedScale {
            v,
            rows: self.rows,
            inner: self.inner.max(1),
            cols: base.cols,
        }))
    }
}

impl BandChange for PreparedScale {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            if self.rows {
                let s = self.v[row0 + i];
                row.iter_mut().for_each(|x| *x *= s);
            } else {
                for (chunk, s) in row.chunks_mut(self.inner).zip(&self.v) {
                    chunk.iter_mut().for_each(|x| *x *= s);
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

    fn module(l: TensorEntry) -> SavedModule {
        SavedModule {
            name: "lin0".into(),
            parts: [("ia3_l".to_string(), l)].into(),
        }
    }

    #[test]
    fn scales_rows_or_columns_like_peft() {
        let w: Vec<f32> = (0..6).map(|i| i as f32 + 1.0).collect(); // [2, 3]
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 3], &w),
                transposed: false,
            },
            bias: Some(entry("lin0.bias", &[2], &[10.0, 20.0])),
        };
        let t = Ia3 {
            feedforward: Feedforward::Suffixes(vec![]),
        };
        let m = module(entry("lin0.ia3_l", &[2, 1], &[2.0, 0.5]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 2);
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [2., 4., 6., 2., 2.5, 3.]);
        let bias = base.bias.clone().unwrap();
        assert_eq!(run_in_memory(&*ch[1].change, &bias, 1).unwrap(), [20., 10.]);
        // Feed-forward: columns, and no bias change.
        let t = Ia3 {
            feedforward: Feedforward::Suffixes(vec!["lin0".into()]),
        };
        let m = module(entry("lin0.ia3_l", &[1, 3], &[1.0, 0.0, -1.0]));
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 1);
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [1., 0., -3., 4., 0., -6.]);
        // A vector of the wrong length names the tensor.
        let m = module(entry("lin0.ia3_l", &[1, 2], &[1.0, 0.0]));
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin0.ia3_l") && e.contains("lin0.weight"), "{e}");
    }
}
