//! Fuzz target: a sharded checkpoint's `*.index.json`. The input is the index text,
//! written next to two real safetensors shards and two real torch `.bin` shards (from
//! fixtures/io), and opened both as a file and as the model folder holding it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream_fuzz::{exercise, fixtures, put, scratch};

fuzz_target!(|data: &[u8]| {
    let dir = scratch("index");
    put(
        &dir,
        "model-00001-of-00002.safetensors",
        fixtures::SHARD_ST_1,
    );
    put(
        &dir,
        "model-00002-of-00002.safetensors",
        fixtures::SHARD_ST_2,
    );
    put(
        &dir,
        "pytorch_model-00001-of-00002.bin",
        fixtures::SHARD_BIN_1,
    );
    put(
        &dir,
        "pytorch_model-00002-of-00002.bin",
        fixtures::SHARD_BIN_2,
    );
    put(&dir, "config.json", fixtures::CONFIG);
    let index = put(&dir, "model.safetensors.index.json", data);
    if let Ok(ckpt) = lorastream::source::open(&index) {
        exercise(&ckpt);
    }
    if let Ok(ckpt) = lorastream::source::open(&dir) {
        exercise(&ckpt);
    }
    let _ = std::hint::black_box(lorastream::source::model_folder_files(&index));
});
