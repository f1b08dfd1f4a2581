//! The merge plan: components (a NAME with a base and/or adapters) → the ordered list of
//! output tensors, each with its source and merge steps. Every check that can fail on the
//! inputs runs here, before anything is written: adapter modules that match no base
//! tensor (with a hint about the likely prefix), shape mismatches, lora_bias without a base
//! bias, grouped convolutions, key collisions, `--expect-keys-from`.

use super::checked::CheckedJobs;
pub use super::component::{Component, MergeSettings};
use super::dora_sequence::DoraSequence;
use super::layout::LayoutEvidence;
use super::merge_types::{DeltaLayout, Job, JobSource, LoraStep, Step};
use super::rename;
use super::transformers_models::TIED_WEIGHTS;
use crate::adapter::Variant;
use crate::adapter::combine::{CombinationType, Combine, CombinedLora, Part};
use crate::adapter::lora_experts::{ExpertsDelta, ExpertsLayout};
use crate::adapter::{Adapter, LoraModule, SAVED_PREFIX};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::sink::OutTensor;
use crate::source::{Checkpoint, ModelConfig, TensorData, TensorEntry};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Plans the whole output.
pub fn plan(components: &[Component], settings: &MergeSettings) -> Result<CheckedJobs> {
    plan_with_notes(components, settings, &mut Vec::new())
}

/// [`plan`], adding to `notes` what is worth telling (rename and exclude rules that
/// matched nothing).
pub fn plan_with_notes(
    components: &[Component],
    settings: &MergeSettings,
    notes: &mut Vec<String>,
) -> Result<CheckedJobs> {
    let mut jobs = Vec::new();
    let mut keys = Vec::new();
    for (ci, c) in components.iter().enumerate() {
        let before = jobs.len();
        if settings.keep_lora {
            plan_keep_lora(ci, c, settings, &mut jobs)?;
        } else {
            plan_merged(ci, c, settings, &mut jobs)?;
        }
        for j in &mut jobs[before..] {
            keys.push(c.key(&j.out.name));
            j.out.name = rename::apply(&settings.renames, &c.key(&j.out.name));
        }
    }
    notes.extend(rename::unused(&settings.renames, &settings.exclude, &keys));
    jobs.retain(|j| !rename::excluded(&settings.exclude, &j.out.name));
    // --requantize fp8-block: which outputs are FP8 again (pass-through copies are jobs).
    let requant = match settings.requantize {
        Some(super::requantize::Requantize::Fp8Block) => {
            let (expanded, requant) = super::requantize::expand(jobs, settings.keep_lora)?;
            jobs = expanded;
            requant
        }
        None => Vec::new(),
    };
    let sources: Vec<String> = jobs.iter().map(describe_source).collect();
    rename::check_unique(
        jobs.iter()
            .zip(&sources)
            .map(|(j, s)| (j.out.name.as_str(), s.as_str())),
    )?;
    mark_ties(&mut jobs);
    super::coverage::check(components, settings, &jobs)?;
    CheckedJobs::check(jobs).map(|c| c.with_requantized(requant))
}

/// Where a tensor's bytes lie in its file: (file identity, first byte, end byte).
fn footprint(t: &TensorEntry) -> Option<(usize, usize, usize)> {
    let file = Arc::as_ptr(&t.file) as usize;
    if t.numel() == 0 {
        return None;
    }
    match &t.data {
        TensorData::Contiguous { start, len } => Some((file, *start, start + len)),
        TensorData::Strided {
            base,
            offset,
            strides,
        } => {
            let es = t.dtype.size();
            let last: usize = offset
                + t.shape
                    .iter()
                    .zip(strides)
                    .map(|(d, s)| (d - 1) * s)
                    .sum::<usize>();
            Some((file, base + offset * es, base + (last + 1) * es))
        }
        // Elements of the decoder's tensor: two entries overlap when they view the same
        // decoder's elements.
        TensorData::Decoded { decoder, offset } => {
            let id = Arc::as_ptr(decoder) as *const () as usize;
            Some((id, *offset, offset + t.numel()))
        }
    }
}

/// What makes two stored tensors the same tensor: same bytes, viewed the same way.
fn view_key(t: &TensorEntry) -> String {
    let data = match &t.data {
        TensorData::Contiguous { start, len } => format!("c{start}+{len}"),
        TensorData::Strided {
            base,
            offset,
            strides,
        } => format!("s{base}:{offset}:{strides:?}"),
        TensorData::Decoded { decoder, offset } => {
            format!("d{:x}:{offset}", Arc::as_ptr(decoder) as *const () as usize)
        }
    };
    format!(
        "{:x}/{data}/{}/{:?}",
        Arc::as_ptr(&t.file) as usize,
        t.dtype,
        t.shape
    )
}

/// Groups of base tensors that are one stored tensor under several names (tied weights:
/// `torch.save` writes `wte` and `lm_head` of GPT-2 as one storage), and pairs that overlap
/// in their file without being the same view. Indices into `tensors`.
fn shared_storage(tensors: &[TensorEntry]) -> (Vec<Vec<usize>>, Vec<(usize, usize)>) {
    let mut spans: Vec<(usize, usize, usize, usize)> = tensors
        .iter()
        .enumerate()
        .filter_map(|(i, t)| footprint(t).map(|(f, a, b)| (f, a, b, i)))
        .collect();
    spans.sort_unstable();
    let (mut groups, mut partial) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < spans.len() {
        // A cluster: spans of one file that overlap one another, transitively.
        let (file, _, mut end, _) = spans[at];
        let mut stop = at + 1;
        while stop < spans.len() && spans[stop].0 == file && spans[stop].1 < end {
            end = end.max(spans[stop].2);
            stop += 1;
        }
        if stop - at > 1 {
            let mut views: Vec<(String, Vec<usize>)> = Vec::new();
            for &(_, _, _, i) in &spans[at..stop] {
                let k = view_key(&tensors[i]);
                match views.iter_mut().find(|(v, _)| *v == k) {
                    Some((_, g)) => g.push(i),
                    None => views.push((k, vec![i])),
                }
            }
            for w in views.windows(2) {
                partial.push((w[0].1[0], w[1].1[0]));
            }
            groups.extend(views.into_iter().map(|(_, g)| g).filter(|g| g.len() > 1));
        }
        at = stop;
    }
    for g in &mut groups {
        g.sort_unstable();
    }
    (groups, partial)
}

