//! GLoRA (`peft_type: "GLORA"`): generalised LoRA on `nn.Linear`, PEFT 0.21
//! `tuners/glora/layer.py`. Five paths per module, `glora_A` … `glora_E`, each one of
//! `lora` (`Xd @ Xu`), `vector` (`X`), `constant` (scalar `X[0]`) or empty (a saved `zeros`
//! buffer), as the config's `config_A_B` / `config_C` / `config_D_E` chose (the saved parts
//! say which; a layer without bias has empty C, D, E).
//!
//! Merge, as PEFT does it, every path first cast to the weight's dtype and every operation
//! in that dtype (so rounded after each op for f16/bf16):
//!
//! - `W' = W + ((W * A) + B)`, A and B `[out, in]` (or broadcast `[out, 1]` / scalar);
//! - `b' = b + (((b * D) + E) + (W @ C).squeeze(-1))`, C `[in, 1]`, D and E `[out]` or scalar,
//!   with W the weight *before* this merge.
//!
//! The bias change needs `W @ C`: its `prepare` reads the base weight band by band (never
//! whole) and keeps the `out` dot products. A and B's `Xd @ Xu` is computed per band with
//! sgemm (f32, as PEFT's f32 factors; within 1 ulp of PEFT on every test row), then rounded
//! into the weight's dtype. Where we differ: PEFT's `W @ C` and C's `Xd @ Xu` are MKL
//! GEMV/GEMM sums in a CPU-dependent order that cannot be followed; lorastream sums them in
//! f64 (nearly exact), so an f32 bias whose terms nearly cancel can differ from PEFT's by
//! more than an ulp of the (small) result: up to 64 ulp measured, recorded per row as
//! ULP_OVERRIDE in fixtures/tuner_rows/glora.py.
//!
//! Limits: PEFT wraps only `nn.Linear` (stored `[out, in]`), so the weight is never taken
//! as transposed. `W @ C` reads the base checkpoint's weight, so a GLoRA with a bias path
//! stacked after another adapter that changes the same weight would use the weight before
//! that adapter (the plan does not say so to a tuner); single-adapter merges are exact.

use super::{
    BandChange, BandSource, Change, Effect, ModuleBase, SavedKey, SavedModule, TensorChange, Tuner,
    TunerType, bad_part, check_float, decode,
};
use crate::dtype::{Dtype, decode_f32, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub const TYPE: TunerType = TunerType {
    peft_type: "GLORA",
    open,
};

const PATHS: [&str; 5] = ["glora_A", "glora_B", "glora_C", "glora_D", "glora_E"];

#[derive(Debug)]
struct Glora;

fn open(v: &Value, path: &Path) -> Result<Box<dyn Tuner>> {
    // The saved parts say which kind each path is; the config is only checked to be one
    // PEFT knows, so an unknown kind is refused by name rather than guessed.
    for (key, allowed) in [
        ("config_A_B", &["lora", "vector", "constant", "none"][..]),
        ("config_C", &["lora", "vector", "none"][..]),
        ("config_D_E", &["constant", "vector", "none"][..]),
    ] {
        if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
            if !x.as_str().is_some_and(|s| allowed.contains(&s)) {
                return Err(Error::format(
                    path,
                    format!("GLORA {key} is {x}; PEFT 0.21 knows {allowed:?}"),
                ));
            }
        }
    }
    Ok(Box::new(Glora))
}

/// One GLoRA path as saved.
#[derive(Clone, Debug)]
enum PathKind {
    /// `Xd @ Xu`.
    Lora { xd: TensorEntry, xu: TensorEntry },
    /// `X`, one value per output (A/B: `[out, 1]`; D/E: `[out]`; C: `[in, 1]`).
    Vector(TensorEntry),
    /// `X[0]`.
    Scalar(TensorEntry),
    /// The empty path's `zeros` buffer, of the full shape.
    Dense(TensorEntry),
}

impl PathKind {
    fn inputs(&self) -> Vec<&TensorEntry> {
        match self {
            PathKind::Lora { xd, xu } => vec![xd, xu],
            PathKind::Vector(t) | PathKind::Scalar(t) | PathKind::Dense(t) => vec![t],
        }
    }
}

