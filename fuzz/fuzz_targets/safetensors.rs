//! Fuzz target: a safetensors file (header length, JSON header, offsets) read by
//! `source::open` and every tensor's bytes touched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream_fuzz::{exercise, put, scratch};

fuzz_target!(|data: &[u8]| {
    let dir = scratch("safetensors");
    let path = put(&dir, "model.safetensors", data);
    if let Ok(ckpt) = lorastream::source::open(&path) {
        exercise(&ckpt);
    }
});
