//! Which file names hold weights. Shared by the sources (a model folder's other files,
//! config and tokenizer, are copied beside a folder output) and the sinks (an output
//! folder that already holds a checkpoint is refused unless overwriting).

/// Whether a file name is a checkpoint (weights, or the index of sharded weights) in one of
/// the formats HF and PyTorch folders carry: safetensors, PyTorch pickles/zips, TF/Flax,
/// GGUF, ONNX, rust-bert, NumPy, TFLite. Everything else in a model folder (config, tokenizer, chat template,
/// custom code, README) describes or accompanies the weights.
pub fn is_weight_file(name: &str) -> bool {
    const EXTENSIONS: [&str; 14] = [
        ".safetensors",
        ".bin",
        ".pth",
        ".pt",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".onnx",
        ".onnx_data",
        ".ot",
        ".npz",
        ".tflite",
        ".index.json",
    ];
    let lower = name.to_ascii_lowercase();
    EXTENSIONS.iter().any(|e| lower.ends_with(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_indexes_are_weight_files() {
        for n in [
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
            "consolidated.00.pth",
            "tf_model.h5",
            "flax_model.msgpack",
        ] {
            assert!(is_weight_file(n), "{n}");
        }
        for n in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
            "modeling_x.py",
            "README.md",
        ] {
            assert!(!is_weight_file(n), "{n}");
        }
    }
}
