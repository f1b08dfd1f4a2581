//! A PEFT adapter trained on the HF model, planned against the GGUF that llama.cpp's
//! `convert_hf_to_gguf.py` made of that model: the adapter's HF module names are renamed
//! to the GGUF's tensor names here, in the plan (no copy of the adapter is written), and
//! the rows of q/k `lora_B` permuted as the converter permuted the base's rows
//! (P(W + sBA) = PW + s(PB)A).
//!
//! What the converter does to each LoRA-targetable weight, per architecture (read from
//! ggml-org/llama.cpp `convert_hf_to_gguf.py` and `gguf-py/gguf/tensor_mapping.py`, commit
//! 0024aa7417efd50a7c2a79e049dfbbbceb0beaaf; the names checked against gguf-py 0.19):
//!
//! - every architecture below: q/k/v/o_proj → `blk.N.attn_q|attn_k|attn_v|attn_output`,
//!   gate/up/down_proj → `blk.N.ffn_gate|ffn_up|ffn_down`, `lm_head` → `output`,
//!   `embed_tokens` → `token_embd`; values as they are (cast to the output type), no
//!   transpose, no fused qkv or gate_up (TextModel.modify_tensors maps the name only).
//! - `llama` (LlamaModel: LlamaForCausalLM, MistralForCausalLM, …): q_proj rows permuted
//!   with `LlamaModel.permute(w, n_head, n_head)`, k_proj with `(w, n_head, n_head_kv)`
//!   (biases likewise). The head counts are the GGUF's `llama.attention.head_count[_kv]`,
//!   which the converter writes from the same config fields.
//! - `qwen2` (Qwen2Model), `qwen3` (Qwen3Model): no permutation; q/k/v biases (Qwen2) and
//!   q_norm/k_norm (Qwen3) are 1-D tensors no LoRA here touches.
//! - `gemma`, `gemma2` (GemmaModel, Gemma2Model): `lm_head.weight` is skipped (never
//!   written: llama.cpp uses token_embd as the output head); norms get +1.
//! - `gemma3` (Gemma3Model, also for Gemma3ForConditionalGeneration): `language_model.`
//!   dropped from names (so adapters of the multimodal model map too; vision modules go
//!   to the mmproj file and are refused), token_embd cut to the tokenizer's vocabulary,
//!   norms +1; `output` written only when not tied.
//!
//! So a LoRA on q/k/v/o/gate/up/down (and lm_head where the GGUF has `output.weight`)
//! merges exactly; embedding LoRAs, lora_bias, DoRA and every other form are refused here
//! by name, as is an adapter module the GGUF holds no tensor for (a tied lm_head, say).

use crate::adapter::{Adapter, Variant};
use crate::error::{Error, Result};
use crate::plan::component::Component;
use crate::source::gguf::{GgufFile, Value};
use crate::source::{Checkpoint, TensorEntry};
use std::path::Path;

/// How the HF names and rows of one GGUF architecture map to the GGUF's.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufNaming {
    pub arch: String,
    /// `{arch}.attention.head_count` and `head_count_kv`.
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Whether q_proj/k_proj rows were permuted by the converter (arch `llama`).
    pub permute_qk: bool,
}

/// Architectures whose adapter merge the compat tests prove against the converter's
/// reduction applied to PEFT's merged model (tests/compat/test_gguf.py); every other
/// architecture is refused by name.
pub const ARCHS: [&str; 6] = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"];

