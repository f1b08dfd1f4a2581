//! `adapter_config.json`: the fields that change a LoRA merge, and the refusals.

use crate::error::{Error, Result};
use regex::Regex;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A LoRA adapter's configuration.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub path: PathBuf,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    /// (PEFT pattern key, compiled matcher, value), in the file's order.
    pub rank_pattern: Vec<(String, Regex, usize)>,
    pub alpha_pattern: Vec<(String, Regex, f64)>,
    pub modules_to_save: Vec<String>,
    /// `target_parameters`: `nn.Parameter`s adapted in place (PEFT's ParamWrapper), as
    /// `module.param` suffixes.
    pub target_parameters: Vec<String>,
    /// The LoRA variant, from the fields that select one.
    pub variant: Variant,
    /// `use_bdlora`: which modules' factors are block-diagonal.
    pub bdlora: Option<BdLora>,
    /// `init_lora_weights` as written (`true` when absent, PEFT's default): how many random
    /// draws a new adapter from this config costs (DARE's stream).
    pub init_lora_weights: String,
}

/// BD-LoRA (`use_bdlora`): per module, A or B is block-diagonal with `nblocks` blocks,
/// saved compact (A [r, in/nblocks], B [out, r/nblocks]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BdLora {
    /// Substrings of a module's own (last) name whose A is block-diagonal.
    pub a_patterns: Vec<String>,
    /// Likewise for B.
    pub b_patterns: Vec<String>,
    pub nblocks: usize,
    /// Every module must match one of the patterns (PEFT refuses others).
    pub match_strict: bool,
}

/// Which factor of a module is block-diagonal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockDiagonal {
    A,
    B,
}

impl BdLora {
    /// PEFT's rule (`pattern in target_name`, the module's last name): which factor of
    /// `module` is block-diagonal; Err when PEFT would have refused the module.
    pub fn factor_of(&self, module: &str) -> std::result::Result<Option<BlockDiagonal>, String> {
        let leaf = module.rsplit('.').next().unwrap_or(module);
        let a = self.a_patterns.iter().any(|p| leaf.contains(p.as_str()));
        let b = self.b_patterns.iter().any(|p| leaf.contains(p.as_str()));
        match (a, b) {
            (true, true) => Err(format!(
                "module '{module}' matches both target_modules_bd_a and target_modules_bd_b"
            )),
            (true, false) => Ok(Some(BlockDiagonal::A)),
            (false, true) => Ok(Some(BlockDiagonal::B)),
            (false, false) if self.match_strict => Err(format!(
                "module '{module}' matches neither target_modules_bd_a nor target_modules_bd_b \
                 (match_strict)"
            )),
            (false, false) => Ok(None),
        }
    }
}

/// LoRA variants that merge like plain LoRA but differ in what they save or how they round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    #[default]
    Plain,
    /// `init_lora_weights: "mica"`: plain ΔW, but PEFT's merge rounds ΔW to the weight's
    /// dtype before adding it.
    Mica,
    /// `velora_config`: also saves `lora_velora_embed`, used in training only.
    Velora,
    /// `monteclora_config`: also saves `lora_monteclora_sampler.*`, used in training only.
    Monteclora,
    /// `use_bdlora`: block-diagonal factors saved compact; PEFT's merge rounds ΔW to the
    /// weight's dtype before adding it.
    BdLora,
}

impl Variant {
    /// Whether PEFT's merge rounds ΔW into the weight's dtype before adding it (two
    /// roundings) for Linear-like modules.
    pub fn rounds_delta_first(self) -> bool {
        match self {
            Variant::Mica | Variant::BdLora => true,
            Variant::Plain | Variant::Velora | Variant::Monteclora => false,
        }
    }
}

/// Variant fields (non-null) whose merge lorastream does not reproduce, and why.
const REFUSED_VARIANTS: [(&str, &str); 3] = [
    (
        "kasa_config",
        "KaSA: PEFT truncates the base weight with an SVD when it loads the adapter (dropping its r smallest \
         singular directions), so the merged weight depends on LAPACK's SVD and cannot be reproduced exactly",
    ),
    (
        "arrow_config",
        "Arrow: a router over several LoRA experts; PEFT itself cannot merge it",
    ),
    (
        "alora_invocation_tokens",
        "aLoRA (activated LoRA): applies only after its invocation tokens; PEFT itself cannot merge it",
    ),
];

