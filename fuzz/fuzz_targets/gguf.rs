//! Fuzz target: a GGUF file (header, metadata of every type, tensor infos, alignment,
//! offsets) read by `source::open` and every tensor's bytes touched (quantized blocks
//! decoded), plus the parser on its own and the metadata as `inspect` shows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream_fuzz::{exercise, put, scratch};

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = lorastream::source::gguf::parse(data, std::path::Path::new("f.gguf")) {
        let _ = g.metadata_json(16);
        for t in &g.tensors {
            assert!(t.start + t.nbytes <= data.len());
        }
    }
    let dir = scratch("gguf");
    let path = put(&dir, "model.gguf", data);
    if let Ok(ckpt) = lorastream::source::open(&path) {
        exercise(&ckpt);
    }
});
