//! The walk over a run's work list, the same for every backend: each item is a tie (a
//! sink that shares storage stores the tensor as a view of an earlier one), a copy or a
//! merge, whole or only some rows (`verify --sample`). The walk begins and ends each
//! tensor in the sink, tells the observer when one is done, and looks one item ahead:
//! a copy coming next is announced to the page cache, and a merge coming next in full is
//! handed to the backend's engine with the current one, so that the engine reads its
//! inputs while the current one computes. What the engine keeps between merges (buffers,
//! inputs read ahead) lives for the run, in the engine's own `Run` state.

use super::rows::{RowFilter, copy_rows, one_row_merges};
use crate::error::Result;
use crate::pipeline::copy_tensor;
use crate::plan::checked::{CheckedJobs, CheckedMerge};
use crate::sink::{OutTensor, TensorSink};
use crate::source::TensorEntry;
use std::time::{Duration, Instant};

/// How much of a copied tensor coming next the page cache is asked to start reading
/// (with `--buffered-io`) while the current item runs.
const PREFETCH_BYTES: usize = 16 << 20;

/// One output tensor of a run and what to do for it.
#[derive(Clone, Copy, Debug)]
pub struct WorkItem<'j> {
    pub out: &'j OutTensor,
    pub task: Task<'j>,
}

/// What a run does for one output tensor.
#[derive(Clone, Copy, Debug)]
pub enum Task<'j> {
    /// Stored as a view of planned tensor `to` (an earlier one with the same bytes), for a
    /// sink that shares storage ([`TensorSink::shares_storage`]).
    Tie { to: usize },
    /// Written from `from`; `rows`: only these rows (increasing), each as the whole
    /// tensor has it.
    Write {
        from: Source<'j>,
        rows: Option<&'j [usize]>,
    },
}

/// Where a written tensor's values come from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'j> {
    /// A stored tensor, cast to the output dtype.
    Copy(&'j TensorEntry),
    /// A merge the plan checked.
    Merge(CheckedMerge<'j>),
}

impl<'j> Source<'j> {
    /// Where planned job `i`'s values come from: its checked merge, or the stored tensor
    /// it copies.
    pub fn of(jobs: &'j CheckedJobs, i: usize) -> Source<'j> {
        match jobs.merge(i) {
            Some(m) => Source::Merge(m),
            None => Source::Copy(jobs[i].source_tensor()),
        }
    }
}

/// How a backend computes one merge; the walk drives it.
pub(crate) trait Engine: Sync {
    /// What the engine keeps from one merge to the next during a run (buffers, the next
    /// merge's inputs being read).
    type Run: Default;
    /// Writes `m` whole into `sink` (which has begun the tensor). `next`: the merge this
    /// run writes next in full, whose inputs the engine may start reading now.
    fn merge(
        &self,
        run: &mut Self::Run,
        m: CheckedMerge<'_>,
        next: Option<CheckedMerge<'_>>,
        sink: &mut dyn TensorSink,
    ) -> Result<()>;
}

/// Produces `work` in order into `sink` with `engine`; `observer` is told each finished
/// item (its index in `work`, and how long it took).
pub(crate) fn run<E: Engine + ?Sized>(
    engine: &E,
    work: &[WorkItem<'_>],
    sink: &mut dyn TensorSink,
    observer: &mut dyn FnMut(usize, Duration),
) -> Result<()> {
    let mut state = E::Run::default();
    for (i, item) in work.iter().enumerate() {
        let out = item.out;
        let (from, rows) = match item.task {
            Task::Tie { to } => {
                sink.tie(out, to)?;
                observer(i, Duration::ZERO);
                continue;
            }
            Task::Write { from, rows } => (from, rows),
        };
        let next_merge = read_ahead(&work[i + 1..]);
        let t0 = Instant::now();
        sink.begin(out)?;
        match (from, rows) {
            (Source::Copy(t), None) => copy_tensor(t, out.dtype, sink)?,
            (Source::Copy(t), Some(r)) => copy_rows(t, r, out.dtype, sink)?,
            (Source::Merge(m), None) => engine.merge(&mut state, m, next_merge, sink)?,
            (Source::Merge(m), Some(r)) => merge_rows(engine, &mut state, m, r, sink)?,
        }
        sink.end()?;
        observer(i, t0.elapsed());
    }
    Ok(())
}

/// Writes rows `rows` (increasing) of `m`, one after another, each as the whole merge
/// computes it: as one-row merges through the engine (the same arithmetic, a row's
/// work), or where a step needs every row, the whole merge with the other rows dropped.
fn merge_rows<E: Engine + ?Sized>(
    engine: &E,
    state: &mut E::Run,
    m: CheckedMerge<'_>,
    rows: &[usize],
    sink: &mut dyn TensorSink,
) -> Result<()> {
    match one_row_merges(m.base(), m.steps(), rows)? {
        Some(each) => {
            for (base, steps) in &each {
                engine.merge(state, m.narrowed(base, steps)?, None, sink)?;
            }
            Ok(())
        }
        None => {
            let mut filter = RowFilter::new(sink, m.base(), rows, m.out_dtype());
            engine.merge(state, m, None, &mut filter)?;
            filter.check_done(m.base())
        }
    }
}

/// Looks at what is written next (ties write nothing): a copy in full is announced to the
/// page cache here; a merge in full is returned, for the engine to read ahead. Sampled
/// rows are not read ahead.
fn read_ahead<'j>(rest: &[WorkItem<'j>]) -> Option<CheckedMerge<'j>> {
    let next = rest.iter().find_map(|w| match w.task {
        Task::Write { from, rows } => Some((from, rows)),
        Task::Tie { .. } => None,
    });
    match next {
        Some((Source::Merge(m), None)) => Some(m),
        Some((Source::Copy(t), None)) => {
            t.prefetch(PREFETCH_BYTES);
            None
        }
        Some((_, Some(_))) | None => None,
    }
}

