//! FRoD (`peft_type: "FROD"`, PEFT 0.21 `tuners/frod/layer.py`): refused by name, because
//! its merge cannot be reproduced to PEFT's bits (or near them) from the files.
//!
//! Saved: the shared projections `frod_V.<module>` `[in, in]` with the sparse pattern
//! `frod_s_indices`/`frod_s_size`, and per module `frod_lambda_l` and
//! `frod_lambda_s_values`. PEFT's merge adds `U·(S + diag λ)·Vᵀ − W`, where `U` is not saved:
//! when the adapter is loaded PEFT recomputes it from the base weight, `bi = W·V⁻ᵀ` by
//! `torch.linalg.solve` in float64 (LAPACK LU), normalised by its column norms. The merge
//! then forms `U·(S + diag λ)·Vᵀ` *in the weight's dtype* (bf16/f16 CPU matmuls, each product
//! rounded to 16 bits) and subtracts W, which it nearly equals: the cancellation turns those
//! roundings into 15 000–32 000 ulp of the result against the exact merge (the fixtures'
//! `peft_ulp_vs_f64` for 16-bit bases), so only a bit-exact copy of torch's 16-bit GEMM
//! kernels would match PEFT, and a correctly rounded merge would not. Refused rather than
//! written differently from PEFT.

/// Why FRoD is refused: listed in [`super::NOT_MERGEABLE`], so opening such an adapter
/// fails with this reason before anything is read.
pub const REFUSED: (&str, &str) = (
    "FROD",
    "its merge adds U·(S + diag λ)·Vᵀ − W, where U is not saved (PEFT recomputes it at load from \
     the base weight by a float64 LAPACK solve) and the product is formed in the weight's dtype \
     (16-bit CPU matmuls) before W is subtracted; the cancellation amplifies those roundings to \
     thousands of ulp, so the result depends on torch's own 16-bit GEMM and cannot be reproduced; \
     merge with PEFT (merge_and_unload) instead",
);

#[cfg(test)]
mod tests {
    use crate::adapter::tuners::NOT_MERGEABLE;

    #[test]
    fn refused_with_the_reason() {
        let why = NOT_MERGEABLE
            .iter()
            .find(|(t, _)| *t == "FROD")
            .map(|(_, w)| *w);
        assert!(
            why.is_some_and(|w| w.contains("U is not saved") && w.contains("solve")),
            "{why:?}"
        );
    }
}
