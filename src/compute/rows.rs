//! Computing only some rows of a merge (for `verify --sample`): each chosen row of the
//! weight becomes a one-row merge over views of the inputs (the weight's row, B's row or
//! A's column, the row of a replacement or bias, the row's DoRA magnitude), checked like
//! any merge and run through the backend's ordinary engine, so a sampled row goes through
//! the same arithmetic as in a full merge and costs one row of work.
//!
//! Where one row cannot be computed alone — DoRA on a transposed layout (Conv1D,
//! Embedding) normalises over every row of a column — the whole tensor is computed and
//! only the chosen rows are passed on.

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::pipeline::copy_tensor;
use crate::plan::merge_types::{DeltaLayout, LoraStep, Step};
use crate::sink::{OutTensor, TensorSink};
use crate::source::{TensorData, TensorEntry};

/// `k` row indices of `0..n`, evenly spread, always with the first and the last
/// (all rows when `k >= n`; `[0]` when `k < 2` and `n > 0`).
pub fn sample_rows(n: usize, k: usize) -> Vec<usize> {
    if k >= n {
        return (0..n).collect();
    }
    if k < 2 {
        return vec![0];
    }
    // i·(n-1)/(k-1) is strictly increasing in i when k <= n.
    (0..k)
        .map(|i| ((i as u128 * (n as u128 - 1)) / (k as u128 - 1)) as usize)
        .collect()
}

/// Rows (first dimension) of a tensor; a scalar is one row.
pub fn row_count(shape: &[usize]) -> usize {
    shape.first().copied().unwrap_or(1)
}

/// Row `i` of `t` (index `i` of its first dimension) as a tensor of shape `[1, …]`.
pub fn row_view(t: &TensorEntry, i: usize) -> Option<TensorEntry> {
    let rows = *t.shape.first()?;
    if i >= rows {
        return None;
    }
    let mut shape = t.shape.clone();
    shape[0] = 1;
    let data = match &t.data {
        TensorData::Contiguous { start, len } => {
            let row = len / rows;
            TensorData::Contiguous {
                start: start + i * row,
                len: row,
            }
        }
        TensorData::Strided {
            base,
            offset,
            strides,
        } => TensorData::Strided {
            base: *base,
            offset: offset + i * strides.first()?,
            strides: strides.clone(),
        },
        TensorData::Decoded { decoder, offset } => TensorData::Decoded {
            decoder: decoder.clone(),
            offset: offset + i * (t.numel() / rows),
        },
    };
    Some(TensorEntry {
        shape,
        data,
        ..t.clone()
    })
}

/// Column `i` of a 2-D `t` as a tensor of shape `[rows, 1]` (a strided view).
fn column_view(t: &TensorEntry, i: usize) -> Option<TensorEntry> {
    let [rows, cols] = t.shape[..] else {
        return None;
    };
    if i >= cols {
        return None;
    }
    let data = match &t.data {
        TensorData::Contiguous { start, .. } => TensorData::Strided {
            base: *start,
            offset: i,
            strides: vec![cols, 1],
        },
        TensorData::Strided {
            base,
            offset,
            strides,
        } => TensorData::Strided {
            base: *base,
            offset: offset + i * strides.get(1)?,
            strides: strides.clone(),
        },
        // Only adapter factors are viewed by column, and no adapter format is decoded.
        TensorData::Decoded { .. } => return None,
    };
    Some(TensorEntry {
        shape: vec![rows, 1],
        data,
        ..t.clone()
    })
}

/// Element `i` of a 1-D tensor as a `[1]` tensor.
fn element_view(t: &TensorEntry, i: usize) -> Option<TensorEntry> {
    if t.shape.len() != 1 {
        return None;
    }
    row_view(t, i)
}

