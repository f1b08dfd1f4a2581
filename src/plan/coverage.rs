//! Adapter coverage: every tensor an adapter holds (lora_A/B, lora_B.bias, DoRA
//! magnitude, full replacements) must end up in the output exactly once — applied by a
//! merge step, or copied under `--keep-lora`. An adapter tensor no output uses (its
//! target left out by `--exclude`, a part the planner does not know what to do with) is
//! an error naming it, so nothing an adapter carries is dropped silently. The counts
//! (present / used, per adapter) go into the merge report.

use super::component::{Component, MergeSettings};
use super::merge_types::{Job, JobSource};
use super::rename;
use crate::adapter::{Adapter, SAVED_PREFIX};
use crate::error::{Error, Result};
use crate::source::{TensorData, TensorEntry};
use std::collections::HashMap;
use std::path::PathBuf;

/// One adapter's tensors: how many it holds and how many the plan uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AdapterCoverage {
    pub tensors: usize,
    pub used: usize,
}

/// Per component, per adapter (command-line order).
pub type Coverage = Vec<Vec<AdapterCoverage>>;

/// Every tensor an adapter holds, with the base key it is meant for and whether several
/// output tensors may use it: a tuner's parts may change the weight and the bias (IA3,
/// RoAd) and its shared tensors serve every module — the tuner file decides where each
/// goes. A LoRA part or a full copy is used once (or by tied outputs of one storage).
fn adapter_tensors(ad: &Adapter) -> Vec<(&TensorEntry, String, bool)> {
    let mut out = Vec::new();
    for m in &ad.tuned {
        for t in m.parts.values() {
            out.push((t, format!("{}.weight", m.name), true));
        }
    }
    for (name, t) in &ad.shared {
        out.push((t, name.clone(), true));
    }
    for m in &ad.modules {
        let parts = [
            Some(&m.a),
            Some(&m.b),
            m.b_bias.as_ref(),
            m.magnitude.as_ref(),
        ];
        for (i, t) in parts.into_iter().enumerate() {
            if let Some(t) = t {
                // lora_B.bias lands on the bias, the other parts on the weight.
                let target = if i == 2 { "bias" } else { "weight" };
                out.push((t, format!("{}.{target}", m.name), false));
            }
        }
    }
    for r in &ad.replacements {
        out.push((&r.tensor, r.base_key.clone(), false));
    }
    out
}

/// The stored tensors a job reads.
fn job_inputs(j: &Job) -> Vec<&TensorEntry> {
    match &j.source {
        JobSource::Copy(t) => vec![t],
        JobSource::Merge { base, steps } => {
            let mut v = vec![base];
            for s in steps {
                v.extend(s.inputs());
            }
            v
        }
    }
}

/// Whether two entries are the same bytes of the same file (tied weights sharing one
/// storage: a delta on one is a delta on both, as PEFT's in-place merge does).
fn same_storage(a: &TensorEntry, b: &TensorEntry) -> bool {
    let data_eq = match (&a.data, &b.data) {
        (
            TensorData::Contiguous { start: s1, len: l1 },
            TensorData::Contiguous { start: s2, len: l2 },
        ) => s1 == s2 && l1 == l2,
        (
            TensorData::Strided {
                base: b1,
                offset: o1,
                strides: st1,
            },
            TensorData::Strided {
                base: b2,
                offset: o2,
                strides: st2,
            },
        ) => b1 == b2 && o1 == o2 && st1 == st2,
        (
            TensorData::Decoded {
                decoder: d1,
                offset: o1,
            },
            TensorData::Decoded {
                decoder: d2,
                offset: o2,
            },
        ) => std::sync::Arc::ptr_eq(d1, d2) && o1 == o2,
        _ => false,
    };
    data_eq && a.file.path() == b.file.path() && a.shape == b.shape
}

type Key = (usize, PathBuf, String);

fn key(component: usize, t: &TensorEntry) -> Key {
    (component, t.file.path().to_path_buf(), t.name.clone())
}

/// For each adapter tensor, the indices of the jobs that read it.
fn uses(components: &[Component], jobs: &[Job]) -> HashMap<Key, Vec<usize>> {
    let mut uses: HashMap<Key, Vec<usize>> = HashMap::new();
    for (ci, c) in components.iter().enumerate() {
        for ad in &c.adapters {
            for (t, _, _) in adapter_tensors(ad) {
                uses.entry(key(ci, t)).or_default();
            }
        }
    }
    for (ji, j) in jobs.iter().enumerate() {
        for t in job_inputs(j) {
            if let Some(u) = uses.get_mut(&key(j.component, t)) {
                if !u.contains(&ji) {
                    u.push(ji);
                }
            }
        }
    }
    uses
}

/// Counts, per component and adapter, the adapter tensors the plan uses.
pub fn count(components: &[Component], jobs: &[Job]) -> Coverage {
    let uses = uses(components, jobs);
    components
        .iter()
        .enumerate()
        .map(|(ci, c)| {
            c.adapters
                .iter()
                .map(|ad| {
                    let all = adapter_tensors(ad);
                    AdapterCoverage {
                        tensors: all.len(),
                        used: all
                            .iter()
                            .filter(|(t, _, _)| {
                                uses.get(&key(ci, t)).is_some_and(|u| !u.is_empty())
                            })
                            .count(),
                    }
                })
                .collect()
        })
        .collect()
}

