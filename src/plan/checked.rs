//! What compute may take for granted: the plan's jobs after the one check that every
//! backend relies on. [`CheckedJobs`] is the plan's output and the only way to a
//! [`CheckedMerge`] besides [`CheckedMerge::new`], which runs the same check; compute
//! accepts nothing else, so no backend re-checks dtypes or sizes of its own.
//!
//! The check: every merged tensor and every tensor its steps read is floating point
//! (F16/BF16/F32/F64), and every step's tensors have the sizes the base tensor needs
//! (a replacement and a bias one value per element, LoRA factors `rows·r` and `cols·r`,
//! a DoRA magnitude one per row or column). The adapter and tuner readers refuse bad
//! shapes first, each with its own message; this is the contract compute builds on.

use super::merge_types::{DeltaLayout, Job, JobSource, Step};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::sink::OutTensor;
use crate::source::TensorEntry;

/// The planned jobs, every merge among them checked (see the module comment).
#[derive(Clone, Debug)]
pub struct CheckedJobs {
    jobs: Vec<Job>,
    /// `--requantize fp8-block`: the merged jobs written FP8 block-scaled.
    requantized: Vec<super::requantize::Fp8Requant>,
}

impl CheckedJobs {
    /// Checks every merged job, in order; the first one that compute could not run fails
    /// the plan, naming its file and tensor, before anything is written.
    pub fn check(jobs: Vec<Job>) -> Result<CheckedJobs> {
        for j in &jobs {
            if let JobSource::Merge { base, steps } = &j.source {
                check_merge(base, steps, &j.out.name, j.out.dtype)?;
            }
        }
        Ok(CheckedJobs {
            jobs,
            requantized: Vec::new(),
        })
    }

    /// The same jobs, with the merged ones `requantized` lists written FP8 block-scaled.
    pub fn with_requantized(mut self, requantized: Vec<super::requantize::Fp8Requant>) -> Self {
        self.requantized = requantized;
        self
    }

    /// The merged jobs written FP8 block-scaled (`--requantize fp8-block`).
    pub fn requantized(&self) -> &[super::requantize::Fp8Requant] {
        &self.requantized
    }

    /// Job `i`'s merge, when it is one.
    pub fn merge(&self, i: usize) -> Option<CheckedMerge<'_>> {
        let j = self.jobs.get(i)?;
        match &j.source {
            JobSource::Merge { base, steps } => Some(CheckedMerge {
                base,
                steps,
                out_name: &j.out.name,
                out_dtype: j.out.dtype,
            }),
            JobSource::Copy(_) => None,
        }
    }

    /// The jobs, no longer known to be checked (tests that edit a plan).
    pub fn into_jobs(self) -> Vec<Job> {
        self.jobs
    }
}

impl std::ops::Deref for CheckedJobs {
    type Target = [Job];
    fn deref(&self) -> &[Job] {
        &self.jobs
    }
}

/// A merge that passed the check: a floating base tensor, its steps, and the floating
/// dtype it is written in.
#[derive(Clone, Copy, Debug)]
pub struct CheckedMerge<'j> {
    base: &'j TensorEntry,
    steps: &'j [Step],
    /// The output tensor's name, for messages.
    out_name: &'j str,
    out_dtype: Dtype,
}

impl<'j> CheckedMerge<'j> {
    /// Checks `base` with `steps`, written as `out`.
    pub fn new(
        base: &'j TensorEntry,
        steps: &'j [Step],
        out: &'j OutTensor,
    ) -> Result<CheckedMerge<'j>> {
        check_merge(base, steps, &out.name, out.dtype)?;
        Ok(CheckedMerge {
            base,
            steps,
            out_name: &out.name,
            out_dtype: out.dtype,
        })
    }

    /// The same output computed from other tensors (views of this merge's, narrowed to
    /// some rows, for `verify --sample`), checked again like any merge.
    pub fn narrowed<'a>(&self, base: &'a TensorEntry, steps: &'a [Step]) -> Result<CheckedMerge<'a>>
    where
        'j: 'a,
    {
        check_merge(base, steps, self.out_name, self.out_dtype)?;
        Ok(CheckedMerge {
            base,
            steps,
            out_name: self.out_name,
            out_dtype: self.out_dtype,
        })
    }

    pub fn base(&self) -> &'j TensorEntry {
        self.base
    }

    pub fn steps(&self) -> &'j [Step] {
        self.steps
    }

    pub fn out_dtype(&self) -> Dtype {
        self.out_dtype
    }

    /// Rows of the base tensor (its first dim; a scalar is one) and elements per row.
    pub fn rows_cols(&self) -> (usize, usize) {
        rows_cols(self.base)
    }
}

/// Rows (the first dim, at least one) and elements per row of a stored tensor.
fn rows_cols(base: &TensorEntry) -> (usize, usize) {
    let rows = base.shape.first().copied().unwrap_or(1).max(1);
    (rows, base.numel() / rows)
}

