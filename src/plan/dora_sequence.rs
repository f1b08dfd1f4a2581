//! Several LoRA adapters on one weight with a DoRA adapter after another one: the whole run
//! of LoRA steps on that weight as one change that replays PEFT 0.21.2's merge of them.
//!
//! `merge_and_unload(adapter_names=[a, b, …])` merges the adapters of a layer in order.
//! A plain LoRA is added (`W += ΔW`). A DoRA adapter takes its norm from the weight *with
//! the adapters merged so far unmerged again* (`LoraLayer._unmerged_base_weight`): PEFT
//! unmerges them in reverse order (plain: `W -= ΔW.to(W.dtype)`; DoRA:
//! `W = (W / f - ΔW).to(W.dtype)` with the factor `f = m / ‖·‖` it cached when it merged
//! that adapter), copies that weight `U`, computes the new adapter's norm `‖U + ΔW‖` per
//! output (row of `[out, in]`), then merges the unmerged adapters again in order — a DoRA
//! one among them takes a fresh norm from the same `U` and caches it — and finally merges
//! the new adapter: `W = (m / ‖U + ΔW‖ · (W + ΔW)).to(W.dtype)`. Every one of those steps
//! rounds into the weight's dtype, so the result carries the roundings of each
//! unmerge/re-merge round trip; this change performs exactly those steps, in that order,
//! with PEFT's dtypes (ΔW and the factors in f32, each step rounded into the weight's dtype).
//!
//! [`program`] turns the adapters into that list of operations once, the way PEFT's calls
//! nest; [`DoraSequence`] runs it on every band. A norm runs over a row of a Linear/Conv
//! weight (inside one band) or over a column of a stored `[in, out]` one (Conv1D,
//! Embedding): then each copy `U` needs one pass over the whole tensor in `prepare`, which
//! replays the operations before it on each band and sums the squares per column.
//!
//! Where lorastream differs from PEFT: the norm is the exact (f64) norm of the f32 values
//! rounded to f32, not `torch.linalg.norm`'s own f32 reduction (the same difference as a
//! single DoRA adapter, a few ulp of f32; hidden by the rounding into a 16-bit weight).

use super::merge_types::{DeltaLayout, LoraStep};
use crate::adapter::tuners::{BandChange, BandSource, Effect, TensorChange, decode};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;

/// One operation of PEFT's merge sequence on the weight `W` (j: the adapter's index in
/// the run, slot: one norm PEFT computed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Plain LoRA merge: `W += ΔW` (`ΔW.to(W.dtype)` first where the step says so).
    Add(usize),
    /// Plain LoRA unmerge: `W -= ΔW.to(W.dtype)`.
    Sub(usize),
    /// `U = W`: the weight with every merged adapter taken out (its index among copies).
    Copy(usize),
    /// `norm[slot] = ‖U(copy) + ΔW_j‖` per output.
    Norm { j: usize, slot: usize, copy: usize },
    /// DoRA merge: `W = (m_j / norm[slot]) · (W + ΔW_j)`.
    DoraMerge { j: usize, slot: usize },
    /// DoRA unmerge: `W = W / (m_j / norm[slot]) − ΔW_j`.
    DoraUnmerge { j: usize, slot: usize },
}

/// PEFT's operations for merging adapters `dora[j]` (true: DoRA) in order, as
/// `LoraLayer.merge` → variant `merge_unsafe` → `_unmerged_base_weight` nest them.
pub fn program(dora: &[bool]) -> Vec<Op> {
    struct Sim<'d> {
        dora: &'d [bool],
        ops: Vec<Op>,
        merged: Vec<usize>,
        cached: Vec<Option<usize>>,
        slots: usize,
        copies: usize,
    }
    impl Sim<'_> {
        fn merge(&mut self, j: usize, inside: Option<usize>) {
            if !self.dora[j] {
                self.ops.push(Op::Add(j));
                self.merged.push(j);
                return;
            }
            let slot = self.slots;
            self.slots += 1;
            match inside {
                // Re-merged inside `_unmerged_base_weight`: the cached copy is used.
                Some(copy) => self.ops.push(Op::Norm { j, slot, copy }),
                None => {
                    let replay = self.merged.clone();
                    while let Some(i) = self.merged.pop() {
                        self.ops.push(match (self.dora[i], self.cached[i]) {
                            (true, Some(slot)) => Op::DoraUnmerge { j: i, slot },
                            _ => Op::Sub(i),
                        });
                    }
                    let copy = self.copies;
                    self.copies += 1;
                    self.ops.push(Op::Copy(copy));
                    // The norm is taken inside the `with` block, the replay runs on exit.
                    self.ops.push(Op::Norm { j, slot, copy });
                    for i in replay {
                        self.merge(i, Some(copy));
                    }
                }
            }
            self.cached[j] = Some(slot);
            self.ops.push(Op::DoraMerge { j, slot });
            self.merged.push(j);
        }
    }
    let mut sim = Sim {
        dora,
        ops: Vec::new(),
        merged: Vec::new(),
        cached: vec![None; dora.len()],
        slots: 0,
        copies: 0,
    };
    for j in 0..dora.len() {
        sim.merge(j, None);
    }
    sim.ops
}

