//! `verify`: recomputes a merge and compares it, value by value, with an existing output
//! (ours, PEFT's `save_pretrained` folder, any readable checkpoint), writing nothing.
//! The merge runs exactly as `merge` plans it (`merge::merge_into`), pointed at a
//! `CompareSink` that reads OUT's tensors alongside; `--sample` computes only some rows.
//!
//! Keys: a planned tensor absent from OUT is *missing*, a tensor of OUT not planned is
//! *extra*; both fail the check. One exception is reported apart, not as a failure: an
//! output embedding (`…lm_head.weight`, `…embed_out.weight`) absent from OUT whose
//! recomputed values equal OUT's input embedding (`…embed_tokens.weight`, `…wte.weight`,
//! …) of the same shape. That is how `save_pretrained` stores tied weights (one of the
//! pair dropped), and loading the folder restores it, with exactly the right values.

use crate::compare::{TensorDiff, Tolerance};
use crate::compute::rows::{row_count, sample_rows};
use crate::error::{Error, Result};
use crate::merge::{MergeOptions, Produce, Target, merge_into};
use crate::pipeline::peak_rss_bytes;
use crate::sink::{CompareSink, Expected, OutTensor};
use crate::source::{self, Checkpoint};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Everything `verify` takes.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The merge to recompute (its `dry_run`, `expect_keys_from` and `sink` are ignored).
    pub merge: MergeOptions,
    pub tolerance: Tolerance,
    /// `--sample ROWS`: compare only ROWS rows of every tensor (at least 2).
    pub sample: Option<usize>,
}

/// A planned key absent from OUT whose values OUT holds under a tied name.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TiedKey {
    pub name: String,
    /// The tensor of OUT it equals.
    pub equals: String,
}

/// What `verify` found (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub output: String,
    pub format: &'static str,
    /// True when OUT matches: no differing, missing or extra tensors.
    pub matches: bool,
    pub tolerance: String,
    pub sample_rows: Option<usize>,
    pub device: String,
    /// Tensors the merge plans.
    pub planned: usize,
    /// Tensors whose values were compared.
    pub compared: usize,
    pub elements_compared: u64,
    /// Tensors outside the tolerance, or of another dtype or shape in OUT.
    pub differing: Vec<TensorDiff>,
    /// Planned tensors that OUT lacks.
    pub missing: Vec<String>,
    /// Tensors of OUT the merge does not produce.
    pub extra: Vec<String>,
    /// Planned tensors OUT lacks but holds as a tied weight (not failures; see module doc).
    pub tied: Vec<TiedKey>,
    pub seconds: f64,
    pub peak_rss_bytes: u64,
    pub notes: Vec<String>,
}

/// Names of output embeddings and of the input embeddings they are tied to, by suffix.
const TIED_OUTPUTS: [&str; 2] = ["lm_head.weight", "embed_out.weight"];
const TIED_INPUTS: [&str; 6] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
];

/// OUT's tensor that `name` (absent from OUT) may be tied to: an input embedding of the
/// same shape under the same prefix.
fn tie_candidate<'a>(
    name: &str,
    shape: &[usize],
    out: &'a Checkpoint,
) -> Option<&'a source::TensorEntry> {
    let prefix = TIED_OUTPUTS.iter().find_map(|s| name.strip_suffix(s))?;
    out.tensors.iter().find(|t| {
        t.shape == shape
            && t.name.starts_with(prefix)
            && TIED_INPUTS.iter().any(|s| t.name.ends_with(s))
    })
}

