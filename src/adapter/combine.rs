//! Weighted combinations of LoRA adapters, as PEFT 0.21.2's `add_weighted_adapter`
//! (`tuners/lora/model.py`, `utils/merge_utils.py`) builds them, followed by the merge of
//! the new adapter (`merge_and_unload(adapter_names=[new])`).
//!
//! Per adapted module, the adapters that hold it (each with its weight `w` and its own
//! scaling `s`, a Python float) give new factors A', B':
//!
//! - `cat`: `A' = cat_rows((A·w)·s)`, `B' = cat_cols(B)`, written into the new adapter's
//!   factors, which PEFT creates in the *base weight's* dtype: on a 16-bit base they are
//!   rounded to it, and `get_delta_weight` then rounds ΔW to it too before the add.
//! - `linear`, `ties`, `magnitude_prune`: A and B are combined separately with the weights
//!   `f32(√|w·s|·sign(w·s))` for A and `f32(√|w·s|)` for B (`task_arithmetic`: Σ T·w in
//!   order; `magnitude_prune`: each T pruned to its `int(density·numel)` largest |values|
//!   first; `ties`: pruned, the majority sign elected over the unweighted pruned tensors by
//!   their sum (`total`) or their signs (`frequency`), then Σ of the weighted values that
//!   agree, divided by how many agree (at least 1)). The factors stay f32.
//!
//! The new adapter has `r = lora_alpha = new rank` (the sum of the ranks for `cat`, the
//! common rank otherwise), so its scaling is 1 (√r with rsLoRA, copied from the first
//! adapter's config). The merge is then ΔW = B'·A' scaled, in the module's layout.
//!
//! - `svd`: ΔW = Σ w·ΔWⱼ cut to the largest rank by its SVD (see [`svd_factors`]:
//!   computed in f64 from the factors, so it differs from PEFT's f32 `torch.linalg.svd`
//!   by PEFT's own SVD rounding; measured in fixtures/make_peft_combos.py).
//!
//! - `ties_svd`, `magnitude_prune_svd`: every adapter's full ΔW (`(B·A)·s`, f32) pruned
//!   and mixed as `ties` / `magnitude_prune` do with the weights `f32(w)`, then cut to the
//!   largest rank by an f64 SVD of the full matrix (one-sided Jacobi; modules up to
//!   [`MAX_FULL_SVD_DIM`] on their shorter side, larger ones refused by name).
//!
//! - `dare_linear`, `dare_ties` (and their `_svd` forms on full ΔWs): as `linear` / `ties`,
//!   but each tensor is first pruned at random and rescaled: `T·mask / f32(density)` with
//!   `mask = torch.bernoulli(torch.full_like(T, density))`, drawn from torch's global CPU
//!   stream. Given the seed of the `torch.manual_seed(seed)` run just before
//!   `add_weighted_adapter` (`--seed`), the masks are PEFT's exactly ([`crate::adapter::torch_rng`]):
//!   the stream first pays for the new adapter's init (`inject_adapter` builds every
//!   module's `nn.Linear(in, r)` and `nn.Linear(r, out)`, then kaiming-inits A again when
//!   `init_lora_weights` is true), then the modules draw in `model.named_modules()` order,
//!   per module every adapter's lora_A in the given order, then every lora_B (the `_svd`
//!   forms: every adapter's ΔW, as `get_delta_weight` returns it, `[in, out]` for
//!   fan_in_fan_out and Embeddings). The planner settles that order (`--module-order`, or the base's own
//!   pickle order) and gives each module the stream's state where its masks start
//!   ([`CombinedLora::dare_rng`]).
//!
//! Refused: DARE without `--seed`, a `magnitude_prune`/`ties` cut that falls between equal
//! magnitudes (torch's `topk` picks among ties by its own order).
//!
//! The change keeps the original factors as its inputs (so coverage sees every one used)
//! and computes the new factors once per tensor in `prepare`; bands get ΔW's rows with
//! `sgemm`, as the engine's own LoRA step does.

use crate::adapter::torch_rng::{BernoulliP, TorchRng};
use crate::adapter::tuners::{BandChange, BandSource, Effect, TensorChange, decode};
use crate::dtype::{Dtype, round_through};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use std::path::PathBuf;

/// `combination_type` of `add_weighted_adapter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CombinationType {
    #[default]
    Linear,
    Cat,
    Ties,
    MagnitudePrune,
    DareLinear,
    DareTies,
    Svd,
    TiesSvd,
    DareLinearSvd,
    DareTiesSvd,
    MagnitudePruneSvd,
}

/// Every type with its PEFT name.
pub const COMBINATION_TYPES: &[(&str, CombinationType)] = &[
    ("linear", CombinationType::Linear),
    ("cat", CombinationType::Cat),
    ("svd", CombinationType::Svd),
    ("ties", CombinationType::Ties),
    ("ties_svd", CombinationType::TiesSvd),
    ("dare_linear", CombinationType::DareLinear),
    ("dare_ties", CombinationType::DareTies),
    ("dare_linear_svd", CombinationType::DareLinearSvd),
    ("dare_ties_svd", CombinationType::DareTiesSvd),
    ("magnitude_prune", CombinationType::MagnitudePrune),
    ("magnitude_prune_svd", CombinationType::MagnitudePruneSvd),
];