/// The LoRA steps of one weight merged as PEFT merges them in one model.
#[derive(Debug)]
pub struct DoraSequence {
    steps: Vec<LoraStep>,
    ops: Vec<Op>,
    /// The weight (for messages).
    weight: String,
}

impl DoraSequence {
    /// `steps`: the weight's LoRA steps in merge order, every one of one layout.
    pub fn new(weight: &str, steps: Vec<LoraStep>) -> Result<DoraSequence> {
        let layout = steps.first().map(|s| s.layout);
        if let Some(s) = steps.iter().find(|s| Some(s.layout) != layout) {
            return Err(Error::tensor(
                s.a.file.path(),
                &s.a.name,
                format!("lines up with '{weight}' in another layout than the adapters before it"),
            ));
        }
        let dora: Vec<bool> = steps.iter().map(|s| s.magnitude.is_some()).collect();
        Ok(DoraSequence {
            ops: program(&dora),
            steps,
            weight: weight.to_string(),
        })
    }

    fn transposed(&self) -> bool {
        self.steps
            .first()
            .is_some_and(|s| s.layout == DeltaLayout::Transposed)
    }
}

impl TensorChange for DoraSequence {
    fn tuner(&self) -> &'static str {
        "LoRA/DoRA sequence"
    }
    fn effect(&self) -> Effect {
        Effect::Transform
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        self.steps
            .iter()
            .flat_map(|s| [Some(&s.a), Some(&s.b), s.magnitude.as_ref()])
            .flatten()
            .collect()
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (rows, cols) = (base.rows, base.cols);
        let transposed = self.transposed();
        let mut factors = Vec::with_capacity(self.steps.len());
        for s in &self.steps {
            // Normal: B [rows, r], A [r, cols]; transposed: A [r, rows], B [cols, r].
            let (b_want, a_want, m_want) = if transposed {
                (cols * s.r, rows * s.r, cols)
            } else {
                (rows * s.r, cols * s.r, rows)
            };
            let wrong = |t: &TensorEntry, want: usize| {
                Error::tensor(
                    t.file.path(),
                    &t.name,
                    format!(
                        "has {} values, but '{}' [{rows} x {cols}] needs {want}",
                        t.numel(),
                        self.weight
                    ),
                )
            };
            for (t, want) in [(&s.a, a_want), (&s.b, b_want)]
                .into_iter()
                .chain(s.magnitude.as_ref().map(|m| (m, m_want)))
            {
                if t.numel() != want {
                    return Err(wrong(t, want));
                }
                if !t.dtype.is_float() {
                    return Err(Error::tensor(
                        t.file.path(),
                        &t.name,
                        format!("is {}; LoRA and DoRA tensors are floating point", t.dtype),
                    ));
                }
            }
            factors.push(Factors {
                a: decode(&s.a),
                b: decode(&s.b),
                magnitude: s.magnitude.as_ref().map(decode),
                r: s.r,
                scale: s.scale,
                round_first: s.round_delta_first,
            });
        }
        let mut prepared = Prepared {
            factors,
            ops: self.ops.clone(),
            dtype: base.dtype(),
            rows,
            cols,
            transposed,
            col_norms: Vec::new(),
        };
        if transposed {
            prepared.column_norms(base);
        }
        Ok(Box::new(prepared))
    }
}

struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    magnitude: Option<Vec<f32>>,
    r: usize,
    scale: f32,
    round_first: bool,
}

struct Prepared {
    factors: Vec<Factors>,
    ops: Vec<Op>,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    transposed: bool,
    /// Transposed layouts: per norm slot, one norm per column (from `prepare`'s passes).
    col_norms: Vec<Vec<f32>>,
}