/// The merge of row `i` alone: the weight's row with every step narrowed to that row;
/// None when a step needs the other rows (or has an unexpected shape).
fn one_row(base: &TensorEntry, steps: &[Step], i: usize) -> Option<OneRow> {
    let rows = row_count(&base.shape);
    // A view of another tensor that lines up with the weight row by row.
    let same_rows = |t: &TensorEntry| -> Option<TensorEntry> {
        (t.numel() == base.numel() && row_count(&t.shape) == rows)
            .then(|| row_view(t, i))
            .flatten()
    };
    let mut narrowed = Vec::with_capacity(steps.len());
    for s in steps {
        narrowed.push(match s {
            Step::Replace(t) => Step::Replace(same_rows(t)?),
            Step::AddBias { bias, scale } => Step::AddBias {
                bias: same_rows(bias)?,
                scale: *scale,
            },
            // A tuner's change may need the whole tensor (statistics, row blocks): the
            // sampled rows are taken from the full merge instead.
            Step::Tuned(_) => return None,
            Step::Lora(l) => {
                let (a, b, magnitude) = match l.layout {
                    DeltaLayout::Normal => {
                        // B [rows, r, 1…]: its row i; A whole; magnitude: one per row.
                        if row_count(&l.b.shape) != rows {
                            return None;
                        }
                        let m = match &l.magnitude {
                            Some(m) => Some(element_view(m, i)?),
                            None => None,
                        };
                        (l.a.clone(), row_view(&l.b, i)?, m)
                    }
                    DeltaLayout::Transposed => {
                        // DoRA here normalises over all rows of each column.
                        if l.magnitude.is_some() {
                            return None;
                        }
                        // A [r, rows]: its column i; B [cols, r] whole.
                        if l.a.shape.get(1) != Some(&rows) {
                            return None;
                        }
                        (column_view(&l.a, i)?, l.b.clone(), None)
                    }
                };
                Step::Lora(Box::new(LoraStep {
                    a,
                    b,
                    magnitude,
                    ..(**l).clone()
                }))
            }
        });
    }
    Some((row_view(base, i)?, narrowed))
}

/// A one-row merge: the row of the weight, and the steps narrowed to it.
pub(crate) type OneRow = (TensorEntry, Vec<Step>);

/// Rows `rows` (increasing) of `base` with `steps` as one-row merges, one per row, each
/// over views of the inputs; None when a step needs the other rows (the caller computes
/// the whole merge and keeps the rows with a [`RowFilter`]).
pub(crate) fn one_row_merges(
    base: &TensorEntry,
    steps: &[Step],
    rows: &[usize],
) -> Result<Option<Vec<OneRow>>> {
    check_rows(base, rows)?;
    Ok(rows.iter().map(|&i| one_row(base, steps, i)).collect())
}

/// Writes rows `rows` (increasing) of a stored tensor, cast to `to`, into `sink`.
pub fn copy_rows(
    t: &TensorEntry,
    rows: &[usize],
    to: Dtype,
    sink: &mut dyn TensorSink,
) -> Result<()> {
    check_rows(t, rows)?;
    for &i in rows {
        match row_view(t, i) {
            Some(v) => copy_tensor(&v, to, sink)?,
            None => return Err(internal(t, "row out of range")),
        }
    }
    Ok(())
}

fn check_rows(t: &TensorEntry, rows: &[usize]) -> Result<()> {
    let n = row_count(&t.shape);
    if t.shape.is_empty() || rows.windows(2).any(|w| w[0] >= w[1]) || rows.iter().any(|&r| r >= n) {
        return Err(internal(t, "sampled rows out of order or out of range"));
    }
    Ok(())
}

fn internal(t: &TensorEntry, msg: &str) -> Error {
    Error::tensor(t.file.path(), &t.name, format!("internal: {msg}"))
}

/// Passes on only the bytes of the chosen rows of a tensor streamed whole.
pub(crate) struct RowFilter<'s> {
    inner: &'s mut dyn TensorSink,
    rows: &'s [usize],
    row_bytes: u64,
    /// Bytes of the whole tensor seen so far.
    at: u64,
    total: u64,
}

impl<'s> RowFilter<'s> {
    pub(crate) fn new(
        inner: &'s mut dyn TensorSink,
        base: &TensorEntry,
        rows: &'s [usize],
        out_dtype: Dtype,
    ) -> RowFilter<'s> {
        let n = row_count(&base.shape).max(1) as u64;
        let total = base.numel() as u64 * out_dtype.size() as u64;
        RowFilter {
            inner,
            rows,
            row_bytes: total / n,
            at: 0,
            total,
        }
    }

    /// Whether the whole tensor went through (an internal error otherwise).
    pub(crate) fn check_done(&self, base: &TensorEntry) -> Result<()> {
        if self.at == self.total {
            Ok(())
        } else {
            Err(internal(base, "the backend wrote another size"))
        }
    }
}