impl CombinationType {
    pub fn parse(s: &str) -> Option<CombinationType> {
        COMBINATION_TYPES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, t)| *t)
    }
    pub fn name(self) -> &'static str {
        COMBINATION_TYPES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("?", |(n, _)| n)
    }
    fn uses_density(self) -> bool {
        !matches!(
            self,
            CombinationType::Linear | CombinationType::Cat | CombinationType::Svd
        )
    }
    /// DARE: pruned at random.
    pub fn is_dare(self) -> bool {
        matches!(
            self,
            CombinationType::DareLinear
                | CombinationType::DareTies
                | CombinationType::DareLinearSvd
                | CombinationType::DareTiesSvd
        )
    }
    /// Prunes and mixes full ΔWs, then cuts them by an SVD.
    pub fn is_pruned_svd(self) -> bool {
        matches!(
            self,
            CombinationType::TiesSvd
                | CombinationType::MagnitudePruneSvd
                | CombinationType::DareLinearSvd
                | CombinationType::DareTiesSvd
        )
    }
}

/// `majority_sign_method`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MajoritySign {
    #[default]
    Total,
    Frequency,
}

/// `--combine` with its options.
#[derive(Clone, Debug, Default)]
pub struct Combine {
    pub kind: CombinationType,
    pub density: Option<f64>,
    pub majority: MajoritySign,
    /// `--seed`: DARE's `torch.manual_seed(seed)` just before `add_weighted_adapter`.
    pub seed: Option<u64>,
    /// `--module-order FILE`: the model's module names in `named_modules()` order (DARE).
    pub module_order: Option<PathBuf>,
}

impl Combine {
    /// What this combination of `n` adapters really is (PEFT: one adapter is always
    /// `linear`), or why it is refused whatever the modules.
    pub fn effective(&self, n: usize) -> Result<Combine> {
        let kind = if n == 1 {
            CombinationType::Linear
        } else {
            self.kind
        };
        let name = self.kind.name();
        if !self.kind.is_dare() && (self.seed.is_some() || self.module_order.is_some()) {
            return Err(Error::Usage(format!(
                "--seed and --module-order go with the random (dare_*) combinations, not --combine {name}"
            )));
        }
        if kind.uses_density() {
            match self.density {
                None => {
                    return Err(Error::Usage(format!(
                        "--combine {name} needs --density (the fraction of values kept, 0..1)"
                    )));
                }
                Some(d) if d.is_nan() || d < 0.0 => {
                    return Err(Error::Usage(format!(
                        "--density {d}: must be >= 0 (PEFT: 'Density should be >= 0')"
                    )));
                }
                _ => {}
            }
        }
        if kind.is_dare() && self.density.is_some_and(|d| d < 1.0) {
            if self.seed.is_none() {
                return Err(Error::Usage(format!(
                    "--combine {name} prunes at random (torch.bernoulli from torch's global RNG): \
                     give --seed N, the seed of the torch.manual_seed(N) run just before \
                     add_weighted_adapter, to reproduce PEFT's masks"
                )));
            }
            if self.density == Some(0.0) {
                return Err(Error::Usage(format!(
                    "--combine {name} --density 0 keeps nothing and divides by 0: PEFT's result is \
                     NaN everywhere"
                )));
            }
        }
        Ok(Combine {
            kind,
            density: self.density,
            majority: self.majority,
            seed: self.seed,
            module_order: self.module_order.clone(),
        })
    }

    /// DARE that draws masks (density below 1: PEFT's `prune` returns the tensor as it is
    /// otherwise, drawing nothing).
    pub fn draws(&self) -> bool {
        self.kind.is_dare() && self.density.is_some_and(|d| d < 1.0)
    }
}

/// One adapter's LoRA on the module.
#[derive(Clone, Debug)]
pub struct Part {
    /// `lora_A` `[r, …]` (`lora_embedding_A` `[r, V]`).
    pub a: TensorEntry,
    /// `lora_B` `[out, r, 1…]` (`lora_embedding_B` `[D, r]`).
    pub b: TensorEntry,
    /// The adapter's weight (`--lora DIR:WEIGHT`).
    pub weight: f64,
    /// The adapter's scaling on this module, as PEFT holds it.
    pub scaling: f64,
}

/// The merge of the combined adapter into one weight.
#[derive(Debug)]
pub struct CombinedLora {
    pub parts: Vec<Part>,
    pub how: Combine,
    /// The weight is stored `[in, out]` (Conv1D, Embedding): its rows are ΔW's columns.
    pub transposed: bool,
    /// An Embedding (PEFT's Embedding merge rounds ΔW to the weight's dtype first).
    pub embedding: bool,
    /// The new adapter's scaling (1, or √r with rsLoRA).
    pub scale: f32,
    /// The new adapter's rank (`svd`: the largest of the adapters' ranks).
    pub new_rank: usize,
    /// For messages: the module and the first adapter's weights file.
    pub module: String,
    pub weights: PathBuf,
    /// DARE: torch's stream where this module's masks start (see the module comment).
    pub dare_rng: Option<TorchRng>,
}

