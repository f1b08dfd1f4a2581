//! `--keep-lora` for adapters of non-LoRA tuners: the names, tensors and dtypes of the
//! tuner's part of `PeftModel.from_pretrained(base, adapter).state_dict()`.
//!
//! PEFT's `get_peft_model_state_dict` saves a tuner layer's `adapter_layer_names`
//! (ParameterDicts such as IA3's `ia3_l`, ModuleDicts such as OFT's `oft_R`) with the
//! adapter name removed: `X.ia3_l.default` is saved as `X.ia3_l`, `X.oft_R.default.weight`
//! as `X.oft_R.weight`. Loading puts it back right after the dict's own name, the first
//! dotted segment of what follows the module: that is the rule here, for every tuner.
//! Beyond it, per tuner (all observed in real PEFT 0.21.2 state_dicts, see
//! `fixtures/tuner_matrix/<tuner>/expected_keep_lora/`):
//!
//! - shared tensors (VeRA's `vera_A`/`vera_B`, VB-LoRA's `vblora_vector_bank`) live on the
//!   tuner model (`base_model.<name>.default`) and every adapted layer holds the same dict
//!   (`base_model.model.<module>.<name>.default`): one tensor under all those names;
//!   RandLoRA saves those bases again under each module (the same values: one name then);
//!   TinyLoRA's shared vectors are a ParameterList (`tinylora_v.0` → `tinylora_v.default.0`);
//! - AdaLoRA's `ranknum` is not saved: PEFT makes it `float(init_r)` in the base weight's
//!   dtype (f32 in the state_dict, but 257 through bf16 is 256), and the factors of a module
//!   `rank_pattern` rebuilds are the saved values rounded through the base weight's dtype;
//! - float adapter tensors are f32 (PEFT upcasts the adapter on load), others as saved;
//!   except parts PEFT makes in the base layer's dtype and loads the saved values into
//!   (rounded, as `copy_` rounds): LN Tuning's `ln_tuning_layers` (a copy of the norm layer)
//!   and GLoRA's `zeros` buffers. Without a base those keep their saved dtype.
//!
//! A tuner whose state_dict has not been compared with PEFT's is refused by name: PEFT may
//! create tensors at load that are not in the adapter file (regenerated projections, bases,
//! internal buffers), and writing a state_dict without them would be silently wrong.

use crate::adapter::tuners::decode;
use crate::adapter::{Adapter, SAVED_PREFIX};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use std::collections::BTreeMap;

/// Where PEFT keeps a tuner's shared tensors (`base_model.<name>` in the adapter file).
const SAVED_PREFIX_MODEL: &str = "base_model.";

/// Tuners (by display name) refused although known, with the reason.
const REFUSED: &[(&str, &str)] = &[(
    "SHiRA",
    "PeftModel.state_dict() has no shira_indices (PEFT keeps the sparse positions in a plain dict \
     of the layer, filled from the adapter file at load), so the unmerged output would lose them",
)];

/// Tuners (by display name) whose `--keep-lora` output is checked against PEFT's
/// state_dict (fixtures/tuner_matrix/<tuner>/expected_keep_lora/).
const CHECKED: &[&str] = &[
    "IA3",
    "LoHa",
    "LoKr",
    "OFT",
    "HRA",
    "VeRA",
    "VB-LoRA",
    "DeLoRA",
    "MiSS",
    "FourierFT",
    "TrainableTokens",
    "LN Tuning",
    "BEFT",
    "GLoRA",
    "Super-Tuning",
    "DEFT",
    "BOFT",
    "RoAd",
    "PVeRA",
    "UniLoRA",
    "C3A",
    "WaveFT",
    "GraLoRA",
    "HiRA",
    "PEANuT",
    "AdaLoRA",
    "RandLoRA",
    "TinyLoRA",
];

/// A tensor of the output: its `state_dict()` key and where its values come from.
#[derive(Clone, Debug)]
pub struct Kept {
    pub name: String,
    pub tensor: TensorEntry,
    pub dtype: Dtype,
}

/// The tuner's tensors of a `PeftModel.state_dict()`.
#[derive(Debug, Default)]
pub struct KeptTuner {
    /// Per adapted module (its name relative to the base model), in saved order.
    pub modules: BTreeMap<String, Vec<Kept>>,
    /// Tensors on the tuner model itself (`base_model.<name>.default`).
    pub model_level: Vec<Kept>,
}

