//! Fuzz target: the input is a `data.pkl`, wrapped into a well-formed torch zip
//! (`archive/data.pkl`, `archive/version`, storages `data/0`..`data/7` of 0 to 4096
//! bytes) and read by `source::open`: the pickle machine, the state-dict flattening and
//! the tensor-view checks (offsets, strides, storage sizes), with every tensor touched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lorastream_fuzz::{exercise, put, scratch};
use std::io::Write;
use zip::write::SimpleFileOptions;

/// Storage record sizes: a typical one, a tiny one, an empty one, a bigger one, and
/// enough more for a state dict of every dtype.
const STORAGES: [(&str, usize); 8] = [
    ("0", 256),
    ("1", 16),
    ("2", 0),
    ("3", 4096),
    ("4", 64),
    ("5", 64),
    ("6", 64),
    ("7", 64),
];

fn torch_zip(pkl: &[u8]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut add = |name: &str, bytes: &[u8]| {
        w.start_file(name, opts).expect("zip entry");
        w.write_all(bytes).expect("zip write");
    };
    add("archive/data.pkl", pkl);
    add("archive/byteorder", b"little");
    for (key, len) in STORAGES {
        let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
        add(&format!("archive/data/{key}"), &bytes);
    }
    add("archive/version", b"3\n");
    w.finish().expect("zip finish").into_inner()
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch("torch_pickle");
    let path = put(&dir, "model.pth", &torch_zip(data));
    if let Ok(ckpt) = lorastream::source::open(&path) {
        exercise(&ckpt);
    }
});