impl CombinedLora {
    fn refuse(&self, msg: String) -> Error {
        Error::tensor(&self.weights, &self.parts[0].a.name, msg)
    }

    /// A' `[r', K]` and B' `[out, r']` (f32, before any rounding to the base dtype).
    fn factors(&self) -> Result<(Vec<f32>, Vec<f32>, usize)> {
        let mut rng = self.dare_rng.clone();
        if self.how.draws() && rng.is_none() {
            return Err(Error::Internal(format!(
                "module '{}': DARE without its random stream",
                self.module
            )));
        }
        let k_of = |t: &TensorEntry| t.numel() / t.shape.first().copied().unwrap_or(1).max(1);
        let out_of = |t: &TensorEntry| t.shape.first().copied().unwrap_or(0);
        let rank_of = |p: &Part| p.a.shape.first().copied().unwrap_or(0);
        let k = k_of(&self.parts[0].a);
        let out = out_of(&self.parts[0].b);
        if self
            .parts
            .iter()
            .any(|p| k_of(&p.a) != k || out_of(&p.b) != out || p.b.numel() != out * rank_of(p))
        {
            return Err(self.refuse(format!(
                "module '{}': the adapters' factors do not have the same input/output sizes",
                self.module
            )));
        }
        if self.how.kind == CombinationType::Cat {
            let r: usize = self.parts.iter().map(rank_of).sum();
            let mut a = Vec::with_capacity(r * k);
            let mut b = vec![0f32; out * r];
            let mut col = 0;
            for p in &self.parts {
                let (w, s) = (p.weight as f32, p.scaling as f32);
                // current_adapter_lora_A.data * weight * target.scaling[adapter]
                a.extend(decode(&p.a).into_iter().map(|x| x * w * s));
                let rp = rank_of(p);
                for (o, row) in decode(&p.b).chunks_exact(rp.max(1)).enumerate() {
                    b[o * r + col..o * r + col + rp].copy_from_slice(row);
                }
                col += rp;
            }
            return Ok((a, b, r));
        }
        if self.how.kind == CombinationType::Svd {
            let (a, b) = svd_factors(&self.parts, k, out, self.new_rank);
            return Ok((a, b, self.new_rank));
        }
        if self.how.kind.is_pruned_svd() {
            if out.min(k) > MAX_FULL_SVD_DIM {
                return Err(self.refuse(format!(
                    "module '{}': --combine {} takes the SVD of the full {out} x {k} ΔW, which \
                     lorastream does for sizes up to {MAX_FULL_SVD_DIM} only; use svd, cat, linear, \
                     ties or magnitude_prune",
                    self.module,
                    self.how.kind.name()
                )));
            }
            // get_delta_weight per adapter: (B @ A) * scaling, f32.
            let deltas: Vec<Vec<f32>> = self
                .parts
                .iter()
                .map(|p| {
                    let (a, b) = (decode(&p.a), decode(&p.b));
                    let rp = rank_of(p);
                    let s = p.scaling as f32;
                    let mut d = vec![0f32; out * k];
                    for o in 0..out {
                        for j in 0..rp {
                            let bo = b[o * rp + j];
                            let row = &a[j * k..(j + 1) * k];
                            d[o * k..(o + 1) * k]
                                .iter_mut()
                                .zip(row)
                                .for_each(|(x, &y)| *x += bo * y);
                        }
                    }
                    d.iter_mut().for_each(|x| *x *= s);
                    d
                })
                .collect();
            let weights: Vec<f32> = self.parts.iter().map(|p| p.weight as f32).collect();
            // PEFT's ΔW of a fan_in_fan_out module is [in, out]: its mask runs that way.
            let order = self.transposed.then_some(out);
            let dw = self.mix(deltas, &weights, "ΔW", &mut rng, order)?;
            let (a, b) = full_svd_factors(&dw, out, k, self.new_rank);
            return Ok((a, b, self.new_rank));
        }
        let r = rank_of(&self.parts[0]);
        if self.parts.iter().any(|p| rank_of(p) != r) {
            return Err(self.refuse(format!(
                "module '{}': --combine {} needs the same rank in every adapter (PEFT stacks the \
                 factors); use cat",
                self.module,
                self.how.kind.name()
            )));
        }
        let mut wa = Vec::new();
        let mut wb = Vec::new();
        for p in &self.parts {
            let ws = p.weight * p.scaling;
            let root = ws.abs().sqrt();
            wa.push((if ws >= 0.0 { root } else { -root }) as f32);
            wb.push(root as f32);
        }
        let a: Vec<Vec<f32>> = self.parts.iter().map(|p| decode(&p.a)).collect();
        let b: Vec<Vec<f32>> = self.parts.iter().map(|p| decode(&p.b)).collect();
        // Every adapter's A is masked before any B (the stream's order).
        let a = self.mix(a, &wa, "lora_A", &mut rng, None)?;
        let b = self.mix(b, &wb, "lora_B", &mut rng, None)?;
        Ok((a, b, r))
    }

