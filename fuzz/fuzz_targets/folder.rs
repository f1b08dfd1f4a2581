//! Fuzz target: folder layout. The input describes a small folder — entries
//! `name \0 content \0`, at most 8, names cut to 64 bytes of `[A-Za-z0-9._-]` with at most
//! one `/` (a `checkpoint-N/` subfolder, say) — where a content of `@st`, `@pth`, `@bin`,
//! `@acfg`, `@cfg`, `@gptq` or `@awq` stands for a real fixture file (a safetensors model, a
//! torch zip, an adapter's .bin, an adapter_config.json, a model config.json, a GPTQ or AWQ
//! packed model, whose config.json the seeds give inline). Every way the CLI reads
//! a folder is tried on it: as a checkpoint, as an adapter, its config and side files, and
//! each file in it as a checkpoint and as `--lora` path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream::adapter::Adapter;
use lorastream::source;
use lorastream_fuzz::{exercise, fixtures, put, scratch};
use std::hint::black_box;

fn clean_name(raw: &[u8]) -> Option<String> {
    let mut name: String = raw
        .iter()
        .take(64)
        .map(|&b| b as char)
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        .collect();
    // One level of subfolder at most; no empty, `.` or `..` parts (they would leave the folder).
    if name.matches('/').count() > 1 {
        name = name.replacen('/', "_", name.matches('/').count() - 1);
    }
    let ok = name
        .split('/')
        .all(|part| !part.is_empty() && part != "." && part != "..");
    ok.then_some(name)
}

fn content(raw: &[u8]) -> &[u8] {
    match raw {
        b"@st" => fixtures::ST,
        b"@pth" => fixtures::PTH,
        b"@bin" => fixtures::ADAPTER_BIN,
        b"@acfg" => fixtures::ADAPTER_CONFIG,
        b"@cfg" => fixtures::CONFIG,
        b"@gptq" => fixtures::GPTQ_ST,
        b"@awq" => fixtures::AWQ_ST,
        other => other,
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch("folder");
    let mut files = Vec::new();
    let mut parts = data.split(|&b| b == 0);
    while let (Some(name), Some(body)) = (parts.next(), parts.next()) {
        if files.len() == 8 {
            break;
        }
        let Some(name) = clean_name(name) else {
            continue;
        };
        // A name that is already a folder (or under a file) cannot be written: skip it.
        let p = dir.join(&name);
        if p.is_dir() || p.parent().is_some_and(|d| d.is_file()) {
            continue;
        }
        files.push(put(&dir, &name, content(body)));
    }
    if let Ok(ckpt) = source::open(&dir) {
        exercise(&ckpt);
    }
    if let Ok(a) = source::open_adapter(&dir) {
        exercise(&a.weights);
    }
    let _ = black_box(Adapter::open(&dir));
    let _ = black_box(source::model_config(&dir));
    let _ = black_box(source::model_folder_files(&dir));
    for f in &files {
        if let Ok(ckpt) = source::open(f) {
            exercise(&ckpt);
        }
        let (lora_dir, _) = source::adapter_dir(f);
        let _ = black_box(Adapter::open(&lora_dir));
        let _ = black_box(source::model_config(f));
    }
});