/// The squares of `u + d`, summed exactly enough (f64) for a norm rounded to f32.
fn sq(u: f32, d: f32) -> f64 {
    let v = (u + d) as f64;
    v * v
}

impl Prepared {
    /// Rows `[row0, row0 + n)` of adapter j's ΔW, f32, as the engine computes a LoRA delta:
    /// `(B @ A) · s` with the scale applied to the finished dot product.
    fn delta(&self, j: usize, row0: usize, n: usize) -> Vec<f32> {
        let f = &self.factors[j];
        let cols = self.cols;
        let mut d = vec![0f32; n * cols];
        if n == 0 || cols == 0 || f.r == 0 {
            return d;
        }
        let r = f.r as isize;
        // Normal: ΔW[i, :] = Σ_k B[i, k]·A[k, :]; transposed: ΔW[i, o] = Σ_k A[k, i]·B[o, k].
        let (lhs, lrs, lcs, rhs, rrs, rcs) = if self.transposed {
            (&f.a[row0..], 1, self.rows as isize, &f.b[..], 1, r)
        } else {
            (&f.b[row0 * f.r..], r, 1, &f.a[..], cols as isize, 1)
        };
        // SAFETY: the sizes were checked in `prepare` (A and B hold r·rows and r·cols
        // values), so the strides address only elements inside `lhs`, `rhs` and `d`.
        unsafe {
            matrixmultiply::sgemm(
                n,
                f.r,
                cols,
                f.scale,
                lhs.as_ptr(),
                lrs,
                lcs,
                rhs.as_ptr(),
                rrs,
                rcs,
                0.0,
                d.as_mut_ptr(),
                cols as isize,
                1,
            );
        }
        d
    }

    /// Runs `ops[..upto]` on the band `w` (rows from `row0`). Normal layouts take their
    /// norms in the band; `copies` receives every copy `U` made (by index).
    fn run(&self, row0: usize, w: &mut [f32], upto: usize, copies: &mut Vec<Vec<f32>>) {
        let (cols, wd) = (self.cols, self.dtype);
        let n = w.len() / cols.max(1);
        let mut deltas: Vec<Option<Vec<f32>>> = vec![None; self.factors.len()];
        let mut rounded: Vec<Option<Vec<f32>>> = vec![None; self.factors.len()];
        let mut row_norms: Vec<Vec<f32>> = Vec::new();
        let delta = |j: usize, deltas: &mut Vec<Option<Vec<f32>>>| -> Vec<f32> {
            deltas[j]
                .get_or_insert_with(|| self.delta(j, row0, n))
                .clone()
        };
        for op in self.ops.iter().take(upto) {
            match *op {
                Op::Add(j) | Op::Sub(j) => {
                    let sub = matches!(op, Op::Sub(_));
                    let d = if sub || self.factors[j].round_first {
                        rounded[j]
                            .get_or_insert_with(|| {
                                let mut d = delta(j, &mut deltas);
                                round_through(wd, &mut d);
                                d
                            })
                            .clone()
                    } else {
                        delta(j, &mut deltas)
                    };
                    if sub {
                        w.iter_mut().zip(&d).for_each(|(x, d)| *x -= d);
                    } else {
                        w.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
                    }
                }
                Op::Copy(c) => {
                    if copies.len() <= c {
                        copies.resize(c + 1, Vec::new());
                    }
                    copies[c] = w.to_vec();
                }
                Op::Norm { j, slot, copy } => {
                    if self.transposed {
                        continue; // column norms come from `prepare`
                    }
                    let d = delta(j, &mut deltas);
                    let u = &copies[copy];
                    let norms: Vec<f32> = (0..n)
                        .map(|i| {
                            let s = i * cols..(i + 1) * cols;
                            u[s.clone()]
                                .iter()
                                .zip(&d[s])
                                .map(|(&u, &d)| sq(u, d))
                                .sum::<f64>()
                                .sqrt() as f32
                        })
                        .collect();
                    if row_norms.len() <= slot {
                        row_norms.resize(slot + 1, Vec::new());
                    }
                    row_norms[slot] = norms;
                }
                Op::DoraMerge { j, slot } | Op::DoraUnmerge { j, slot } => {
                    let d = delta(j, &mut deltas);
                    let m = self.factors[j].magnitude.as_deref().unwrap_or(&[]);
                    let unmerge = matches!(op, Op::DoraUnmerge { .. });
                    for (i, (row, drow)) in w.chunks_mut(cols).zip(d.chunks(cols)).enumerate() {
                        for (c, (x, d)) in row.iter_mut().zip(drow).enumerate() {
                            // f = m / ‖U + ΔW‖ in f32, per output (row, or stored column).
                            let f = if self.transposed {
                                m[c] / self.col_norms[slot][c]
                            } else {
                                m[row0 + i] / row_norms[slot][i]
                            };
                            *x = if unmerge { *x / f - d } else { f * (*x + d) };
                        }
                    }
                }
            }
            // Each merge and unmerge lands in the weight's dtype (PEFT works in place).
            if !matches!(op, Op::Copy(_) | Op::Norm { .. }) {
                round_through(wd, w);
            }
        }
    }

