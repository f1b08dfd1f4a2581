//! A sink that writes nothing: it compares every tensor it receives, piece by piece as the
//! bytes arrive, with a tensor of an existing checkpoint (`verify`'s OUT), reading the
//! same elements of that tensor as it goes. Memory is one piece of each side, never a
//! tensor, let alone a model. Results land in a shared list the caller reads after the
//! run (the sink itself is consumed by the pipelined writer).

use super::{OutTensor, TensorSink};
use crate::compare::{PIECE_ELEMS, Stats, TensorDiff, Tolerance, read_elements};
use crate::direct_io::AlignedBuf;
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use std::sync::{Arc, Mutex};

/// One tensor the sink will receive, and what to compare it with.
#[derive(Clone, Debug)]
pub struct Expected {
    /// The planned tensor (the recomputation), whose bytes will arrive.
    pub planned: OutTensor,
    /// The stored tensor to compare them with (normally the one of the same name).
    pub against: TensorEntry,
    /// Only these rows arrive (one after another); None: all of the tensor.
    pub rows: Option<Vec<usize>>,
}

/// The tensor being received.
struct Current {
    exp: Expected,
    diff: TensorDiff,
    /// Elements of the incoming stream compared so far.
    done: usize,
    /// Elements of the incoming stream in all.
    total: usize,
    /// Elements per row.
    cols: usize,
}

pub struct CompareSink {
    /// In the order the tensors will arrive.
    expected: std::vec::IntoIter<Expected>,
    tolerance: Tolerance,
    results: Arc<Mutex<Vec<TensorDiff>>>,
    cur: Option<Current>,
    /// Bytes of a partial element left over from the previous piece.
    carry: Vec<u8>,
    buf: AlignedBuf,
    gather: Vec<u8>,
}

impl CompareSink {
    /// A sink that expects `expected` in order and appends one `TensorDiff` per tensor to
    /// `results`.
    pub fn new(
        expected: Vec<Expected>,
        tolerance: Tolerance,
        results: Arc<Mutex<Vec<TensorDiff>>>,
    ) -> CompareSink {
        CompareSink {
            expected: expected.into_iter(),
            tolerance,
            results,
            cur: None,
            carry: Vec::new(),
            buf: AlignedBuf::default(),
            gather: Vec::new(),
        }
    }

    /// Compares whole elements of the incoming stream with the stored tensor.
    fn compare(&mut self, piece: &[u8]) -> Result<()> {
        let Some(cur) = &mut self.cur else {
            return Err(Error::Internal("bytes outside a tensor".into()));
        };
        let es = cur.exp.planned.dtype.size();
        let n = piece.len() / es;
        if cur.done + n > cur.total {
            return Err(Error::Internal(format!(
                "more bytes than tensor '{}' holds",
                cur.exp.planned.name
            )));
        }
        let mut i = 0;
        while i < n {
            let e = cur.done + i;
            // Where element e of the stream is in the stored tensor, and how many follow
            // it contiguously there (to the end of its row when rows are sampled).
            let (flat, run) = match &cur.exp.rows {
                None => (e, n - i),
                Some(rows) => {
                    let (k, c) = (e / cur.cols.max(1), e % cur.cols.max(1));
                    let row = rows.get(k).copied().unwrap_or(0);
                    (row * cur.cols + c, (cur.cols - c).min(n - i))
                }
            };
            let run = run.min(PIECE_ELEMS);
            let theirs =
                read_elements(&cur.exp.against, flat, run, &mut self.buf, &mut self.gather)?;
            cur.diff.stats.add(
                self.tolerance,
                cur.exp.planned.dtype,
                &piece[i * es..(i + run) * es],
                cur.exp.against.dtype,
                theirs,
                |j| (flat + j) as u64,
            );
            i += run;
        }
        cur.done += n;
        Ok(())
    }
}

