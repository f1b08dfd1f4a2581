//! Which way a 2-D LoRA delta lines up with its weight. `nn.Linear` stores W as [out, in]
//! (ΔW = B·A); transformers' `Conv1D` stores it as [in, out] (ΔW = (B·A)ᵀ). For a weight
//! that is not square the shapes decide. For a square one they cannot, and neither can
//! `adapter_config.json`: PEFT sets `fan_in_fan_out` per module type while it wraps the
//! model, overwriting the config as it goes, so the saved flag is whatever the *last*
//! wrapped module needed. The evidence used instead, all of which must agree:
//!
//! 1. the shapes, when the weight is not square;
//! 2. `--fan-in-fan-out REGEX` / `--no-fan-in-fan-out REGEX` from the user;
//! 3. the architecture in the base's `config.json`: transformers' own modeling code says
//!    which attributes are `Conv1D` (table generated from it, `transformers_models.rs`);
//!    custom code shipped beside the weights (`auto_map`) that never mentions `Conv1D`
//!    builds only `nn.Linear` 2-D weights.
//!
//! When none of them settles a square weight, the merge is refused, naming the module and
//! the flags: a wrong guess would silently transpose ΔW.

use super::merge_types::DeltaLayout;
use super::transformers_models::{CONV1D_MODEL_TYPES, KNOWN_MODEL_TYPES, TRANSFORMERS_VERSION};
use crate::source::ModelConfig;
use regex::Regex;

/// `--fan-in-fan-out` / `--no-fan-in-fan-out`: module names (relative to the base model)
/// the user declares stored [in, out] / [out, in].
#[derive(Clone, Debug, Default)]
pub struct LayoutFlags {
    pub fan_in_fan_out: Vec<Regex>,
    pub not_fan_in_fan_out: Vec<Regex>,
}

/// What the base model's description says about its 2-D weights.
#[derive(Clone, Debug)]
enum Architecture {
    /// A model type of transformers: attribute names built as `Conv1D`, and names that are
    /// `Conv1D` in one place and `nn.Linear` in another.
    Transformers {
        model_type: String,
        conv1d: &'static [&'static str],
        ambiguous: &'static [&'static str],
    },
    /// Custom code in the folder (`auto_map`) that never builds `Conv1D`.
    LinearOnlyCode { files: Vec<String> },
    /// Why the architecture tells nothing.
    Unknown(String),
}

/// Everything known about one base model's layouts.
#[derive(Clone, Debug)]
pub struct LayoutEvidence {
    flags: LayoutFlags,
    arch: Architecture,
}

/// Model packages of transformers whose code builds `Conv1D`: custom code importing from
/// them may build it without naming it.
fn conv1d_packages() -> impl Iterator<Item = String> {
    CONV1D_MODEL_TYPES
        .iter()
        .map(|(t, _, _)| format!("models.{}", t.replace('-', "_")))
}

impl LayoutEvidence {
    /// `config`: the base's `config.json` (None when there is none).
    pub fn new(config: Option<&ModelConfig>, flags: &LayoutFlags) -> LayoutEvidence {
        LayoutEvidence {
            flags: flags.clone(),
            arch: architecture(config),
        }
    }

    /// When both `--fan-in-fan-out` and `--no-fan-in-fan-out` match `module`: the command
    /// line contradicts itself (a usage error, whatever the weights say).
    pub fn flags_conflict(&self, module: &str) -> Option<String> {
        let fifo = self
            .flags
            .fan_in_fan_out
            .iter()
            .find(|r| r.is_match(module))?;
        let linear = self
            .flags
            .not_fan_in_fan_out
            .iter()
            .find(|r| r.is_match(module))?;
        Some(format!(
            "--fan-in-fan-out '{fifo}' and --no-fan-in-fan-out '{linear}' both match module '{module}'; \
             make the patterns exclusive"
        ))
    }

    /// What `--fan-in-fan-out` (true: stored [in, out]) or `--no-fan-in-fan-out` (false)
    /// says about `module`, with the flag for messages (conflicts: [`Self::flags_conflict`]).
    pub fn flag_for(&self, module: &str) -> Option<(bool, String)> {
        if let Some(r) = self
            .flags
            .fan_in_fan_out
            .iter()
            .find(|r| r.is_match(module))
        {
            return Some((true, format!("--fan-in-fan-out '{r}'")));
        }
        self.flags
            .not_fan_in_fan_out
            .iter()
            .find(|r| r.is_match(module))
            .map(|r| (false, format!("--no-fan-in-fan-out '{r}'")))
    }