/// `init_lora_weights` values that change the base weights when PEFT loads the adapter;
/// an adapter saved that way only merges right after PEFT's conversion to plain LoRA.
const BASE_MUTATING_INITS: [&str; 5] = ["olora", "corda", "loftq", "lora_ga", "pissa"];

impl LoraConfig {
    pub fn from_json(v: &Value, path: &Path) -> Result<LoraConfig> {
        let fail = |msg: String| Error::format(path, msg);
        let peft_type = v
            .get("peft_type")
            .and_then(|t| t.as_str())
            .unwrap_or("LORA");
        if !peft_type.eq_ignore_ascii_case("LORA") {
            return Err(fail(format!(
                "peft_type {peft_type} is not supported: lorastream merges LoRA (incl. DoRA, rsLoRA) \
                 adapters only; {peft_type} uses different merge math"
            )));
        }
        if let Some(init) = v.get("init_lora_weights").and_then(|i| i.as_str()) {
            let lower = init.to_ascii_lowercase();
            if BASE_MUTATING_INITS
                .iter()
                .any(|b| lower == *b || (*b == "pissa" && lower.starts_with("pissa")))
            {
                return Err(fail(format!(
                    "init_lora_weights is \"{init}\": this initialisation changes the base weights, so the adapter \
                     cannot be merged into the original base. Convert it to a plain LoRA first with PEFT's \
                     save_pretrained(..., path_initial_model_for_weight_conversion=...)"
                )));
            }
        }
        for (field, why) in REFUSED_VARIANTS {
            if v.get(field)
                .is_some_and(|x| !x.is_null() && x != &Value::Bool(false))
            {
                return Err(fail(format!(
                    "\"{field}\" is set: {why}. Nothing was written."
                )));
            }
        }
        let is_set = |field: &str| v.get(field).is_some_and(|x| !x.is_null());
        let mica = v
            .get("init_lora_weights")
            .and_then(|i| i.as_str())
            .is_some_and(|i| i.eq_ignore_ascii_case("mica"));
        let bdlora = match v.get("use_bdlora") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(b) => Some(bdlora(b).map_err(|m| fail(format!("use_bdlora: {m}")))?),
        };
        let variant = match (
            mica,
            is_set("velora_config"),
            is_set("monteclora_config"),
            bdlora.is_some(),
        ) {
            (false, false, false, false) => Variant::Plain,
            (true, false, false, false) => Variant::Mica,
            (false, true, false, false) => Variant::Velora,
            (false, false, true, false) => Variant::Monteclora,
            (false, false, false, true) => Variant::BdLora,
            _ => {
                return Err(fail(
                    "more than one LoRA variant is set (MiCA, VeLoRA, MonteCLoRA, BD-LoRA); PEFT accepts only one"
                        .into(),
                ));
            }
        };
        if v.get("loftq_config")
            .and_then(|l| l.as_object())
            .is_some_and(|o| !o.is_empty())
        {
            return Err(fail("loftq_config is set: LoftQ adapters change the base weights and cannot be merged into the original base".into()));
        }
        let r = v
            .get("r")
            .and_then(|r| r.as_u64())
            .filter(|&r| r > 0)
            .ok_or_else(|| fail("\"r\" is missing or not a positive integer".into()))?
            as usize;
        let lora_alpha = v.get("lora_alpha").and_then(|a| a.as_f64()).unwrap_or(8.0);
        let flag = |k: &str| v.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
        let rank_pattern = patterns(v.get("rank_pattern"), path, "rank_pattern", |x| {
            x.as_u64().filter(|&r| r > 0).map(|r| r as usize)
        })?;
        let alpha_pattern = patterns(v.get("alpha_pattern"), path, "alpha_pattern", |x| {
            x.as_f64()
        })?;
        let modules_to_save = string_list(v.get("modules_to_save"));
        let target_parameters = match v.get("target_parameters") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|m| m.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        Ok(LoraConfig {
            path: path.to_path_buf(),
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
            fan_in_fan_out: flag("fan_in_fan_out"),
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            target_parameters,
            variant,
            bdlora,
            init_lora_weights: match v.get("init_lora_weights") {
                None | Some(Value::Null) => "true".into(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            },
        })
    }

