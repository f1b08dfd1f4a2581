//! Fuzz target: a PyTorch zip checkpoint as raw bytes (zip directory, local headers, the
//! pickle inside, storage records) read by `source::open`, every tensor touched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream_fuzz::{exercise, put, scratch};

fuzz_target!(|data: &[u8]| {
    let dir = scratch("torch_zip");
    let path = put(&dir, "model.pth", data);
    if let Ok(ckpt) = lorastream::source::open(&path) {
        exercise(&ckpt);
    }
});
