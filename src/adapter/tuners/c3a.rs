//! C3A (`peft_type: "C3A"`): a block-circulant delta (PEFT 0.21 `tuners/c3a/layer.py`,
//! `utils.get_circulant_fast`).
//!
//! Saved: `<module>.c3a_kernel` `[out / b, in / b, b]` (f32; `b` = the block size, from
//! `block_size` / `block_size_pattern`, read here from the shape). PEFT builds the dense
//! `[out, in]` matrix by pushing the identity through its FFT-based block circular
//! convolution (`fft(ifft(x) · fft(w)).real`), which in exact arithmetic is
//! `C[i·b + u, k·b + t] = w[i, k, (t − u) mod b]`; its merge is
//! `W = W + (C.to(W.dtype) / in)` with the division in W's dtype.
//!
//! lorastream takes `C` exactly from the kernel (no FFT: each band's rows are read off `w`)
//! and then follows PEFT's roundings: into W's dtype, the division by `in` rounded into W's
//! dtype, and the add. PEFT's complex64 FFTs leave round-off of about 1e-7·max|w| on every
//! entry of its `C`, which is not bit-reproducible; the rows file's ULP_OVERRIDE holds the
//! measured difference. C3A wraps `nn.Linear` only; a weight stored `[in, out]` is refused.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, split_part,
};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "C3A",
    open,
};

#[derive(Debug)]
struct C3a;

fn open(_v: &Value, _path: &Path) -> Result<Box<dyn Tuner>> {
    // `block_size` / `block_size_pattern` are the saved kernel's last dim; `init_weights`
    // only initialises it.
    Ok(Box::new(C3a))
}

/// `(m, n, b)` of a kernel that fits `[out, in]`.
fn dims(k: &TensorEntry, out: usize, inp: usize) -> Option<(usize, usize, usize)> {
    match k.shape.as_slice() {
        [m, n, b] if *b > 0 && m * b == out && n * b == inp => Some((*m, *n, *b)),
        _ => None,
    }
}

impl Tuner for C3a {
    fn name(&self) -> &'static str {
        "C3A"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &["c3a_kernel"])
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        m.parts
            .get("c3a_kernel")
            .is_some_and(|k| dims(k, out_in[0], out_in[1]).is_some())
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let k = m.part(weights, "c3a_kernel")?;
        check_float(weights, &[k])?;
        let w = &base.weight;
        let fit = match w.entry.shape.as_slice() {
            [out, inp] if !w.transposed => dims(k, *out, *inp),
            _ => None,
        };
        if fit.is_none() {
            return Err(bad_part(
                weights,
                k,
                format!(
                    "c3a_kernel has shape {:?}, not [out / b, in / b, b] for base '{}' {:?}{} \
                     (PEFT's C3A adapts nn.Linear weights [out, in] only)",
                    k.shape,
                    w.entry.name,
                    w.entry.shape,
                    if w.transposed {
                        " stored [in, out]"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Circulant { kernel: k.clone() }),
        }])
    }
}

#[derive(Debug)]
struct Circulant {
    kernel: TensorEntry,
}

struct Prepared {
    w: Vec<f32>,
    n: usize,
    b: usize,
    cols: usize,
    dtype: Dtype,
}

impl TensorChange for Circulant {
    fn tuner(&self) -> &'static str {
        "C3A"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.kernel]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let Some((_, n, b)) = dims(&self.kernel, base.rows, base.cols) else {
            return Err(Error::Internal(format!(
                "C3A kernel {:?} for '{}' ({} x {})",
                self.kernel.shape, base.base.name, base.rows, base.cols
            )));
        };
        Ok(Box::new(Prepared {
            w: decode(&self.kernel),
            n,
            b,
            cols: base.cols,
            dtype: base.dtype(),
        }))
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let (n, b) = (self.n, self.b);
        let inp = self.cols as f32;
        let mut delta = vec![0f32; self.cols];
        for (r, row) in band.chunks_mut(self.cols).enumerate() {
            let (i, u) = ((row0 + r) / b, (row0 + r) % b);
            for (c, d) in delta.iter_mut().enumerate() {
                let (k, t) = (c / b, c % b);
                *d = self.w[(i * n + k) * b + (t + b - u) % b];
            }
            // PEFT: C.to(W.dtype), then / in in W's dtype, then W + ΔW.
            round_through(self.dtype, &mut delta);
            delta.iter_mut().for_each(|d| *d /= inp);
            round_through(self.dtype, &mut delta);
            for (x, d) in row.iter_mut().zip(&delta) {
                *x += d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};

    fn entry(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        TensorEntry::in_memory(
            Path::new("t"),
            name,
            Dtype::F32,
            shape.to_vec(),
            bytemuck::cast_slice(v),
        )
        .unwrap()
    }

    #[test]
    fn circulant_blocks_divided_by_in() {
        // One block row, two block columns, b = 2: [[a0 a1 | b0 b1], [a1 a0 | b1 b0]] / 4.
        let k = entry("lin0.c3a_kernel", &[1, 2, 2], &[4.0, 8.0, 12.0, 16.0]);
        let m = SavedModule {
            name: "lin0".into(),
            parts: [("c3a_kernel".to_string(), k)].into(),
        };
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 4], &[0.0; 8]),
                transposed: false,
            },
            bias: None,
        };
        assert!(C3a.fits(&m, [2, 4]) && !C3a.fits(&m, [4, 2]));
        let ch = C3a
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [1.0, 2.0, 3.0, 4.0, 2.0, 1.0, 4.0, 3.0]);
    }
}
