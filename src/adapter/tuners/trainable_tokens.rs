//! TrainableTokens (`peft_type: "TRAINABLE_TOKENS"`): new values for some rows of an
//! embedding (or of an `lm_head` Linear), PEFT 0.21 `tuners/trainable_tokens/layer.py`.
//!
//! Saved: `<module>.trainable_tokens_delta`, `[len(token_indices), dim]`: despite its name
//! it holds the rows' new *values*, not a difference. Merge, as PEFT does it:
//! `W = W.index_copy(0, token_indices, delta.to(W.dtype))`: row `token_indices[i]` of the
//! stored `[num, dim]` weight becomes `delta[i]`, rounded once into the weight's dtype; every
//! other row is untouched. PEFT wraps only `nn.Embedding` and `nn.Linear` (both stored
//! `[rows, dim]`, never transposed), so there is no layout question.
//!
//! Tied embeddings: with `tie_word_embeddings`, PEFT puts a *tied* layer on the output
//! embedding that reuses the input embedding's delta and saves nothing of its own. The two
//! modules share one weight, so replacing the rows of the stored (input) weight is the whole
//! merge, as for a LoRA on a tied embedding; an output embedding that is stored on its own
//! is handled by the plan like every other tied weight.
//!
//! Refused by name: duplicate indices (PEFT's `index_copy` leaves which value wins
//! undefined), negative or out-of-range indices, a delta whose rows or width do not fit.
//! The row replacement itself ([`ReplaceRows`]) is also what a LoRA adapter's
//! `trainable_token_indices` merges with.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "TRAINABLE_TOKENS",
    open,
};

/// The saved part's name (`<module>.trainable_tokens_delta`).
pub const PART: &str = "trainable_tokens_delta";

#[derive(Debug)]
struct TrainableTokens {
    indices: Indices,
    name: &'static str,
}

/// Which rows each module replaces.
#[derive(Debug)]
enum Indices {
    /// Every saved module (TRAINABLE_TOKENS' `token_indices`; a LoRA config's list form,
    /// which PEFT applies to the input embedding).
    All(Vec<usize>),
    /// A LoRA config's `trainable_token_indices` dict: module name (suffix) -> indices.
    PerModule(Vec<(String, Vec<usize>)>),
}

impl TrainableTokens {
    fn indices_of(&self, weights: &Path, m: &SavedModule) -> Result<&[usize]> {
        match &self.indices {
            Indices::All(v) => Ok(v),
            Indices::PerModule(map) => map
                .iter()
                .find(|(k, _)| m.name == *k || m.name.ends_with(&format!(".{k}")))
                .map(|(_, v)| v.as_slice())
                .ok_or_else(|| {
                    Error::format(
                        weights,
                        format!(
                            "module '{}' has trainable tokens, but adapter_config.json's trainable_token_indices                              names only {:?}",
                            m.name,
                            map.iter().map(|(k, _)| k).collect::<Vec<_>>()
                        ),
                    )
                }),
        }
    }
}

/// The part of a LoRA adapter that trains rows of embeddings (`trainable_token_indices`,
/// saved as `<module>.token_adapter.trainable_tokens_delta`): a tuner the plan runs beside
/// the LoRA modules. `v` is that config field (a list, or a dict of module -> list).
pub fn lora_token_tuner(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let what = "trainable_token_indices";
    let indices = match v {
        Value::Object(o) => Indices::PerModule(
            o.iter()
                .map(|(k, x)| {
                    Ok((
                        k.clone(),
                        token_indices(x, path, &format!("{what}['{k}']"))?,
                    ))
                })
                .collect::<Result<_>>()?,
        ),
        other => Indices::All(token_indices(other, path, what)?),
    };
    Ok(Box::new(TrainableTokens {
        indices,
        name: "LoRA trainable tokens",
    }))
}

/// The saved key suffix of a LoRA adapter's trainable tokens (after the module name).
pub const LORA_SUFFIX: &str = ".token_adapter.trainable_tokens_delta";