/// Per-layer modules: HF suffix (after `model.layers.N.`) → GGUF name (after `blk.N.`).
const LAYER: [(&str, &str); 7] = [
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

impl GgufNaming {
    /// The naming of base GGUF `g` (read from `path`): its architecture must be one of
    /// [`ARCHS`], with head counts when its q/k rows were permuted.
    pub fn of(g: &GgufFile, path: &Path) -> Result<GgufNaming> {
        let arch = g
            .architecture()
            .ok_or_else(|| Error::format(path, "GGUF has no general.architecture string"))?
            .to_string();
        if !ARCHS.contains(&arch.as_str()) {
            return Err(Error::format(
                path,
                format!(
                    "merging a PEFT adapter into a GGUF of architecture '{arch}' is not supported: lorastream \
                     supports {} (the architectures whose HF → GGUF conversion it reproduces and tests); merge \
                     into the HF model instead and convert it with llama.cpp's convert_hf_to_gguf.py",
                    ARCHS.join(", ")
                ),
            ));
        }
        let count = |k: &str| -> Option<usize> {
            match g.get(&format!("{arch}.attention.{k}"))? {
                Value::U32(v) => Some(*v as usize),
                Value::I32(v) if *v > 0 => Some(*v as usize),
                Value::U64(v) => usize::try_from(*v).ok(),
                _ => None,
            }
        };
        let n_head = count("head_count").unwrap_or(0);
        let n_head_kv = count("head_count_kv").unwrap_or(n_head);
        let permute_qk = arch == "llama";
        if permute_qk && n_head == 0 {
            return Err(Error::format(
                path,
                format!(
                    "{arch}.attention.head_count is missing (or not one number): the q/k row order the \
                     converter chose cannot be known"
                ),
            ));
        }
        Ok(GgufNaming {
            arch,
            n_head,
            n_head_kv,
            permute_qk,
        })
    }
}

/// [`hf_module_to_gguf`] for architecture `arch`: Gemma3Model first drops every
/// `language_model.` from the name (Gemma3ForConditionalGeneration's text model:
/// `model.language_model.layers.N…` → `model.layers.N…`; its vision tower goes to the
/// mmproj file, so those modules stay without a name).
pub fn hf_module_to_gguf_in(arch: &str, module: &str) -> Option<String> {
    if arch == "gemma3" {
        return hf_module_to_gguf(&module.replace("language_model.", ""));
    }
    hf_module_to_gguf(module)
}

/// The GGUF tensor prefix of an HF module path (`model.layers.3.self_attn.q_proj` →
/// `blk.3.attn_q`, `lm_head` → `output`); None for modules outside the table.
pub fn hf_module_to_gguf(module: &str) -> Option<String> {
    if module == "lm_head" {
        return Some("output".into());
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (n, suffix) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let g = LAYER.iter().find(|(h, _)| *h == suffix)?.1;
    Some(format!("blk.{n}.{g}"))
}

/// Whether module `gguf` (a GGUF prefix) had its rows permuted, and with how many heads.
pub fn permuted_heads(n: &GgufNaming, gguf: &str) -> Option<usize> {
    if !n.permute_qk {
        return None;
    }
    if gguf.ends_with(".attn_q") {
        Some(n.n_head)
    } else if gguf.ends_with(".attn_k") {
        Some(n.n_head_kv)
    } else {
        None
    }
}

/// `LlamaModel.permute` as a row map: row `r` of the result is row `map[r]` of the input
/// (`reshape(heads, 2, rows/heads/2, …).swapaxes(1, 2).reshape(rows, …)`). None when the
/// rows do not split into `heads` heads of an even size.
pub fn llama_permutation(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let half = rows / heads / 2;
    let mut map = Vec::with_capacity(rows);
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                map.push(h * 2 * half + j * half + i);
            }
        }
    }
    Some(map)
}

/// The adapters of every component renamed for the GGUF base they merge into (see the
/// module comment). The GGUF is its own config: a `config.json` beside it is not read.
pub fn components_to_gguf(comps: &mut [Component], naming: &GgufNaming) -> Result<()> {
    for c in comps.iter_mut() {
        c.model_config = None;
        let Some(base) = &c.base else { continue };
        for ad in &mut c.adapters {
            adapter_to_gguf(ad, naming, base)?;
        }
    }
    Ok(())
}