    /// Transposed layouts: every norm slot's column norms. One pass per copy `U`: each
    /// band replays the operations up to that copy (the norms it needs are known by then).
    fn column_norms(&mut self, base: &BandSource<'_>) {
        let cols = self.cols;
        let slots = self
            .ops
            .iter()
            .filter(|o| matches!(o, Op::Norm { .. }))
            .count();
        self.col_norms = vec![Vec::new(); slots];
        let copy_at: Vec<usize> = self
            .ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Op::Copy(_)))
            .map(|(i, _)| i)
            .collect();
        for (c, &at) in copy_at.iter().enumerate() {
            let wanted: Vec<(usize, usize)> = self
                .ops
                .iter()
                .filter_map(|o| match *o {
                    Op::Norm { j, slot, copy } if copy == c => Some((j, slot)),
                    _ => None,
                })
                .collect();
            let mut sums = vec![vec![0f64; cols]; wanted.len()];
            base.for_each_band(&mut |row0, vals| {
                let mut w = vals.to_vec();
                let mut copies = Vec::new();
                self.run(row0, &mut w, at + 1, &mut copies);
                let n = w.len() / cols.max(1);
                for (&(j, _), sum) in wanted.iter().zip(sums.iter_mut()) {
                    let d = self.delta(j, row0, n);
                    for (urow, drow) in w.chunks(cols).zip(d.chunks(cols)) {
                        for ((s, &u), &d) in sum.iter_mut().zip(urow).zip(drow) {
                            *s += sq(u, d);
                        }
                    }
                }
            });
            for (&(_, slot), sum) in wanted.iter().zip(sums) {
                self.col_norms[slot] = sum.into_iter().map(|s| s.sqrt() as f32).collect();
            }
        }
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let mut copies = Vec::new();
        self.run(row0, band, self.ops.len(), &mut copies);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::run_in_memory;
    use Op::*;

    /// f32 tensors made in memory, as entries.
    fn entries(parts: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<TensorEntry> {
        parts
            .iter()
            .map(|(name, shape, v)| {
                let bytes = bytemuck::cast_slice::<f32, u8>(v);
                TensorEntry::in_memory(
                    std::path::Path::new("t"),
                    name,
                    Dtype::F32,
                    shape.clone(),
                    bytes,
                )
                .unwrap()
            })
            .collect()
    }

    /// The same adapters on a [out, in] weight and on its stored transpose ([in, out], norms
    /// per column, taken in passes over bands of one row) give the transposed result: the
    /// column passes replay the operations before each copy like the row bands do. Small
    /// integers keep every sum exact, so the two agree bit for bit.
    #[test]
    fn transposed_layout_is_the_transpose() {
        let (out, inn, r) = (3usize, 5usize, 2usize);
        let w: Vec<f32> = (0..out * inn)
            .map(|i| ((i * 7 % 11) as f32) - 5.0)
            .collect();
        let wt: Vec<f32> = (0..inn * out)
            .map(|k| w[(k % out) * inn + k / out])
            .collect();
        let a1: Vec<f32> = (0..r * inn).map(|i| (i % 3) as f32 - 1.0).collect();
        let b1: Vec<f32> = (0..out * r).map(|i| (i % 4) as f32 - 1.5).collect();
        let a2: Vec<f32> = (0..r * inn).map(|i| (i % 5) as f32 - 2.0).collect();
        let b2: Vec<f32> = (0..out * r).map(|i| 1.0 - (i % 2) as f32).collect();
        let m2: Vec<f32> = vec![2.0, 3.0, 0.5];
        let t = entries(&[
            ("w", vec![out, inn], w),
            ("wt", vec![inn, out], wt),
            ("a1", vec![r, inn], a1),
            ("b1", vec![out, r], b1),
            ("a2", vec![r, inn], a2),
            ("b2", vec![out, r], b2),
            ("m2", vec![out], m2),
        ]);
        let step = |a: &TensorEntry, b: &TensorEntry, m: Option<&TensorEntry>, layout| LoraStep {
            a: a.clone(),
            b: b.clone(),
            r,
            scale: 0.5,
            layout,
            round_delta_first: false,
            magnitude: m.cloned(),
        };
        let run = |base: &TensorEntry, layout| {
            let seq = DoraSequence::new(
                &base.name,
                vec![
                    step(&t[2], &t[3], None, layout),
                    step(&t[4], &t[5], Some(&t[6]), layout),
                    step(&t[2], &t[5], Some(&t[6]), layout),
                ],
            )
            .unwrap();
            run_in_memory(&seq, base, 1).unwrap()
        };
        let normal = run(&t[0], DeltaLayout::Normal);
        let transposed = run(&t[1], DeltaLayout::Transposed);
        let back: Vec<f32> = (0..out * inn)
            .map(|k| transposed[(k % inn) * out + k / inn])
            .collect();
        assert_eq!(normal, back);
        // And the DoRA steps did something beyond the plain sum.
        assert!(normal.iter().all(|x| x.is_finite()));
    }

    /// A factor of the wrong size is refused with the tensor's name, not read out of bounds.
    #[test]
    fn wrong_sizes_are_refused() {
        let t = entries(&[
            ("w", vec![2, 3], vec![1.0; 6]),
            ("a", vec![1, 4], vec![1.0; 4]),
            ("b", vec![2, 1], vec![1.0; 2]),
            ("m", vec![2], vec![1.0; 2]),
        ]);
        let s = |m: Option<&TensorEntry>| LoraStep {
            a: t[1].clone(),
            b: t[2].clone(),
            r: 1,
            scale: 1.0,
            layout: DeltaLayout::Normal,
            round_delta_first: false,
            magnitude: m.cloned(),
        };
        let seq = DoraSequence::new("w", vec![s(None), s(Some(&t[3]))]).unwrap();
        let e = run_in_memory(&seq, &t[0], 1).unwrap_err().to_string();
        assert!(
            e.contains("'a'") || e.contains("a:") || e.contains(" a "),
            "{e}"
        );
        assert!(e.contains("needs 3"), "{e}");
    }

    #[test]
    fn program_follows_peft_nesting() {
        // LoRA then DoRA: unmerge the LoRA, copy, norm, re-merge it, merge the DoRA.
        assert_eq!(
            program(&[false, true]),
            vec![
                Add(0),
                Sub(0),
                Copy(0),
                Norm {
                    j: 1,
                    slot: 0,
                    copy: 0
                },
                Add(0),
                DoraMerge { j: 1, slot: 0 }
            ]
        );
        // Three DoRA adapters: the replays take fresh norms of the same copy, and the
        // next unmerge divides by the factors cached by those replays.
        assert_eq!(
            program(&[true, true, true]),
            vec![
                Copy(0),
                Norm {
                    j: 0,
                    slot: 0,
                    copy: 0
                },
                DoraMerge { j: 0, slot: 0 },
                DoraUnmerge { j: 0, slot: 0 },
                Copy(1),
                Norm {
                    j: 1,
                    slot: 1,
                    copy: 1
                },
                Norm {
                    j: 0,
                    slot: 2,
                    copy: 1
                },
                DoraMerge { j: 0, slot: 2 },
                DoraMerge { j: 1, slot: 1 },
                DoraUnmerge { j: 1, slot: 1 },
                DoraUnmerge { j: 0, slot: 2 },
                Copy(2),
                Norm {
                    j: 2,
                    slot: 3,
                    copy: 2
                },
                Norm {
                    j: 0,
                    slot: 4,
                    copy: 2
                },
                DoraMerge { j: 0, slot: 4 },
                Norm {
                    j: 1,
                    slot: 5,
                    copy: 2
                },
                DoraMerge { j: 1, slot: 5 },
                DoraMerge { j: 2, slot: 3 },
            ]
        );
        // A plain LoRA after a DoRA is only added; a DoRA alone is its own copy.
        assert_eq!(
            program(&[true, false]),
            vec![
                Copy(0),
                Norm {
                    j: 0,
                    slot: 0,
                    copy: 0
                },
                DoraMerge { j: 0, slot: 0 },
                Add(1)
            ]
        );
    }
}