/// Test helper: `base` with `steps` merged as `out` (only `rows`, when given) by
/// `backend`, through a one-item run.
#[cfg(test)]
pub(crate) fn merged(
    backend: &dyn super::DeltaBackend,
    base: &TensorEntry,
    steps: &[crate::plan::merge_types::Step],
    out: crate::dtype::Dtype,
    rows: Option<&[usize]>,
) -> Result<Vec<u8>> {
    let out = OutTensor {
        name: base.name.clone(),
        dtype: out,
        shape: base.shape.clone(),
    };
    let merge = CheckedMerge::new(base, steps, &out)?;
    let item = WorkItem {
        out: &out,
        task: Task::Write {
            from: Source::Merge(merge),
            rows,
        },
    };
    let mut sink = crate::sink::MemorySink::default();
    backend.run(&[item], &mut sink, &mut |_, _| {})?;
    Ok(sink.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::{DeltaBackend, NoDeltas};
    use crate::dtype::Dtype;
    use crate::error::Error;
    use crate::source::{MappedFile, TensorData};

    /// What a sink was told, in order.
    #[derive(Default)]
    struct Events(Vec<String>);

    impl TensorSink for Events {
        fn begin(&mut self, t: &OutTensor) -> Result<()> {
            self.0.push(format!("begin {}", t.name));
            Ok(())
        }
        fn write(&mut self, bytes: &[u8]) -> Result<()> {
            self.0.push(format!("{} bytes", bytes.len()));
            Ok(())
        }
        fn tie(&mut self, t: &OutTensor, to: usize) -> Result<()> {
            self.0.push(format!("tie {} to {to}", t.name));
            Ok(())
        }
        fn end(&mut self) -> Result<()> {
            self.0.push("end".into());
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    /// Copies are begun and ended around their bytes (sampled rows: only those rows), a
    /// tie is one call with nothing begun, the observer hears every item in order, and a
    /// merge handed to the backend of a copy-only run is an internal error, not a
    /// silently empty tensor.
    #[test]
    fn the_walk_begins_ends_ties_and_reports_each_item() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, vec![7u8; 4 * 3 * 4]).unwrap();
        let t = TensorEntry {
            name: "t".into(),
            dtype: Dtype::F32,
            shape: vec![4, 3],
            file: MappedFile::open(&path).unwrap(),
            data: TensorData::Contiguous { start: 0, len: 48 },
        };
        let out = |name: &str| OutTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![4, 3],
        };
        let (a, b, c) = (out("a"), out("b"), out("c"));
        let rows = [1usize, 3];
        let work = [
            WorkItem {
                out: &a,
                task: Task::Write {
                    from: Source::Copy(&t),
                    rows: None,
                },
            },
            WorkItem {
                out: &b,
                task: Task::Tie { to: 0 },
            },
            WorkItem {
                out: &c,
                task: Task::Write {
                    from: Source::Copy(&t),
                    rows: Some(&rows),
                },
            },
        ];
        let mut sink = Events::default();
        let mut seen = Vec::new();
        NoDeltas
            .run(&work, &mut sink, &mut |i, _| seen.push(i))
            .unwrap();
        assert_eq!(seen, [0, 1, 2]);
        let total: usize = sink
            .0
            .iter()
            .filter_map(|e| e.strip_suffix(" bytes")?.parse::<usize>().ok())
            .sum();
        // 48 bytes for `a`, two rows of 12 for `c`.
        assert_eq!(total, 48 + 24);
        let calls: Vec<&str> = sink
            .0
            .iter()
            .map(String::as_str)
            .filter(|e| !e.ends_with(" bytes"))
            .collect();
        assert_eq!(calls, ["begin a", "end", "tie b to 0", "begin c", "end"]);

        let steps = [];
        let merge = CheckedMerge::new(&t, &steps, &a).unwrap();
        let item = WorkItem {
            out: &a,
            task: Task::Write {
                from: Source::Merge(merge),
                rows: None,
            },
        };
        let e = NoDeltas
            .run(&[item], &mut Events::default(), &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e}");
    }
}