    /// PEFT's task_arithmetic / magnitude_prune / ties / dare_linear / dare_ties over
    /// same-shaped tensors. DARE draws each tensor's mask from `rng` in turn, row-major, or
    /// (`transposed_cols = Some(out)`, a `[out, k]` ΔW PEFT holds as `[k, out]`) down its
    /// columns.
    fn mix(
        &self,
        mut tensors: Vec<Vec<f32>>,
        weights: &[f32],
        what: &str,
        rng: &mut Option<TorchRng>,
        transposed_cols: Option<usize>,
    ) -> Result<Vec<f32>> {
        // The SVD forms prune and elect like their plain forms (on full ΔWs).
        let kind = match self.how.kind {
            CombinationType::TiesSvd => CombinationType::Ties,
            CombinationType::MagnitudePruneSvd => CombinationType::MagnitudePrune,
            CombinationType::DareLinearSvd => CombinationType::DareLinear,
            CombinationType::DareTiesSvd => CombinationType::DareTies,
            k => k,
        };
        if self.how.draws() {
            let density = self.how.density.unwrap_or(1.0);
            let Some(rng) = rng.as_mut() else {
                return Err(Error::Internal(format!(
                    "module '{}': DARE without its random stream",
                    self.module
                )));
            };
            for t in tensors.iter_mut() {
                random_prune(t, density, rng, transposed_cols);
            }
        }
        if matches!(
            kind,
            CombinationType::Ties | CombinationType::MagnitudePrune
        ) {
            let density = self.how.density.unwrap_or(1.0);
            if density < 1.0 {
                for (j, t) in tensors.iter_mut().enumerate() {
                    prune(t, density).map_err(|v| {
                        self.refuse(format!(
                            "module '{}': pruning the {what} of adapter {} to density {density} cuts \
                             between equal magnitudes ({v}); torch.topk picks among them in its own \
                             order, so the result is not settled",
                            self.module,
                            j + 1
                        ))
                    })?;
                }
            }
        }
        let n = tensors[0].len();
        let mut out = vec![0f32; n];
        if matches!(kind, CombinationType::Ties | CombinationType::DareTies) {
            for (i, o) in out.iter_mut().enumerate() {
                let sm = match self.how.majority {
                    MajoritySign::Total => tensors.iter().map(|t| t[i]).fold(0.0, |a, x| a + x),
                    MajoritySign::Frequency => {
                        tensors.iter().map(|t| sign(t[i])).fold(0.0, |a, x| a + x)
                    }
                };
                let majority = if sm >= 0.0 { 1.0 } else { -1.0 };
                let mut mixed = 0f32;
                let mut count = 0f32;
                for (t, w) in tensors.iter().zip(weights) {
                    let keep = sign(t[i]) == majority;
                    mixed += t[i] * w * if keep { 1.0 } else { 0.0 };
                    count += if keep { 1.0 } else { 0.0 };
                }
                *o = mixed / count.max(1.0);
            }
        } else {
            for (t, w) in tensors.iter().zip(weights) {
                out.iter_mut().zip(t).for_each(|(o, x)| *o += x * w);
            }
        }
        Ok(out)
    }
}

/// torch.sign (NaN stays NaN).
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x * 0.0
    }
}

/// PEFT's random_pruning with rescale (DARE): `t·mask / f32(density)`, the mask drawn
/// with `torch.bernoulli(torch.full_like(t, density))` (f32 `t`: PEFT holds the factors
/// and ΔWs in f32) in row-major order of `t`, or, with `transposed_cols = Some(out)`, of
/// `t`'s transpose (`t` is `[out, n/out]`).
fn random_prune(t: &mut [f32], density: f64, rng: &mut TorchRng, transposed_cols: Option<usize>) {
    let p = BernoulliP::of(Dtype::F32, density);
    let d = density as f32;
    let n = t.len();
    let keep = |x: &mut f32, rng: &mut TorchRng| {
        let m = if rng.bernoulli(p) { 1.0 } else { 0.0 };
        *x = *x * m / d;
    };
    match transposed_cols {
        Some(out) if out > 0 => {
            let k = n / out;
            for j in 0..n {
                // Element j of the [k, out] view is ΔW[j % out][j / out].
                keep(&mut t[(j % out) * k + j / out], rng);
            }
        }
        _ => t.iter_mut().for_each(|x| keep(x, rng)),
    }
}

/// PEFT's magnitude_based_pruning: keeps the `int(density·numel)` values of largest
/// magnitude. Err: the cut falls between equal nonzero magnitudes (which ones torch keeps
/// is its own choice).
fn prune(t: &mut [f32], density: f64) -> std::result::Result<(), f32> {
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    if k > 0 && k < t.len() {
        let (last, next) = (t[order[k - 1]].abs(), t[order[k]].abs());
        if last == next && last != 0.0 {
            return Err(last);
        }
    }
    for &i in &order[k.min(t.len())..] {
        // tensor * mask: a dropped value becomes ±0.
        t[i] *= 0.0;
    }
    Ok(())
}

