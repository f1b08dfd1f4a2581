//! FourierFT (`peft_type: "FOURIERFT"`): ΔW is the real part of the inverse 2-D DFT of a
//! sparse spectrum (PEFT 0.21 `tuners/fourierft/layer.py`).
//!
//! Saved: `<module>.fourierft_spectrum` `[n]` only. The positions of the `n` values are not
//! saved: PEFT draws them at load time as the first `n` entries of
//! `torch.randperm(out · in, generator=torch.Generator().manual_seed(random_loc_seed))`,
//! read as `(idx // in, idx % in)` of `[out, in]`. lorastream reproduces that draw (torch's
//! CPU generator is MT19937 seeded by the 32-bit seed; its randperm is a Fisher–Yates
//! shuffle taking `random() % (N − i)` at step `i`, checked against torch; only the first `n`
//! steps are run, so memory is O(n)). PEFT's merge:
//! `W += (ifft2(dense_spectrum).real · scaling)` (transposed for a Conv1D), the FFT in
//! complex64, then one rounding into W's dtype.
//!
//! Where lorastream differs: the inverse DFT is not an FFT here but the band's rows computed
//! directly, `ΔW[x, y] = 1/(R·C) Σ s·cos(2π(f_r·x/R + f_c·y/C))`, in f64, grouped by distinct
//! row frequency (`G_f(y) = Σ s·e^{2πi f_c y / C}` once per tensor, then per row one complex
//! rotation per group), rounded to f32 and scaled by `scaling` in f32 as PEFT does. torch's
//! FFT (pocketfft/MKL, f32 butterflies) is not bit-reproducible, so the result is the
//! correctly rounded delta, within a few ulps of PEFT's (the rows file's ULP_OVERRIDE says
//! how many, measured). Memory: the groups hold `distinct row frequencies × C` complex f64.
//!
//! Orientation: the spectrum's length fits a weight either way round, so it cannot say
//! whether a 2-D weight is stored `[out, in]` or `[in, out]` (Conv1D), and the saved
//! `fan_in_fan_out` only holds the value for the last module PEFT wrapped. Every FourierFT
//! weight is therefore settled like a square LoRA weight: by the base's `config.json`
//! (transformers' code) or `--fan-in-fan-out` / `--no-fan-in-fan-out`, refused otherwise.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode, split_part,
};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "FOURIERFT",
    open,
};

/// torch's CPU `randperm` uses the shuffle reproduced here below this size (above it,
/// another algorithm; refused).
const RANDPERM_SMALL: usize = (u32::MAX / 20) as usize;

#[derive(Debug)]
struct FourierFt {
    scaling: f32,
    seed: u64,
}

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    let scaling = match v.get("scaling") {
        None | Some(Value::Null) => 150.0,
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::format(path, format!("scaling is {x}, not a number")))?,
    };
    let seed = match v.get("random_loc_seed") {
        None => 777,
        Some(x) => x.as_u64().ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "random_loc_seed is {x}; PEFT seeds the spectrum's positions with a \
                     non-negative integer, and without it they cannot be known"
                ),
            )
        })?,
    };
    Ok(Box::new(FourierFt {
        // torch multiplies the f32 real part by the Python float in f32.
        scaling: scaling as f32,
        seed,
    }))
}

impl Tuner for FourierFt {
    fn name(&self) -> &'static str {
        "FourierFT"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        split_part(rel, &["fourierft_spectrum"])
    }

    fn fits(&self, m: &SavedModule, out_in: [usize; 2]) -> bool {
        let Some(s) = m.parts.get("fourierft_spectrum") else {
            return false;
        };
        // Symmetric in out and in: the plan's evidence settles the orientation.
        s.shape.len() == 1 && s.numel() <= out_in[0] * out_in[1]
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let (s, out, inp) = spectrum_part(
            weights,
            m,
            base,
            "fourierft_spectrum",
            "FourierFT",
            "spectrum's",
        )?;
        let w = &base.weight;
        Ok(vec![Change {
            target: w.entry.name.clone(),
            change: Arc::new(Spectrum {
                spectrum: s.clone(),
                out,
                inp,
                transposed: w.transposed,
                seed: self.seed,
                scaling: self.scaling,
            }),
        }])
    }
}

