//! HF ↔ GGUF tensor names for the llama-family architectures, and the row permutation
//! llama.cpp's `convert_hf_to_gguf.py` applies to q_proj/k_proj of `llama` models
//! (`LlamaModel.permute`), so a PEFT adapter trained on the HF model can be merged into the
//! GGUF made from it: its modules are renamed to the GGUF's tensors, and the rows of its
//! q/k `lora_B` permuted as the base's rows were (P(W + BA) = PW + (PB)A).
//!
//! The names are gguf-py's `tensor_mapping.py` entries for these modules (the same for
//! llama/Mistral, Qwen2, Qwen3 and Gemma 1-3); only `llama` permutes.

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

/// Architectures whose linear layers use the names below.
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
    }
}