/// Recomputes the merge `opts` describes and compares it with `out`.
pub fn verify(out: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let start = Instant::now();
    if let Some(k) = opts.sample
        && k < 2
    {
        return Err(Error::Usage(format!(
            "--sample {k}: give at least 2 rows (the first and the last are always checked)"
        )));
    }
    let ckpt = source::open(out)?;
    ckpt.set_read_mode(opts.merge.reads);
    let mut merge_opts = opts.merge.clone();
    merge_opts.dry_run = false;
    merge_opts.expect_keys_from = None;
    let results = Arc::new(Mutex::new(Vec::new()));
    // Filled when the plan is known.
    let mut shape_changes: Vec<TensorDiff> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    let mut tie_tries: HashMap<String, String> = HashMap::new();
    let mut extra: Vec<String> = Vec::new();
    let mut planned = 0;
    let report = merge_into(&merge_opts, |plan: &[OutTensor]| {
        planned = plan.len();
        let by_name: HashMap<&str, &source::TensorEntry> =
            ckpt.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let planned_names: std::collections::HashSet<&str> =
            plan.iter().map(|t| t.name.as_str()).collect();
        extra = ckpt
            .tensors
            .iter()
            .filter(|t| !planned_names.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect();
        let rows_of = |t: &OutTensor| match opts.sample {
            Some(k) if !t.shape.is_empty() && row_count(&t.shape) > k => {
                Produce::Rows(sample_rows(row_count(&t.shape), k))
            }
            _ => Produce::All,
        };
        let mut expected = Vec::new();
        let mut produce = Vec::with_capacity(plan.len());
        for t in plan {
            let against = match by_name.get(t.name.as_str()) {
                Some(o) if o.shape != t.shape => {
                    shape_changes.push(TensorDiff::new(
                        &t.name,
                        (t.dtype, &t.shape),
                        (o.dtype, &o.shape),
                    ));
                    None
                }
                Some(o) => Some(*o),
                None => match tie_candidate(&t.name, &t.shape, &ckpt) {
                    Some(c) => {
                        tie_tries.insert(t.name.clone(), c.name.clone());
                        Some(c)
                    }
                    None => {
                        missing.push(t.name.clone());
                        None
                    }
                },
            };
            match against {
                Some(o) => {
                    let p = rows_of(t);
                    expected.push(Expected {
                        planned: t.clone(),
                        against: o.clone(),
                        rows: match &p {
                            Produce::Rows(r) => Some(r.clone()),
                            _ => None,
                        },
                    });
                    produce.push(p);
                }
                None => produce.push(Produce::Skip),
            }
        }
        Ok(Some(Target {
            sink: Box::new(CompareSink::new(expected, opts.tolerance, results.clone())),
            produce,
        }))
    })?;
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    let compared = results.len();
    let elements_compared = results.iter().map(|d| d.stats.compared).sum();
    let mut differing = shape_changes;
    let mut tied = Vec::new();
    let mut notes = report.notes;
    for d in results {
        match tie_tries.get(&d.name) {
            Some(equals) if !d.differs() => tied.push(TiedKey {
                name: d.name.clone(),
                equals: equals.clone(),
            }),
            Some(equals) => {
                notes.push(format!(
                    "{} is not in OUT and differs from {equals} ({}), so it is not a tied copy",
                    d.name,
                    d.summary()
                ));
                missing.push(d.name);
            }
            None if d.differs() => differing.push(d),
            None => {}
        }
    }
    for t in &tied {
        notes.push(format!(
            "{} is not in OUT; its values equal {} there (tied weights, as save_pretrained stores them)",
            t.name, t.equals
        ));
    }
    Ok(VerifyReport {
        output: out.display().to_string(),
        format: ckpt.format.name(),
        matches: differing.is_empty() && missing.is_empty() && extra.is_empty(),
        tolerance: opts.tolerance.describe(),
        sample_rows: opts.sample,
        device: report.device,
        planned,
        compared,
        elements_compared,
        differing,
        missing,
        extra,
        tied,
        seconds: start.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
        notes,
    })
}

impl VerifyReport {
    /// The report for a person: what differs (a table), what is missing or extra, and a
    /// summary line.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if !self.differing.is_empty() {
            s.push_str(&crate::compare::table(&self.differing));
        }
        list(
            &mut s,
            "missing in OUT (the merge produces them)",
            &self.missing,
        );
        list(
            &mut s,
            "extra in OUT (the merge does not produce them)",
            &self.extra,
        );
        let what = match self.sample_rows {
            Some(k) => format!("{k} sampled rows of each tensor"),
            None => "every element".into(),
        };
        if self.matches {
            s.push_str(&format!(
                "OK: {} matches the merge: {} tensors, {} elements compared ({what}), tolerance {}\n",
                self.output, self.compared, self.elements_compared, self.tolerance
            ));
        } else {
            s.push_str(&format!(
                "DIFFERENT: {}: {} tensor(s) differ, {} missing, {} extra ({} of {} planned tensors compared, {what}, tolerance {})\n",
                self.output,
                self.differing.len(),
                self.missing.len(),
                self.extra.len(),
                self.compared,
                self.planned,
                self.tolerance
            ));
        }
        s
    }
}

fn list(s: &mut String, title: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    s.push_str(&format!("{title}: {}\n", names.len()));
    for n in names.iter().take(50) {
        s.push_str(&format!("  {n}\n"));
    }
    if names.len() > 50 {
        s.push_str(&format!("  … and {} more\n", names.len() - 50));
    }
}