/// Fails unless every adapter tensor is used by exactly one output tensor (or by several
/// that are one storage, tied weights). The message names the tensor, its file, its
/// target and, when `--exclude` left the target out, that rule.
pub fn check(components: &[Component], settings: &MergeSettings, jobs: &[Job]) -> Result<()> {
    let uses = uses(components, jobs);
    for (ci, c) in components.iter().enumerate() {
        for ad in &c.adapters {
            let all = adapter_tensors(ad);
            let mut unused: Vec<(&TensorEntry, &String)> = Vec::new();
            for (t, target, repeats) in &all {
                let u = uses.get(&key(ci, t)).map_or(&[][..], Vec::as_slice);
                match u {
                    [] => unused.push((t, target)),
                    _ if *repeats => {}
                    [first, rest @ ..] => {
                        let base = jobs[*first].source_tensor();
                        if let Some(other) = rest
                            .iter()
                            .find(|&&o| !same_storage(base, jobs[o].source_tensor()))
                        {
                            return Err(Error::tensor(
                                t.file.path(),
                                &t.name,
                                format!(
                                    "internal: this adapter tensor is applied to two output tensors \
                                     ('{}' and '{}') that are not one storage; nothing was written",
                                    jobs[*first].out.name, jobs[*other].out.name
                                ),
                            ));
                        }
                    }
                }
            }
            if let Some((t, target)) = unused.first() {
                let final_of = |k: &str| rename::apply(&settings.renames, &prefixed(c, k));
                let final_key = final_of(target);
                let candidates = [
                    final_key.clone(),
                    final_of(&format!("{SAVED_PREFIX}{target}")),
                    final_of(&t.name),
                ];
                let why = match excluded_by(&settings.exclude, &candidates) {
                    Some((k, re)) => format!(
                        " (its target '{k}' is left out by --exclude '{re}'; narrow that rule, or \
                         remove the module from the adapter if it is really meant to be dropped)"
                    ),
                    None => format!(" (meant for '{final_key}')"),
                };
                return Err(Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!(
                        "adapter {} (component {}): {} of its {} tensors are used by no output tensor, \
                         this one first{why}; nothing was written",
                        ad.dir.display(),
                        c.label(),
                        unused.len(),
                        all.len(),
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn prefixed(c: &Component, k: &str) -> String {
    match &c.name {
        Some(n) => format!("{n}.{k}"),
        None => k.to_string(),
    }
}

/// The `--exclude` rule that left out one of `keys` (the final keys the tensor's target
/// would have, merged or under `--keep-lora`), if any: for the message only.
fn excluded_by(exclude: &[regex::Regex], keys: &[String]) -> Option<(String, String)> {
    keys.iter().find_map(|k| {
        exclude
            .iter()
            .find(|re| re.is_match(k))
            .map(|re| (k.clone(), re.as_str().to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::merge::plan;
    use crate::source;
    use std::path::Path;

    fn fixture(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/peft")
            .join(p)
    }

    fn component(adapter: &str) -> Component {
        Component {
            name: None,
            base: Some(source::open(&fixture("bases/llama_f32")).unwrap()),
            adapters: vec![Adapter::open(&fixture(adapter)).unwrap()],
            model_config: source::model_config(&fixture("bases/llama_f32")).unwrap(),
        }
    }

    #[test]
    fn counts_every_part_once() {
        let comps = [component("cases/dora_linear/adapter")];
        let jobs = plan(&comps, &MergeSettings::default()).unwrap();
        let n = adapter_tensors(&comps[0].adapters[0]).len();
        assert!(n > 0);
        assert_eq!(
            count(&comps, &jobs),
            vec![vec![AdapterCoverage {
                tensors: n,
                used: n
            }]]
        );
    }

    #[test]
    fn a_dropped_job_leaves_its_adapter_tensors_unused() {
        // What a planning bug (or a filter applied after the steps were made) would do:
        // the check sees it whichever rule dropped the job.
        let comps = [component("cases/modules_to_save/adapter")];
        let mut jobs = plan(&comps, &MergeSettings::default()).unwrap().into_jobs();
        jobs.retain(|j| j.out.name != "lm_head.weight");
        let c = count(&comps, &jobs);
        assert_eq!(c[0][0].used + 1, c[0][0].tensors);
        let e = check(&comps, &MergeSettings::default(), &jobs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'base_model.model.lm_head.weight'")
                && e.contains("meant for 'lm_head.weight'"),
            "{e}"
        );
    }

    #[test]
    fn tied_uses_are_allowed_and_others_are_not() {
        let comps = [component("cases/llama_f32/adapter")];
        let mut jobs = plan(&comps, &MergeSettings::default()).unwrap().into_jobs();
        let q = jobs
            .iter()
            .position(|j| j.out.name == "model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        // The same merge written under a second name: one storage, so allowed.
        let mut tied = jobs[q].clone();
        tied.out.name = "tied.weight".into();
        jobs.push(tied);
        check(&comps, &MergeSettings::default(), &jobs).unwrap();
        // The same steps on another base tensor: applied twice.
        let mut other = jobs[q].clone();
        if let JobSource::Merge { base, .. } = &mut other.source {
            *base = comps[0].base.as_ref().unwrap().tensors[0].clone();
        }
        other.out.name = "other.weight".into();
        jobs.push(other);
        let e = check(&comps, &MergeSettings::default(), &jobs)
            .unwrap_err()
            .to_string();
        assert!(e.contains("applied to two output tensors"), "{e}");
    }
}
