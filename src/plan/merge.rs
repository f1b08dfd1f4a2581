//! The merge plan: components (a NAME with a base and/or adapters) → the ordered list of
//! output tensors, each with its source and merge steps. Every check that can fail on the
//! inputs runs here, before anything is written: adapter modules that match no base
//! tensor (with a hint about the likely prefix), shape mismatches, lora_bias without a base
//! bias, grouped convolutions, key collisions, `--expect-keys-from`.

use super::merge_types::{DeltaLayout, Job, JobSource, LoraStep, Step};
use super::{DtypeChoice, RenameRule, rename};
use crate::adapter::{Adapter, LoraModule, SAVED_PREFIX};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::sink::OutTensor;
use crate::source::{Checkpoint, TensorEntry};
use std::collections::{HashMap, HashSet};

/// One component: its name (the output key prefix), base weights and adapters (in order).
pub struct Component {
    pub name: Option<String>,
    pub base: Option<Checkpoint>,
    pub adapters: Vec<Adapter>,
}

impl Component {
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| "(unnamed)".into())
    }
    fn key(&self, k: &str) -> String {
        match &self.name {
            Some(n) => format!("{n}.{k}"),
            None => k.to_string(),
        }
    }
}

/// How the output is laid out.
#[derive(Clone, Debug, Default)]
pub struct MergeSettings {
    /// Keep the adapters unmerged, in `PeftModel.state_dict()` form.
    pub keep_lora: bool,
    pub dtype: DtypeChoice,
    pub renames: Vec<RenameRule>,
    /// `--exclude`: final keys to leave out.
    pub exclude: Vec<regex::Regex>,
}

/// Plans the whole output.
pub fn plan(components: &[Component], settings: &MergeSettings) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for (ci, c) in components.iter().enumerate() {
        let before = jobs.len();
        if settings.keep_lora {
            plan_keep_lora(ci, c, settings, &mut jobs)?;
        } else {
            plan_merged(ci, c, settings, &mut jobs)?;
        }
        for j in &mut jobs[before..] {
            j.out.name = rename::apply(&settings.renames, &c.key(&j.out.name));
        }
    }
    jobs.retain(|j| !rename::excluded(&settings.exclude, &j.out.name));
    let sources: Vec<String> = jobs.iter().map(describe_source).collect();
    rename::check_unique(
        jobs.iter()
            .zip(&sources)
            .map(|(j, s)| (j.out.name.as_str(), s.as_str())),
    )?;
    super::coverage::check(components, settings, &jobs)?;
    check_mergeable(&jobs)?;
    Ok(jobs)
}

fn describe_source(j: &Job) -> String {
    let t = j.source_tensor();
    format!("{} in {}", t.name, t.file.path().display())
}

/// Per base key, the steps every adapter adds, after checking each adapter fits the base.
fn steps_for_base(c: &Component, base: &Checkpoint) -> Result<HashMap<String, Vec<Step>>> {
    let by_name: HashMap<&str, &TensorEntry> =
        base.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut steps: HashMap<String, Vec<Step>> = HashMap::new();
    for ad in &c.adapters {
        let mut unmatched: Vec<String> = Vec::new();
        for rep in &ad.replacements {
            match by_name.get(rep.base_key.as_str()) {
                None => unmatched.push(rep.saved_key.clone()),
                Some(w) => {
                    if w.shape != rep.tensor.shape
                        || !rep.tensor.dtype.is_float() && rep.tensor.dtype != w.dtype
                    {
                        return Err(Error::tensor(
                            ad.weights_path(),
                            &rep.tensor.name,
                            format!(
                                "has shape {:?} {} but base tensor '{}' in {} is {:?} {}",
                                rep.tensor.shape,
                                rep.tensor.dtype,
                                w.name,
                                base.path.display(),
                                w.shape,
                                w.dtype
                            ),
                        ));
                    }
                    steps
                        .entry(rep.base_key.clone())
                        .or_default()
                        .push(Step::Replace(rep.tensor.clone()));
                }
            }
        }
        for m in &ad.modules {
            let wkey = format!("{}.weight", m.name);
            let Some(w) = by_name.get(wkey.as_str()) else {
                unmatched.push(m.name.clone());
                continue;
            };
            let step = lora_step(ad, m, w, base)?;
            steps
                .entry(wkey)
                .or_default()
                .push(Step::Lora(Box::new(step)));
            if let Some(bias) = &m.b_bias {
                let bkey = format!("{}.bias", m.name);
                let Some(bw) = by_name.get(bkey.as_str()) else {
                    return Err(Error::tensor(
                        ad.weights_path(),
                        &bias.name,
                        format!(
                            "lora_bias=True but the base has no '{bkey}' to add it to (PEFT refuses this merge too)"
                        ),
                    ));
                };
                if bw.shape != [bias.numel()] {
                    return Err(Error::tensor(
                        ad.weights_path(),
                        &bias.name,
                        format!(
                            "has {} values but base '{bkey}' has shape {:?}",
                            bias.numel(),
                            bw.shape
                        ),
                    ));
                }
                steps.entry(bkey).or_default().push(Step::AddBias {
                    bias: bias.clone(),
                    scale: m.scale,
                });
            }
        }
        if !unmatched.is_empty() {
            return Err(mismatch_error(c, ad, base, &unmatched));
        }
    }
    Ok(steps)
}

