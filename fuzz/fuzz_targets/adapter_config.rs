//! Fuzz target: `adapter_config.json` text. Parsed as `LoraConfig` directly (then asked
//! the questions a merge asks of it), and as part of a real adapter folder next to a
//! fixture's `adapter_model.safetensors`, through `Adapter::open`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream::adapter::{Adapter, LoraConfig};
use lorastream_fuzz::{fixtures, put, scratch};
use std::hint::black_box;
use std::path::Path;

/// Module and parameter names a merge asks about (Llama and GPT-2 style).
const MODULES: [&str; 5] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "transformer.h.0.attn.c_attn",
    "lm_head",
    "model.embed_tokens",
];

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(cfg) = LoraConfig::from_json(&v, Path::new("adapter_config.json"))
    {
        for m in MODULES {
            black_box(cfg.rank_and_scale(m));
            black_box(cfg.saves_module(m));
            black_box(cfg.targets_parameter(&format!("{m}.weight")));
            if let Some(bd) = &cfg.bdlora {
                let _ = black_box(bd.factor_of(m));
            }
        }
    }
    let dir = scratch("adapter_config");
    put(&dir, "adapter_config.json", data);
    put(&dir, "adapter_model.safetensors", fixtures::ADAPTER_ST);
    if let Ok(a) = Adapter::open(&dir) {
        for m in MODULES {
            black_box(a.module(m).is_some());
        }
    }
});
