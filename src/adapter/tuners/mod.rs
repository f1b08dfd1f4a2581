//! PEFT tuners other than LoRA, one file each, behind two small traits.
//!
//! A tuner file owns everything about its tuner: the `adapter_config.json` fields it reads
//! (and the options it refuses), which saved keys are its parts, the checks of those parts
//! against the base tensors, and how the change it makes to a base tensor turns a band of
//! rows of that tensor into the merged band. Nothing outside the file knows its math.
//!
//! - [`Tuner`]: one opened adapter of that type. The adapter reader asks it what each saved
//!   key is ([`Tuner::classify`]); the plan asks it, per adapted module, for the changes to
//!   the module's base tensors ([`Tuner::changes`]), which is where the shapes are checked.
//! - [`TensorChange`]: one change to one base tensor, carried by the plan's job as
//!   `Step::Tuned` and run by compute. Before the bands it is prepared once per tensor
//!   ([`TensorChange::prepare`]: small factors decoded to f32, products that do not depend on
//!   the weight, statistics over the whole current value when the math needs them); then
//!   every band of rows goes through [`BandChange::apply`]. A change can add a delta
//!   (LoHa, LoKr, VeRA…), scale rows or columns (IA3), transform each row (OFT, BOFT, HRA:
//!   `W·R`), or mix rows within blocks that a band never splits (RoAd:
//!   [`TensorChange::row_block`]).
//!
//! Bands are f32, row-major `[rows, cols]` in the tensor's *stored* orientation (`cols` is
//! the product of the trailing dims). The engine rounds the band into the base dtype after
//! every step, as PEFT's in-place merges do; a tuner whose PEFT merge rounds its delta to
//! the weight's dtype before adding it does that itself ([`crate::dtype::round_through`]).
//!
//! Which tuners exist is [`TUNER_TYPES`]; PEFT types that cannot be merged at all (prompt
//! learning, routers) are [`NOT_MERGEABLE`], refused with PEFT's reason.

pub mod adalora;
pub mod adamss;
pub mod beft;
pub mod boft;
pub mod c3a;
pub mod deft;
pub mod delora;
pub mod fourierft;
pub mod frod;
pub mod glora;
pub mod gralora;
pub mod hira;
pub mod hra;
pub mod ia3;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod miss;
pub mod oft;
pub mod osf;
pub mod peanut;
pub mod psoft;
pub mod pvera;
pub mod randlora;
pub mod road;
pub mod shira;
pub mod supertuning;
pub mod tinylora;
pub mod torch_mm;
pub mod trainable_tokens;
pub mod unilora;
pub mod vblora;
pub mod vera;
pub mod waveft;

use crate::dtype::{Dtype, decode_f32};
use crate::error::{Error, Result};
use crate::source::TensorEntry;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// How a change acts on a band (for reports and for backends that run some kinds natively).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// W + ΔW.
    Delta,
    /// Rows or columns of W scaled.
    Scale,
    /// Each row of W transformed (W·R), or rows mixed within blocks.
    Transform,
    /// Rows of W replaced (TrainableTokens).
    Rows,
}

/// What a saved adapter key (less `base_model.model.`) is to a tuner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SavedKey<'k> {
    /// A part of an adapted module: (module, part), e.g. ("lin0", "hada_w1_a").
    Part { module: &'k str, part: &'k str },
    /// A tensor the tuner shares across modules (VeRA's projections), by name.
    Shared(&'k str),
    /// A full tensor that replaces a base tensor (modules_to_save copies, saved biases).
    Full,
}

/// The saved parts of one adapted module, by part name.
#[derive(Clone, Debug, Default)]
pub struct SavedModule {
    /// Module name relative to the base model (`model.layers.0.mlp.down_proj`).
    pub name: String,
    pub parts: BTreeMap<String, TensorEntry>,
}