/// Reads path `p` of module `m`: `rows x cols` is the full shape of the path's value
/// (A/B `[out, in]`, C `[in, 1]`, D/E `[out]` as `[out, 1]`); `scalar_ok` for the paths
/// that may be a constant.
fn read_path(
    weights: &Path,
    m: &SavedModule,
    p: &str,
    rows: usize,
    cols: usize,
    scalar_ok: bool,
) -> Result<PathKind> {
    let get = |s: &str| m.parts.get(&format!("{p}.{s}"));
    let shape_err = |t: &TensorEntry, want: String| {
        bad_part(
            weights,
            t,
            format!(
                "has shape {:?}; module '{}' ({rows} x {cols} for {p}) needs {want}",
                t.shape, m.name
            ),
        )
    };
    let kind = match (get("Xd"), get("Xu"), get("X"), get("zeros")) {
        (Some(xd), Some(xu), None, None) => {
            let (&[a, r], &[r2, b]) = (xd.shape.as_slice(), xu.shape.as_slice()) else {
                return Err(shape_err(xd, "2-D Xd [rows, r] and Xu [r, cols]".into()));
            };
            if a != rows || r2 != r {
                return Err(shape_err(xd, format!("[{rows}, r] with Xu [r, {cols}]")));
            }
            if b != cols {
                return Err(shape_err(xu, format!("[{r}, {cols}]")));
            }
            PathKind::Lora {
                xd: xd.clone(),
                xu: xu.clone(),
            }
        }
        (None, None, Some(x), None) => {
            let n = x.numel();
            // A vector is one value per row of the path ([rows, 1] or [rows]); a constant
            // is a single value, shape [1].
            let vector = n == rows && x.shape.iter().filter(|&&d| d != 1).count() <= 1;
            if scalar_ok && x.shape == [1] && (cols > 1 || rows != 1 || !vector) {
                PathKind::Scalar(x.clone())
            } else if vector && x.shape.len() <= 2 {
                PathKind::Vector(x.clone())
            } else {
                return Err(shape_err(
                    x,
                    if scalar_ok {
                        format!("[{rows}, 1] / [{rows}] (vector) or [1] (constant)")
                    } else {
                        format!("[{rows}, 1] (vector)")
                    },
                ));
            }
        }
        (None, None, None, Some(z)) => {
            if z.numel() != rows * cols {
                return Err(shape_err(z, format!("{} values", rows * cols)));
            }
            PathKind::Dense(z.clone())
        }
        _ => {
            return Err(Error::format(
                weights,
                format!(
                    "module '{}' has no complete {p} (one of Xd+Xu, X or zeros); it has {:?}",
                    m.name,
                    m.parts.keys().collect::<Vec<_>>()
                ),
            ));
        }
    };
    let parts = kind.inputs();
    check_float(weights, &parts)?;
    Ok(kind)
}

impl Tuner for Glora {
    fn name(&self) -> &'static str {
        "GLoRA"
    }

    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k> {
        for p in PATHS {
            let tag = format!(".{p}.");
            if let Some(i) = rel.rfind(&tag) {
                let (module, rest) = (&rel[..i], &rel[i + 1..]);
                if matches!(rest.rsplit('.').next(), Some("Xd" | "Xu" | "X" | "zeros")) {
                    return SavedKey::Part { module, part: rest };
                }
            }
        }
        SavedKey::Full
    }

    /// PEFT's GLoRA wraps only `nn.Linear`, stored `[out, in]`: no layout to settle.
    fn fits(&self, _m: &SavedModule, _out_in: [usize; 2]) -> bool {
        false
    }

    fn changes(
        &self,
        weights: &Path,
        m: &SavedModule,
        _shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>> {
        let w = &base.weight.entry;
        let any = m.parts.values().next().ok_or_else(|| {
            Error::format(weights, format!("module '{}' has no GLoRA parts", m.name))
        })?;
        let &[out, inp] = w.shape.as_slice() else {
            return Err(bad_part(
                weights,
                any,
                format!(
                    "GLoRA adapts nn.Linear weights, but base '{}' has shape {:?}",
                    w.name, w.shape
                ),
            ));
        };
        let a = read_path(weights, m, "glora_A", out, inp, true)?;
        let b = read_path(weights, m, "glora_B", out, inp, true)?;
        let c = read_path(weights, m, "glora_C", inp, 1, false)?;
        let d = read_path(weights, m, "glora_D", out, 1, true)?;
        let e = read_path(weights, m, "glora_E", out, 1, true)?;
        let mut changes = Vec::new();
        let mut unused = Vec::new();
        match &base.bias {
            Some(bias) => {
                if bias.shape != [out] {
                    return Err(bad_part(
                        weights,
                        any,
                        format!(
                            "base bias '{}' has shape {:?}, not [{out}]",
                            bias.name, bias.shape
                        ),
                    ));
                }
                changes.push(Change {
                    target: bias.name.clone(),
                    change: Arc::new(BiasChange {
                        weight: w.clone(),
                        c,
                        d,
                        e,
                    }),
                });
            }
            None => {
                // PEFT makes C, D, E empty for a layer without bias and never uses them;
                // anything else would be an adapter for another layer.
                for (p, k) in [("glora_C", &c), ("glora_D", &d), ("glora_E", &e)] {
                    if !matches!(k, PathKind::Dense(_)) {
                        return Err(bad_part(
                            weights,
                            k.inputs()[0],
                            format!(
                                "{p} is trained, but base module '{}' has no bias for it to change",
                                m.name
                            ),
                        ));
                    }
                }
                unused = vec![c, d, e];
            }
        }
        changes.insert(
            0,
            Change {
                target: w.name.clone(),
                change: Arc::new(WeightChange {
                    a,
                    b,
                    cols: inp,
                    unused,
                }),
            },
        );
        Ok(changes)
    }
}