    /// The layout of module `module` whose weight fits ΔW as stored ([out, in]:
    /// `normal_fits`) and/or transposed ([in, out]: `transposed_fits`); at least one fits.
    /// Err: why it cannot be decided (or the evidence disagrees), for the message.
    pub fn decide(
        &self,
        module: &str,
        normal_fits: bool,
        transposed_fits: bool,
    ) -> Result<DeltaLayout, String> {
        use DeltaLayout::{Normal, Transposed};
        let mut said: Vec<(DeltaLayout, String)> = Vec::new();
        match (normal_fits, transposed_fits) {
            (true, false) => said.push((Normal, "its shapes".into())),
            (false, true) => said.push((Transposed, "its shapes".into())),
            _ => {}
        }
        let fifo = self
            .flags
            .fan_in_fan_out
            .iter()
            .find(|r| r.is_match(module));
        let linear = self
            .flags
            .not_fan_in_fan_out
            .iter()
            .find(|r| r.is_match(module));
        if let Some(r) = fifo {
            said.push((Transposed, format!("--fan-in-fan-out '{r}'")));
        }
        if let Some(r) = linear {
            said.push((Normal, format!("--no-fan-in-fan-out '{r}'")));
        }
        let leaf = module.rsplit('.').next().unwrap_or(module);
        let mut unknown = None;
        match &self.arch {
            Architecture::Transformers {
                model_type,
                conv1d,
                ambiguous,
            } => {
                let from = format!("transformers' {model_type} code ({TRANSFORMERS_VERSION})");
                if ambiguous.contains(&leaf) {
                    unknown = Some(format!(
                        "in {from} '{leaf}' is a Conv1D in one module and an nn.Linear in another"
                    ));
                } else if conv1d.contains(&leaf) {
                    said.push((
                        Transposed,
                        format!("{from}, which builds '{leaf}' as Conv1D"),
                    ));
                } else {
                    said.push((Normal, format!("{from}, which builds no Conv1D '{leaf}'")));
                }
            }
            Architecture::LinearOnlyCode { files } => said.push((
                Normal,
                format!(
                    "the model's own code ({}), which builds no Conv1D",
                    files.join(", ")
                ),
            )),
            Architecture::Unknown(why) => unknown = Some(why.clone()),
        }
        let Some((first, by)) = said.first() else {
            // Square LoRA weights, and tuners whose saved parts fit either way (FourierFT).
            return Err(format!(
                "its shapes cannot tell nn.Linear ([out, in]) from transformers' Conv1D ([in, out]) \
                 (the adapter's tensors fit both), and {}",
                unknown.unwrap_or_default()
            ));
        };
        if let Some((_, other)) = said.iter().find(|(l, _)| l != first) {
            return Err(format!(
                "the evidence disagrees: {by} says {}, {other} says {}",
                describe(*first),
                describe(if *first == Normal { Transposed } else { Normal })
            ));
        }
        Ok(*first)
    }
}

fn describe(l: DeltaLayout) -> &'static str {
    match l {
        DeltaLayout::Normal => "[out, in] (nn.Linear)",
        DeltaLayout::Transposed => "[in, out] (Conv1D, fan_in_fan_out)",
    }
}