impl SavedModule {
    /// The part `part`, or an error naming the module and what is missing.
    pub fn part(&self, weights: &Path, part: &str) -> Result<&TensorEntry> {
        self.parts.get(part).ok_or_else(|| {
            Error::format(
                weights,
                format!(
                    "module '{}' has no '{part}' (incomplete adapter; it has {:?})",
                    self.name,
                    self.parts.keys().collect::<Vec<_>>()
                ),
            )
        })
    }
}

/// A base tensor an adapted module changes, as the plan found it.
#[derive(Clone, Debug)]
pub struct BaseTensor {
    pub entry: TensorEntry,
    /// Stored `[in, out]` (a transformers Conv1D, `fan_in_fan_out`): PEFT's `[out, in]`
    /// math runs on the transpose. The plan settles it from the evidence (shapes,
    /// config.json, flags); only 2-D weights can be transposed.
    pub transposed: bool,
}

impl BaseTensor {
    /// The weight's dims in PEFT's orientation (`[out, in, k…]`).
    pub fn out_in_shape(&self) -> Vec<usize> {
        let mut s = self.entry.shape.clone();
        if self.transposed {
            s.reverse();
        }
        s
    }
}

/// The base tensors of one adapted module.
#[derive(Clone, Debug)]
pub struct ModuleBase {
    /// `module.weight` (or the adapted parameter).
    pub weight: BaseTensor,
    /// `module.bias`, when the base has one.
    pub bias: Option<TensorEntry>,
}

/// A change to one base tensor (`target`: its key in the base checkpoint).
#[derive(Clone, Debug)]
pub struct Change {
    pub target: String,
    pub change: Arc<dyn TensorChange>,
}

/// The `(module, part)` of a saved key whose last component is one of `parts`
/// (a tuner's per-module tensors, named `<module>.<part>`).
pub(super) fn split_part<'k>(rel: &'k str, parts: &[&str]) -> SavedKey<'k> {
    match rel.rsplit_once('.') {
        Some((module, part)) if parts.contains(&part) => SavedKey::Part { module, part },
        _ => SavedKey::Full,
    }
}

/// Whether module `m` has a low-rank pair of 2-D factors, `out_part` `[out, r]` and
/// `in_part` `[r', in]`, on the sides that give the base's PEFT `[out, in]` (the `fits` of
/// AdaLoRA's B @ A, LoHa's first Hadamard pair, SuperTuning's LoRA pair).
pub(super) fn factor_pair_fits(
    m: &SavedModule,
    out_part: &str,
    in_part: &str,
    out_in: [usize; 2],
) -> bool {
    let (Some(o), Some(i)) = (m.parts.get(out_part), m.parts.get(in_part)) else {
        return false;
    };
    o.shape.len() == 2 && i.shape.len() == 2 && o.shape[0] == out_in[0] && i.shape[1] == out_in[1]
}

/// One opened adapter of a non-LoRA tuner type.
pub trait Tuner: Send + Sync + fmt::Debug {
    /// Display name ("LoHa").
    fn name(&self) -> &'static str;
    /// What a saved key (less the `base_model.model.` prefix) is.
    fn classify<'k>(&self, rel: &'k str) -> SavedKey<'k>;
    /// Whether the module's parts fit a 2-D weight of `[out, in]` = `out_in` (PEFT's
    /// orientation). The plan asks for both orientations of a stored 2-D weight: a weight
    /// that fits both ways (square) has its layout settled by the evidence, and one that
    /// fits neither is reported with [`Tuner::changes`]'s message.
    fn fits(&self, module: &SavedModule, out_in: [usize; 2]) -> bool;
    /// Whether PEFT adapts a transformers Conv1D (stored `[in, out]`) with this tuner. When
    /// it does not, a 2-D weight is stored `[out, in]` (PEFT would have refused the module
    /// otherwise), and evidence that it is a Conv1D is a conflict, not a question.
    fn adapts_conv1d(&self) -> bool {
        true
    }
    /// The module's changes to its base tensors, every shape and dtype checked: an error
    /// names the adapter file, the tensor and the base tensor it does not fit.
    fn changes(
        &self,
        weights: &Path,
        module: &SavedModule,
        shared: &BTreeMap<String, TensorEntry>,
        base: &ModuleBase,
    ) -> Result<Vec<Change>>;
}