/// PEFT's `svd` combination of one module: ΔW = Σ w·(B·A·s) (every ΔW has rank ≤ the
/// sum of the ranks R), its best rank-`r` approximation U·S·Vᴴ, returned as A' = Vᴴ
/// `[r, k]` and B' = U·S `[out, r]` (f32). PEFT runs `torch.linalg.svd` on the f32 ΔW;
/// here the SVD is taken in f64 from the factors (thin QR of the stacked B and Aᵀ, then a
/// one-sided Jacobi SVD of the R×R core), exact up to f64 rounding, so the result differs
/// from PEFT's by PEFT's own f32 SVD error (about 1e-7 of ‖ΔW‖). The singular vectors'
/// signs do not matter: B'·A' is what is merged.
fn svd_factors(parts: &[Part], k: usize, out: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    let rank: usize = parts
        .iter()
        .map(|p| p.a.shape.first().copied().unwrap_or(0))
        .sum();
    // Bc [out, R] (columns: every adapter's B), At [k, R] (= (w·s·A)ᵀ), column-major.
    let mut bc = vec![0f64; out * rank];
    let mut at = vec![0f64; k * rank];
    let mut col = 0;
    for p in parts {
        let rp = p.a.shape.first().copied().unwrap_or(0);
        let ws = p.weight * p.scaling;
        let (a, b) = (decode(&p.a), decode(&p.b));
        for j in 0..rp {
            for o in 0..out {
                bc[(col + j) * out + o] = b[o * rp + j] as f64;
            }
            for i in 0..k {
                at[(col + j) * k + i] = a[j * k + i] as f64 * ws;
            }
        }
        col += rp;
    }
    let rb = thin_qr(&mut bc, out, rank);
    let ra = thin_qr(&mut at, k, rank);
    // Core C = R_B · R_Aᵀ (R×R, column-major): ΔW = Q_B · C · Q_Aᵀ.
    let mut c = vec![0f64; rank * rank];
    for j in 0..rank {
        for i in 0..rank {
            c[j * rank + i] = (0..rank).map(|t| rb[t * rank + i] * ra[t * rank + j]).sum();
        }
    }
    let (uc, sv, vc) = jacobi_svd(c, rank, rank);
    let mut a_new = vec![0f32; r * k];
    let mut b_new = vec![0f32; out * r];
    for (slot, &(sigma, idx)) in sv.iter().take(r.min(rank)).enumerate() {
        // U[:, slot] = Q_B · uc[:, idx]; V[:, slot] = Q_A · vc[:, idx].
        for o in 0..out {
            let u: f64 = (0..rank)
                .map(|t| bc[t * out + o] * uc[idx * rank + t])
                .sum();
            b_new[o * r + slot] = (u * sigma) as f32;
        }
        for i in 0..k {
            let v: f64 = (0..rank).map(|t| at[t * k + i] * vc[idx * rank + t]).sum();
            a_new[slot * k + i] = v as f32;
        }
    }
    (a_new, b_new)
}

/// The largest `min(out, k)` a pruned SVD combination takes: its SVD is of the full ΔW
/// (a one-sided Jacobi SVD, O(out·k·min) per sweep), which beyond this is too slow to run.
pub const MAX_FULL_SVD_DIM: usize = 1024;

/// `ties_svd` / `magnitude_prune_svd` of one module: the combined full ΔW `[out, k]` (f32,
/// row-major) cut to rank `r` by an f64 SVD: (A' `[r, k]`, B' = U·S `[out, r]`).
fn full_svd_factors(dw: &[f32], out: usize, k: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    // Jacobi orthogonalises columns: take the matrix whose columns are the shorter side.
    let tall = k <= out;
    let (m, n) = if tall { (out, k) } else { (k, out) };
    let mut x = vec![0f64; m * n];
    for o in 0..out {
        for i in 0..k {
            let v = dw[o * k + i] as f64;
            if tall {
                x[i * out + o] = v; // column i of ΔW
            } else {
                x[o * k + i] = v; // column o of ΔWᵀ
            }
        }
    }
    let (u, sv, v) = jacobi_svd(x, m, n);
    let mut a_new = vec![0f32; r * k];
    let mut b_new = vec![0f32; out * r];
    for (slot, &(sigma, j)) in sv.iter().take(r.min(n)).enumerate() {
        // tall: ΔW = U·S·Vᵀ (U out-long, V k-long); else ΔWᵀ = U·S·Vᵀ, so ΔW = V·S·Uᵀ.
        let (left, right) = if tall {
            (&u[j * m..(j + 1) * m], &v[j * n..(j + 1) * n])
        } else {
            (&v[j * n..(j + 1) * n], &u[j * m..(j + 1) * m])
        };
        for o in 0..out {
            b_new[o * r + slot] = (left[o] * sigma) as f32;
        }
        for i in 0..k {
            a_new[slot * k + i] = right[i] as f32;
        }
    }
    (a_new, b_new)
}

/// Thin QR of the column-major `m × n` matrix `x` by modified Gram-Schmidt with one
/// re-orthogonalisation: `x` becomes Q (a column that depends on the earlier ones becomes
/// zero, with a zero on R's diagonal); the returned R is `n × n`, column-major.
fn thin_qr(x: &mut [f64], m: usize, n: usize) -> Vec<f64> {
    let mut r = vec![0f64; n * n];
    let scale = x.iter().fold(0f64, |a, v| a.max(v.abs()));
    for j in 0..n {
        for _ in 0..2 {
            for i in 0..j {
                let d: f64 = (0..m).map(|t| x[i * m + t] * x[j * m + t]).sum();
                r[j * n + i] += d;
                for t in 0..m {
                    x[j * m + t] -= d * x[i * m + t];
                }
            }
        }
        let norm = (0..m).map(|t| x[j * m + t].powi(2)).sum::<f64>().sqrt();
        if norm > scale * 1e-13 {
            r[j * n + j] = norm;
            for t in 0..m {
                x[j * m + t] /= norm;
            }
        } else {
            x[j * m..(j + 1) * m].fill(0.0);
        }
    }
    r
}