/// Reads a list of token indices (`token_indices`, or one entry of a LoRA config's
/// `trainable_token_indices`), refusing what PEFT's `index_copy` cannot settle: negative
/// values and duplicates. `what` names the option in messages.
pub fn token_indices(v: &Value, path: &Path, what: &str) -> Result<Vec<usize>> {
    let bad = |msg: String| Error::format(path, format!("{what}: {msg}"));
    let Value::Array(a) = v else {
        return Err(bad(format!("is {v}, not a list of token indices")));
    };
    let mut out = Vec::with_capacity(a.len());
    for x in a {
        let i = x
            .as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| bad(format!("{x} is not a token index (a non-negative integer)")))?;
        if out.contains(&i) {
            return Err(bad(format!(
                "token index {i} is listed twice; PEFT's index_copy leaves which value it keeps undefined"
            )));
        }
        out.push(i);
    }
    if out.is_empty() {
        return Err(bad("is empty: no rows to replace".into()));
    }
    Ok(out)
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let raw = v.get("token_indices").ok_or_else(|| {
        Error::format(
            path,
            "TRAINABLE_TOKENS config has no token_indices (which rows the adapter replaces)",
        )
    })?;
    Ok(Box::new(TrainableTokens {
        indices: Indices::All(token_indices(raw, path, "token_indices")?),
        name: "TrainableTokens",
    }))
}

/// Checks `delta` against the base weight `w` (stored `[num, dim]`) and `indices`, and
/// makes the change that replaces those rows.
pub fn replace_rows(
    weights: &Path,
    delta: &TensorEntry,
    indices: &[usize],
    w: &TensorEntry,
) -> Result<ReplaceRows> {
    check_float(weights, &[delta])?;
    let &[num, dim] = w.shape.as_slice() else {
        return Err(bad_part(
            weights,
            delta,
            format!(
                "replaces rows of base '{}', which has shape {:?}; trainable tokens replace rows of a 2-D \
                 embedding or lm_head weight",
                w.name, w.shape
            ),
        ));
    };
    if delta.shape != [indices.len(), dim] {
        return Err(bad_part(
            weights,
            delta,
            format!(
                "has shape {:?}, but {} token indices of base '{}' {:?} need [{}, {dim}]",
                delta.shape,
                indices.len(),
                w.name,
                w.shape,
                indices.len()
            ),
        ));
    }
    if let Some(i) = indices.iter().find(|&&i| i >= num) {
        return Err(bad_part(
            weights,
            delta,
            format!(
                "token index {i} is past the {num} rows of base '{}' {:?}",
                w.name, w.shape
            ),
        ));
    }
    Ok(ReplaceRows {
        delta: delta.clone(),
        indices: indices.to_vec(),
        tuner: "TrainableTokens",
    })
}

impl Tuner for TrainableTokens {
    fn name(&self) -> &'static str {
        self.name
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        match rel
            .strip_suffix(LORA_SUFFIX)
            .or_else(|| rel.strip_suffix(".trainable_tokens_delta"))
        {
            Some(module) => SavedKey::Part { module, part: PART },
            None => SavedKey::Full,
        }
    }

    /// Never asks the plan to settle a layout: an Embedding or Linear is stored `[rows, dim]`
    /// and PEFT replaces its rows as stored, so the shapes are checked in `changes` only
    /// (returning false for both orientations keeps a square weight from being "unsettled").
    fn fits(&self, _m: &SavedModule, _out_in: [usize; 2]) -> bool {
        false
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let delta = m.part(weights, PART)?;
        let w = &base.weight.entry;
        let indices = self.indices_of(weights, m)?;
        Ok(vec![Change {
            target: w.name.clone(),
            change: Arc::new(replace_rows(weights, delta, indices, w)?.reported_as(self.name)),
        }])
    }
}

/// Rows `indices[i]` of the tensor replaced by row `i` of `delta` (then rounded into the
/// tensor's dtype by the engine: PEFT's `delta.to(W)`).
#[derive(Debug)]
pub struct ReplaceRows {
    delta: TensorEntry,
    indices: Vec<usize>,
    tuner: &'static str,
}

impl ReplaceRows {
    /// The same change reported as coming from `tuner` (a LoRA adapter's trainable tokens).
    pub fn reported_as(mut self, tuner: &'static str) -> ReplaceRows {
        self.tuner = tuner;
        self
    }
}

struct PreparedRows {
    delta: Vec<f32>,
    /// Stored row -> row of `delta`.
    at: HashMap<usize, usize>,
    cols: usize,
}