/// Explains adapter modules that match no base tensor, with the likely prefix fix.
fn mismatch_error(c: &Component, ad: &Adapter, base: &Checkpoint, unmatched: &[String]) -> Error {
    let total = ad.modules.len() + ad.replacements.len();
    let names: HashSet<&str> = base.tensors.iter().map(|t| t.name.as_str()).collect();
    let has = |m: &str| names.contains(format!("{m}.weight").as_str()) || names.contains(m);
    let first = &unmatched[0];
    let mut hint = String::new();
    if first.strip_prefix(SAVED_PREFIX).is_some_and(has) {
        hint = format!(
            " The adapter's keys carry '{SAVED_PREFIX}' twice (saved from an already wrapped model): \
             re-save it, or strip one prefix."
        );
    }
    if hint.is_empty() {
        for p in ["model.", "model.model.", "language_model.model."] {
            if has(&format!("{p}{first}")) {
                hint = format!(
                    " They would match if prefixed with '{p}' (e.g. '{p}{first}'): the adapter was saved \
                     relative to another module than this base (missing inner '{p}')."
                );
                break;
            }
        }
    }
    if let Some((_, rest)) = first
        .split_once('.')
        .filter(|(_, r)| hint.is_empty() && has(r))
    {
        hint = format!(" They would match without their first component (e.g. '{rest}').");
    }
    let shown: Vec<&str> = unmatched.iter().take(5).map(String::as_str).collect();
    Error::Plan(format!(
        "adapter {} (component {}): {} of its {} modules/tensors match no tensor of base {}, e.g. {}.{} \
         Nothing was written.",
        ad.dir.display(),
        c.label(),
        unmatched.len(),
        total,
        base.path.display(),
        shown
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", "),
        hint
    ))
}

/// Works out how a module's A and B line up with the base weight `w`.
fn lora_step(ad: &Adapter, m: &LoraModule, w: &TensorEntry, base: &Checkpoint) -> Result<LoraStep> {
    let bad = |msg: String| {
        Error::tensor(
            ad.weights_path(),
            &m.a.name,
            format!(
                "{msg} (base '{}' in {} is {:?})",
                w.name,
                base.path.display(),
                w.shape
            ),
        )
    };
    let (a, b) = (&m.a.shape, &m.b.shape);
    let r = m.r;
    let float_ok = m.a.dtype.is_float() && m.b.dtype.is_float();
    if !float_ok {
        return Err(bad("LoRA weights are not floating point".into()));
    }
    let layout = if m.embedding {
        // A [r, V], B [D, r], W [V, D]
        if a.len() != 2 || b.len() != 2 || w.shape != [a[1], b[0]] {
            return Err(bad(format!(
                "embedding LoRA A {a:?} / B {b:?} does not fit"
            )));
        }
        DeltaLayout::Transposed
    } else if a.len() == 2 {
        if b.len() != 2 || w.shape.len() != 2 {
            return Err(bad(format!("LoRA A {a:?} / B {b:?} does not fit")));
        }
        let normal = w.shape == [b[0], a[1]];
        let transposed = w.shape == [a[1], b[0]];
        match (normal, transposed) {
            // Square: only the config can tell (PEFT forces fan_in_fan_out for Conv1D).
            (true, true) if ad.config.fan_in_fan_out => DeltaLayout::Transposed,
            (true, _) => DeltaLayout::Normal,
            (false, true) => DeltaLayout::Transposed,
            (false, false) => {
                return Err(bad(format!(
                    "LoRA A {a:?} / B {b:?} does not fit (shape mismatch)"
                )));
            }
        }
    } else {
        // Convolutions: A [r, in, k…], B [out, r, 1…], W [out, in, k…].
        let fits_b =
            b.len() == a.len() && b.iter().skip(2).all(|&d| d == 1) && w.shape.first() == b.first();
        if !fits_b || w.shape.len() != a.len() {
            return Err(bad(format!(
                "conv LoRA A {a:?} / B {b:?} does not fit (shape mismatch)"
            )));
        }
        if w.shape[1..] != a[1..] {
            if w.shape[2..] == a[2..] && a[1] != 0 && w.shape[1] != a[1] {
                return Err(bad(format!(
                    "grouped convolutions cannot be merged (PEFT refuses too): A {a:?} vs weight {:?}",
                    w.shape
                )));
            }
            return Err(bad(format!(
                "conv LoRA A {a:?} does not fit (shape mismatch)"
            )));
        }
        DeltaLayout::Normal
    };
    if let Some(mag) = &m.magnitude {
        let want = match layout {
            DeltaLayout::Normal => w.shape[0],
            DeltaLayout::Transposed => w.shape[1],
        };
        if mag.numel() != want || !mag.dtype.is_float() {
            return Err(bad(format!(
                "DoRA magnitude {:?} does not have {want} values",
                mag.shape
            )));
        }
    }
    Ok(LoraStep {
        a: m.a.clone(),
        b: m.b.clone(),
        r,
        scale: m.scale,
        layout,
        round_delta_first: m.embedding && m.magnitude.is_none(),
        magnitude: m.magnitude.clone(),
    })
}

