"""What llama.cpp's convert_hf_to_gguf.py does to an HF causal LM of the architectures
lorastream merges adapters into, reduced to the tensors and the metadata the merge reads.

Read from ggml-org/llama.cpp, convert_hf_to_gguf.py at commit
0024aa7417efd50a7c2a79e049dfbbbceb0beaaf (names: the installed gguf-py 0.19's
TensorNameMap, the same tables as that commit's gguf-py/gguf/tensor_mapping.py):

- ModelBase.prepare_tensors: tensors in the order the safetensors file lists them (a tied
  lm_head is not saved, so not converted); dtypes other than f16/f32 → f32; 1-D tensors
  and names ending in `_norm.weight` → F32; every other tensor in the --outtype
  (F32/F16/BF16/Q8_0) by gguf.quants.quantize, falling back to F16 on QuantError.
- TextModel.modify_tensors → ModelBase.map_tensor_name: the gguf-py name, nothing else.
- LlamaModel (LlamaForCausalLM, MistralForCausalLM → arch llama): q_proj weight/bias rows
  `LlamaModel.permute(w, n_head, n_head)`, k_proj `(w, n_head, n_head_kv)`.
- Qwen2Model, Qwen3Model: the name only (multimodal prefixes skipped; not in these models).
- GemmaModel, Gemma2Model: `lm_head.weight` skipped; `*norm.weight` + 1.
- Gemma3Model: `language_model.` dropped; `*norm.weight` + 1 (norm_shift); token_embd cut
  to the tokenizer's vocabulary (these models have no tokenizer: all rows kept, as a
  tokenizer of vocab_size tokens would give).
- set_gguf_parameters: block count, context/embedding/feed-forward length, head counts,
  rms eps, key/value length, file type (the tokenizer is stood in for by a short list).

Tested against the real thing: the merge is compared with this reduction of the model
PEFT's merge_and_unload() returns, both read back with gguf's GGUFReader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, LlamaFileType, quants

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

FILE_TYPE = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16,
             T.BF16: LlamaFileType.MOSTLY_BF16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0}


def llama_permute(w, n_head: int, n_head_kv: int | None):
    """`LlamaModel.permute` of convert_hf_to_gguf.py, verbatim in numpy/torch terms."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


@dataclass
class Case:
    """One architecture: the transformers model and config, the PEFT LoRA trained on it,
    and the converter's handling of its tensors."""
    key: str
    gguf_arch: str
    model: str
    config_class: str
    config_kw: dict
    seed: int
    lora: dict = field(default_factory=lambda: dict(r=4, lora_alpha=8, target_modules=LINEAR))
    n_targets: int = 2 * len(LINEAR)

    # Builds the config instead of `config_kw` (the multimodal Gemma 3).
    make_config: object = None

    def cls(self):
        import transformers
        return getattr(transformers, self.model)

    def config(self):
        import transformers
        common = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      max_position_embeddings=64)
        if self.make_config is not None:
            return self.make_config(common)
        return getattr(transformers, self.config_class)(**{**common, **self.config_kw})

    def text_config(self):
        cfg = self.config()
        return getattr(cfg, "text_config", None) or cfg

    def tensor_map(self):
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.gguf_arch]
        return gguf.get_tensor_name_map(arch, self.text_config().num_hidden_layers)

    def skip(self, name: str) -> bool:
        if self.gguf_arch == "gemma3" and name.startswith(
                ("multi_modal_projector.", "vision_tower.", "multimodal_projector.", "vision_model.")):
            return True  # Gemma3Model: vision tensors go to the mmproj file
        return self.gguf_arch in ("gemma", "gemma2") and name == "lm_head.weight"

    def gguf_name(self, name: str) -> str:
        if self.gguf_arch == "gemma3":
            name = name.replace("language_model.", "")
        new = self.tensor_map().get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        return new

    def reduce_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The values the converter writes for HF tensor `name` (before the type)."""
        cfg = self.text_config()
        if self.gguf_arch == "llama":
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = llama_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
            if name.endswith(("k_proj.weight", "k_proj.bias")):
                t = llama_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        if self.gguf_arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        return t

    def targets(self, name: str) -> bool:
        """Whether the adapter changes HF weight `name`."""
        mods = self.lora["target_modules"]
        if isinstance(mods, str):  # a regex: the linear layers of the text model
            mods = LINEAR
        return not self.skip(name) and any(name.endswith(f".{m}.weight") or name == f"{m}.weight"
                                           for m in mods)


ARCHS = {c.key: c for c in [
    # GQA: k rows permuted with 2 heads, q with 4.
    Case("llama", "llama", "LlamaForCausalLM", "LlamaConfig",
         dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), seed=0),
    # Mistral converts as llama; one kv head; rsLoRA scale.
    Case("mistral", "llama", "MistralForCausalLM", "MistralConfig",
         dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False), seed=1,
         lora=dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LINEAR)),
    # q/k/v biases (not targeted); rank and alpha patterns, matched on HF names.
    Case("qwen2", "qwen2", "Qwen2ForCausalLM", "Qwen2Config",
         dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), seed=2,
         lora=dict(r=4, lora_alpha=8, target_modules=LINEAR,
                   rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 5})),
    # head_dim apart from hidden/heads; q_norm/k_norm.
    Case("qwen3", "qwen3", "Qwen3ForCausalLM", "Qwen3Config",
         dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False), seed=3),
    # Tied embeddings (no output.weight written), one kv head.
    Case("gemma", "gemma", "GemmaForCausalLM", "GemmaConfig",
         dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32), seed=4),
    Case("gemma2", "gemma2", "Gemma2ForCausalLM", "Gemma2Config",
         dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32), seed=5),
    Case("gemma3", "gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig",
         dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32), seed=6),
    # Gemma3ForConditionalGeneration (a SigLIP tower too): its text model converts as
    # gemma3; the LoRA targets the text model's linear layers only.
    Case("gemma3mm", "gemma3", "Gemma3ForConditionalGeneration", "Gemma3Config", {}, seed=7,
         lora=dict(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
         make_config=lambda common: __import__("transformers").Gemma3Config(
             text_config=__import__("transformers").Gemma3TextConfig(
                 **common, num_attention_heads=4, num_key_value_heads=2, head_dim=32).to_dict(),
             vision_config=__import__("transformers").SiglipVisionConfig(
                 hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 image_size=28, patch_size=14).to_dict(),
             mm_tokens_per_image=4, image_token_index=63, boi_token_index=61, eoi_token_index=62)),
]}


def hf_to_gguf(case: Case, state: dict, path, qtype, arch: str | None = None) -> None:
    """The reduction: `state` (HF names, f32, as save_pretrained wrote it) written as the
    GGUF convert_hf_to_gguf.py --outtype `qtype` makes; `arch` overrides
    general.architecture (to make GGUFs lorastream must refuse)."""
    cfg = case.text_config()
    w = GGUFWriter(str(path), arch or case.gguf_arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_file_type(FILE_TYPE[qtype])
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(cfg.vocab_size)])
    for name, t in state.items():
        if case.skip(name):
            continue
        new = case.gguf_name(name)
        data = case.reduce_tensor(name, t.float()).numpy()
        qt = T.F32 if data.ndim <= 1 or new.endswith("_norm.weight") else qtype
        try:
            raw = quants.quantize(np.ascontiguousarray(data), qt)
        except gguf.QuantError:
            qt = T.F16
            raw = quants.quantize(np.ascontiguousarray(data), qt)
        w.add_tensor(new, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
