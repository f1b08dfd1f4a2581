//! PEFT adapters: `adapter_config.json` plus the saved tensors, turned into per-module
//! LoRA parts (A, B, optional lora_B bias and DoRA magnitude) and full replacement tensors
//! (modules_to_save copies, embedding copies, saved biases).
//!
//! The rules follow PEFT 0.21 (see `fixtures/peft/NOTES.md`, observed from real PEFT):
//! saved keys carry the prefix `base_model.model.` and no adapter name; the scale is
//! `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA) with per-module overrides from
//! `rank_pattern` / `alpha_pattern`. Tuner types and initialisations whose merge we do
//! not reproduce are refused by name.

pub mod combine;
mod config;
pub mod lora_experts;
pub mod torch_rng;
pub mod tuners;

pub use config::{BdLora, BlockDiagonal, LoraConfig, Variant};

use crate::error::{Error, Result};
use crate::source::{self, TensorEntry};
use std::path::{Path, PathBuf};

/// The fixed prefix of saved adapter keys.
pub const SAVED_PREFIX: &str = "base_model.model.";
/// The prefix of a tuner's shared tensors (on the tuner model, not under a module).
const SHARED_PREFIX: &str = "base_model.";

/// The LoRA parts of one adapted module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// Module name relative to the base model (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// `lora_A.weight` [r, in, …] or `lora_embedding_A` [r, num_embeddings].
    pub a: TensorEntry,
    /// `lora_B.weight` [out, r, …] or `lora_embedding_B` [dim, r].
    pub b: TensorEntry,
    /// `lora_B.bias` [out] (lora_bias=True).
    pub b_bias: Option<TensorEntry>,
    /// `lora_magnitude_vector` (DoRA).
    pub magnitude: Option<TensorEntry>,
    /// An Embedding LoRA (`lora_embedding_A/B`).
    pub embedding: bool,
    /// The rank from the config (after rank_pattern).
    pub r: usize,
    /// The scale s applied to B @ A.
    pub scale: f32,
}

/// A full tensor saved in the adapter that replaces a base tensor on load.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The base tensor's key it replaces (`lm_head.weight`).
    pub base_key: String,
    /// The key as saved, less the prefix (`lm_head.base_layer.weight`).
    pub saved_key: String,
    pub tensor: TensorEntry,
}

impl Replacement {
    /// A full tensor saved under `rel` (prefix removed): it replaces the base tensor of the
    /// same name less PEFT's `.base_layer.` wrapper.
    fn saved(rel: String, tensor: TensorEntry) -> Replacement {
        Replacement {
            base_key: rel.replace(".base_layer.", "."),
            saved_key: rel,
            tensor,
        }
    }
}

/// A saved adapter key less PEFT's `base_model.model.` prefix; an error naming the tensor
/// for a key without it.
fn saved_rel(weights: &Path, t: &TensorEntry) -> Result<String> {
    t.name
        .strip_prefix(SAVED_PREFIX)
        .map(str::to_string)
        .ok_or_else(|| {
            Error::tensor(
                weights,
                &t.name,
                format!("adapter key does not start with '{SAVED_PREFIX}' (not saved by PEFT's save_pretrained?)"),
            )
        })
}

/// One loaded adapter folder.
#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub modules: Vec<LoraModule>,
    pub replacements: Vec<Replacement>,
    /// Training-only state of the variant (VeLoRA's `lora_velora_embed`, MonteCLoRA's
    /// sampler): saved, but no part of the merged weight (PEFT's merge ignores it too).
    pub training_only: Vec<TensorEntry>,
    /// A non-LoRA tuner (`peft_type` other than LORA), which owns `tuned` and `shared`.
    pub tuner: Option<Box<dyn tuners::Tuner>>,
    /// The tuner's adapted modules, with their saved parts.
    pub tuned: Vec<tuners::SavedModule>,
    /// The tuner's tensors shared by its modules (VeRA's projections), by name.
    pub shared: std::collections::BTreeMap<String, TensorEntry>,
    /// `--lora DIR:WEIGHT`: the adapter's weight in a `--combine` combination.
    pub weight: Option<f64>,
}