fn plan_merged(ci: usize, c: &Component, s: &MergeSettings, jobs: &mut Vec<Job>) -> Result<()> {
    let Some(base) = &c.base else {
        return Err(Error::Plan(format!(
            "component {} has adapters but no --base: merging needs the base weights (or pass --keep-lora to \
             write the adapters unmerged)",
            c.label()
        )));
    };
    let mut steps = steps_for_base(c, base)?;
    for t in &base.tensors {
        let source = match steps.remove(&t.name) {
            Some(st) => JobSource::Merge {
                base: t.clone(),
                steps: st,
            },
            None => JobSource::Copy(t.clone()),
        };
        jobs.push(Job {
            out: OutTensor {
                name: t.name.clone(),
                dtype: s.dtype.apply(t.dtype),
                shape: t.shape.clone(),
            },
            source,
            component: ci,
        });
    }
    Ok(())
}

/// `PeftModel.state_dict()` keys: `base_model.model.` + key, with targeted modules' own
/// tensors under `base_layer`, modules_to_save under `original_module` and
/// `modules_to_save.default`, and the LoRA tensors with the adapter name `default`.
fn plan_keep_lora(ci: usize, c: &Component, s: &MergeSettings, jobs: &mut Vec<Job>) -> Result<()> {
    let ad = match c.adapters.as_slice() {
        [] => {
            // No adapter: the component's tensors as they are.
            if c.base.is_some() {
                plan_merged(ci, c, s, jobs)?;
            }
            return Ok(());
        }
        [one] => one,
        _ => {
            return Err(Error::Plan(format!(
                "component {}: --keep-lora takes one adapter per component (PEFT names it 'default'); \
                 merge the others first or give them separate components",
                c.label()
            )));
        }
    };
    let replacements: HashMap<&str, &TensorEntry> = ad
        .replacements
        .iter()
        .map(|r| (r.base_key.as_str(), &r.tensor))
        .collect();
    let targeted: HashSet<&str> = ad.modules.iter().map(|m| m.name.as_str()).collect();
    // Adapter tensors are f32 in PeftModel.state_dict() (PEFT upcasts them on load).
    let adapter_dtype = |t: &TensorEntry| {
        s.dtype.apply(if t.dtype.is_float() {
            Dtype::F32
        } else {
            t.dtype
        })
    };
    let push = |jobs: &mut Vec<Job>, name: String, t: &TensorEntry, dtype: Dtype| {
        jobs.push(Job {
            out: OutTensor {
                name,
                dtype,
                shape: t.shape.clone(),
            },
            source: JobSource::Copy(t.clone()),
            component: ci,
        })
    };
    let push_lora = |jobs: &mut Vec<Job>, m: &LoraModule| {
        let (a_key, b_key) = if m.embedding {
            ("lora_embedding_A.default", "lora_embedding_B.default")
        } else {
            ("lora_A.default.weight", "lora_B.default.weight")
        };
        let parts = [
            (a_key, Some(&m.a)),
            (b_key, Some(&m.b)),
            ("lora_B.default.bias", m.b_bias.as_ref()),
            ("lora_magnitude_vector.default.weight", m.magnitude.as_ref()),
        ];
        for (suffix, t) in parts {
            if let Some(t) = t {
                let name = format!("{SAVED_PREFIX}{}.{suffix}", m.name);
                push(jobs, name, t, adapter_dtype(t));
            }
        }
    };
    match &c.base {
        Some(base) => {
            // Validate the adapter against the base exactly as a merge would.
            steps_for_base(c, base)?;
            let mut emitted: HashSet<&str> = HashSet::new();
            for t in &base.tensors {
                let (module, param) = t.name.rsplit_once('.').unwrap_or(("", t.name.as_str()));
                let value = replacements.get(t.name.as_str()).copied().unwrap_or(t);
                let base_dtype = s.dtype.apply(t.dtype);
                if targeted.contains(module) {
                    let name = format!("{SAVED_PREFIX}{module}.base_layer.{param}");
                    jobs.push(cast_job(ci, name, value, t, base_dtype));
                    if !emitted.contains(module) && param == "weight" {
                        emitted.insert(module);
                        if let Some(m) = ad.module(module) {
                            push_lora(jobs, m);
                        }
                    }
                } else if !module.is_empty() && ad.config.saves_module(module) {
                    push(
                        jobs,
                        format!("{SAVED_PREFIX}{module}.original_module.{param}"),
                        t,
                        base_dtype,
                    );
                    let name = format!("{SAVED_PREFIX}{module}.modules_to_save.default.{param}");
                    jobs.push(cast_job(ci, name, value, t, base_dtype));
                } else {
                    jobs.push(cast_job(
                        ci,
                        format!("{SAVED_PREFIX}{}", t.name),
                        value,
                        t,
                        base_dtype,
                    ));
                }
            }
        }
        None => {
            for m in &ad.modules {
                push_lora(jobs, m);
            }
            for r in &ad.replacements {
                let (module, param) = r
                    .base_key
                    .rsplit_once('.')
                    .unwrap_or(("", r.base_key.as_str()));
                let name = if targeted.contains(module) {
                    format!("{SAVED_PREFIX}{module}.base_layer.{param}")
                } else if !module.is_empty() && ad.config.saves_module(module) {
                    format!("{SAVED_PREFIX}{module}.modules_to_save.default.{param}")
                } else {
                    format!("{SAVED_PREFIX}{}", r.base_key)
                };
                push(jobs, name, &r.tensor, s.dtype.apply(r.tensor.dtype));
            }
        }
    }
    Ok(())
}