    /// The fields every PEFT config shares (`modules_to_save`, `fan_in_fan_out`), for an
    /// adapter of another tuner; the LoRA fields are neutral (that adapter has no LoRA
    /// modules) and the tuner's own fields are read by its file in `tuners/`.
    pub fn common_fields(v: &Value, path: &Path) -> Result<LoraConfig> {
        let modules_to_save = string_list(v.get("modules_to_save"));
        Ok(LoraConfig {
            path: path.to_path_buf(),
            r: 1,
            lora_alpha: 1.0,
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: v
                .get("fan_in_fan_out")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            modules_to_save,
            target_parameters: Vec::new(),
            variant: Variant::Plain,
            bdlora: None,
            init_lora_weights: "true".into(),
        })
    }

    /// Whether `key` (`module.param`, relative to the base model) is one of
    /// `target_parameters` (PEFT's rule: equal, or ending in "." + entry).
    pub fn targets_parameter(&self, key: &str) -> bool {
        self.target_parameters
            .iter()
            .any(|t| key == t || key.ends_with(&format!(".{t}")))
    }

    /// Rank and scale of a module (name relative to the base model), with PEFT's
    /// `get_pattern_key` rule: the first pattern key (in file order) for which
    /// `re.match(rf"(.*\.)?({key})$", name)` succeeds.
    pub fn rank_and_scale(&self, module: &str) -> (usize, f32) {
        let (r, scale) = self.rank_and_scale_f64(module);
        (r, scale as f32)
    }

    /// The rank PEFT's `add_weighted_adapter` counts for the adapter: `r`, or the largest
    /// of `r` and the `rank_pattern` ranks.
    pub fn max_rank(&self) -> usize {
        self.rank_pattern
            .iter()
            .map(|(_, _, r)| *r)
            .fold(self.r, usize::max)
    }

    /// [`Self::rank_and_scale`] with the scale as PEFT holds it (a Python float), which
    /// `add_weighted_adapter` multiplies by the weights before rounding to f32.
    pub fn rank_and_scale_f64(&self, module: &str) -> (usize, f64) {
        let r = self
            .rank_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.r, |(_, _, r)| *r);
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |(_, _, a)| *a);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        (r, scale)
    }

    /// Whether a module (by name relative to the base model) is one of `modules_to_save`:
    /// its name equals an entry or ends with "." + entry (PEFT's rule).
    pub fn saves_module(&self, module: &str) -> bool {
        self.modules_to_save
            .iter()
            .any(|m| module == m || module.ends_with(&format!(".{m}")))
    }
}

/// A config field PEFT accepts as a list of names or one name (`modules_to_save`,
/// `target_modules_bd_a`); anything else is no names.
fn string_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn bdlora(v: &Value) -> std::result::Result<BdLora, String> {
    let list = |k: &str| string_list(v.get(k));
    let nblocks = v
        .get("nblocks")
        .and_then(Value::as_u64)
        .filter(|&n| n > 0)
        .ok_or("\"nblocks\" is missing or not a positive integer")? as usize;
    Ok(BdLora {
        a_patterns: list("target_modules_bd_a"),
        b_patterns: list("target_modules_bd_b"),
        nblocks,
        match_strict: v
            .get("match_strict")
            .and_then(Value::as_bool)
            .unwrap_or(true),
    })
}