/// One-sided Jacobi SVD of the column-major `m × n` matrix `c`: (U `m × n` with unit
/// columns, [(σ, column)] sorted by σ descending, V `n × n`), with `c = U·diag(σ)·Vᵀ`.
#[allow(clippy::type_complexity)]
fn jacobi_svd(mut c: Vec<f64>, m: usize, n: usize) -> (Vec<f64>, Vec<(f64, usize)>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut al, mut be, mut ga) = (0f64, 0f64, 0f64);
                for t in 0..m {
                    let (xp, xq) = (c[p * m + t], c[q * m + t]);
                    al += xp * xp;
                    be += xq * xq;
                    ga += xp * xq;
                }
                if ga == 0.0 || ga.abs() <= f64::EPSILON * (al * be).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (be - al) / (2.0 * ga);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                for (x, len) in [(&mut c, m), (&mut v, n)] {
                    for i in 0..len {
                        let (xp, xq) = (x[p * len + i], x[q * len + i]);
                        x[p * len + i] = cs * xp - sn * xq;
                        x[q * len + i] = sn * xp + cs * xq;
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut sv: Vec<(f64, usize)> = (0..n)
        .map(|j| ((0..m).map(|t| c[j * m + t].powi(2)).sum::<f64>().sqrt(), j))
        .collect();
    for &(s, j) in &sv {
        if s > 0.0 {
            c[j * m..(j + 1) * m].iter_mut().for_each(|x| *x /= s);
        }
    }
    sv.sort_by(|a, b| b.0.total_cmp(&a.0));
    (c, sv, v)
}

impl TensorChange for CombinedLora {
    fn tuner(&self) -> &'static str {
        "LoRA (weighted combination)"
    }
    fn effect(&self) -> Effect {
        Effect::Delta
    }
    fn inputs(&self) -> Vec<&TensorEntry> {
        self.parts.iter().flat_map(|p| [&p.a, &p.b]).collect()
    }
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>> {
        let (mut a, mut b, r) = self.factors()?;
        let k = a.len() / r.max(1);
        let out = b.len() / r.max(1);
        let fits = if self.transposed {
            base.rows == k && base.cols == out
        } else {
            base.rows == out && base.cols == k
        };
        if !fits {
            return Err(Error::Internal(format!(
                "combined LoRA of '{}' ({out} x {k}) for '{}' ({} x {})",
                self.module, base.base.name, base.rows, base.cols
            )));
        }
        let sixteen = matches!(base.dtype(), Dtype::F16 | Dtype::BF16);
        let cat = self.how.kind == CombinationType::Cat;
        if cat && sixteen {
            // The new adapter's factors are created in the weight's dtype and cat writes
            // into them.
            round_through(base.dtype(), &mut a);
            round_through(base.dtype(), &mut b);
        }
        Ok(Box::new(Prepared {
            a,
            b,
            r,
            k,
            out,
            scale: self.scale,
            transposed: self.transposed,
            round_delta: (self.embedding || cat && sixteen).then_some(base.dtype()),
        }))
    }
}

struct Prepared {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    k: usize,
    out: usize,
    scale: f32,
    transposed: bool,
    round_delta: Option<Dtype>,
}

