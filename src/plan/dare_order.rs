//! DARE's random stream over a whole model: where each module's masks start in torch's
//! CPU stream after `torch.manual_seed(--seed)`, so that each module can draw its own
//! masks when it is merged (streaming: no mask is held; one 2.5 KB state per module).
//!
//! PEFT's `add_weighted_adapter` first injects the new adapter into every module (each
//! `update_layer` builds `nn.Linear(in, r)` and `nn.Linear(r, out)`, whose init draws, then
//! kaiming-inits A again when `init_lora_weights` is true; an Embedding draws `randn` for
//! A and B, then `normal_` for B again), then walks
//! `model.named_modules()` and draws each module's masks in turn (see
//! `adapter::combine`). The first part only needs the total; the second needs the model's
//! module order, which a safetensors file (keys sorted) does not record. It is taken from
//! `--module-order FILE`, or from a single-file pickle base (`torch.save(state_dict)` keeps
//! `state_dict()` order, which is `named_modules()` order); otherwise DARE is refused.

use super::component::Component;
use crate::adapter::combine::{Combine, CombinedLora};
use crate::adapter::torch_rng::{DrawCount, TorchRng};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::source::{Checkpoint, SourceFormat};
use std::collections::HashMap;

/// Gives every combined module (`(base key, change)`) its stream state. `init` is the
/// first adapter's `init_lora_weights` (PEFT copies its config into the new adapter).
pub(super) fn plan_streams(
    spec: &Combine,
    c: &Component,
    base: &Checkpoint,
    init: &str,
    new_rank: usize,
    built: &mut [(String, CombinedLora)],
) -> Result<()> {
    let name = spec.kind.name();
    let Some(seed) = spec.seed else {
        return Err(Error::Usage(format!("--combine {name} needs --seed N")));
    };
    if let Some(label) = &c.name {
        return Err(Error::Plan(format!(
            "component {label}: --combine {name} over a component of a multi-model folder: the order \
             in which each component's add_weighted_adapter ran on torch's one random stream is not \
             recorded; combine a single model"
        )));
    }
    // The new adapter's init draws per module: A twice (nn.Linear, kaiming) or once.
    let a_inits: u64 = match init {
        "true" => 2,
        "false" => 1,
        other => {
            return Err(Error::Plan(format!(
                "--combine {name}: the first adapter's init_lora_weights is {other}; the new adapter \
                 PEFT builds with it draws from torch's stream in a way lorastream does not count \
                 (it does for true and false)"
            )));
        }
    };
    let r = new_rank as u64;
    let positions = positions(spec, base, built)?;
    let mut order: Vec<usize> = (0..built.len()).collect();
    order.sort_by_key(|&i| positions[i]);
    // The init, module by module in the same order (inject_adapter walks named_modules()
    // too; the order matters only through the cache of torch's small normal_ draws).
    let mut init = DrawCount::default();
    let mut mask_draws = vec![0u64; built.len()];
    for &i in &order {
        let m = &built[i].1;
        let p0 = &m.parts[0];
        if m.parts
            .iter()
            .any(|p| p.a.shape.len() != 2 || p.b.shape.len() != 2)
        {
            return Err(Error::tensor(
                &m.weights,
                &p0.a.name,
                format!(
                    "module '{}': --combine {name} on a convolution: the new adapter's conv init \
                     is not counted by lorastream; DARE is done for Linear, Conv1D and Embedding \
                     modules",
                    m.module
                ),
            ));
        }
        let (k, out) = (p0.a.shape[1] as u64, p0.b.shape[0] as u64);
        if m.embedding {
            // torch.randn((r, V)), torch.randn((D, r)); init true: zeros_(A), normal_(B).
            init.normal(r * k);
            init.normal(out * r);
            if a_inits == 2 {
                init.normal(out * r);
            }
        } else {
            init.uniform(Dtype::F32, a_inits * r * k + out * r);
        }
        mask_draws[i] = if spec.kind.is_pruned_svd() {
            m.parts.len() as u64 * out * k
        } else {
            m.parts
                .iter()
                .map(|p| (p.a.numel() + p.b.numel()) as u64)
                .sum()
        };
    }
    let mut rng = TorchRng::manual_seed(seed);
    rng.skip(init.total);
    for i in order {
        built[i].1.dare_rng = Some(rng.clone());
        rng.skip(mask_draws[i]);
    }
    Ok(())
}

/// `--module-order`'s text: each line's first word (a leading `base_model.model.`, as a
/// `PeftModel` prints its modules, dropped) → its line; a repeated name keeps its first.
fn parse_order(text: &str) -> HashMap<&str, usize> {
    let mut at: HashMap<&str, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let Some(word) = line.split_whitespace().next() else {
            continue;
        };
        let word = word.strip_prefix("base_model.model.").unwrap_or(word);
        at.entry(word).or_insert(i);
    }
    at
}

/// Each module's place in `named_modules()` order (comparable numbers).
fn positions(
    spec: &Combine,
    base: &Checkpoint,
    built: &[(String, CombinedLora)],
) -> Result<Vec<usize>> {
    let name = spec.kind.name();
    if let Some(path) = &spec.module_order {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let at = parse_order(&text);
        let missing: Vec<&str> = built
            .iter()
            .map(|(_, m)| m.module.as_str())
            .filter(|m| !at.contains_key(m))
            .collect();
        if !missing.is_empty() {
            return Err(Error::format(
                path,
                format!(
                    "--module-order does not list {} of the combined modules ({}{}); it must name \
                     every one, as model.named_modules() does",
                    missing.len(),
                    missing
                        .iter()
                        .take(5)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if missing.len() > 5 { ", …" } else { "" }
                ),
            ));
        }
        return Ok(built.iter().map(|(_, m)| at[m.module.as_str()]).collect());
    }
    let pickle = matches!(
        base.format,
        SourceFormat::TorchZip | SourceFormat::TorchLegacy
    ) && base.files.len() == 1;
    if !pickle {
        return Err(Error::Plan(format!(
            "--combine {name}: PEFT draws the masks module by module in model.named_modules() order, \
             which the base {} ({}) does not record; give --module-order FILE listing the model's \
             module names in that order (e.g. print(\"\\n\".join(n for n, _ in model.named_modules()))), \
             or a single-file pickle base (.bin/.pth), which keeps state_dict() order",
            base.path.display(),
            if base.files.len() > 1 {
                "several files"
            } else {
                "safetensors keeps its keys sorted"
            }
        )));
    }
    let at: HashMap<&str, usize> = base
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    built
        .iter()
        .map(|(key, m)| {
            at.get(key.as_str()).copied().ok_or_else(|| {
                Error::Internal(format!("module '{}': base key {key} not found", m.module))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_order_reads_the_first_word_of_each_line() {
        // As print(model) / named_modules() with types, from a PeftModel or the bare model.
        let text =
            "\nbase_model.model.zin  Linear\nblocks\nblocks.0.q\n  blocks.0.up Conv1D\nzin\n";
        let at = parse_order(text);
        assert!(at["zin"] < at["blocks.0.q"] && at["blocks.0.q"] < at["blocks.0.up"]);
        assert_eq!(at["zin"], 1, "the first occurrence counts");
        assert!(!at.contains_key("Linear") && !at.contains_key(""));
    }
}