impl Adapter {
    /// How big reads of the adapter's tensors go (see `MappedFile::read_at`).
    pub fn set_read_mode(&self, mode: crate::direct_io::ReadMode) {
        for m in &self.modules {
            for t in [
                Some(&m.a),
                Some(&m.b),
                m.b_bias.as_ref(),
                m.magnitude.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                t.file.set_read_mode(mode);
            }
        }
        for r in &self.replacements {
            r.tensor.file.set_read_mode(mode);
        }
        for t in self.tuned.iter().flat_map(|m| m.parts.values()) {
            t.file.set_read_mode(mode);
        }
        for t in self.shared.values() {
            t.file.set_read_mode(mode);
        }
    }

    /// What the adapter is, for messages ("LoRA", "IA3").
    pub fn kind(&self) -> &'static str {
        self.tuner.as_ref().map_or("LoRA", |t| t.name())
    }

    /// Opens and validates an adapter folder.
    pub fn open(dir: &Path) -> Result<Adapter> {
        let files = source::open_adapter(dir)?;
        let peft_type = files
            .config
            .get("peft_type")
            .and_then(|t| t.as_str())
            .unwrap_or("LORA")
            .to_string();
        if !peft_type.eq_ignore_ascii_case("LORA") {
            return open_tuned(dir, files, peft_type);
        }
        let config = LoraConfig::from_json(&files.config, &files.config_path)?;
        let weights_path = files.weights.path.clone();
        let mut parts: Vec<(String, Parts)> = Vec::new();
        let mut replacements = Vec::new();
        let mut training_only = Vec::new();
        let mut tokens: Vec<tuners::SavedModule> = Vec::new();
        for t in files.weights.tensors {
            let rel = saved_rel(&weights_path, &t)?;
            if let Some(variant) = variant_key(&rel) {
                let wanted = match variant {
                    "VeLoRA" => config.variant == Variant::Velora,
                    "MonteCLoRA" => config.variant == Variant::Monteclora,
                    _ => false,
                };
                if !wanted {
                    return Err(Error::tensor(
                        &weights_path,
                        &t.name,
                        format!(
                            "is a {variant} tensor, which {}",
                            match variant {
                                "KaSA" =>
                                    "lorastream does not merge: PEFT truncates the base weight with \
                                           an SVD when it loads a KaSA adapter, which cannot be reproduced exactly",
                                _ =>
                                    "adapter_config.json does not declare (its variant's config field is missing)",
                            }
                        ),
                    ));
                }
                training_only.push(t);
                continue;
            }
            if let Some(module) = rel.strip_suffix(tuners::trainable_tokens::LORA_SUFFIX) {
                // trainable_token_indices: rows of an embedding, merged by the
                // TrainableTokens row replacement beside the LoRA modules.
                tokens.push(tuners::SavedModule {
                    name: module.to_string(),
                    parts: [(tuners::trainable_tokens::PART.to_string(), t)].into(),
                });
                continue;
            }
            match classify(&rel) {
                Some((module, part)) => {
                    let idx = match parts.iter().position(|(m, _)| *m == module) {
                        Some(i) => i,
                        None => {
                            parts.push((module.to_string(), Parts::default()));
                            parts.len() - 1
                        }
                    };
                    let p = &mut parts[idx].1;
                    let slot = match part {
                        Part::A | Part::EmbA => &mut p.a,
                        Part::B | Part::EmbB => &mut p.b,
                        Part::BBias => &mut p.b_bias,
                        Part::Magnitude => &mut p.magnitude,
                    };
                    if matches!(part, Part::EmbA | Part::EmbB) {
                        p.embedding = true;
                    }
                    *slot = Some(t);
                }
                None => replacements.push(Replacement::saved(rel, t)),
            }
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (name, p) in parts {
            let missing = |what: &str| {
                Error::format(
                    &weights_path,
                    format!("module '{name}' has no {what} (incomplete adapter)"),
                )
            };
            let mut a = p.a.ok_or_else(|| missing("lora_A"))?;
            let mut b = p.b.ok_or_else(|| missing("lora_B"))?;
            if let Some(bd) = &config.bdlora {
                let refuse = |msg: String| Error::tensor(&weights_path, &a.name, msg);
                match bd
                    .factor_of(&name)
                    .map_err(|m| refuse(format!("BD-LoRA: {m}")))?
                {
                    Some(BlockDiagonal::A) => a = block_diagonal(&a, bd.nblocks)?,
                    Some(BlockDiagonal::B) => b = block_diagonal(&b, bd.nblocks)?,
                    None => {}
                }
            }
            let (r, scale) = config.rank_and_scale(&name);
            // An adapter of a 3-D nn.Parameter (target_parameters, MoE experts) stacks
            // one rank-r factor per expert: [r·E, in] / [out, r·E]; the plan judges it.
            let per_expert = !config.target_parameters.is_empty()
                && a.shape.first().is_some_and(|&n| n % r == 0)
                && b.shape.get(1) == a.shape.first();
            // A grouped convolution's B holds r/groups columns (PEFT cannot merge it either).
            let grouped = a.shape.len() > 2
                && a.shape.first() == Some(&r)
                && b.shape
                    .get(1)
                    .is_some_and(|&c| c > 0 && c < r && r % c == 0);
            if grouped {
                return Err(Error::tensor(
                    &weights_path,
                    &b.name,
                    format!(
                        "lora_B {:?} has r/groups = {} columns for rank {r}: module '{name}' is a grouped \
                         convolution, which cannot be merged (PEFT refuses too: \"Merging is not supported for \
                         _ConvNd layers with groups > 1\")",
                        b.shape, b.shape[1]
                    ),
                ));
            }
            if !per_expert && (a.shape.first() != Some(&r) || b.shape.get(1) != Some(&r)) {
                return Err(Error::tensor(
                    &weights_path,
                    &a.name,
                    format!(
                        "lora_A {:?} / lora_B {:?} do not have rank {r}, which adapter_config.json gives \
                         for module '{name}' (r / rank_pattern)",
                        a.shape, b.shape
                    ),
                ));
            }
            modules.push(LoraModule {
                name,
                a,
                b,
                b_bias: p.b_bias,
                magnitude: p.magnitude,
                embedding: p.embedding,
                r,
                scale,
            });
        }
        if modules.is_empty() && replacements.is_empty() && tokens.is_empty() {
            return Err(Error::format(&weights_path, "adapter holds no tensors"));
        }
        let tuner = lora_tokens(
            &files.config,
            &files.config_path,
            &weights_path,
            &tokens,
            &modules,
            &replacements,
        )?;
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            modules,
            replacements,
            training_only,
            tuner,
            tuned: tokens,
            shared: Default::default(),
            weight: None,
        })
    }

    /// The adapter's weights file, for messages.
    pub fn weights_path(&self) -> &Path {
        self.modules
            .first()
            .map(|m| m.a.file.path())
            .or_else(|| self.replacements.first().map(|r| r.tensor.file.path()))
            .or_else(|| {
                self.tuned
                    .iter()
                    .flat_map(|m| m.parts.values())
                    .next()
                    .map(|t| t.file.path())
            })
            .unwrap_or(&self.dir)
    }

    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.modules.iter().find(|m| m.name == name)
    }
}