/// A tuner type PEFT saves as `peft_type`, and how to open its config.
pub struct TunerType {
    pub peft_type: &'static str,
    pub open: fn(config: &Value, path: &Path) -> Result<Box<dyn Tuner>>,
}

/// Every tuner lorastream merges besides LoRA.
pub const TUNER_TYPES: &[TunerType] = &[
    ia3::TYPE,
    loha::TYPE,
    lokr::TYPE,
    oft::TYPE,
    hra::TYPE,
    vera::TYPE,
    vblora::TYPE,
    shira::TYPE,
    delora::TYPE,
    miss::TYPE,
    fourierft::TYPE,
    trainable_tokens::TYPE,
    ln_tuning::TYPE,
    beft::TYPE,
    glora::TYPE,
    supertuning::TYPE,
    deft::TYPE,
    adalora::TYPE,
    peanut::TYPE,
    boft::TYPE,
    road::TYPE,
    hira::TYPE,
    gralora::TYPE,
    c3a::TYPE,
    waveft::TYPE,
    randlora::TYPE,
    pvera::TYPE,
    tinylora::TYPE,
    unilora::TYPE,
];

/// PEFT types without a merge (they do not change weights, or route between adapters), and
/// tuners whose merge lorastream cannot reproduce (each file says why).
pub const NOT_MERGEABLE: &[(&str, &str)] = &[
    osf::REFUSED,
    adamss::REFUSED,
    psoft::REFUSED,
    frod::REFUSED,
    (
        "PROMPT_TUNING",
        "prompt tuning adds virtual tokens, not weights",
    ),
    (
        "MULTITASK_PROMPT_TUNING",
        "prompt tuning adds virtual tokens, not weights",
    ),
    ("P_TUNING", "p-tuning adds a prompt encoder, not weights"),
    (
        "PREFIX_TUNING",
        "prefix tuning adds past key/values, not weights",
    ),
    (
        "ADAPTION_PROMPT",
        "adaption prompts add attention inputs, not weights",
    ),
    (
        "CPT",
        "context-aware prompt tuning adds virtual tokens, not weights",
    ),
    (
        "CARTRIDGE",
        "cartridges add a trained KV prefix, not weights",
    ),
    (
        "POLY",
        "Poly routes between LoRA modules per task; PEFT cannot merge it",
    ),
    (
        "XLORA",
        "X-LoRA mixes LoRA experts per token; PEFT cannot merge it",
    ),
];

/// The tuner type saved as `peft_type`.
pub fn tuner_type(peft_type: &str) -> Option<&'static TunerType> {
    TUNER_TYPES
        .iter()
        .find(|t| t.peft_type.eq_ignore_ascii_case(peft_type))
}

