//! Which merges run on the GPU. The plan checked every merge (`plan::checked`), so what
//! is decided here is only what the kernels do: LoRA and DoRA steps on a weight, after its
//! last replacement. The rest runs on the CPU engine, for the whole tensor, by design:
//!
//! - `Step::AddBias` (`lora_B.bias`): a 1-D add, nothing for the GPU to gain;
//! - `Step::Tuned` (IA3 and the other tuners, `adapter/tuners`): their math is written once,
//!   for the CPU engine's bands; a tuner the GPU runs natively would get a kernel and an
//!   arm of its own here;
//! - a tensor without a LoRA step after its last replacement, an empty one, and one too
//!   wide or of too high a rank for the kernels' 32-bit indices.
//!
//! The match over step kinds is exhaustive: a new kind must be placed here.

use crate::dtype::Dtype;
use crate::plan::checked::CheckedMerge;
use crate::plan::merge_types::{LoraStep, Step};
use crate::source::TensorEntry;

/// dtype codes shared with kernels/merge.cu (every floating dtype has one).
pub(super) fn dt_code(d: Dtype) -> Option<i32> {
    match d {
        Dtype::F32 => Some(0),
        Dtype::F16 => Some(1),
        Dtype::BF16 => Some(2),
        Dtype::F64 => Some(3),
        _ => None,
    }
}
pub(super) const DT_F32: i32 = 0;

/// A merge the GPU takes: the value starts from `src` (W or its last replacement) and the
/// LoRA steps after it apply in order.
pub(super) struct GpuPlan<'a> {
    pub src: &'a TensorEntry,
    pub rows: usize,
    pub cols: usize,
    /// W's dtype code.
    pub wd: i32,
    pub steps: Vec<&'a LoraStep>,
}

/// Where a merge runs.
pub(super) enum Placement<'a> {
    Gpu(GpuPlan<'a>),
    /// The CPU engine merges the whole tensor.
    Cpu,
}

/// Decides where `m` runs (see the module comment).
pub(super) fn place(m: CheckedMerge<'_>) -> Placement<'_> {
    let base = m.base();
    let (rows, cols) = m.rows_cols();
    // Checked merges are floating throughout, and every floating dtype has a code.
    let (Some(wd), Some(_)) = (dt_code(base.dtype), dt_code(m.out_dtype())) else {
        return Placement::Cpu;
    };
    if base.numel() == 0 || cols > i32::MAX as usize {
        return Placement::Cpu;
    }
    let mut src = base;
    let mut lora: Vec<&LoraStep> = Vec::new();
    for s in m.steps() {
        match s {
            // By design (module comment): a bias addition, or another tuner's change.
            Step::AddBias { .. } | Step::Tuned(_) => return Placement::Cpu,
            // The value starts again from the replacement; earlier deltas are gone.
            Step::Replace(t) => {
                src = t;
                lora.clear();
            }
            // The kernels take the rank as a 32-bit count, and a rank of 0 adds nothing.
            Step::Lora(l) if l.r == 0 || l.r > i32::MAX as usize => return Placement::Cpu,
            Step::Lora(l) => lora.push(l),
        }
    }
    if lora.is_empty() {
        return Placement::Cpu;
    }
    Placement::Gpu(GpuPlan {
        src,
        rows,
        cols,
        wd,
        steps: lora,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::merge_types::DeltaLayout;
    use crate::sink::OutTensor;
    use crate::source::{MappedFile, TensorData};

    /// LoRA steps after the last replacement go to the GPU; a bias addition sends the
    /// whole tensor to the CPU, as does a replacement alone.
    #[test]
    fn lora_on_the_gpu_the_rest_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1024]).unwrap();
        let file = MappedFile::open(&path).unwrap();
        let t = |name: &str, shape: &[usize]| TensorEntry {
            name: name.into(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            file: file.clone(),
            data: TensorData::Contiguous {
                start: 0,
                len: shape.iter().product::<usize>() * 2,
            },
        };
        let w = t("w", &[4, 6]);
        let lora = Step::Lora(Box::new(LoraStep {
            a: t("a", &[2, 6]),
            b: t("b", &[4, 2]),
            r: 2,
            scale: 1.0,
            layout: DeltaLayout::Normal,
            round_delta_first: false,
            magnitude: None,
        }));
        let rep = Step::Replace(t("rep", &[4, 6]));
        let bias = Step::AddBias {
            bias: t("bias", &[4, 6]),
            scale: 1.0,
        };
        let out = OutTensor {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![4, 6],
        };
        let on_gpu = |steps: &[Step]| {
            let m = CheckedMerge::new(&w, steps, &out).unwrap();
            match place(m) {
                Placement::Gpu(p) => Some((p.src.name.clone(), p.steps.len())),
                Placement::Cpu => None,
            }
        };
        assert_eq!(on_gpu(std::slice::from_ref(&lora)), Some(("w".into(), 1)));
        assert_eq!(
            on_gpu(&[lora.clone(), rep.clone(), lora.clone()]),
            Some(("rep".into(), 1))
        );
        assert_eq!(on_gpu(&[lora.clone(), rep]), None);
        assert_eq!(on_gpu(&[lora, bias]), None);
    }
}