/// The TrainableTokens part of a LoRA adapter (`trainable_token_indices`): its saved rows
/// (`tokens`) checked against the config, and refused where the order in which PEFT applies
/// them and another change to the same weight is not in the files.
fn lora_tokens(
    config: &serde_json::Value,
    config_path: &Path,
    weights_path: &Path,
    tokens: &[tuners::SavedModule],
    modules: &[LoraModule],
    replacements: &[Replacement],
) -> Result<Option<Box<dyn tuners::Tuner>>> {
    let field = config
        .get("trainable_token_indices")
        .filter(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        .filter(|v| v.as_object().is_none_or(|o| !o.is_empty()));
    let Some(field) = field else {
        return match tokens.first().and_then(|m| m.parts.values().next()) {
            Some(t) => Err(Error::tensor(
                weights_path,
                &t.name,
                "is a trainable-tokens delta, but adapter_config.json has no trainable_token_indices                  (which rows it replaces)",
            )),
            None => Ok(None),
        };
    };
    if tokens.is_empty() {
        return Err(Error::format(
            weights_path,
            "adapter_config.json sets trainable_token_indices, but the adapter holds no              '<module>.token_adapter.trainable_tokens_delta' (incomplete adapter)",
        ));
    }
    for m in tokens {
        let weight = format!("{}.weight", m.name);
        let clash = modules
            .iter()
            .any(|l| l.name == m.name)
            .then(|| format!("a LoRA on '{}'", m.name))
            .or_else(|| {
                replacements
                    .iter()
                    .find(|r| r.base_key == weight)
                    .map(|r| format!("a full copy '{}'", r.saved_key))
            });
        if let Some(other) = clash {
            let t = m.parts.values().next().map_or("", |t| t.name.as_str());
            return Err(Error::tensor(
                weights_path,
                t,
                format!(
                    "replaces rows of '{weight}', which {other} also changes; the order PEFT applies them in                      is not in the files, so lorastream does not merge both"
                ),
            ));
        }
    }
    tuners::trainable_tokens::lora_token_tuner(field, config_path).map(Some)
}

/// Opens an adapter of a non-LoRA tuner: its tuner file reads the config and says what
/// each saved key is.
fn open_tuned(dir: &Path, files: source::AdapterFiles, peft_type: String) -> Result<Adapter> {
    let path = &files.config_path;
    if let Some((_, why)) = tuners::NOT_MERGEABLE
        .iter()
        .find(|(t, _)| t.eq_ignore_ascii_case(&peft_type))
    {
        return Err(Error::format(
            path,
            format!("peft_type {peft_type} cannot be merged: {why}. Nothing was written."),
        ));
    }
    let Some(kind) = tuners::tuner_type(&peft_type) else {
        let known: Vec<&str> = tuners::TUNER_TYPES.iter().map(|t| t.peft_type).collect();
        return Err(Error::format(
            path,
            format!(
                "peft_type {peft_type} is not supported: lorastream merges LORA (incl. DoRA, rsLoRA and \
                 the LoRA variants) and {}; {peft_type} uses other merge math. Nothing was written.",
                known.join(", ")
            ),
        ));
    };
    let tuner = (kind.open)(&files.config, path)?;
    let config = LoraConfig::common_fields(&files.config, path)?;
    let weights_path = files.weights.path.clone();
    let mut tuned: Vec<tuners::SavedModule> = Vec::new();
    let mut shared = std::collections::BTreeMap::new();
    let mut replacements = Vec::new();
    for t in files.weights.tensors {
        // PEFT saves a tuner's shared tensors (VeRA's projections, VB-LoRA's vector bank) on
        // the tuner model itself, outside the wrapped model: `base_model.<name>`.
        if !t.name.starts_with(SAVED_PREFIX)
            && let Some(own) = t.name.strip_prefix(SHARED_PREFIX)
        {
            match tuner.classify(own) {
                tuners::SavedKey::Shared(name) => {
                    shared.insert(name.to_string(), t);
                    continue;
                }
                _ => {
                    return Err(Error::tensor(
                        &weights_path,
                        &t.name,
                        format!(
                            "is outside '{SAVED_PREFIX}' but not a shared tensor of {} (not saved by PEFT's \
                             save_pretrained for this peft_type?)",
                            tuner.name()
                        ),
                    ));
                }
            }
        }
        let rel = saved_rel(&weights_path, &t)?;
        match tuner.classify(&rel) {
            tuners::SavedKey::Part { module, part } => {
                let (module, part) = (module.to_string(), part.to_string());
                let idx = match tuned.iter().position(|m| m.name == module) {
                    Some(i) => i,
                    None => {
                        tuned.push(tuners::SavedModule {
                            name: module,
                            parts: Default::default(),
                        });
                        tuned.len() - 1
                    }
                };
                tuned[idx].parts.insert(part, t);
            }
            tuners::SavedKey::Shared(name) => {
                shared.insert(name.to_string(), t);
            }
            tuners::SavedKey::Full => replacements.push(Replacement::saved(rel, t)),
        }
    }
    if tuned.is_empty() && replacements.is_empty() {
        return Err(Error::format(&weights_path, "adapter holds no tensors"));
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        config,
        modules: Vec::new(),
        replacements,
        training_only: Vec::new(),
        tuner: Some(tuner),
        tuned,
        shared,
        weight: None,
    })
}