pub(crate) fn patterns<T>(
    v: Option<&Value>,
    path: &Path,
    field: &str,
    value: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<(String, Regex, T)>> {
    let Some(Value::Object(map)) = v else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(k, x)| {
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| {
                Error::format(
                    path,
                    format!(
                        "{field} key '{k}' is not a regular expression lorastream can use: {e}"
                    ),
                )
            })?;
            let val = value(x).ok_or_else(|| {
                Error::format(path, format!("{field} value for '{k}' is not a number"))
            })?;
            Ok((k.clone(), re, val))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<LoraConfig> {
        LoraConfig::from_json(&v, Path::new("adapter_config.json"))
    }

    #[test]
    fn patterns_follow_peft_matching() {
        let c = cfg(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
            "rank_pattern": {"q_proj": 4, "^model\\.layers\\.1\\.mlp\\.down_proj": 2},
            "alpha_pattern": {"down_proj": 4}}))
        .unwrap();
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.q_proj"),
            (4, 4.0)
        );
        assert_eq!(
            c.rank_and_scale("model.layers.0.self_attn.k_proj"),
            (8, 2.0)
        );
        // The '^' key only matches the whole name: layer 0's down_proj keeps r=8.
        assert_eq!(c.rank_and_scale("model.layers.0.mlp.down_proj"), (8, 0.5));
        assert_eq!(c.rank_and_scale("model.layers.1.mlp.down_proj"), (2, 2.0));
        // A pattern must match a whole dotted component: "proj" does not match "q_proj".
        let c = cfg(json!({"r": 8, "lora_alpha": 8, "rank_pattern": {"proj": 2}})).unwrap();
        assert_eq!(c.rank_and_scale("x.q_proj").0, 8);
    }

    #[test]
    fn rslora_scale() {
        let c = cfg(json!({"r": 16, "lora_alpha": 8, "use_rslora": true})).unwrap();
        assert_eq!(c.rank_and_scale("m").1, 2.0);
    }

    #[test]
    fn refuses_other_tuners_and_base_mutating_inits() {
        for t in ["LOHA", "LOKR", "IA3", "ADALORA", "VERA"] {
            let e = cfg(json!({"peft_type": t, "r": 8}))
                .unwrap_err()
                .to_string();
            assert!(e.contains(t), "{e}");
        }
        for i in [
            "pissa",
            "pissa_niter_4",
            "olora",
            "corda",
            "loftq",
            "lora_ga",
        ] {
            let e = cfg(json!({"r": 8, "init_lora_weights": i}))
                .unwrap_err()
                .to_string();
            assert!(e.contains(i), "{e}");
        }
        assert!(cfg(json!({"r": 8, "init_lora_weights": "gaussian"})).is_ok());
        assert!(cfg(json!({"r": 8, "init_lora_weights": true})).is_ok());
    }

    #[test]
    fn variants_are_named() {
        for (field, value, word) in [
            ("kasa_config", json!({"beta": 0.1}), "KaSA"),
            ("arrow_config", json!({"top_k": 2}), "Arrow"),
            ("alora_invocation_tokens", json!([1, 2]), "aLoRA"),
        ] {
            let e = cfg(json!({"r": 8, field: value})).unwrap_err().to_string();
            assert!(e.contains(word) && e.contains(field), "{e}");
            // null means unused.
            assert!(cfg(json!({"r": 8, field: null})).is_ok());
        }
        let c = cfg(json!({"r": 8, "init_lora_weights": "mica"})).unwrap();
        assert_eq!(c.variant, Variant::Mica);
        assert!(c.variant.rounds_delta_first());
        let c = cfg(json!({"r": 8, "velora_config": {"num_groups": 4}})).unwrap();
        assert_eq!(c.variant, Variant::Velora);
        assert!(!c.variant.rounds_delta_first());
        let c = cfg(json!({"r": 8, "monteclora_config": {"num_samples": 2}})).unwrap();
        assert_eq!(c.variant, Variant::Monteclora);
        assert!(cfg(json!({"r": 8, "monteclora_config": {}, "velora_config": {}})).is_err());
        let c = cfg(
            json!({"r": 8, "use_bdlora": {"nblocks": 2, "target_modules_bd_a": ["o_proj"],
            "target_modules_bd_b": ["q_proj"], "match_strict": true}}),
        )
        .unwrap();
        assert_eq!(c.variant, Variant::BdLora);
        let bd = c.bdlora.unwrap();
        assert_eq!(
            bd.factor_of("model.layers.0.self_attn.o_proj"),
            Ok(Some(BlockDiagonal::A))
        );
        assert_eq!(bd.factor_of("x.q_proj"), Ok(Some(BlockDiagonal::B)));
        assert!(bd.factor_of("x.k_proj").is_err());
        let c = cfg(json!({"r": 8, "target_parameters": ["experts.gate_up_proj"]})).unwrap();
        assert!(c.targets_parameter("model.layers.0.mlp.experts.gate_up_proj"));
        assert!(!c.targets_parameter("model.layers.0.mlp.xexperts.gate_up_proj"));
    }

    #[test]
    fn modules_to_save_match_by_suffix() {
        let c = cfg(json!({"r": 8, "modules_to_save": ["lm_head", "score"]})).unwrap();
        assert!(c.saves_module("lm_head"));
        assert!(c.saves_module("model.score"));
        assert!(!c.saves_module("model.xscore"));
    }
}