/// One adapter's modules renamed from HF to `base`'s GGUF names, q/k `lora_B` rows
/// permuted in memory where the converter permuted the base's. Refusals name the adapter
/// file, the HF module and (where there is one) the GGUF tensor.
pub fn adapter_to_gguf(ad: &mut Adapter, naming: &GgufNaming, base: &Checkpoint) -> Result<()> {
    let config_path = ad.config.path.clone();
    let refuse = |what: String| {
        Err(Error::format(
            &config_path,
            format!(
                "{what}: merging into a GGUF supports plain LoRA adapters (lora_A/lora_B on linear layers); \
                 merge into the HF model instead and convert it with convert_hf_to_gguf.py"
            ),
        ))
    };
    if ad.tuner.is_some() {
        return refuse(format!("peft_type {}", ad.kind()));
    }
    let cfg = &ad.config;
    let set = [
        ("use_dora", cfg.use_dora),
        ("fan_in_fan_out", cfg.fan_in_fan_out),
        ("modules_to_save", !cfg.modules_to_save.is_empty()),
        ("target_parameters", !cfg.target_parameters.is_empty()),
        ("use_bdlora", cfg.bdlora.is_some()),
        ("trainable_token_indices", !ad.tuned.is_empty()),
    ];
    if let Some((k, _)) = set.iter().find(|(_, on)| *on) {
        return refuse(format!("adapter_config.json sets {k}"));
    }
    if cfg.variant != Variant::Plain {
        return refuse(format!("a {:?} LoRA variant", cfg.variant));
    }
    if let Some(r) = ad.replacements.first() {
        // PEFT saves these for modules_to_save and, when lm_head or an embedding is targeted,
        // for save_embedding_layers: their HF values would replace the GGUF's own tensor.
        return refuse(format!(
            "the adapter saves a full copy of '{}' as '{}' (modules_to_save, or PEFT's \
             save_embedding_layers when lm_head/embed_tokens is targeted; save it with \
             save_pretrained(..., save_embedding_layers=False) if the copy is the unchanged base weight)",
            r.base_key, r.saved_key
        ));
    }
    if let Some(t) = ad.training_only.first() {
        return refuse(format!("the adapter saves training state '{}'", t.name));
    }
    for m in &mut ad.modules {
        let weights = m.a.file.path().to_path_buf();
        let bad = |msg: String| Error::tensor(&weights, &m.a.name, msg);
        if m.embedding {
            return Err(bad(format!(
                "module '{}' is an Embedding LoRA; merging into a GGUF supports LoRA on linear layers \
                 (q/k/v/o/gate/up/down_proj, lm_head)",
                m.name
            )));
        }
        if m.b_bias.is_some() {
            return Err(bad(format!(
                "module '{}' has a lora_B bias (lora_bias=True), which merging into a GGUF does not support",
                m.name
            )));
        }
        let g = hf_module_to_gguf_in(&naming.arch, &m.name).ok_or_else(|| {
            bad(format!(
                "HF module '{}' has no GGUF tensor lorastream knows for architecture {} (it maps \
                 model.layers.N.self_attn.{{q,k,v,o}}_proj, model.layers.N.mlp.{{gate,up,down}}_proj and lm_head)",
                m.name, naming.arch
            ))
        })?;
        let key = format!("{g}.weight");
        if !base.tensors.iter().any(|t| t.name == key) {
            let why = if m.name == "lm_head" {
                " (convert_hf_to_gguf.py writes no output.weight when the embeddings are tied, and never for \
                 gemma/gemma2: llama.cpp then uses token_embd.weight as the output head, which this merge \
                 does not change)"
            } else {
                ""
            };
            return Err(bad(format!(
                "HF module '{}' maps to GGUF tensor '{key}', which {} does not hold{why}",
                m.name,
                base.path.display()
            )));
        }
        if let Some(heads) = permuted_heads(naming, &g) {
            let rows = m.b.shape.first().copied().unwrap_or(0);
            let map = llama_permutation(rows, heads).ok_or_else(|| {
                Error::tensor(
                    &weights,
                    &m.b.name,
                    format!(
                        "lora_B of HF module '{}' (GGUF '{key}') has {rows} rows, which do not split into \
                         {heads} heads of an even size as llama.cpp's q/k permutation needs",
                        m.name
                    ),
                )
            })?;
            m.b = permute_rows(&m.b, &map)?;
        }
        m.name = g;
    }
    Ok(())
}