fn architecture(config: Option<&ModelConfig>) -> Architecture {
    let Some(c) = config else {
        return Architecture::Unknown(
            "no config.json beside the base names its architecture".into(),
        );
    };
    let shown = c.path.display();
    if c.has_custom_code() {
        let mut files = Vec::new();
        for (file, local) in &c.code {
            let Some(p) = local else {
                return Architecture::Unknown(format!(
                    "{shown} names custom code ({file}) that is not in the folder"
                ));
            };
            let Ok(text) = std::fs::read_to_string(p) else {
                return Architecture::Unknown(format!("{} cannot be read", p.display()));
            };
            if text.contains("Conv1D") || conv1d_packages().any(|m| text.contains(&m)) {
                return Architecture::Unknown(format!("the model's own code ({file}) uses Conv1D"));
            }
            files.push(file.clone());
        }
        return Architecture::LinearOnlyCode { files };
    }
    let Some(model_type) = c.model_type() else {
        return Architecture::Unknown(format!("{shown} has no model_type"));
    };
    if let Some((_, conv1d, ambiguous)) =
        CONV1D_MODEL_TYPES.iter().find(|(t, _, _)| *t == model_type)
    {
        return Architecture::Transformers {
            model_type: model_type.to_string(),
            conv1d,
            ambiguous,
        };
    }
    if KNOWN_MODEL_TYPES.contains(&model_type) {
        return Architecture::Transformers {
            model_type: model_type.to_string(),
            conv1d: &[],
            ambiguous: &[],
        };
    }
    Architecture::Unknown(format!(
        "{shown} says model_type '{model_type}', which transformers {TRANSFORMERS_VERSION} does not \
         know, and names no custom code"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeltaLayout::{Normal, Transposed};
    use serde_json::json;
    use std::path::PathBuf;

    fn config(v: serde_json::Value) -> ModelConfig {
        ModelConfig {
            path: PathBuf::from("config.json"),
            json: v,
            code: Vec::new(),
        }
    }

    fn flags(fifo: &[&str], linear: &[&str]) -> LayoutFlags {
        LayoutFlags {
            fan_in_fan_out: fifo.iter().map(|r| Regex::new(r).unwrap()).collect(),
            not_fan_in_fan_out: linear.iter().map(|r| Regex::new(r).unwrap()).collect(),
        }
    }

    #[test]
    fn square_weights_need_evidence() {
        let none = LayoutEvidence::new(None, &LayoutFlags::default());
        assert_eq!(none.decide("lin0", true, false), Ok(Normal));
        assert_eq!(none.decide("conv1d", false, true), Ok(Transposed));
        let e = none.decide("conv1d", true, true).unwrap_err();
        assert!(e.contains("no config.json"), "{e}");
        let f = LayoutEvidence::new(None, &flags(&["^conv1d$"], &["^lin"]));
        assert_eq!(f.decide("conv1d", true, true), Ok(Transposed));
        assert_eq!(f.decide("lin0", true, true), Ok(Normal));
        assert!(f.decide("other", true, true).is_err());
        // A flag that contradicts the shapes is refused, not obeyed.
        let e = f.decide("lin0", false, true).unwrap_err();
        assert!(
            e.contains("disagrees") && e.contains("--no-fan-in-fan-out"),
            "{e}"
        );
        // Both flags on one module.
        let both = LayoutEvidence::new(None, &flags(&["x"], &["^x$"]));
        assert!(both.decide("x", true, true).is_err());
        let e = both.flags_conflict("x").unwrap_or_default();
        assert!(e.contains("'x'") && e.contains("'^x$'"), "{e}");
        assert_eq!(f.flags_conflict("conv1d"), None);
    }

    #[test]
    fn transformers_architectures_settle_square_weights() {
        let gpt2 = LayoutEvidence::new(
            Some(&config(json!({"model_type": "gpt2"}))),
            &LayoutFlags::default(),
        );
        assert_eq!(
            gpt2.decide("transformer.h.0.attn.c_proj", true, true),
            Ok(Transposed)
        );
        assert_eq!(gpt2.decide("score", true, false), Ok(Normal));
        // The shapes of a Conv1D name saying [out, in] contradict the architecture.
        assert!(
            gpt2.decide("transformer.h.0.mlp.c_fc", true, false)
                .is_err()
        );
        let llama = LayoutEvidence::new(
            Some(&config(json!({"model_type": "llama"}))),
            &LayoutFlags::default(),
        );
        assert_eq!(
            llama.decide("model.layers.0.self_attn.q_proj", true, true),
            Ok(Normal)
        );
        let odd = LayoutEvidence::new(
            Some(&config(json!({"model_type": "no-such-model"}))),
            &LayoutFlags::default(),
        );
        let e = odd.decide("a.b", true, true).unwrap_err();
        assert!(e.contains("no-such-model"), "{e}");
        // A flag against transformers' own code is refused.
        let e = LayoutEvidence::new(
            Some(&config(json!({"model_type": "gpt2"}))),
            &flags(&[], &["."]),
        )
        .decide("transformer.h.0.attn.c_proj", true, true)
        .unwrap_err();
        assert!(e.contains("disagrees"), "{e}");
    }

    #[test]
    fn custom_code_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("modeling_x.py");
        std::fs::write(&code, "import torch.nn as nn\nclass M(nn.Module): pass\n").unwrap();
        let mut c = config(json!({"model_type": "x", "auto_map": {"AutoModel": "modeling_x.M"}}));
        c.code = vec![("modeling_x.py".into(), Some(code.clone()))];
        let ev = LayoutEvidence::new(Some(&c), &LayoutFlags::default());
        assert_eq!(ev.decide("layers.0.wo", true, true), Ok(Normal));
        std::fs::write(&code, "from transformers.pytorch_utils import Conv1D\n").unwrap();
        let ev = LayoutEvidence::new(Some(&c), &LayoutFlags::default());
        assert!(
            ev.decide("layers.0.wo", true, true)
                .unwrap_err()
                .contains("uses Conv1D")
        );
        c.code = vec![("modeling_x.py".into(), None)];
        let ev = LayoutEvidence::new(Some(&c), &LayoutFlags::default());
        assert!(
            ev.decide("layers.0.wo", true, true)
                .unwrap_err()
                .contains("not in the folder")
        );
    }
}