impl BandChange for Prepared {
    fn apply(&self, row0: usize, band: &mut [f32]) {
        let cols = if self.transposed { self.out } else { self.k };
        let rows = band.len() / cols.max(1);
        let mut d = vec![0f32; rows * cols];
        if rows > 0 && self.r > 0 {
            let (r, k) = (self.r as isize, self.k as isize);
            // Normal: ΔW[o, :] = Σ_j B'[o, j]·A'[j, :]; transposed: ΔWᵀ[i, o] = Σ_j A'[j, i]·B'[o, j].
            let (lhs, lrs, lcs, rhs, rrs, rcs) = if self.transposed {
                (self.a[row0..].as_ptr(), 1, k, self.b.as_ptr(), 1, r)
            } else {
                (
                    self.b[row0 * self.r..].as_ptr(),
                    r,
                    1,
                    self.a.as_ptr(),
                    k,
                    1,
                )
            };
            // SAFETY: lhs addresses rows·r values from row0 of B' ([out, r]) or the columns
            // row0.. of A' ([r, k]); rhs all of A' or B'; d holds rows·cols values (prepare
            // checked the band's tensor is out x k or k x out).
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    self.r,
                    cols,
                    self.scale,
                    lhs,
                    lrs,
                    lcs,
                    rhs,
                    rrs,
                    rcs,
                    0.0,
                    d.as_mut_ptr(),
                    cols as isize,
                    1,
                );
            }
        }
        if let Some(dt) = self.round_delta {
            round_through(dt, &mut d);
        }
        band.iter_mut().zip(&d).for_each(|(w, x)| *w += x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::tuners::run_in_memory;
    use crate::dtype::encode_f32;
    use std::path::Path;

    fn entry(name: &str, shape: &[usize], v: &[f32]) -> TensorEntry {
        let mut bytes = vec![0u8; v.len() * 4];
        encode_f32(Dtype::F32, v, &mut bytes);
        TensorEntry::in_memory(Path::new("t"), name, Dtype::F32, shape.to_vec(), &bytes).unwrap()
    }

    fn combined(kind: CombinationType, density: Option<f64>, transposed: bool) -> CombinedLora {
        // Two rank-1 adapters on a [2 out, 3 in] weight.
        let p = |a: &[f32], b: &[f32], weight, scaling| Part {
            a: entry("lora_A", &[1, 3], a),
            b: entry("lora_B", &[2, 1], b),
            weight,
            scaling,
        };
        CombinedLora {
            parts: vec![
                p(&[1.0, -2.0, 4.0], &[1.0, 2.0], 0.5, 2.0),
                p(&[-3.0, 1.0, 0.5], &[-1.0, 4.0], -1.0, 1.0),
            ],
            how: Combine {
                kind,
                density,
                ..Default::default()
            },
            transposed,
            embedding: false,
            scale: 1.0,
            new_rank: 1,
            module: "m".into(),
            weights: "w".into(),
            dare_rng: None,
        }
    }

    #[test]
    fn full_svd_recovers_a_low_rank_matrix_tall_or_wide() {
        // ΔW = u1·v1ᵀ·5 + u2·v2ᵀ·2 with orthonormal u, v: rank 2 gives it back, rank 1 the
        // first term; both for [3, 4] (wide) and its transpose [4, 3] (tall).
        let u = [[0.6f64, 0.8, 0.0], [0.0, 0.0, 1.0]];
        let v = [[0.5f64, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5]];
        let sig = [5.0f64, 2.0];
        for wide in [true, false] {
            let (out, k) = if wide { (3, 4) } else { (4, 3) };
            let term = |t: usize, o: usize, i: usize| {
                let (uo, vi) = if wide {
                    (u[t][o], v[t][i])
                } else {
                    (v[t][o], u[t][i])
                };
                sig[t] * uo * vi
            };
            let dw: Vec<f32> = (0..out * k)
                .map(|x| (term(0, x / k, x % k) + term(1, x / k, x % k)) as f32)
                .collect();
            for r in [2usize, 1] {
                let (a, b) = full_svd_factors(&dw, out, k, r);
                for o in 0..out {
                    for i in 0..k {
                        let got: f32 = (0..r).map(|j| b[o * r + j] * a[j * k + i]).sum();
                        let want = (0..r).map(|t| term(t, o, i)).sum::<f64>() as f32;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{wide} {r} {o} {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn svd_keeps_the_largest_singular_directions() {
        // Two rank-1 adapters with orthogonal factors: ΔW = 3·e0·f1ᵀ + 1·e1·f0ᵀ; rank 2
        // gives ΔW back, rank 1 only its largest part.
        let p = |a: &[f32], b: &[f32], weight| Part {
            a: entry("lora_A", &[1, 3], a),
            b: entry("lora_B", &[2, 1], b),
            weight,
            scaling: 1.0,
        };
        let parts = vec![
            p(&[0.0, 1.0, 0.0], &[1.0, 0.0], 3.0),
            p(&[1.0, 0.0, 0.0], &[0.0, 1.0], 1.0),
        ];
        let product = |a: &[f32], b: &[f32], r: usize| {
            let mut d = vec![0f32; 6];
            for o in 0..2 {
                for i in 0..3 {
                    d[o * 3 + i] = (0..r).map(|j| b[o * r + j] * a[j * 3 + i]).sum();
                }
            }
            d
        };
        for (r, want) in [
            (2, [0.0, 3.0, 0.0, 1.0, 0.0, 0.0]),
            (1, [0.0, 3.0, 0.0, 0.0, 0.0, 0.0]),
        ] {
            let (a, b) = svd_factors(&parts, 3, 2, r);
            let d = product(&a, &b, r);
            assert!(
                d.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-6),
                "{r}: {d:?}"
            );
        }
    }

    #[test]
    fn cat_is_the_sum_of_the_weighted_deltas() {
        for transposed in [false, true] {
            let c = combined(CombinationType::Cat, None, transposed);
            let shape = if transposed { [3, 2] } else { [2, 3] };
            let base = entry("w", &shape, &[0.0; 6]);
            let got = run_in_memory(&c, &base, 1).unwrap();
            // ΔW = 0.5·2·B1A1 − 1·1·B2A2
            let (a1, b1, a2, b2) = (
                [1.0, -2.0, 4.0],
                [1.0, 2.0],
                [-3.0, 1.0, 0.5],
                [-1.0f32, 4.0],
            );
            for o in 0..2 {
                for i in 0..3 {
                    let want = b1[o] * a1[i] - b2[o] * a2[i];
                    let at = if transposed { i * 2 + o } else { o * 3 + i };
                    assert_eq!(got[at], want, "{transposed} {o} {i}");
                }
            }
        }
    }

    #[test]
    fn linear_weights_the_factors_by_square_roots() {
        let c = combined(CombinationType::Linear, None, false);
        let (a, b, r) = c.factors().unwrap();
        assert_eq!(r, 1);
        // w·s = 1 and -1: A' = 1·A1 − 1·A2, B' = B1 + B2.
        assert_eq!(a, vec![4.0, -3.0, 3.5]);
        assert_eq!(b, vec![0.0, 6.0]);
    }

    #[test]
    fn ties_elects_the_sign_and_averages_the_agreeing_values() {
        let c = combined(CombinationType::Ties, Some(1.0), false);
        let t = vec![vec![1.0, -2.0, 4.0], vec![-3.0, 1.0, 0.5]];
        // sums: -2 (→ -1), -1 (→ -1), 4.5 (→ +1); weights 1 and -1.
        let got = c.mix(t, &[1.0, -1.0], "lora_A", &mut None, None).unwrap();
        assert_eq!(got, vec![3.0, -2.0, (4.0 - 0.5) / 2.0]);
    }

    #[test]
    fn pruning_keeps_the_largest_and_refuses_an_unsettled_cut() {
        let mut t = vec![0.5, -3.0, 2.0, 1.0];
        prune(&mut t, 0.5).unwrap();
        assert_eq!(t, vec![0.0, -3.0, 2.0, 0.0]);
        let mut tie = vec![1.0, -1.0, 0.5];
        assert_eq!(prune(&mut tie, 0.34), Err(1.0));
    }

    #[test]
    fn dare_needs_a_seed_and_a_positive_density() {
        for name in ["dare_ties", "dare_linear_svd"] {
            let mut c = Combine {
                kind: CombinationType::parse(name).unwrap(),
                density: Some(0.5),
                ..Default::default()
            };
            let e = c.effective(2).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("--seed"), "{e}");
            // One adapter is always linear in PEFT.
            assert_eq!(c.effective(1).unwrap().kind, CombinationType::Linear);
            c.seed = Some(3);
            assert!(c.effective(2).unwrap().draws());
            c.density = Some(0.0);
            assert!(c.effective(2).unwrap_err().to_string().contains("NaN"));
            // density >= 1: PEFT prunes nothing and draws nothing; no seed needed.
            c.density = Some(1.0);
            c.seed = None;
            assert!(!c.effective(2).unwrap().draws());
        }
        let seeded_ties = Combine {
            kind: CombinationType::Ties,
            density: Some(0.5),
            seed: Some(1),
            ..Default::default()
        };
        assert!(
            seeded_ties
                .effective(2)
                .unwrap_err()
                .to_string()
                .contains("--seed")
        );
        let no_density = Combine {
            kind: CombinationType::Ties,
            density: None,
            ..Default::default()
        };
        assert!(no_density.effective(2).is_err());
    }

    #[test]
    fn dare_masks_rescale_and_follow_the_stream() {
        // The mask of a [2, 3] tensor (row-major) and of its [3, 2] transpose.
        let mut rng = TorchRng::manual_seed(11);
        let mut want = Vec::new();
        for _ in 0..6 {
            want.push(rng.bernoulli_f32(0.5f32));
        }
        let t: Vec<f32> = (1..=6).map(|x| x as f32).collect();
        let mut got = t.clone();
        random_prune(&mut got, 0.5, &mut TorchRng::manual_seed(11), None);
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, if w { t[i] / 0.5 } else { 0.0 }, "{i}");
        }
        let mut tr = t.clone();
        random_prune(&mut tr, 0.5, &mut TorchRng::manual_seed(11), Some(2));
        for (j, &kept) in want.iter().enumerate() {
            // Element j of the [3, 2] view is t[(j % 2) * 3 + j / 2].
            let at = (j % 2) * 3 + j / 2;
            assert_eq!(tr[at], if kept { t[at] * 2.0 } else { 0.0 }, "{j}");
        }
        // A's masks come before B's: dare_linear of two adapters draws A1, A2, B1, B2.
        let mut c = combined(CombinationType::DareLinear, Some(0.5), false);
        c.dare_rng = Some(TorchRng::manual_seed(5));
        let (a, b, _) = c.factors().unwrap();
        let mut rng = TorchRng::manual_seed(5);
        let mut draw = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| if rng.bernoulli_f32(0.5) { 1.0 } else { 0.0 })
                .collect()
        };
        let (m_a1, m_a2, m_b1, m_b2) = (draw(3), draw(3), draw(2), draw(2));
        let (a1, a2, b1, b2) = (
            [1.0f32, -2.0, 4.0],
            [-3.0f32, 1.0, 0.5],
            [1.0f32, 2.0],
            [-1.0f32, 4.0],
        );
        for i in 0..3 {
            // weights for A: +1 and -1 (w·s = 1, -1)
            let want = a1[i] * m_a1[i] / 0.5 - a2[i] * m_a2[i] / 0.5;
            assert_eq!(a[i], want, "A {i}");
        }
        for o in 0..2 {
            let want = b1[o] * m_b1[o] / 0.5 + b2[o] * m_b2[o] / 0.5;
            assert_eq!(b[o], want, "B {o}");
        }
    }
}