/// The check (see the module comment). Dtypes first, with the messages users see for
/// quantised or integer inputs; then sizes.
fn check_merge(base: &TensorEntry, steps: &[Step], out_name: &str, out: Dtype) -> Result<()> {
    if !base.dtype.is_float() || !out.is_float() {
        return Err(Error::tensor(
            base.file.path(),
            &base.name,
            format!(
                "cannot merge into a {} tensor (output '{out_name}'): LoRA deltas, lora_B.bias and \
                 replacements apply to F16/BF16/F32/F64 weights only; a quantised (float8) or \
                 integer weight must be dequantised first. Nothing was written",
                base.dtype
            ),
        ));
    }
    for s in steps {
        // A tuner's change checked its own parts when the plan built it (some are
        // integer indices: SHiRA, Super-Tuning).
        let parts = match s {
            Step::Tuned(_) => continue,
            Step::Replace(_) | Step::AddBias { .. } | Step::Lora(_) => s.inputs(),
        };
        if let Some(t) = parts.into_iter().find(|t| !t.dtype.is_float()) {
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
    let (rows, cols) = rows_cols(base);
    let numel = base.numel();
    let size = |t: &TensorEntry, want: usize, what: &str| {
        if t.numel() == want {
            return Ok(());
        }
        Err(Error::tensor(
            t.file.path(),
            &t.name,
            format!(
                "has {} values, but as {what} of '{}' {:?} it needs {want}. Nothing was written",
                t.numel(),
                base.name,
                base.shape
            ),
        ))
    };
    for s in steps {
        match s {
            Step::Replace(t) => size(t, numel, "the replacement")?,
            Step::AddBias { bias, .. } => size(bias, numel, "lora_B.bias")?,
            Step::Lora(l) => {
                // Normal: B [rows, r] and A [r, cols]; Transposed: A [r, rows], B [cols, r].
                let (b_want, a_want, mag_want) = match l.layout {
                    DeltaLayout::Normal => (rows * l.r, cols * l.r, rows),
                    DeltaLayout::Transposed => (cols * l.r, rows * l.r, cols),
                };
                size(&l.a, a_want, "lora_A")?;
                size(&l.b, b_want, "lora_B")?;
                if let Some(m) = &l.magnitude {
                    size(m, mag_want, "the DoRA magnitude")?;
                }
            }
            // A tuner checks its own tensors against the base when the plan asks for its
            // changes (`Tuner::changes`); their dtypes are checked above.
            Step::Tuned(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::merge_types::LoraStep;
    use crate::source::{MappedFile, TensorData};

    fn entry(
        file: &std::sync::Arc<MappedFile>,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
    ) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            file: file.clone(),
            data: TensorData::Contiguous {
                start: 0,
                len: shape.iter().product::<usize>() * dtype.size(),
            },
        }
    }

    fn job(base: TensorEntry, steps: Vec<Step>) -> Job {
        Job {
            out: OutTensor {
                name: "out.weight".into(),
                dtype: base.dtype,
                shape: base.shape.clone(),
            },
            source: JobSource::Merge { base, steps },
            component: 0,
            tied_to: None,
        }
    }

    /// Sizes and dtypes compute relies on are refused here, naming the tensor; a copy
    /// of any dtype passes, and a checked plan hands out its merges.
    #[test]
    fn refuses_what_compute_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = MappedFile::open(&path).unwrap();
        let w = entry(&file, "w", Dtype::F32, &[4, 6]);
        let lora = |a: &[usize], b: &[usize], layout| {
            Step::Lora(Box::new(LoraStep {
                a: entry(&file, "a", Dtype::F32, a),
                b: entry(&file, "b", Dtype::BF16, b),
                r: 2,
                scale: 1.0,
                layout,
                round_delta_first: false,
                magnitude: None,
            }))
        };
        let ok = CheckedJobs::check(vec![
            job(w.clone(), vec![lora(&[2, 6], &[4, 2], DeltaLayout::Normal)]),
            job(
                w.clone(),
                vec![lora(&[2, 4], &[6, 2], DeltaLayout::Transposed)],
            ),
            job(
                w.clone(),
                vec![Step::Replace(entry(&file, "rep", Dtype::F16, &[4, 6]))],
            ),
        ])
        .unwrap();
        assert_eq!(ok.merge(1).unwrap().rows_cols(), (4, 6));
        let bad = [
            (vec![lora(&[2, 6], &[6, 2], DeltaLayout::Normal)], "'b'"),
            (vec![lora(&[3, 6], &[4, 2], DeltaLayout::Normal)], "'a'"),
            (
                vec![Step::Replace(entry(&file, "rep", Dtype::F16, &[4, 5]))],
                "'rep'",
            ),
            (
                vec![Step::Replace(entry(&file, "int", Dtype::I32, &[4, 6]))],
                "'int'",
            ),
        ];
        for (steps, named) in bad {
            let e = CheckedJobs::check(vec![job(w.clone(), steps)]).unwrap_err();
            assert!(e.to_string().contains(named), "{e}");
        }
        let int = entry(&file, "i", Dtype::I64, &[4, 6]);
        let e = CheckedJobs::check(vec![job(int.clone(), vec![])]).unwrap_err();
        assert!(e.to_string().contains("cannot merge into a"), "{e}");
        let copy = Job {
            source: JobSource::Copy(int.clone()),
            ..job(int, vec![])
        };
        let plan = CheckedJobs::check(vec![copy]).unwrap();
        assert!(plan.merge(0).is_none());
    }
}