/// The adapter's tensors under their `PeftModel.state_dict()` names, or a refusal naming
/// the tuner when its state_dict is not known to follow these rules.
/// `base_dtype`: the dtype of a base tensor by key, when there is a base.
pub fn kept_tuner(ad: &Adapter, base_dtype: &dyn Fn(&str) -> Option<Dtype>) -> Result<KeptTuner> {
    let Some(tuner) = ad.tuner.as_ref() else {
        return Ok(KeptTuner::default());
    };
    if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == tuner.name()) {
        return Err(Error::Plan(format!(
            "adapter {}: --keep-lora does not write {} adapters: {why}; merge it instead",
            ad.dir.display(),
            tuner.name()
        )));
    }
    if !CHECKED.contains(&tuner.name()) {
        return Err(Error::Plan(format!(
            "adapter {}: --keep-lora does not write {} adapters (their PeftModel.state_dict() is not \
             checked against PEFT: PEFT may create tensors at load that the adapter file lacks); merge \
             it instead",
            ad.dir.display(),
            tuner.name()
        )));
    };
    // Several TinyLoRA vectors (weight_tying < 1): the merge refuses them (which module uses
    // which follows the base model's module order), and so does --keep-lora, with or without
    // a base, rather than write a state_dict whose merge would be refused.
    if tuner.name() == "TinyLoRA" && ad.shared.len() > 1 {
        return Err(Error::Plan(format!(
            "adapter {}: --keep-lora does not write TinyLoRA adapters with {} vectors (weight_tying < 1 \
             over several modules: which module uses which follows the base model's module order, \
             which lorastream cannot see); only one shared vector is written",
            ad.dir.display(),
            ad.shared.len()
        )));
    }
    // PEFT upcasts a float adapter to f32 when it loads it (autocast_adapter_dtype).
    let dtype_of = |t: &TensorEntry| {
        if t.dtype.is_float() {
            Dtype::F32
        } else {
            t.dtype
        }
    };
    let mut out = KeptTuner::default();
    for m in &ad.tuned {
        let prefix = format!("{SAVED_PREFIX}{}.", m.name);
        let mut kept = Vec::new();
        for t in m.parts.values() {
            let rest = t.name.strip_prefix(&prefix).ok_or_else(|| {
                Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!("is a part of module '{}' but not named under it", m.name),
                )
            })?;
            let dtype = match in_base_dtype(tuner.name(), &m.name, rest) {
                Some(key) => base_dtype(&key).unwrap_or(t.dtype),
                None => dtype_of(t),
            };
            kept.push(Kept {
                name: format!("{prefix}{}", with_adapter_name(rest)),
                tensor: t.clone(),
                dtype,
            });
        }
        for (name, t) in &ad.shared {
            // RandLoRA saves the shared bases again under each module: PEFT's layer holds the
            // one shared buffer, so the module's copy must be the same values (then it is
            // that name already).
            if let Some(copy) = m.parts.get(name.as_str()) {
                if copy.shape != t.shape || copy.dtype != t.dtype || copy.bytes() != t.bytes() {
                    return Err(Error::tensor(
                        copy.file.path(),
                        &copy.name,
                        format!(
                            "differs from the shared '{SAVED_PREFIX_MODEL}{name}'; PEFT's state_dict holds \
                             one buffer under both names, which the file does not settle"
                        ),
                    ));
                }
                continue;
            }
            kept.push(shared(t, format!("{prefix}{}", with_adapter_name(name)))?);
        }
        out.modules.insert(m.name.clone(), kept);
    }
    for (name, t) in &ad.shared {
        out.model_level.push(shared(
            t,
            format!("base_model.{}", with_adapter_name(name)),
        )?);
    }
    if tuner.name() == "AdaLoRA" {
        adalora_state(ad, base_dtype, &mut out)?;
    }
    Ok(out)
}

/// AdaLoRA's state_dict beyond its saved tensors (see `adalora::state_dict_facts`): each
/// module's `ranknum` (`float(init_r)` through the base weight's dtype, as f32), and on a
/// 16-bit base the factors of a module `rank_pattern` rebuilds rounded to that dtype (as
/// f32). Without a base the weight's dtype is unknown: the saved values are kept, as for
/// the other parts PEFT makes in the base's dtype.
fn adalora_state(
    ad: &Adapter,
    base_dtype: &dyn Fn(&str) -> Option<Dtype>,
    out: &mut KeptTuner,
) -> Result<()> {
    let path = &ad.config.path;
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
    let (init_r, patterned) = crate::adapter::tuners::adalora::state_dict_facts(&v, path)?;
    let f32_entry = |file: &std::path::Path, name: &str, shape: Vec<usize>, v: &[f32]| {
        TensorEntry::in_memory(file, name, Dtype::F32, shape, bytemuck::cast_slice(v))
    };
    for (module, kept) in out.modules.iter_mut() {
        let wdtype = base_dtype(&format!("{module}.weight"));
        if let Some(wd) = wdtype.filter(|_| patterned.contains(module)) {
            for k in kept.iter_mut() {
                let mut v = decode(&k.tensor);
                round_through(wd, &mut v);
                // Same file and name: the adapter's tensor, only its values rounded.
                k.tensor = f32_entry(
                    k.tensor.file.path(),
                    &k.tensor.name,
                    k.tensor.shape.clone(),
                    &v,
                )?;
                k.dtype = Dtype::F32;
            }
        }
        let mut r = [init_r as f32];
        if let Some(wd) = wdtype {
            round_through(wd, &mut r);
        }
        let name = format!("{SAVED_PREFIX}{module}.ranknum.default");
        kept.push(Kept {
            tensor: f32_entry(ad.weights_path(), &name, vec![1], &r)?,
            name,
            dtype: Dtype::F32,
        });
    }
    Ok(())
}

