//! Partitioned outputs (`--part K/N`): the plan every part computes alike lives with the
//! sinks (`sink::part_plan`, a shard layout); `merge::merge_part` and the convert pipeline
//! run one part, `stitch` (src/stitch.rs) checks and joins the parts. This module is the
//! library's public name for the plan.

pub use crate::sink::part_plan::*;
