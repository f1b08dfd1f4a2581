//! Fuzz target: the pickle machine alone on raw `data.pkl` bytes: loading, then dropping
//! whatever it built (deep or shared structures must drop without overflowing the stack).
//! Walking the value is left to the `torch_pickle` target, which goes through the real
//! flattening of a state dict.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let v = lorastream::source::pickle::load(data);
    drop(std::hint::black_box(v));
});