/// A copy of `value` (the base tensor or its replacement) in the base tensor's dtype.
fn cast_job(ci: usize, name: String, value: &TensorEntry, base: &TensorEntry, dtype: Dtype) -> Job {
    let source = if value.dtype == base.dtype {
        JobSource::Copy(value.clone())
    } else {
        // A replacement lands in the base tensor's dtype first (load_state_dict copies).
        JobSource::Merge {
            base: base.clone(),
            steps: vec![Step::Replace(value.clone())],
        }
    };
    Job {
        out: OutTensor {
            name,
            dtype,
            shape: base.shape.clone(),
        },
        source,
        component: ci,
    }
}

/// Every merged job's tensors are in dtypes the backends compute in: a LoRA delta, bias
/// or replacement on a float8 or integer weight is refused here, in planning, so no
/// backend starts writing before finding out (the backends keep their own assertion as
/// an internal error).
pub fn check_mergeable(jobs: &[Job]) -> Result<()> {
    for j in jobs {
        let JobSource::Merge { base, steps } = &j.source else {
            continue;
        };
        if !base.dtype.is_float() || !j.out.dtype.is_float() {
            return Err(Error::tensor(
                base.file.path(),
                &base.name,
                format!(
                    "cannot merge into a {} tensor (output '{}'): LoRA deltas, lora_B.bias and \
                     replacements apply to F16/BF16/F32/F64 weights only; a quantised (float8) or \
                     integer weight must be dequantised first. Nothing was written",
                    base.dtype, j.out.name
                ),
            ));
        }
        for s in steps {
            let parts: Vec<&TensorEntry> = match s {
                Step::Replace(t) => vec![t],
                Step::AddBias { bias, .. } => vec![bias],
                Step::Lora(l) => [Some(&l.a), Some(&l.b), l.magnitude.as_ref()]
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            if let Some(t) = parts.iter().find(|t| !t.dtype.is_float()) {
                return Err(Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!(
                        "is {}, but merging into '{}' needs floating adapter tensors \
                         (F16/BF16/F32/F64). Nothing was written",
                        t.dtype, base.name
                    ),
                ));
            }
        }
    }
    Ok(())
}
