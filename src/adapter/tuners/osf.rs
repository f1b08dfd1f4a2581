//! OSF, orthogonal subspace fine-tuning (`peft_type: "OSF"`, PEFT 0.21 `tuners/osf/`):
//! refused by name, because its merge cannot be reproduced from the files.
//!
//! PEFT saves only the trained low singular triplets `osf_svd_params.{U_low,S_low,V_low}` of
//! each module. Its merge adds `U_low·S_low·V_low − U_low_init·S_low_init·V_low_init`, where
//! the `_init` factors are not saved: `update_layer` recomputes them when the adapter is
//! loaded, from `torch.linalg.svd` of the base weight (LAPACK's f32 SVD; singular vectors are
//! defined only up to sign and their round-off is the library's own). A merge that depends on
//! an SVD of the base computed at load time cannot be reproduced bit for bit, so lorastream
//! refuses OSF rather than write weights that differ from PEFT's by an unknown amount.

/// Why OSF is refused: listed in [`super::NOT_MERGEABLE`], so opening such an adapter
/// fails with this reason before anything is read.
pub const REFUSED: (&str, &str) = (
    "OSF",
    "its merge subtracts U_low_init·S_low_init·V_low_init, which the adapter does not save; PEFT \
     recomputes it when loading, from an SVD of the base weight (torch.linalg.svd), whose singular \
     vectors (signs and round-off) lorastream cannot reproduce bit for bit; merge with PEFT \
     (merge_and_unload) instead",
);

#[cfg(test)]
mod tests {
    use crate::adapter::tuners::NOT_MERGEABLE;

    #[test]
    fn refused_with_the_reason() {
        let why = NOT_MERGEABLE
            .iter()
            .find(|(t, _)| *t == "OSF")
            .map(|(_, w)| *w);
        assert!(
            why.is_some_and(|w| w.contains("SVD") && w.contains("U_low_init")),
            "{why:?}"
        );
    }
}