/// The checks FourierFT and WaveFT share: `part` is a 1-D float vector of
/// 0 < n <= out·in values for a 2-D base small enough for the reproduced randperm.
/// Returns the part and the base's (out, in). `tuner` and `what` ("spectrum's",
/// "coefficients'") name them in messages.
pub(super) fn spectrum_part<'m>(
    weights: &Path,
    m: &'m SavedModule,
    base: &ModuleBase,
    part: &str,
    tuner: &str,
    what: &str,
) -> Result<(&'m TensorEntry, usize, usize)> {
    let s = m.part(weights, part)?;
    check_float(weights, &[s])?;
    let w = &base.weight;
    let shape = w.out_in_shape();
    let [out, inp] = shape.as_slice() else {
        return Err(bad_part(
            weights,
            s,
            format!(
                "base '{}' has shape {:?}; PEFT's {tuner} adapts 2-D nn.Linear / Conv1D weights only",
                w.entry.name, w.entry.shape
            ),
        ));
    };
    let n = s.numel();
    if s.shape.len() != 1 || n == 0 || n > out * inp {
        return Err(bad_part(
            weights,
            s,
            format!(
                "has shape {:?}; PEFT saves [n_frequency] with 0 < n_frequency <= out·in = {} for base '{}' {:?}",
                s.shape,
                out * inp,
                w.entry.name,
                w.entry.shape
            ),
        ));
    }
    if out * inp >= RANDPERM_SMALL {
        return Err(bad_part(
            weights,
            s,
            format!(
                "base '{}' has {} values; PEFT draws the {what} positions with torch.randperm, \
                 whose algorithm lorastream reproduces below {RANDPERM_SMALL} values only",
                w.entry.name,
                out * inp
            ),
        ));
    }
    Ok((s, *out, *inp))
}

/// The first `n` entries of torch's `randperm(total, generator=manual_seed(seed))`.
pub(super) fn torch_randperm_prefix(total: usize, n: usize, seed: u64) -> Vec<usize> {
    // torch's CPU generator as `manual_seed(seed)` leaves it (the DARE masks use the same).
    let mut g = crate::adapter::torch_rng::TorchRng::manual_seed(seed);
    let mut moved: HashMap<usize, usize> = HashMap::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n.min(total) {
        // torch stops one step early (i < total − 1); the last entry is then fixed.
        let z = if i + 1 < total {
            (g.next_u32() as usize) % (total - i)
        } else {
            0
        };
        let a = *moved.get(&i).unwrap_or(&i);
        let b = *moved.get(&(i + z)).unwrap_or(&(i + z));
        moved.insert(i, b);
        moved.insert(i + z, a);
        out.push(b);
    }
    out
}

#[derive(Debug)]
struct Spectrum {
    spectrum: TensorEntry,
    out: usize,
    inp: usize,
    transposed: bool,
    seed: u64,
    scaling: f32,
}

/// One distinct stored-row frequency and its row of the column-direction inverse DFT.
struct Group {
    freq: usize,
    re: Vec<f64>,
    im: Vec<f64>,
}

struct Prepared {
    groups: Vec<Group>,
    rows: usize,
    cols: usize,
    scaling: f32,
}

