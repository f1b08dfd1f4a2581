//! lorastream: merge PEFT LoRA adapters into model weights and convert checkpoints by
//! streaming tensors one at a time, without building the model.
//!
//! Data flows one way:
//!
//! ```text
//! source (readers) ─▶ plan (names, deltas, checks) ─▶ compute (cpu | cuda) ─▶ sink (writers)
//! ```
//!
//! - [`source`] reads safetensors and PyTorch zip checkpoints: headers from memory maps,
//!   tensor data with positioned (direct) reads.
//! - [`plan`] decides output names, dtypes and which tensors get which delta.
//! - [`sink`] writes `.pth` and safetensors incrementally and atomically.
//! - [`pipeline`] runs jobs (`convert`) and holds what jobs share.
//! - [`recipe`] runs batch recipes (`lorastream run RECIPE.toml`): many jobs, resumable.
//! - [`direct_io`] is the plumbing for reading and writing around the page cache.

pub mod adapter;
pub mod cancel;
pub mod checkpoint_files;
pub mod compare;
pub mod compute;
pub mod diff;
pub mod direct_io;
pub mod dtype;
pub mod error;
pub mod gguf_job;
pub mod inspect;
pub mod merge;
pub mod natural;
pub mod partition;
pub mod pipeline;
pub mod plan;
pub mod recipe;
pub mod sink;
pub mod source;
pub mod stitch;
pub mod verify;

pub use dtype::Dtype;
pub use error::{Error, Result};