#[derive(Default)]
struct Parts {
    a: Option<TensorEntry>,
    b: Option<TensorEntry>,
    b_bias: Option<TensorEntry>,
    magnitude: Option<TensorEntry>,
    embedding: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    A,
    B,
    BBias,
    EmbA,
    EmbB,
    Magnitude,
}

/// BD-LoRA's compact factor [R, C] (`nblocks` blocks of R/nblocks rows) as the dense
/// block-diagonal [R, C·nblocks] PEFT merges with (`torch.block_diag(*w.chunk(n, 0))`):
/// block i's rows land in columns [i·C, (i+1)·C), zeros elsewhere. Factors are small, so
/// the dense form is made in memory, in the stored dtype (a copy of values and zeros).
fn block_diagonal(t: &TensorEntry, nblocks: usize) -> Result<TensorEntry> {
    let bad = |msg: String| Error::tensor(t.file.path(), &t.name, format!("BD-LoRA: {msg}"));
    let &[rows, cols] = t.shape.as_slice() else {
        return Err(bad(format!(
            "a block-diagonal factor is 2-D, not {:?}",
            t.shape
        )));
    };
    if nblocks == 0 || rows % nblocks != 0 {
        return Err(bad(format!(
            "{rows} rows do not split into nblocks = {nblocks} blocks"
        )));
    }
    let es = t.dtype.size();
    let wide = cols
        .checked_mul(nblocks)
        .filter(|w| {
            rows.checked_mul(*w)
                .and_then(|n| n.checked_mul(es))
                .is_some()
        })
        .ok_or_else(|| bad("too large".into()))?;
    let per = rows / nblocks;
    let src = t.bytes();
    let mut dense = vec![0u8; rows * wide * es];
    for i in 0..rows {
        let block = i / per;
        let from = &src[i * cols * es..(i + 1) * cols * es];
        let at = (i * wide + block * cols) * es;
        dense[at..at + cols * es].copy_from_slice(from);
    }
    TensorEntry::in_memory(t.file.path(), &t.name, t.dtype, vec![rows, wide], &dense)
}