impl TensorChange for Spectrum {
    fn tuner(&self) -> &'static str {
        "FourierFT"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        vec![&self.spectrum]
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (rows, cols) = if self.transposed {
            (self.inp, self.out)
        } else {
            (self.out, self.inp)
        };
        if (base.rows, base.cols) != (rows, cols) {
            return Err(Error::Internal(format!(
                "FourierFT spectrum for [{}, {}] on '{}' ({} x {})",
                self.out, self.inp, base.base.name, base.rows, base.cols
            )));
        }
        let values = decode(&self.spectrum);
        let idx = torch_randperm_prefix(self.out * self.inp, values.len(), self.seed);
        // Twiddles e^{2πi k / cols}, exact angles from integer k.
        let tw: Vec<(f64, f64)> = (0..cols)
            .map(|k| {
                let t = std::f64::consts::TAU * k as f64 / cols as f64;
                (t.cos(), t.sin())
            })
            .collect();
        let mut by_freq: BTreeMap<usize, Group> = BTreeMap::new();
        for (&i, &s) in idx.iter().zip(&values) {
            let (p, q) = (i / self.inp, i % self.inp);
            let (fr, fc) = if self.transposed { (q, p) } else { (p, q) };
            let g = by_freq.entry(fr).or_insert_with(|| Group {
                freq: fr,
                re: vec![0.0; cols],
                im: vec![0.0; cols],
            });
            let s = s as f64;
            for y in 0..cols {
                let (c, sn) = tw[(fc * y) % cols];
                g.re[y] += s * c;
                g.im[y] += s * sn;
            }
        }
        Ok(Box::new(Prepared {
            groups: by_freq.into_values().collect(),
            rows,
            cols,
            scaling: self.scaling,
        }))
    }
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let norm = 1.0 / (self.rows as f64 * self.cols as f64);
        let mut acc = vec![0f64; self.cols];
        for (i, row) in band.chunks_mut(self.cols).enumerate() {
            let x = row0 + i;
            acc.iter_mut().for_each(|a| *a = 0.0);
            for g in &self.groups {
                let t =
                    std::f64::consts::TAU * ((g.freq * x) % self.rows) as f64 / self.rows as f64;
                let (c, s) = (t.cos(), t.sin());
                for ((a, &re), &im) in acc.iter_mut().zip(&g.re).zip(&g.im) {
                    *a += c * re - s * im;
                }
            }
            for (w, &a) in row.iter_mut().zip(&acc) {
                *w += ((a * norm) as f32) * self.scaling;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::{BaseTensor, run_in_memory};
    use crate::dtype::Dtype;

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
    fn randperm_prefix_is_torchs() {
        // torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:5], torch 2.15.
        assert_eq!(torch_randperm_prefix(200, 5, 777), [135, 123, 63, 99, 19]);
        assert_eq!(
            torch_randperm_prefix(40_000_000, 5, 5),
            [33453411, 36996820, 19766955, 10526155, 7852098]
        );
        let mut all = torch_randperm_prefix(20, 20, 777);
        assert_eq!(all[..5], [15, 0, 9, 11, 3]);
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn constant_full_spectrum_is_an_impulse() {
        // Every position holds 2.0: ifft2 of a constant is 2.0 at (0, 0) and 0 elsewhere,
        // whatever the positions' order; scaling 3 → ΔW[0, 0] = 6.
        let (out, inp) = (3usize, 4usize);
        let m = SavedModule {
            name: "lin0".into(),
            parts: [(
                "fourierft_spectrum".to_string(),
                entry("lin0.fourierft_spectrum", &[out * inp], &[2.0; 12]),
            )]
            .into(),
        };
        let t = FourierFt {
            scaling: 3.0,
            seed: 777,
        };
        for transposed in [false, true] {
            let shape = if transposed { [inp, out] } else { [out, inp] };
            let base = ModuleBase {
                weight: BaseTensor {
                    entry: entry("lin0.weight", &shape, &[1.0; 12]),
                    transposed,
                },
                bias: None,
            };
            assert!(t.fits(&m, [out, inp]) && t.fits(&m, [inp, out]));
            let ch = t
                .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
                .unwrap();
            let got = run_in_memory(&*ch[0].change, &base.weight.entry, 2).unwrap();
            assert!((got[0] - 7.0).abs() < 1e-6, "{got:?}");
            assert!(got[1..].iter().all(|x| (x - 1.0).abs() < 1e-6), "{got:?}");
        }
    }
}