/// The GGUF tensors `ad` (trained on the HF model) changes in `base`, after the same
/// renaming and checks the plan applies ([`adapter_to_gguf`]).
pub fn merged_tensors(
    mut ad: Adapter,
    naming: &GgufNaming,
    base: &Checkpoint,
) -> Result<std::collections::HashSet<String>> {
    adapter_to_gguf(&mut ad, naming, base)?;
    Ok(ad
        .modules
        .iter()
        .map(|m| format!("{}.weight", m.name))
        .collect())
}

/// `t` with row `r` taken from row `map[r]`, made in memory (named and placed as `t`).
fn permute_rows(t: &TensorEntry, map: &[usize]) -> Result<TensorEntry> {
    let src = t.bytes();
    let row = src.len() / map.len().max(1);
    let mut out = vec![0u8; src.len()];
    for (r, &from) in map.iter().enumerate() {
        out[r * row..(r + 1) * row].copy_from_slice(&src[from * row..(from + 1) * row]);
    }
    TensorEntry::in_memory(t.file.path(), &t.name, t.dtype, t.shape.clone(), &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            hf_module_to_gguf("model.layers.12.self_attn.q_proj").as_deref(),
            Some("blk.12.attn_q")
        );
        assert_eq!(
            hf_module_to_gguf("model.layers.0.mlp.down_proj").as_deref(),
            Some("blk.0.ffn_down")
        );
        assert_eq!(hf_module_to_gguf("lm_head").as_deref(), Some("output"));
        assert_eq!(hf_module_to_gguf("model.layers.x.mlp.up_proj"), None);
        assert_eq!(hf_module_to_gguf("model.layers.0.mlp.fc1"), None);
        assert_eq!(hf_module_to_gguf("model.embed_tokens"), None);
        let mm = "model.language_model.layers.1.mlp.up_proj";
        assert_eq!(
            hf_module_to_gguf_in("gemma3", mm).as_deref(),
            Some("blk.1.ffn_up")
        );
        assert_eq!(hf_module_to_gguf_in("qwen2", mm), None);
        let vision = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj";
        assert_eq!(hf_module_to_gguf_in("gemma3", vision), None);
    }

    /// The map equals numpy's reshape/swapaxes/reshape on row indices: 2 heads of 6 rows.
    #[test]
    fn permutation_interleaves_halves_per_head() {
        let m = llama_permutation(12, 2).unwrap();
        assert_eq!(m, vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        assert!(llama_permutation(10, 2).is_none());
        assert!(llama_permutation(12, 0).is_none());
        let n = GgufNaming {
            arch: "llama".into(),
            n_head: 4,
            n_head_kv: 2,
            permute_qk: true,
        };
        assert_eq!(permuted_heads(&n, "blk.0.attn_q"), Some(4));
        assert_eq!(permuted_heads(&n, "blk.0.attn_k"), Some(2));
        assert_eq!(permuted_heads(&n, "blk.0.attn_v"), None);
        let q = GgufNaming {
            arch: "qwen2".into(),
            permute_qk: false,
            ..n
        };
        assert_eq!(permuted_heads(&q, "blk.0.attn_q"), None);
    }

    #[test]
    fn rows_are_permuted_in_memory() {
        let bytes: Vec<u8> = (0u8..12).collect();
        let t = TensorEntry::in_memory(
            Path::new("a.safetensors"),
            "b",
            crate::dtype::Dtype::F16,
            vec![3, 2],
            &bytes,
        )
        .unwrap();
        let p = permute_rows(&t, &[2, 0, 1]).unwrap();
        assert_eq!(&p.bytes()[..], &[8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!((p.name.as_str(), p.shape.clone()), ("b", vec![3, 2]));
    }
}