impl TensorChange for ReplaceRows {
    fn tuner(&self) -> &'static str {
        self.tuner
    }
    fn effect(&self) -> Effect {
        Effect::Rows
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.delta]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let delta = decode(&self.delta);
        if delta.len() != self.indices.len() * base.cols
            || self.indices.iter().any(|&i| i >= base.rows)
        {
            return Err(Error::Internal(format!(
                "trainable tokens {:?} for '{}' ({} x {})",
                self.delta.shape, base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(PreparedRows {
            delta,
            at: self
                .indices
                .iter()
                .enumerate()
                .map(|(k, &i)| (i, k))
                .collect(),
            cols: base.cols,
        }))
    }
}

impl BandChange for PreparedRows {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            if let Some(&k) = self.at.get(&(row0 + i)) {
                row.copy_from_slice(&self.delta[k * self.cols..(k + 1) * self.cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;

    fn entry(name: &str, dtype: Dtype, shape: &[usize], v: &[f32]) -> TensorEntry {
        let mut bytes = Vec::new();
        for &x in v {
            match dtype {
                Dtype::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                _ => bytes.extend_from_slice(&x.to_le_bytes()),
            }
        }
        TensorEntry::in_memory(Path::new("t"), name, dtype, shape.to_vec(), &bytes).unwrap()
    }

    fn setup(indices: &[usize], delta: &[f32], dshape: &[usize]) -> (TrainableTokens, SavedModule) {
        let t = TrainableTokens {
            indices: Indices::All(indices.to_vec()),
            name: "TrainableTokens",
        };
        let m = SavedModule {
            name: "emb".into(),
            parts: [(
                PART.to_string(),
                entry("emb.trainable_tokens_delta", Dtype::F32, dshape, delta),
            )]
            .into(),
        };
        (t, m)
    }

    #[test]
    fn replaces_listed_rows_across_bands_rounded_to_the_base_dtype() {
        // [4, 2] bf16 embedding; rows 3 and 0 replaced (in that order), bands of one row.
        let w = entry(
            "emb.weight",
            Dtype::BF16,
            &[4, 2],
            &[1., 2., 3., 4., 5., 6., 7., 8.],
        );
        let base = ModuleBase {
            weight: BaseTensor {
                entry: w.clone(),
                transposed: false,
            },
            bias: None,
        };
        let x = 1.0 + 1.0 / 512.0; // not a bf16 value: rounds to 1.0 (ties to even)
        let (t, m) = setup(&[3, 0], &[-1., x, 9., 10.], &[2, 2]);
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].change.effect(), Effect::Rows);
        let got = run_in_memory(&*ch[0].change, &w, 1).unwrap();
        assert_eq!(got, [9., 10., 3., 4., 5., 6., -1., 1.]);
        let got = run_in_memory(&*ch[0].change, &w, 3).unwrap();
        assert_eq!(got, [9., 10., 3., 4., 5., 6., -1., 1.]);
    }

    #[test]
    fn refuses_what_peft_cannot_settle() {
        let w = entry("emb.weight", Dtype::F32, &[4, 2], &[0.; 8]);
        let base = ModuleBase {
            weight: BaseTensor {
                entry: w,
                transposed: false,
            },
            bias: None,
        };
        // Index past the rows.
        let (t, m) = setup(&[4], &[1., 2.], &[1, 2]);
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token index 4") && e.contains("emb.weight"),
            "{e}"
        );
        // Rows that do not match the indices.
        let (t, m) = setup(&[0, 1], &[1., 2.], &[1, 2]);
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("emb.trainable_tokens_delta") && e.contains("[2, 2]"),
            "{e}"
        );
        // Duplicate and negative indices in the config.
        let p = Path::new("adapter_config.json");
        let e = token_indices(&serde_json::json!([1, 2, 1]), p, "token_indices")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = token_indices(&serde_json::json!([-1]), p, "token_indices")
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_indices") && e.contains("-1"), "{e}");
    }

    #[test]
    fn lora_indices_per_module_by_name_suffix() {
        let p = Path::new("adapter_config.json");
        let t = lora_token_tuner(&serde_json::json!({"embed_tokens": [2, 0]}), p).unwrap();
        assert_eq!(t.name(), "LoRA trainable tokens");
        assert_eq!(
            t.classify("model.embed_tokens.token_adapter.trainable_tokens_delta"),
            SavedKey::Part {
                module: "model.embed_tokens",
                part: PART
            }
        );
        let w = entry(
            "model.embed_tokens.weight",
            Dtype::F32,
            &[3, 1],
            &[1., 2., 3.],
        );
        let base = ModuleBase {
            weight: BaseTensor {
                entry: w.clone(),
                transposed: false,
            },
            bias: None,
        };
        let mut m = SavedModule {
            name: "model.embed_tokens".into(),
            parts: [(PART.to_string(), entry("d", Dtype::F32, &[2, 1], &[7., 9.]))].into(),
        };
        let ch = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch[0].change.tuner(), "LoRA trainable tokens");
        assert_eq!(run_in_memory(&*ch[0].change, &w, 2).unwrap(), [9., 2., 7.]);
        // A module the dict does not name is refused, naming what it does name.
        m.name = "model.other".into();
        let e = t
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.other") && e.contains("embed_tokens"),
            "{e}"
        );
    }
}