/// A shared tensor under one of its names. Only f32 ones: PEFT loads the saved values into
/// buffers it made itself, and which dtype those have for other saved dtypes is not checked.
fn shared(t: &TensorEntry, name: String) -> Result<Kept> {
    if t.dtype != Dtype::F32 {
        return Err(Error::tensor(
            t.file.path(),
            &t.name,
            format!(
                "--keep-lora writes shared tuner tensors only when saved as F32 (this one is {:?}; the \
                 dtype PEFT's state_dict gives it is not checked); merge the adapter instead",
                t.dtype
            ),
        ));
    }
    Ok(Kept {
        name,
        tensor: t.clone(),
        dtype: Dtype::F32,
    })
}

/// The base tensor whose dtype PEFT gives the part `rest` of `module` (observed in PEFT
/// 0.21.2 with f16 and bf16 bases: not upcast like the other adapter tensors), if any.
fn in_base_dtype(tuner: &str, module: &str, rest: &str) -> Option<String> {
    match tuner {
        // A deep copy of the norm layer: `ln_tuning_layers.weight` is like `module.weight`.
        "LN Tuning" => rest
            .strip_prefix("ln_tuning_layers.")
            .map(|p| format!("{module}.{p}")),
        // The zero buffers of a path set to "none" are made like the layer's weight.
        "GLoRA" if rest.ends_with(".zeros") => Some(format!("{module}.weight")),
        _ => None,
    }
}

/// `ia3_l` → `ia3_l.default`, `oft_R.weight` → `oft_R.default.weight`,
/// `glora_A.Xd` → `glora_A.default.Xd`: the adapter name after the dict's own name.
fn with_adapter_name(rest: &str) -> String {
    match rest.split_once('.') {
        Some((dict, tail)) => format!("{dict}.default.{tail}"),
        None => format!("{rest}.default"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_made_like_the_base_layer() {
        assert_eq!(
            in_base_dtype("LN Tuning", "ln0", "ln_tuning_layers.bias").as_deref(),
            Some("ln0.bias")
        );
        assert_eq!(
            in_base_dtype("GLoRA", "lin0", "glora_A.zeros").as_deref(),
            Some("lin0.weight")
        );
        assert_eq!(in_base_dtype("GLoRA", "lin0", "glora_A.Xd"), None);
        assert_eq!(in_base_dtype("IA3", "lin0", "ia3_l"), None);
    }

    #[test]
    fn adapter_name_goes_after_the_dict() {
        assert_eq!(with_adapter_name("ia3_l"), "ia3_l.default");
        assert_eq!(with_adapter_name("oft_R.weight"), "oft_R.default.weight");
        assert_eq!(
            with_adapter_name("ln_tuning_layers.bias"),
            "ln_tuning_layers.default.bias"
        );
        assert_eq!(with_adapter_name("glora_D.X"), "glora_D.default.X");
        // A shared ParameterList (TinyLoRA's vectors) the same way.
        assert_eq!(with_adapter_name("tinylora_v.0"), "tinylora_v.default.0");
    }

    #[test]
    fn every_listed_tuner_exists() {
        // A renamed tuner would silently fall out of --keep-lora: the names must be real. The
        // tuner fixtures' configs open every tuner (each needs its own config fields).
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tuner_matrix");
        let mut names = std::collections::BTreeSet::new();
        for tuner in std::fs::read_dir(&root).expect("fixtures/tuner_matrix") {
            let adapters = tuner.expect("entry").path().join("adapters");
            let Ok(dirs) = std::fs::read_dir(&adapters) else {
                continue;
            };
            for d in dirs {
                let path = d.expect("entry").path().join("adapter_config.json");
                let text = std::fs::read_to_string(&path).expect("adapter_config.json");
                let cfg: serde_json::Value = serde_json::from_str(&text).expect("json");
                let pt = cfg["peft_type"].as_str().expect("peft_type");
                if let Some(kind) = crate::adapter::tuners::tuner_type(pt)
                    && let Ok(t) = (kind.open)(&cfg, &path)
                {
                    names.insert(t.name());
                }
            }
        }
        for n in CHECKED.iter().chain(REFUSED.iter().map(|(n, _)| n)) {
            assert!(
                names.contains(n),
                "{n} is not the name of a tuner ({names:?})"
            );
        }
    }
}