impl TensorSink for RowFilter<'_> {
    fn begin(&mut self, _: &OutTensor) -> Result<()> {
        Err(Error::Internal("RowFilter::begin".into()))
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (start, end) = (self.at, self.at + bytes.len() as u64);
        let rb = self.row_bytes.max(1);
        // The chosen rows that overlap [start, end), in order.
        let first = self.rows.partition_point(|&r| (r as u64 + 1) * rb <= start);
        for &r in &self.rows[first..] {
            let (r0, r1) = (r as u64 * rb, (r as u64 + 1) * rb);
            if r0 >= end {
                break;
            }
            let (s, e) = (r0.max(start) - start, r1.min(end) - start);
            self.inner.write(&bytes[s as usize..e as usize])?;
        }
        self.at = end;
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu::CpuBackend;
    use crate::compute::walk::merged;
    use crate::sink::MemorySink;
    use crate::source::MappedFile;

    #[test]
    fn sampled_rows_are_spread_and_keep_the_ends() {
        assert_eq!(sample_rows(10, 3), vec![0, 4, 9]);
        assert_eq!(sample_rows(10, 2), vec![0, 9]);
        assert_eq!(sample_rows(5, 5), vec![0, 1, 2, 3, 4]);
        assert_eq!(sample_rows(3, 8), vec![0, 1, 2]);
        assert_eq!(sample_rows(1000, 1), vec![0]);
        let s = sample_rows(151_936, 64);
        assert_eq!((s.len(), s[0], s[63]), (64, 0, 151_935));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }

    /// Writes `tensors` (f32 values) one after another into one file and returns entries.
    fn entries(
        dir: &std::path::Path,
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
    ) -> Vec<TensorEntry> {
        let path = dir.join("t.bin");
        let bytes: Vec<u8> = tensors
            .iter()
            .flat_map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()))
            .collect();
        std::fs::write(&path, bytes).unwrap();
        let file = MappedFile::open(&path).unwrap();
        let mut at = 0;
        tensors
            .iter()
            .map(|(name, shape, v)| {
                let t = TensorEntry {
                    name: name.to_string(),
                    dtype: Dtype::F32,
                    shape: shape.clone(),
                    file: file.clone(),
                    data: TensorData::Contiguous {
                        start: at,
                        len: v.len() * 4,
                    },
                };
                at += v.len() * 4;
                t
            })
            .collect()
    }

    fn lora(
        a: &TensorEntry,
        b: &TensorEntry,
        layout: DeltaLayout,
        m: Option<&TensorEntry>,
    ) -> Step {
        Step::Lora(Box::new(LoraStep {
            a: a.clone(),
            b: b.clone(),
            r: a.shape[0],
            scale: 0.75,
            layout,
            round_delta_first: false,
            magnitude: m.cloned(),
        }))
    }

    /// Rows computed alone are bit-identical to the same rows of the whole merge, in
    /// every layout (plain LoRA, DoRA by rows, transposed, transposed DoRA via the
    /// filter), followed by a bias step.
    #[test]
    fn sampled_rows_equal_the_full_merge() {
        let (rows, cols, r) = (7usize, 5usize, 3usize);
        let v = |n: usize, k: f32| (0..n).map(|i| ((i as f32) * k).sin()).collect::<Vec<_>>();
        let dir = tempfile::tempdir().unwrap();
        let t = entries(
            dir.path(),
            &[
                ("w", vec![rows, cols], v(rows * cols, 0.37)),
                ("a", vec![r, cols], v(r * cols, 1.1)),
                ("b", vec![rows, r], v(rows * r, 0.9)),
                ("m", vec![rows], v(rows, 2.3)),
                ("at", vec![r, rows], v(r * rows, 0.5)),
                ("bt", vec![cols, r], v(cols * r, 0.7)),
                ("mt", vec![cols], v(cols, 1.7)),
                ("bias", vec![rows, cols], v(rows * cols, 3.1)),
            ],
        );
        let (w, a, b, m, at, bt, mt, bias) =
            (&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7]);
        let add = Step::AddBias {
            bias: bias.clone(),
            scale: 0.5,
        };
        let cases = [
            vec![lora(a, b, DeltaLayout::Normal, None)],
            vec![lora(a, b, DeltaLayout::Normal, Some(m)), add.clone()],
            vec![lora(at, bt, DeltaLayout::Transposed, None)],
            vec![lora(at, bt, DeltaLayout::Transposed, Some(mt)), add],
        ];
        let be = CpuBackend::new(Some(2)).unwrap();
        for (ci, steps) in cases.iter().enumerate() {
            for out in [Dtype::F32, Dtype::BF16] {
                let full = merged(&be, w, steps, out, None).unwrap();
                let pick = [0usize, 3, 6];
                let part = merged(&be, w, steps, out, Some(&pick)).unwrap();
                let rb = cols * out.size();
                let want: Vec<u8> = pick
                    .iter()
                    .flat_map(|&i| full[i * rb..(i + 1) * rb].to_vec())
                    .collect();
                assert!(part == want, "case {ci} {out}: sampled rows differ");
            }
        }
        let mut part = MemorySink::default();
        copy_rows(w, &[1, 6], Dtype::F32, &mut part).unwrap();
        let all: Vec<u8> = w.bytes().to_vec();
        let rb = cols * 4;
        assert_eq!(part.0[..rb], all[rb..2 * rb]);
        assert_eq!(part.0[rb..], all[6 * rb..7 * rb]);
        assert!(copy_rows(w, &[3, 1], Dtype::F32, &mut part).is_err());
    }
}