/// One change to one base tensor, checked by the plan, run by compute band by band.
pub trait TensorChange: Send + Sync + fmt::Debug {
    /// The tuner it comes from ("IA3"), for reports.
    fn tuner(&self) -> &'static str;
    fn effect(&self) -> Effect;
    /// Every saved tensor it reads (released after the tensor, used for coverage).
    fn inputs(&self) -> Vec<&TensorEntry>;
    /// Another base tensor whose *stored* value the change reads (GLoRA's bias reads the
    /// weight): the plan refuses the change when an earlier adapter changes that tensor,
    /// since PEFT would read the value after that adapter's merge.
    fn reads_base(&self) -> Option<&TensorEntry> {
        None
    }
    /// Rows that must stay in one band (a band starts at a multiple of it and holds whole
    /// blocks): 1 unless the change mixes rows.
    fn row_block(&self) -> usize {
        1
    }
    /// Per-tensor preparation, before the first band. `base` describes the tensor and can
    /// stream its current value (before this change) band by band.
    fn prepare(&self, base: &BandSource<'_>) -> Result<Box<dyn BandChange + '_>>;
}

/// A prepared change: turns a band of the current value into the merged band.
pub trait BandChange: Send + Sync {
    /// `band` holds rows `[row0, row0 + band.len() / cols)` of the current value, f32,
    /// row-major in the stored orientation; rewritten in place with the value after the
    /// change (the engine rounds it into the base dtype afterwards).
    fn apply(&self, row0: usize, band: &mut [f32]);
}

/// Streams a tensor's value band by band: calls its argument with (first row, values)
/// for each band, in row order.
pub type BandStream<'a> = dyn Fn(&mut dyn FnMut(usize, &[f32])) + Sync + 'a;

/// The tensor a change is prepared for.
pub struct BandSource<'a> {
    /// The base tensor (name, file and dtype for messages).
    pub base: &'a TensorEntry,
    /// Stored rows (the first dim) and columns (the rest flattened).
    pub rows: usize,
    pub cols: usize,
    /// Streams the current value (before this change): bands in row order, each as
    /// (first row, values).
    pub stream: &'a BandStream<'a>,
}

impl BandSource<'_> {
    pub fn dtype(&self) -> Dtype {
        self.base.dtype
    }
    /// Visits the current value band by band.
    pub fn for_each_band(&self, f: &mut dyn FnMut(usize, &[f32])) {
        (self.stream)(f)
    }
}

/// A (small) saved tensor decoded to f32, whole.
pub fn decode(t: &TensorEntry) -> Vec<f32> {
    let mut v = vec![0f32; t.numel()];
    decode_f32(t.dtype, &t.bytes(), &mut v);
    v
}

/// An error about a saved tensor of the adapter (`weights`: the adapter's weights file).
pub fn bad_part(weights: &Path, t: &TensorEntry, msg: impl Into<String>) -> Error {
    Error::tensor(weights, &t.name, msg)
}

/// Checks that the saved parts are floating point (PEFT saves trained values as floats).
pub fn check_float(weights: &Path, parts: &[&TensorEntry]) -> Result<()> {
    match parts.iter().find(|t| !t.dtype.is_float()) {
        Some(t) => Err(bad_part(
            weights,
            t,
            format!(
                "is {}; a tuner's trained tensors are floating point",
                t.dtype
            ),
        )),
        None => Ok(()),
    }
}

/// A test harness: runs `change` over a whole tensor in memory exactly as the engine does
/// (bands of `band` rows aligned to the row block, rounding into `dtype` after the step).
#[cfg(test)]
pub fn run_in_memory(
    change: &dyn TensorChange,
    base: &TensorEntry,
    band: usize,
) -> Result<Vec<f32>> {
    let rows = base.shape.first().copied().unwrap_or(1);
    let cols = base.numel() / rows.max(1);
    let w = decode(base);
    let block = change.row_block().max(1);
    let band = band.div_ceil(block).max(1) * block;
    let stream = |f: &mut dyn FnMut(usize, &[f32])| {
        for i0 in (0..rows).step_by(band) {
            let i1 = (i0 + band).min(rows);
            f(i0, &w[i0 * cols..i1 * cols]);
        }
    };
    let src = BandSource {
        base,
        rows,
        cols,
        stream: &stream,
    };
    let prepared = change.prepare(&src)?;
    let mut out = w.clone();
    for i0 in (0..rows).step_by(band) {
        let i1 = (i0 + band).min(rows);
        prepared.apply(i0, &mut out[i0 * cols..i1 * cols]);
    }
    crate::dtype::round_through(base.dtype, &mut out);
    Ok(out)
}