impl TensorSink for CompareSink {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        let exp = match self.expected.next() {
            Some(e) if e.planned == *t && self.cur.is_none() => e,
            _ => {
                return Err(Error::Internal(format!(
                    "tensor '{}' compared out of plan order",
                    t.name
                )));
            }
        };
        let numel: usize = t.shape.iter().product();
        let rows_total = t.shape.first().copied().unwrap_or(1).max(1);
        let cols = numel / rows_total;
        let total = match &exp.rows {
            Some(r) => r.len() * cols,
            None => numel,
        };
        let mut diff = TensorDiff::new(
            &t.name,
            (t.dtype, &t.shape),
            (exp.against.dtype, &exp.against.shape),
        );
        diff.rows_compared = exp.rows.clone();
        diff.stats = Stats::default();
        self.carry.clear();
        self.cur = Some(Current {
            exp,
            diff,
            done: 0,
            total,
            cols,
        });
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let es = match &self.cur {
            Some(c) => c.exp.planned.dtype.size(),
            None => return Err(Error::Internal("bytes outside a tensor".into())),
        };
        let mut bytes = bytes;
        if !self.carry.is_empty() {
            let need = (es - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..need]);
            bytes = &bytes[need..];
            if self.carry.len() < es {
                return Ok(());
            }
            let one = std::mem::take(&mut self.carry);
            self.compare(&one)?;
        }
        let whole = bytes.len() / es * es;
        self.compare(&bytes[..whole])?;
        self.carry.extend_from_slice(&bytes[whole..]);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        match self.cur.take() {
            Some(c) if c.done == c.total && self.carry.is_empty() => {
                c.exp.against.release();
                self.results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c.diff);
                Ok(())
            }
            Some(c) => Err(Error::Internal(format!(
                "tensor '{}' ended after {} of {} elements",
                c.exp.planned.name, c.done, c.total
            ))),
            None => Err(Error::Internal("end outside a tensor".into())),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.cur.is_some() || self.expected.next().is_some() {
            return Err(Error::Internal(
                "comparison finished before every tensor arrived".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;
    use crate::source::{MappedFile, TensorData};

    fn stored(dir: &std::path::Path, v: &[f32], shape: Vec<usize>) -> TensorEntry {
        let path = dir.join("out.bin");
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(&path, &bytes).unwrap();
        TensorEntry {
            name: "w".into(),
            dtype: Dtype::F32,
            shape,
            file: MappedFile::open(&path).unwrap(),
            data: TensorData::Contiguous {
                start: 0,
                len: bytes.len(),
            },
        }
    }

    /// Pieces that split elements, sampled rows mapped to the right stored rows, and the
    /// first difference located by its flat index in the stored tensor.
    #[test]
    fn compares_pieces_and_sampled_rows() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let against = stored(dir.path(), &v, vec![4, 3]);
        let planned = OutTensor {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![4, 3],
        };
        let results = Arc::new(Mutex::new(Vec::new()));
        let exp = |rows: Option<Vec<usize>>| Expected {
            planned: planned.clone(),
            against: against.clone(),
            rows,
        };
        let mut sink = Box::new(CompareSink::new(
            vec![exp(None), exp(Some(vec![0, 3]))],
            Tolerance::Exact,
            results.clone(),
        ));
        let all: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        sink.begin(&planned).unwrap();
        // Split inside an element on purpose.
        sink.write(&all[..5]).unwrap();
        sink.write(&all[5..27]).unwrap();
        sink.write(&all[27..]).unwrap();
        sink.end().unwrap();
        // Rows 0 and 3, with element (3, 1) (flat 10) changed.
        let rows: Vec<f32> = vec![0.0, 1.0, 2.0, 9.0, 10.5, 11.0];
        sink.begin(&planned).unwrap();
        let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
        sink.write(&bytes).unwrap();
        sink.end().unwrap();
        sink.finish().unwrap();
        let r = results.lock().unwrap();
        assert_eq!((r[0].stats.compared, r[0].stats.differing), (12, 0));
        assert_eq!((r[1].stats.compared, r[1].stats.differing), (6, 1));
        assert_eq!(r[1].stats.first_differing, Some(10));
        assert_eq!(r[1].rows_compared, Some(vec![0, 3]));
        drop(r);
        // Too few bytes, or a tensor out of order, is an error, not a silent pass.
        let mut sink = Box::new(CompareSink::new(
            vec![exp(None)],
            Tolerance::Exact,
            results.clone(),
        ));
        sink.begin(&planned).unwrap();
        sink.write(&all[..8]).unwrap();
        assert!(sink.end().is_err());
        let sink = Box::new(CompareSink::new(vec![exp(None)], Tolerance::Exact, results));
        assert!(sink.finish().is_err());
    }
}