/// A path's values for rows `[row0, row0 + n)` of a `[rows, cols]` value, f32, rounded into
/// `dtype` (PEFT's `path().to(dtype)`), in `out` (`n * cols` values).
fn path_rows(k: &Prepared, row0: usize, n: usize, cols: usize, dtype: Dtype, out: &mut Vec<f32>) {
    out.clear();
    out.resize(n * cols, 0.0);
    match k {
        Prepared::Lora { xd, xu, r } => {
            let r = *r;
            // SAFETY: xd holds [rows, r] (row0 + n <= rows), xu [r, cols], out [n, cols],
            // row-major with the strides given.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    r,
                    cols,
                    1.0,
                    xd[row0 * r..].as_ptr(),
                    r as isize,
                    1,
                    xu.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    cols as isize,
                    1,
                );
            }
        }
        Prepared::Vector(v) => {
            for (row, &x) in out.chunks_mut(cols).zip(&v[row0..]) {
                row.fill(x);
            }
        }
        Prepared::Scalar(x) => out.fill(*x),
        Prepared::Dense(t) => {
            let mut bytes = Vec::with_capacity(n * cols * t.dtype.size());
            t.gather(row0 * cols, n * cols, &mut bytes);
            decode_f32(t.dtype, &bytes, out);
        }
    }
    round_through(dtype, out);
}

/// A path ready for bands: small factors decoded, dense buffers read per band.
enum Prepared<'a> {
    Lora {
        xd: Vec<f32>,
        xu: Vec<f32>,
        r: usize,
    },
    Vector(Vec<f32>),
    Scalar(f32),
    Dense(&'a TensorEntry),
}

fn prepare_path(k: &PathKind) -> Prepared<'_> {
    match k {
        PathKind::Lora { xd, xu } => Prepared::Lora {
            r: xu.shape[0],
            xd: decode(xd),
            xu: decode(xu),
        },
        PathKind::Vector(t) => Prepared::Vector(decode(t)),
        PathKind::Scalar(t) => Prepared::Scalar(decode(t).first().copied().unwrap_or(0.0)),
        PathKind::Dense(t) => Prepared::Dense(t),
    }
}

/// `W + ((W * A) + B)`.
#[derive(Debug)]
struct WeightChange {
    a: PathKind,
    b: PathKind,
    cols: usize,
    /// Saved tensors PEFT stores but never reads (the empty C/D/E of a layer without
    /// bias), listed as inputs so that coverage accounts for them.
    unused: Vec<PathKind>,
}

struct PreparedWeight<'a> {
    a: Prepared<'a>,
    b: Prepared<'a>,
    cols: usize,
    dtype: Dtype,
}

impl TensorChange for WeightChange {
    fn tuner(&self) -> &'static str {
        "GLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = self.a.inputs();
        v.extend(self.b.inputs());
        v.extend(self.unused.iter().flat_map(|k| k.inputs()));
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        if base.cols != self.cols {
            return Err(Error::Internal(format!(
                "GLoRA weight change of {} columns for '{}' ({} x {})",
                self.cols, base.base.name, base.rows, base.cols
            )));
        }
        Ok(Box::new(PreparedWeight {
            a: prepare_path(&self.a),
            b: prepare_path(&self.b),
            cols: self.cols,
            dtype: base.dtype(),
        }))
    }
}