/// The variant whose own (non-factor) tensor a saved key is, if any.
fn variant_key(rel: &str) -> Option<&'static str> {
    if rel.ends_with(".lora_diag") {
        Some("KaSA")
    } else if rel.ends_with(".lora_velora_embed") {
        Some("VeLoRA")
    } else if rel.contains(".lora_monteclora_sampler.") {
        Some("MonteCLoRA")
    } else {
        None
    }
}

/// Splits a saved key (prefix removed) into (module, LoRA part), or None for a full tensor.
fn classify(rel: &str) -> Option<(&str, Part)> {
    const SUFFIXES: [(&str, Part); 7] = [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_B.bias", Part::BBias),
        (".lora_embedding_A", Part::EmbA),
        (".lora_embedding_B", Part::EmbB),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_magnitude_vector.weight", Part::Magnitude),
    ];
    SUFFIXES
        .iter()
        .find_map(|(s, p)| rel.strip_suffix(s).map(|m| (m, *p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_entry(name: &str, shape: &[usize]) -> TensorEntry {
        let n: usize = shape.iter().product();
        TensorEntry::in_memory(
            Path::new("a"),
            name,
            crate::dtype::Dtype::F32,
            shape.to_vec(),
            &vec![0u8; n * 4],
        )
        .unwrap()
    }

    #[test]
    fn lora_trainable_tokens_need_their_config_and_refuse_a_second_change() {
        let cfg = serde_json::json!({"trainable_token_indices": {"emb": [0, 1]}});
        let p = Path::new("adapter_config.json");
        let w = Path::new("adapter_model.safetensors");
        let tokens = vec![tuners::SavedModule {
            name: "emb".into(),
            parts: [(
                tuners::trainable_tokens::PART.to_string(),
                f32_entry(
                    "base_model.model.emb.token_adapter.trainable_tokens_delta",
                    &[2, 4],
                ),
            )]
            .into(),
        }];
        let t = lora_tokens(&cfg, p, w, &tokens, &[], &[]).unwrap().unwrap();
        assert_eq!(t.name(), "LoRA trainable tokens");
        // Saved rows without the config field, and the field without saved rows.
        let e = lora_tokens(&serde_json::json!({}), p, w, &tokens, &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token_adapter.trainable_tokens_delta")
                && e.contains("no trainable_token_indices"),
            "{e}"
        );
        let e = lora_tokens(&cfg, p, w, &[], &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("incomplete adapter"), "{e}");
        assert!(
            lora_tokens(&serde_json::json!({}), p, w, &[], &[], &[])
                .unwrap()
                .is_none()
        );
        // A LoRA on the same embedding: which PEFT applies first is not in the files.
        let lora = LoraModule {
            name: "emb".into(),
            a: f32_entry("base_model.model.emb.lora_embedding_A", &[1, 3]),
            b: f32_entry("base_model.model.emb.lora_embedding_B", &[4, 1]),
            b_bias: None,
            magnitude: None,
            embedding: true,
            r: 1,
            scale: 1.0,
        };
        let e = lora_tokens(&cfg, p, w, &tokens, &[lora], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("emb.weight") && e.contains("a LoRA on 'emb'"),
            "{e}"
        );
        let copy = Replacement {
            base_key: "emb.weight".into(),
            saved_key: "emb.weight".into(),
            tensor: f32_entry("base_model.model.emb.weight", &[3, 4]),
        };
        let e = lora_tokens(&cfg, p, w, &tokens, &[], &[copy])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a full copy 'emb.weight'"), "{e}");
    }

    #[test]
    fn classifies_saved_keys() {
        assert_eq!(
            classify("model.layers.0.q_proj.lora_A.weight"),
            Some(("model.layers.0.q_proj", Part::A))
        );
        assert_eq!(
            classify("model.embed_tokens.lora_embedding_B"),
            Some(("model.embed_tokens", Part::EmbB))
        );
        assert_eq!(
            classify("c1.lora_magnitude_vector"),
            Some(("c1", Part::Magnitude))
        );
        assert_eq!(classify("q.lora_B.bias"), Some(("q", Part::BBias)));
        assert_eq!(classify("lm_head.base_layer.weight"), None);
        assert_eq!(classify("lm_head.weight"), None);
        assert_eq!(variant_key("q.lora_diag"), Some("KaSA"));
        assert_eq!(variant_key("q.lora_velora_embed"), Some("VeLoRA"));
        assert_eq!(
            variant_key("q.lora_monteclora_sampler.std_prior"),
            Some("MonteCLoRA")
        );
        assert_eq!(variant_key("q.lora_A.weight"), None);
    }

    #[test]
    fn block_diagonal_factors_expand_like_torch_block_diag() {
        // [[1 2] [3 4] [5 6] [7 8]] in 2 blocks -> [[1 2 0 0] [3 4 0 0] [0 0 5 6] [0 0 7 8]]
        let v: Vec<f32> = (1..=8).map(|x| x as f32).collect();
        let t = TensorEntry::in_memory(
            Path::new("a"),
            "w",
            crate::Dtype::F32,
            vec![4, 2],
            bytemuck::cast_slice(&v),
        )
        .unwrap();
        let d = block_diagonal(&t, 2).unwrap();
        assert_eq!(d.shape, [4, 4]);
        let got: Vec<f32> = d
            .bytes()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let want = [
            1., 2., 0., 0., 3., 4., 0., 0., 0., 0., 5., 6., 0., 0., 7., 8.,
        ];
        assert_eq!(got, want);
        assert!(block_diagonal(&t, 3).is_err());
    }
}