/// Gives every tied base tensor the steps of its merged twin (PEFT merges into the one
/// shared weight, so every name of it carries the merged value), and refuses what cannot
/// be written right: steps on two names of one tensor, or on a tensor that overlaps
/// another view of the same bytes.
fn spread_over_ties(base: &Checkpoint, steps: &mut HashMap<String, Vec<Step>>) -> Result<()> {
    let (groups, partial) = shared_storage(&base.tensors);
    let name = |i: usize| base.tensors[i].name.as_str();
    for (a, b) in partial {
        if let Some(m) = [a, b].into_iter().find(|&i| steps.contains_key(name(i))) {
            let other = if m == a { b } else { a };
            return Err(Error::tensor(
                base.tensors[m].file.path(),
                name(m),
                format!(
                    "shares bytes of its storage with '{}' but is another view of them ({:?} vs {:?});                      merging into it would change that tensor in a way lorastream cannot write. Re-save                      the base with separate storages (e.g. safetensors) first",
                    name(other),
                    base.tensors[m].shape,
                    base.tensors[other].shape
                ),
            ));
        }
    }
    for g in groups {
        let merged: Vec<usize> = g
            .iter()
            .copied()
            .filter(|&i| steps.contains_key(name(i)))
            .collect();
        match merged.as_slice() {
            [] => {}
            [one] => {
                let Some(st) = steps.get(name(*one)).cloned() else {
                    continue;
                };
                for &i in &g {
                    steps
                        .entry(name(i).to_string())
                        .or_insert_with(|| st.clone());
                }
            }
            [a, b, ..] => {
                return Err(Error::tensor(
                    base.tensors[*a].file.path(),
                    name(*a),
                    format!(
                        "is one tied tensor with '{}' (one storage in the file), and adapters change both                          names; PEFT would apply both to the one shared weight in module order, which the                          file does not tell. Merge the adapter of one of them only",
                        name(*b)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// For a plain copy of `sources` into `dtypes`: per tensor, the earlier one it is the very
/// same stored tensor as (tied weights), so a sink that shares storage writes it once.
pub fn tied_copies(sources: &[&TensorEntry], dtypes: &[Dtype]) -> Vec<Option<usize>> {
    earlier_twins(
        sources
            .iter()
            .zip(dtypes)
            .map(|(t, d)| footprint(t).map(|_| format!("{}|{d}", view_key(t)))),
    )
}

/// For each key, the index of the first earlier item with the same key (None for the first
/// of its kind and for items without a key).
fn earlier_twins(keys: impl Iterator<Item = Option<String>>) -> Vec<Option<usize>> {
    let mut first: HashMap<String, usize> = HashMap::new();
    keys.enumerate()
        .map(|(i, key)| {
            let key = key?;
            match first.get(&key) {
                Some(&to) => Some(to),
                None => {
                    first.insert(key, i);
                    None
                }
            }
        })
        .collect()
}

/// Marks jobs that produce the same bytes as an earlier job from the same stored tensor
/// (tied weights), so sinks that can share storage write them once.
fn mark_ties(jobs: &mut [Job]) {
    let ties = earlier_twins(jobs.iter().map(tie_key));
    for (j, to) in jobs.iter_mut().zip(ties) {
        j.tied_to = to;
    }
}

/// What makes two jobs produce the same bytes: the same stored tensor, output dtype and
/// shape, and the same steps. None for a job that reads no bytes.
fn tie_key(j: &Job) -> Option<String> {
    footprint(j.source_tensor())?;
    let steps = match &j.source {
        JobSource::Copy(_) => String::new(),
        JobSource::Merge { steps, .. } => steps
            .iter()
            .map(|s| match s {
                Step::Replace(t) => format!("R{}", view_key(t)),
                Step::Lora(l) => format!(
                    "L{}{}{:?}{}{:?}{}",
                    view_key(&l.a),
                    view_key(&l.b),
                    l.layout,
                    l.scale,
                    l.magnitude.as_ref().map(view_key),
                    l.round_delta_first
                ),
                Step::AddBias { bias, scale } => format!("B{}{scale}", view_key(bias)),
                // One change object: the same computation (ties share it by cloning).
                Step::Tuned(c) => format!("T{:p}", Arc::as_ptr(c)),
            })
            .collect::<Vec<_>>()
            .join(";"),
    };
    Some(format!(
        "{}|{}|{:?}|{steps}",
        view_key(j.source_tensor()),
        j.out.dtype,
        j.out.shape
    ))
}

fn describe_source(j: &Job) -> String {
    let t = j.source_tensor();
    format!("{} in {}", t.name, t.file.path().display())
}

/// Per base key, the steps every adapter adds, after checking each adapter fits the base.
/// `merging`: the layouts of the deltas matter (not for `--keep-lora`, which only checks).
fn steps_for_base(
    c: &Component,
    base: &Checkpoint,
    s: &MergeSettings,
    merging: bool,
) -> Result<HashMap<String, Vec<Step>>> {
    let by_name: HashMap<&str, &TensorEntry> =
        base.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let evidence = LayoutEvidence::new(c.model_config.as_ref(), &s.layout);
    // Base tensors by the module that owns them, for `target_parameters`.
    let mut by_module: HashMap<&str, Vec<&TensorEntry>> = HashMap::new();
    for t in &base.tensors {
        if let Some((module, _)) = t.name.rsplit_once('.') {
            by_module.entry(module).or_default().push(t);
        }
    }
    let mut steps: HashMap<String, Vec<Step>> = HashMap::new();
    if let (None, Some(ad)) = (&s.combine, c.adapters.iter().find(|a| a.weight.is_some())) {
        return Err(Error::Usage(format!(
            "adapter {} has a weight (--lora DIR:WEIGHT), which only a --combine combination uses; \
             add --combine TYPE, or drop the weight to merge the adapters one after another",
            ad.dir.display()
        )));
    }
    if let Some(how) = s.combine.as_ref().filter(|_| !c.adapters.is_empty()) {
        combined_steps(c, base, how, &by_name, &evidence, merging, &mut steps)?;
        return Ok(steps);
    }
    for ad in &c.adapters {
        let mut unmatched: Vec<String> = Vec::new();
        let mut unsettled: Vec<(String, String)> = Vec::new();
        for rep in &ad.replacements {
            let mut key = rep.base_key.as_str();
            if !by_name.contains_key(key) {
                // A copy of a tied output embedding replaces the weight it is stored as.
                if let Some(source) =
                    tied_source(c.model_config.as_ref(), key).filter(|s| by_name.contains_key(s))
                {
                    if ad.replacements.iter().any(|o| o.base_key == source) {
                        return Err(Error::tensor(
                            ad.weights_path(),
                            &rep.tensor.name,
                            format!(
                                "'{key}' is tied to '{source}' (config.json: tie_word_embeddings) and the \
                                 adapter holds a copy of both; which one PEFT keeps depends on load order"
                            ),
                        ));
                    }
                    key = source;
                }
            }
            match by_name.get(key) {
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
                        .entry(key.to_string())
                        .or_default()
                        .push(Step::Replace(rep.tensor.clone()));
                }
            }
        }
        for m in &ad.modules {
            let (mut wkey, parameter) = match wrapped_parameter(ad, m, &by_module)? {
                Some(p) => (p.name.clone(), true),
                None => (format!("{}.weight", m.name), false),
            };
            let mha = by_name.contains_key(format!("{}.in_proj_weight", m.name).as_str())
                || m.name.ends_with(".base_layer.out_proj");
            if mha {
                return Err(Error::tensor(
                    ad.weights_path(),
                    &m.a.name,
                    format!(
                        "module '{}' is an nn.MultiheadAttention (in_proj_weight with a nested out_proj), whose \
                         LoRA lorastream does not merge (PEFT 0.21.2 adds out_proj's delta twice when merging it)",
                        m.name
                    ),
                ));
            }
            if !by_name.contains_key(wkey.as_str()) {
                // A tied output embedding is stored once, under its source's name.
                if let Some(source) =
                    tied_source(c.model_config.as_ref(), &wkey).filter(|s| by_name.contains_key(s))
                {
                    let own = ad
                        .modules
                        .iter()
                        .any(|o| format!("{}.weight", o.name) == source);
                    if own {
                        return Err(Error::tensor(
                            ad.weights_path(),
                            &m.a.name,
                            format!(
                                "'{wkey}' is tied to '{source}' (config.json: tie_word_embeddings), and this \
                                 adapter changes both; PEFT applies both to the one shared weight in module \
                                 order, which lorastream does not reproduce. Merge them as two adapters"
                            ),
                        ));
                    }
                    wkey = source.to_string();
                }
            }
            let Some(w) = by_name.get(wkey.as_str()) else {
                unmatched.push(m.name.clone());
                continue;
            };
            if parameter && w.shape.len() == 3 {
                if let Some(ch) =
                    experts_change(ad, m, w, c.model_config.as_ref(), &evidence, &mut unsettled)?
                {
                    steps.entry(wkey).or_default().push(Step::Tuned(ch));
                }
                continue;
            }
            let fit = Fit {
                evidence: &evidence,
                merging,
                parameter,
            };
            let Some(step) = lora_step(ad, m, w, base, &fit, &mut unsettled)? else {
                continue;
            };
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
        if let Some(tuner) = &ad.tuner {
            tuned_steps(
                ad,
                &**tuner,
                &by_name,
                &evidence,
                merging,
                &mut steps,
                &mut unmatched,
                &mut unsettled,
            )?;
        }
        if !unmatched.is_empty() {
            return Err(mismatch_error(c, ad, base, &unmatched));
        }
        if !unsettled.is_empty() {
            return Err(unsettled_error(c, ad, base, &unsettled));
        }
    }
    dora_sequences(&mut steps)?;
    Ok(steps)
}

/// A DoRA adapter merged after another LoRA adapter on the same weight: PEFT 0.21.2 takes
/// its norm from the weight with the earlier adapters unmerged again and then replays their
/// merges (`LoraLayer._unmerged_base_weight`). The LoRA steps from the first one to the
/// last DoRA one become one change that does exactly that (`dora_sequence.rs`), and the
/// `lora_B.bias` additions of those adapters go through the same unmerge/re-merge round
/// trips. A DoRA step after other tuners' changes only (no LoRA before it) stays a plain
/// DoRA step: its norm is of the weight as those changes left it, as in PEFT's mixed
/// model, where the other tuner's layer is merged first.
fn dora_sequences(steps: &mut HashMap<String, Vec<Step>>) -> Result<()> {
    let mut keys: Vec<String> = steps.keys().cloned().collect();
    keys.sort();
    for key in keys {
        let list = &steps[&key];
        let is_lora = |s: &Step| matches!(s, Step::Lora(_));
        let is_dora = |s: &Step| matches!(s, Step::Lora(l) if l.magnitude.is_some());
        let Some(first) = list.iter().position(is_lora) else {
            continue;
        };
        let Some(last) = list.iter().rposition(is_dora).filter(|&l| l > first) else {
            continue;
        };
        let run: Vec<LoraStep> = list[first..=last]
            .iter()
            .map(|s| match s {
                Step::Lora(l) => Ok((**l).clone()),
                _ => {
                    let dora = list[..=last].iter().rev().find_map(|s| match s {
                        Step::Lora(l) => l.magnitude.clone(),
                        _ => None,
                    });
                    let (file, name) = dora
                        .map(|m| (m.file.path().to_path_buf(), m.name))
                        .unwrap_or_default();
                    Err(Error::tensor(
                        file,
                        name,
                        format!(
                            "is a DoRA adapter merged into '{key}' after LoRA adapters with another \
                             tuner's change between them; PEFT cannot hold that sequence in one model \
                             (its mixed model nests the layers differently), so lorastream does not \
                             guess its order. Merge the other tuner first, or in a separate run"
                        ),
                    ))
                }
            })
            .collect::<Result<_>>()?;
        let bkey = key.strip_suffix("weight").map(|p| format!("{p}bias"));
        let bias_steps = match &bkey {
            Some(bk) => sequence_bias(steps.get(bk.as_str()), &run, &key)?,
            None => None,
        };
        let change = DoraSequence::new(&key, run)?;
        if let (Some(bk), Some(b)) = (bkey, bias_steps) {
            steps.insert(bk, b);
        }
        if let Some(list) = steps.get_mut(&key) {
            list.splice(first..=last, [Step::Tuned(Arc::new(change))]);
        }
    }
    Ok(())
}

/// The bias steps of a DoRA sequence: each adapter's `lora_B.bias` is added when PEFT
/// merges it and subtracted when PEFT unmerges it (`bias -= lora_B.bias · s`, rounded into
/// the bias's dtype like every in-place step), in the order of the sequence's program.
/// None when no adapter of the run has a `lora_B.bias` here.
fn sequence_bias(
    bias: Option<&Vec<Step>>,
    run: &[LoraStep],
    key: &str,
) -> Result<Option<Vec<Step>>> {
    let Some(list) = bias.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    // The bias of run step j: the AddBias saved next to its lora_B in the same file.
    let mut of_step: Vec<Option<(TensorEntry, f32)>> = vec![None; run.len()];
    let (mut rest, mut after) = (Vec::new(), Vec::new());
    for s in list {
        let found = match s {
            Step::AddBias { bias, .. } => run.iter().enumerate().position(|(j, l)| {
                of_step[j].is_none()
                    && l.b.file.path() == bias.file.path()
                    && l.b.name.strip_suffix("weight") == bias.name.strip_suffix("bias")
            }),
            _ => None,
        };
        match (found, s) {
            (Some(j), Step::AddBias { bias, scale }) => of_step[j] = Some((bias.clone(), *scale)),
            // The bias of a plain LoRA merged after the run: added after it, as before.
            (None, Step::AddBias { .. }) => after.push(s.clone()),
            _ => rest.push(s),
        }
    }
    if of_step.iter().all(Option::is_none) {
        return Ok(None);
    }
    if let Some(s) = rest.first() {
        let t = s
            .inputs()
            .first()
            .map(|t| (t.file.path().to_path_buf(), t.name.clone()));
        let (file, name) = t.unwrap_or_default();
        return Err(Error::tensor(
            file,
            name,
            format!(
                "changes the bias of '{key}', which a DoRA sequence of adapters also changes through                  lora_bias; lorastream does not interleave the two. Merge this adapter in a separate run"
            ),
        ));
    }
    let dora: Vec<bool> = run.iter().map(|l| l.magnitude.is_some()).collect();
    let mut out = Vec::new();
    for op in super::dora_sequence::program(&dora) {
        use super::dora_sequence::Op;
        let (j, sign) = match op {
            Op::Add(j) | Op::DoraMerge { j, .. } => (j, 1.0f32),
            Op::Sub(j) | Op::DoraUnmerge { j, .. } => (j, -1.0),
            Op::Copy(_) | Op::Norm { .. } => continue,
        };
        if let Some((bias, scale)) = &of_step[j] {
            out.push(Step::AddBias {
                bias: bias.clone(),
                scale: sign * scale,
            });
        }
    }
    out.extend(after);
    Ok(Some(out))
}

/// `--combine`: the component's adapters as one weighted combination (PEFT's
/// `add_weighted_adapter`, then the merge of the new adapter alone), one change per
/// adapted weight. Every adapter is checked against the base as a LoRA of its own.
fn combined_steps(
    c: &Component,
    base: &Checkpoint,
    spec: &Combine,
    by_name: &HashMap<&str, &TensorEntry>,
    evidence: &LayoutEvidence,
    merging: bool,
    steps: &mut HashMap<String, Vec<Step>>,
) -> Result<()> {
    let how = spec.effective(c.adapters.len())?;
    let first = &c.adapters[0];
    let refuse = |ad: &Adapter, what: &str| {
        Err(Error::Plan(format!(
            "adapter {} (component {}): --combine {} takes plain LoRA adapters; this one has {what}",
            ad.dir.display(),
            c.label(),
            spec.kind.name()
        )))
    };
    for ad in &c.adapters {
        if ad.tuner.is_some() {
            return refuse(ad, &format!("peft_type {}", ad.kind()));
        }
        if !ad.config.target_parameters.is_empty() {
            return refuse(
                ad,
                "target_parameters (PEFT: add_weighted_adapter does not support targeting nn.Parameter)",
            );
        }
        if !ad.replacements.is_empty() {
            return refuse(
                ad,
                "full tensors (modules_to_save, saved copies or biases), which PEFT does not combine",
            );
        }
        if ad.config.variant != Variant::Plain || !ad.training_only.is_empty() {
            return refuse(ad, "a LoRA variant (MiCA, BD-LoRA, VeLoRA, MonteCLoRA)");
        }
        if ad.modules.iter().any(|m| m.magnitude.is_some()) {
            return refuse(
                ad,
                "DoRA magnitudes (the combined adapter would get a fresh magnitude from the base weight)",
            );
        }
        if ad.modules.iter().any(|m| m.b_bias.is_some()) {
            return refuse(
                ad,
                "lora_bias (add_weighted_adapter combines lora_A/lora_B only)",
            );
        }
        if ad.weight.is_none() {
            return Err(Error::Usage(format!(
                "--combine {} needs a weight for every adapter: --lora {}:WEIGHT",
                spec.kind.name(),
                ad.dir.display()
            )));
        }
    }
    let ranks: Vec<usize> = c.adapters.iter().map(|a| a.config.max_rank()).collect();
    let new_rank = if how.kind == CombinationType::Cat {
        ranks.iter().sum()
    } else if how.kind == CombinationType::Svd || how.kind.is_pruned_svd() {
        // svd_rank=None: the largest rank.
        ranks.iter().copied().max().unwrap_or(0)
    } else if ranks.iter().all(|&r| r == ranks[0]) {
        ranks[0]
    } else {
        return Err(Error::Plan(format!(
            "component {}: --combine {} needs every adapter to have the same r (they have {ranks:?}); \
             PEFT refuses this too. Use cat",
            c.label(),
            how.kind.name()
        )));
    };
    // The new adapter: r = lora_alpha = new_rank, use_rslora copied from the first one.
    let scale = if first.config.use_rslora {
        (new_rank as f64 / (new_rank as f64).sqrt()) as f32
    } else {
        1.0
    };
    let mut names: Vec<&str> = Vec::new();
    for ad in &c.adapters {
        for m in &ad.modules {
            if !names.contains(&m.name.as_str()) {
                names.push(&m.name);
            }
        }
    }
    let fit = Fit {
        evidence,
        merging,
        parameter: false,
    };
    let (mut unmatched, mut unsettled) = (Vec::new(), Vec::new());
    let mut built: Vec<(String, CombinedLora)> = Vec::new();
    for name in names {
        let wkey = format!("{name}.weight");
        let Some(w) = by_name.get(wkey.as_str()) else {
            unmatched.push(name.to_string());
            continue;
        };
        let mut parts = Vec::new();
        let mut layout = None;
        let mut embedding = false;
        for ad in &c.adapters {
            let Some(m) = ad.module(name) else { continue };
            let Some(step) = lora_step(ad, m, w, base, &fit, &mut unsettled)? else {
                layout = None;
                break;
            };
            if layout.is_some_and(|l| l != step.layout) {
                return Err(Error::tensor(
                    ad.weights_path(),
                    &m.a.name,
                    format!(
                        "module '{name}': the adapters line up with '{}' in different layouts",
                        w.name
                    ),
                ));
            }
            layout = Some(step.layout);
            embedding = m.embedding;
            parts.push(Part {
                a: m.a.clone(),
                b: m.b.clone(),
                weight: ad.weight.unwrap_or(0.0),
                scaling: ad.config.rank_and_scale_f64(name).1,
            });
        }
        let Some(layout) = layout else { continue };
        built.push((
            wkey,
            CombinedLora {
                parts,
                how: how.clone(),
                transposed: layout == DeltaLayout::Transposed,
                embedding,
                scale,
                new_rank,
                module: name.to_string(),
                weights: first.weights_path().to_path_buf(),
                dare_rng: None,
            },
        ));
    }
    if !unmatched.is_empty() {
        return Err(mismatch_error(c, first, base, &unmatched));
    }
    if !unsettled.is_empty() {
        return Err(unsettled_error(c, first, base, &unsettled));
    }
    if how.draws() {
        let init = first.config.init_lora_weights.as_str();
        super::dare_order::plan_streams(&how, c, base, init, new_rank, &mut built)?;
    }
    for (wkey, change) in built {
        steps
            .entry(wkey)
            .or_default()
            .push(Step::Tuned(Arc::new(change)));
    }
    Ok(())
}

/// The steps of a non-LoRA tuner's modules: each module's base weight (and bias) found,
/// its stored orientation settled like a LoRA's (shapes, then the evidence for a square
/// 2-D weight), and the tuner's changes checked against them.
#[allow(clippy::too_many_arguments)]
fn tuned_steps(
    ad: &Adapter,
    tuner: &dyn crate::adapter::tuners::Tuner,
    by_name: &HashMap<&str, &TensorEntry>,
    evidence: &LayoutEvidence,
    merging: bool,
    steps: &mut HashMap<String, Vec<Step>>,
    unmatched: &mut Vec<String>,
    unsettled: &mut Vec<(String, String)>,
) -> Result<()> {
    use crate::adapter::tuners::{BaseTensor, ModuleBase};
    for m in &ad.tuned {
        let wkey = format!("{}.weight", m.name);
        let Some(w) = by_name.get(wkey.as_str()) else {
            unmatched.push(m.name.clone());
            continue;
        };
        let transposed = match w.shape.as_slice() {
            &[r, c] => {
                if let Some(msg) = evidence.flags_conflict(&m.name) {
                    return Err(Error::Usage(msg));
                }
                let normal = tuner.fits(m, [r, c]);
                let transposed = tuner.adapts_conv1d() && tuner.fits(m, [c, r]);
                if !normal && !transposed {
                    // The tuner's own check says what does not fit.
                    false
                } else {
                    match evidence.decide(&m.name, normal, transposed) {
                        Ok(layout) => layout == DeltaLayout::Transposed,
                        Err(_) if !merging => false,
                        Err(why) => {
                            unsettled.push((
                                m.name.clone(),
                                format!("weight '{}' {:?}: {why}", w.name, w.shape),
                            ));
                            continue;
                        }
                    }
                }
            }
            _ => false,
        };
        let module_base = ModuleBase {
            weight: BaseTensor {
                entry: (*w).clone(),
                transposed,
            },
            bias: by_name
                .get(format!("{}.bias", m.name).as_str())
                .map(|b| (*b).clone()),
        };
        let changes = tuner.changes(ad.weights_path(), m, &ad.shared, &module_base)?;
        // A change that reads another base tensor's stored value (GLoRA's bias: W @ C)
        // would read it before an earlier adapter's change to it, where PEFT reads it after.
        for ch in &changes {
            if let Some(read) = ch.change.reads_base()
                && steps.get(&read.name).is_some_and(|s| !s.is_empty())
            {
                return Err(Error::tensor(
                    ad.weights_path(),
                    ch.change
                        .inputs()
                        .first()
                        .map_or(m.name.clone(), |t| t.name.clone()),
                    format!(
                        "{} changes '{}' from the value of '{}', which an earlier adapter of this \
                         component changes too; lorastream reads the stored '{}', PEFT the merged one. \
                         Merge the earlier adapters into a new base first, then this one",
                        tuner.name(),
                        ch.target,
                        read.name,
                        read.name
                    ),
                ));
            }
        }
        for ch in changes {
            if !by_name.contains_key(ch.target.as_str()) {
                return Err(Error::Internal(format!(
                    "{} module '{}' changes '{}', which the base does not hold",
                    tuner.name(),
                    m.name,
                    ch.target
                )));
            }
            steps
                .entry(ch.target)
                .or_default()
                .push(Step::Tuned(ch.change));
        }
    }
    Ok(())
}

/// Explains square weights whose layout nothing settles, with the flags that settle it.
fn unsettled_error(
    c: &Component,
    ad: &Adapter,
    base: &Checkpoint,
    unsettled: &[(String, String)],
) -> Error {
    let shown: Vec<String> = unsettled
        .iter()
        .take(10)
        .map(|(m, why)| format!("  '{m}': {why}"))
        .collect();
    let more = unsettled.len().saturating_sub(shown.len());
    Error::Plan(format!(
        "adapter {} (component {}): cannot tell how ΔW lines up with {} weight(s) of base {}:\n{}{}\n\
         adapter_config.json's fan_in_fan_out ({}) cannot settle it: PEFT rewrites it per module type while \
         wrapping, so it holds the last wrapped module's value. Say which modules are transformers Conv1D \
         (stored [in, out]) with --fan-in-fan-out REGEX and which are nn.Linear (stored [out, in]) with \
         --no-fan-in-fan-out REGEX (regexes over module names, e.g. --no-fan-in-fan-out '.' for a model \
         without Conv1D). Nothing was written.",
        ad.dir.display(),
        c.label(),
        unsettled.len(),
        base.path.display(),
        shown.join("\n"),
        if more > 0 {
            format!("\n  … and {more} more")
        } else {
            String::new()
        },
        ad.config.fan_in_fan_out,
    ))
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

/// The `nn.Parameter` a module's LoRA adapts in place (`target_parameters`: PEFT's
/// ParamWrapper), if any. PEFT names the saved factors after the module that owns the
/// parameter, so the parameter is found among that module's base tensors.
fn wrapped_parameter<'a>(
    ad: &Adapter,
    m: &LoraModule,
    by_module: &HashMap<&str, Vec<&'a TensorEntry>>,
) -> Result<Option<&'a TensorEntry>> {
    if ad.config.target_parameters.is_empty() {
        return Ok(None);
    }
    let refuse = |msg: String| Err(Error::tensor(ad.weights_path(), &m.a.name, msg));
    if m.name.split('.').any(|p| p == "base_layer") {
        return refuse(format!(
            "module '{}' has several nn.Parameters adapted one inside another (target_parameters {:?}); \
             which factors belong to which parameter depends on the order the model registers them, which \
             the checkpoint does not record, so lorastream does not merge nested parameter adapters",
            m.name, ad.config.target_parameters
        ));
    }
    let hits: Vec<&TensorEntry> = by_module
        .get(m.name.as_str())
        .into_iter()
        .flatten()
        .copied()
        .filter(|t| ad.config.targets_parameter(&t.name))
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [p] if p.shape.len() == 2 && m.a.shape.first() == Some(&m.r) => Ok(Some(p)),
        [p] if p.shape.len() == 2 => refuse(format!(
            "lora_A {:?} does not have rank {}, which adapter_config.json gives for the nn.Parameter '{}'",
            m.a.shape, m.r, p.name
        )),
        [p] if p.shape.len() == 3 => Ok(Some(p)),
        [p] => refuse(format!(
            "adapts the {}-D nn.Parameter '{}' {:?} (target_parameters); PEFT's ParamWrapper supports only 2-D \
             and 3-D parameters",
            p.shape.len(),
            p.name,
            p.shape
        )),
        many => refuse(format!(
            "module '{}' has several parameters matching target_parameters ({}); PEFT nests one adapter per \
             parameter, saved under '…base_layer.…' names",
            m.name,
            many.iter()
                .map(|t| format!("'{}'", t.name))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The weight `key` is tied to (and stored as) when the base's config.json says the model
/// ties its word embeddings: transformers' `_tied_weights_keys` of its architecture.
fn tied_source(config: Option<&ModelConfig>, key: &str) -> Option<&'static str> {
    let c = config.filter(|c| c.ties_word_embeddings())?;
    let archs = c.json.get("architectures")?.as_array()?;
    archs.iter().filter_map(|a| a.as_str()).find_map(|arch| {
        TIED_WEIGHTS
            .iter()
            .find(|(class, _)| *class == arch)
            .and_then(|(_, pairs)| pairs.iter().find(|(k, _)| *k == key))
            .map(|(_, source)| *source)
    })
}

/// transformers model types whose fused experts are `use_experts_implementation(
/// is_transposed=True)` (stored `[E, in, out]`), under their `experts` attribute; every other
/// experts class of transformers (TRANSFORMERS_VERSION) stores `[E, out, in]` as PEFT assumes.
const TRANSPOSED_EXPERTS_MODEL_TYPES: &[&str] =
    &["gpt_oss", "aria", "aria_text", "openai_privacy_filter"];

/// What the base's config.json says about the layout of the 3-D parameter of `module`.
fn experts_layout_from_config(
    config: Option<&ModelConfig>,
    module: &str,
) -> std::result::Result<(ExpertsLayout, String), String> {
    use super::transformers_models::{KNOWN_MODEL_TYPES, TRANSFORMERS_VERSION};
    let Some(c) = config else {
        return Err("no config.json beside the base names its architecture".into());
    };
    if c.has_custom_code() {
        return Err(format!(
            "{} names custom code (auto_map), which may set is_transposed on its experts",
            c.path.display()
        ));
    }
    let text_type = c
        .json
        .get("text_config")
        .and_then(|t| t.get("model_type"))
        .and_then(serde_json::Value::as_str);
    let Some(mt) = c.model_type() else {
        return Err(format!("{} has no model_type", c.path.display()));
    };
    if !KNOWN_MODEL_TYPES.contains(&mt) {
        return Err(format!(
            "model_type '{mt}' is not one of transformers {TRANSFORMERS_VERSION}"
        ));
    }
    let leaf = module.rsplit('.').next().unwrap_or(module);
    let transposed_type = [Some(mt), text_type]
        .into_iter()
        .flatten()
        .find(|t| TRANSPOSED_EXPERTS_MODEL_TYPES.contains(t));
    match transposed_type {
        Some(t) if leaf == "experts" => Ok((
            ExpertsLayout::InOut,
            format!(
                "transformers' {t} code ({TRANSFORMERS_VERSION}), whose experts are is_transposed ([E, in, out])"
            ),
        )),
        Some(t) => Err(format!(
            "transformers' {t} code has is_transposed experts, and '{module}' is not its 'experts' module"
        )),
        None => Ok((
            ExpertsLayout::OutIn,
            format!(
                "transformers' {mt} code ({TRANSFORMERS_VERSION}), whose experts are not is_transposed ([E, out, in])"
            ),
        )),
    }
}

/// The change of a LoRA on a 3-D `nn.Parameter` (fused MoE experts, PEFT's ParamWrapper
/// with `num_experts` > 1): the factors' shapes settle `[E, out, in]` vs `[E, in, out]`
/// unless the experts are square, where `--fan-in-fan-out` / `--no-fan-in-fan-out` or
/// the base's config.json must (PEFT reads the module's `is_transposed`, which the
/// checkpoint does not record).
fn experts_change(
    ad: &Adapter,
    m: &LoraModule,
    w: &TensorEntry,
    config: Option<&ModelConfig>,
    evidence: &LayoutEvidence,
    unsettled: &mut Vec<(String, String)>,
) -> Result<Option<Arc<dyn crate::adapter::tuners::TensorChange>>> {
    let bad = |msg: String| {
        Error::tensor(
            ad.weights_path(),
            &m.a.name,
            format!(
                "{msg} (base nn.Parameter '{}' is {:?} {})",
                w.name, w.shape, w.dtype
            ),
        )
    };
    if !m.a.dtype.is_float() || !m.b.dtype.is_float() {
        return Err(bad("LoRA weights are not floating point".into()));
    }
    if m.magnitude.is_some() || m.b_bias.is_some() || m.embedding {
        return Err(bad(
            "DoRA, lora_bias and embedding LoRA do not exist on a 3-D nn.Parameter (PEFT's ParamWrapper \
             refuses them); the adapter is not what PEFT saves"
                .into(),
        ));
    }
    let experts = w.shape[0];
    let (out_in, in_out) = ExpertsDelta::fits(&m.a.shape, &m.b.shape, &w.shape, m.r);
    if !out_in && !in_out {
        return Err(bad(format!(
            "LoRA A {:?} / B {:?} with rank {} do not fit {experts} experts: PEFT saves A [r·E, in] and \
             B [out, r·E]",
            m.a.shape, m.b.shape, m.r
        )));
    }
    if let Some(msg) = evidence.flags_conflict(&m.name) {
        return Err(Error::Usage(msg));
    }
    let mut said: Vec<(ExpertsLayout, String)> = Vec::new();
    match (out_in, in_out) {
        (true, false) => said.push((ExpertsLayout::OutIn, "its shapes".into())),
        (false, true) => said.push((ExpertsLayout::InOut, "its shapes".into())),
        _ => {}
    }
    if let Some((transposed, by)) = evidence.flag_for(&m.name) {
        let l = if transposed {
            ExpertsLayout::InOut
        } else {
            ExpertsLayout::OutIn
        };
        said.push((l, by));
    }
    let from_config = experts_layout_from_config(config, &m.name);
    if let Ok(found) = &from_config {
        said.push(found.clone());
    }
    let describe = |l: ExpertsLayout| match l {
        ExpertsLayout::OutIn => "[E, out, in]",
        ExpertsLayout::InOut => "[E, in, out] (is_transposed)",
    };
    let Some((first, by)) = said.first().cloned() else {
        unsettled.push((
            m.name.clone(),
            format!(
                "3-D nn.Parameter '{}' {:?}: its experts are square, so the shapes cannot tell PEFT's \
                 [E, out, in] from an is_transposed module's [E, in, out], and {}; for the experts, \
                 --fan-in-fan-out means [E, in, out]",
                w.name,
                w.shape,
                from_config.err().unwrap_or_default()
            ),
        ));
        return Ok(None);
    };
    if let Some((other, by2)) = said.iter().find(|(l, _)| *l != first) {
        return Err(bad(format!(
            "the evidence disagrees on the experts' layout: {by} says {}, {by2} says {}",
            describe(first),
            describe(*other)
        )));
    }
    Ok(Some(Arc::new(ExpertsDelta {
        a: m.a.clone(),
        b: m.b.clone(),
        experts,
        r: m.r,
        scale: m.scale,
        layout: first,
    })))
}

/// What decides how a module's factors fit its weight.
struct Fit<'a> {
    evidence: &'a LayoutEvidence,
    /// The layouts matter (not for `--keep-lora`, which only checks).
    merging: bool,
    /// The weight is an `nn.Parameter` adapted in place (`target_parameters`): PEFT's
    /// ParamWrapper, always [out, in], ΔW rounded to the weight's dtype before the add.
    parameter: bool,
}

/// Works out how a module's A and B line up with the base weight `w`. A square weight whose
/// layout the evidence does not settle lands in `unsettled` (None) when merging.
fn lora_step(
    ad: &Adapter,
    m: &LoraModule,
    w: &TensorEntry,
    base: &Checkpoint,
    fit: &Fit<'_>,
    unsettled: &mut Vec<(String, String)>,
) -> Result<Option<LoraStep>> {
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
        if !normal && (!transposed || fit.parameter) {
            return Err(bad(format!(
                "LoRA A {a:?} / B {b:?} does not fit (shape mismatch)"
            )));
        }
        if let Some(msg) = fit.evidence.flags_conflict(&m.name) {
            return Err(Error::Usage(msg));
        }
        let decided = if fit.parameter {
            Ok(DeltaLayout::Normal)
        } else {
            fit.evidence.decide(&m.name, normal, transposed)
        };
        match decided {
            Ok(layout) => layout,
            // --keep-lora writes the factors as they are: the layout does not matter.
            Err(_) if !fit.merging => DeltaLayout::Normal,
            Err(why) => {
                unsettled.push((
                    m.name.clone(),
                    format!("weight '{}' {:?}: {why}", w.name, w.shape),
                ));
                return Ok(None);
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
    Ok(Some(LoraStep {
        a: m.a.clone(),
        b: m.b.clone(),
        r,
        scale: m.scale,
        layout,
        // PEFT's Embedding merge, the ParamWrapper and MiCA add ΔW rounded to W's dtype.
        round_delta_first: m.embedding && m.magnitude.is_none()
            || fit.parameter
            || ad.config.variant.rounds_delta_first(),
        magnitude: m.magnitude.clone(),
    }))
}

fn plan_merged(ci: usize, c: &Component, s: &MergeSettings, jobs: &mut Vec<Job>) -> Result<()> {
    let Some(base) = &c.base else {
        return Err(Error::Usage(format!(
            "component {} has adapters but no --base: merging needs the base weights (or pass --keep-lora to \
             write the adapters unmerged)",
            c.label()
        )));
    };
    let mut steps = steps_for_base(c, base, s, true)?;
    spread_over_ties(base, &mut steps)?;
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
                dtype: s.dtype.apply_to(t),
                shape: t.shape.clone(),
            },
            source,
            component: ci,
            tied_to: None,
        });
    }
    Ok(())
}

/// `PeftModel.state_dict()` keys: `base_model.model.` + key, with targeted modules' own
/// tensors under `base_layer`, modules_to_save under `original_module` and
/// `modules_to_save.default`, and the LoRA tensors with the adapter name `default`.
fn plan_keep_lora(ci: usize, c: &Component, s: &MergeSettings, jobs: &mut Vec<Job>) -> Result<()> {
    if s.combine.is_some() && !c.adapters.is_empty() {
        return Err(Error::Usage(
            "--combine merges the combined adapter; it does not go with --keep-lora".into(),
        ));
    }
    let ad = match c.adapters.as_slice() {
        [] => {
            // No adapter: the component's tensors as they are.
            if c.base.is_some() {
                plan_merged(ci, c, s, jobs)?;
            }
            return Ok(());
        }
        [one]
            if !one.training_only.is_empty()
                || !one.config.target_parameters.is_empty()
                || one.config.bdlora.is_some() =>
        {
            return Err(Error::Plan(format!(
                "adapter {} (component {}): --keep-lora does not write {} yet (their PeftModel.state_dict() \
                 names are not checked against PEFT); merge it instead",
                one.dir.display(),
                c.label(),
                if !one.training_only.is_empty() {
                    "the training-only state of VeLoRA / MonteCLoRA adapters"
                } else if one.config.bdlora.is_some() {
                    "BD-LoRA's compact block-diagonal factors"
                } else {
                    "adapters of nn.Parameters (target_parameters)"
                }
            )));
        }
        [one] => one,
        _ => {
            return Err(Error::Usage(format!(
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
    // A non-LoRA tuner's tensors under their state_dict names (or its refusal).
    let base_dtype = |key: &str| {
        let base = c.base.as_ref()?;
        base.tensors.iter().find(|t| t.name == key).map(|t| t.dtype)
    };
    let kept = super::keep_tuned::kept_tuner(ad, &base_dtype)?;
    let targeted: HashSet<&str> = ad
        .modules
        .iter()
        .map(|m| m.name.as_str())
        .chain(kept.modules.keys().map(String::as_str))
        .collect();
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
            tied_to: None,
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
            steps_for_base(c, base, s, false)?;
            let mut emitted: HashSet<&str> = HashSet::new();
            for t in &base.tensors {
                let (module, param) = t.name.rsplit_once('.').unwrap_or(("", t.name.as_str()));
                let value = replacements.get(t.name.as_str()).copied().unwrap_or(t);
                let base_dtype = s.dtype.apply_to(t);
                if targeted.contains(module) {
                    let name = format!("{SAVED_PREFIX}{module}.base_layer.{param}");
                    jobs.push(cast_job(ci, name, value, t, base_dtype));
                    if !emitted.contains(module) && param == "weight" {
                        emitted.insert(module);
                        if let Some(m) = ad.module(module) {
                            push_lora(jobs, m);
                        }
                        for k in kept.modules.get(module).into_iter().flatten() {
                            push(jobs, k.name.clone(), &k.tensor, s.dtype.apply(k.dtype));
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
            for k in kept.modules.values().flatten() {
                push(jobs, k.name.clone(), &k.tensor, s.dtype.apply(k.dtype));
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
    for k in &kept.model_level {
        push(jobs, k.name.clone(), &k.tensor, s.dtype.apply(k.dtype));
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
        tied_to: None,
    }
}
