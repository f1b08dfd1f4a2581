//! What the fuzz targets share: a scratch folder per process, the fixture files the
//! targets build folders from, and `exercise`, which touches every byte a reader promised
//! (so an entry whose range or view runs past its file panics here, as it would in a merge).

use lorastream::source::{Checkpoint, TensorData};
use std::hint::black_box;
use std::path::{Path, PathBuf};

/// Fixture files, compiled in so a target needs nothing at run time.
pub mod fixtures {
    pub const ST: &[u8] = include_bytes!("../../fixtures/io/dtypes.safetensors");
    pub const PTH: &[u8] = include_bytes!("../../fixtures/io/nested.pth");
    pub const ADAPTER_CONFIG: &[u8] =
        include_bytes!("../../fixtures/io/adapter_st/adapter_config.json");
    pub const ADAPTER_ST: &[u8] =
        include_bytes!("../../fixtures/io/adapter_st/adapter_model.safetensors");
    pub const ADAPTER_BIN: &[u8] =
        include_bytes!("../../fixtures/io/adapter_bin/adapter_model.bin");
    pub const SHARD_ST_1: &[u8] =
        include_bytes!("../../fixtures/io/sharded_st/model-00001-of-00002.safetensors");
    pub const SHARD_ST_2: &[u8] =
        include_bytes!("../../fixtures/io/sharded_st/model-00002-of-00002.safetensors");
    pub const SHARD_BIN_1: &[u8] =
        include_bytes!("../../fixtures/io/sharded_bin/pytorch_model-00001-of-00002.bin");
    pub const SHARD_BIN_2: &[u8] =
        include_bytes!("../../fixtures/io/sharded_bin/pytorch_model-00002-of-00002.bin");
    pub const CONFIG: &[u8] = include_bytes!("../../fixtures/io/sharded_st/config.json");
    /// Packed-integer models (their configs are inline in the folder seeds).
    pub const GPTQ_ST: &[u8] =
        include_bytes!("../../fixtures/gptq_awq/gptq_v1_4bit_asym_act/model.safetensors");
    pub const AWQ_ST: &[u8] = include_bytes!("../../fixtures/gptq_awq/awq_gemm/model.safetensors");
}

/// An empty folder of this process's own, emptied again on every call: under
/// `$LORASTREAM_FUZZ_SCRATCH` when set (the smoke script points it at a folder it removes),
/// else in /dev/shm when there is one (no disk I/O per run), else the temp folder.
pub fn scratch(target: &str) -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if let Some(dir) = std::env::var_os("LORASTREAM_FUZZ_SCRATCH") {
        PathBuf::from(dir)
    } else if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("lorastream-fuzz-{target}-{}", std::process::id()));
    // Leftovers of the last run are ours: remove them (errors show up as failed writes).
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Writes `bytes` to `dir/name`; the scratch folder is ours, so failing is a setup error.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("scratch subfolder");
    }
    std::fs::write(&p, bytes).expect("scratch file");
    p
}

/// Reads every tensor of a checkpoint the way a merge or convert would: contiguous
/// tensors by their byte range, strided views gathered element by element. A reader that
/// accepted an entry must have checked every byte of it is inside the file.
pub fn exercise(ckpt: &Checkpoint) {
    black_box(ckpt.total_bytes());
    for t in &ckpt.tensors {
        black_box(t.numel());
        if let TensorData::Contiguous { start, len } = t.data {
            black_box((start, len, t.nbytes()));
        }
        let bytes = t.bytes();
        black_box(bytes.len());
        assert_eq!(
            bytes.len(),
            t.nbytes(),
            "tensor '{}': bytes do not match its shape and dtype",
            t.name
        );
    }
    black_box(ckpt.skipped.len());
}