impl BandChange for PreparedWeight<'_> {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let n = band.len() / self.cols;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        path_rows(&self.a, row0, n, self.cols, self.dtype, &mut a);
        path_rows(&self.b, row0, n, self.cols, self.dtype, &mut b);
        // t = W * A, then t + B, each rounded into the dtype; the engine rounds W + t.
        for (t, &w) in a.iter_mut().zip(band.iter()) {
            *t *= w;
        }
        round_through(self.dtype, &mut a);
        for (t, &x) in a.iter_mut().zip(&b) {
            *t += x;
        }
        round_through(self.dtype, &mut a);
        for (w, &t) in band.iter_mut().zip(&a) {
            *w += t;
        }
    }
}

/// `b + (((b * D) + E) + (W @ C))`.
#[derive(Debug)]
struct BiasChange {
    weight: TensorEntry,
    c: PathKind,
    d: PathKind,
    e: PathKind,
}

struct PreparedBias {
    /// `(b*D + E) + W@C` per output, rounded as PEFT rounds it, to add to the bias.
    add: Vec<f32>,
}

/// `Σ x·y` in f64: torch sums these small products with MKL's blocked GEMV/GEMM, whose
/// order depends on the CPU and cannot be followed here; the nearly exact f64 sum keeps
/// the difference to PEFT at PEFT's own rounding error (the ULP_OVERRIDE of the f32 rows).
fn dot(x: &[f32], y: &[f32]) -> f64 {
    x.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Rows of the base weight read per `prepare` pass (bounded memory for big weights).
const WEIGHT_BAND_ROWS: usize = 1024;

impl TensorChange for BiasChange {
    fn tuner(&self) -> &'static str {
        "GLoRA"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    // PEFT's bias merge reads the weight as it is before this adapter's merge.
    fn reads_base(&self) -> Option<&TensorEntry> {
        Some(&self.weight)
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        let mut v = self.c.inputs();
        v.extend(self.d.inputs());
        v.extend(self.e.inputs());
        v
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let &[out, inp] = self.weight.shape.as_slice() else {
            return Err(Error::Internal(format!(
                "GLoRA weight '{}' is not 2-D",
                self.weight.name
            )));
        };
        if base.rows * base.cols != out {
            return Err(Error::Internal(format!(
                "GLoRA bias change for '{}' with {out} outputs",
                base.base.name
            )));
        }
        let dtype = base.dtype();
        let wdtype = self.weight.dtype;
        // C as the weight's dtype sees it ([in] values), D and E as the bias's.
        let mut c = Vec::new();
        match prepare_path(&self.c) {
            // Xd @ Xu [in, 1]: a dot product per row, summed in f64 (see `dot`).
            Prepared::Lora { xd, xu, r } => {
                c = xd
                    .chunks(r.max(1))
                    .map(|row| dot(row, &xu) as f32)
                    .collect();
                round_through(wdtype, &mut c);
            }
            other => path_rows(&other, 0, inp, 1, wdtype, &mut c),
        }
        let mut d = Vec::new();
        path_rows(&prepare_path(&self.d), 0, out, 1, dtype, &mut d);
        let mut e = Vec::new();
        path_rows(&prepare_path(&self.e), 0, out, 1, dtype, &mut e);
        // W @ C, the weight read band by band, rounded into the dtype (torch's matmul of
        // that dtype).
        let mut wc = vec![0f32; out];
        let mut bytes = Vec::new();
        let mut rows = Vec::new();
        for r0 in (0..out).step_by(WEIGHT_BAND_ROWS) {
            let n = WEIGHT_BAND_ROWS.min(out - r0);
            bytes.clear();
            self.weight.gather(r0 * inp, n * inp, &mut bytes);
            rows.resize(n * inp, 0.0);
            decode_f32(wdtype, &bytes, &mut rows);
            for (o, row) in wc[r0..r0 + n].iter_mut().zip(rows.chunks(inp.max(1))) {
                *o = dot(row, &c) as f32;
            }
        }
        round_through(wdtype, &mut wc);
        // The bias values, to form b * D (the current value, before this change).
        let mut bias = vec![0f32; out];
        base.for_each_band(&mut |r0, v| {
            let at = r0 * base.cols;
            bias[at..at + v.len()].copy_from_slice(v);
        });
        let mut add: Vec<f32> = bias.iter().zip(&d).map(|(b, d)| b * d).collect();
        round_through(dtype, &mut add);
        add.iter_mut().zip(&e).for_each(|(x, e)| *x += e);
        round_through(dtype, &mut add);
        add.iter_mut().zip(&wc).for_each(|(x, w)| *x += w);
        round_through(dtype, &mut add);
        Ok(Box::new(PreparedBias { add }))
    }
}

impl BandChange for PreparedBias {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        for (x, a) in band.iter_mut().zip(&self.add[row0..]) {
            *x += a;
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

    fn module(parts: &[(&str, &[usize], &[f32])]) -> SavedModule {
        SavedModule {
            name: "lin0".into(),
            parts: parts
                .iter()
                .map(|(p, s, v)| (p.to_string(), entry(&format!("lin0.{p}"), s, v)))
                .collect(),
        }
    }

    #[test]
    fn merges_weight_and_bias_like_peft() {
        // W [2, 3], b [2]; A lora (rank 1), B vector, C lora, D constant, E vector.
        let w = [1., 2., 3., 4., 5., 6.];
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 3], &w),
                transposed: false,
            },
            bias: Some(entry("lin0.bias", &[2], &[1., -1.])),
        };
        let m = module(&[
            ("glora_A.Xd", &[2, 1], &[1., 2.]),
            ("glora_A.Xu", &[1, 3], &[0.5, 0., -1.]),
            ("glora_B.X", &[2, 1], &[10., 20.]),
            ("glora_C.Xd", &[3, 1], &[1., 0., 2.]),
            ("glora_C.Xu", &[1, 1], &[0.5]),
            ("glora_D.X", &[1], &[2.]),
            ("glora_E.X", &[2], &[0.25, 0.5]),
        ]);
        let ch = Glora
            .changes(Path::new("a"), &m, &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 2);
        // A = [[.5, 0, -1], [1, 0, -2]]; W + W*A + B.
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [11.5, 12., 10., 28., 25., 14.]);
        // C = [.5, 0, 1]; W@C = [3.5, 8]; b + b*2 + E + W@C.
        let bias = base.bias.clone().unwrap();
        let got = run_in_memory(&*ch[1].change, &bias, 1).unwrap();
        assert_eq!(got, [1. + 2. + 0.25 + 3.5, -1. - 2. + 0.5 + 8.]);
    }

    #[test]
    fn refuses_incomplete_or_misshapen_paths() {
        let base = ModuleBase {
            weight: BaseTensor {
                entry: entry("lin0.weight", &[2, 3], &[0.; 6]),
                transposed: false,
            },
            bias: None,
        };
        let zeros: &[(&str, &[usize], &[f32])] = &[
            ("glora_C.zeros", &[3, 1], &[0.; 3]),
            ("glora_D.zeros", &[2], &[0.; 2]),
            ("glora_E.zeros", &[2], &[0.; 2]),
        ];
        let mut parts: Vec<(&str, &[usize], &[f32])> =
            vec![("glora_A.X", &[1], &[1.]), ("glora_B.X", &[3, 1], &[0.; 3])];
        parts.extend_from_slice(zeros);
        let e = Glora
            .changes(Path::new("a"), &module(&parts), &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lin0.glora_B.X") && e.contains("[3, 1]"), "{e}");
        let parts: Vec<(&str, &[usize], &[f32])> = vec![("glora_A.X", &[1], &[1.])];
        let e = Glora
            .changes(Path::new("a"), &module(&parts), &BTreeMap::new(), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no complete glora_B"), "{e}");
        // Without a bias, the empty C/D/E buffers ride along as inputs of the weight change.
        let mut parts: Vec<(&str, &[usize], &[f32])> =
            vec![("glora_A.X", &[1], &[1.]), ("glora_B.X", &[1], &[0.5])];
        parts.extend_from_slice(zeros);
        let ch = Glora
            .changes(Path::new("a"), &module(&parts), &BTreeMap::new(), &base)
            .unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].change.inputs().len(), 5);
        let got = run_in_memory(&*ch[0].change, &base.weight.entry, 1).unwrap();
        assert_eq!(got, [0.5; 6]);
    }
}
