//! PSOFT (`peft_type: "PSOFT"`, PEFT 0.21 `tuners/psoft/`): refused by name, because its
//! merge cannot be reproduced from the files.
//!
//! PEFT saves only the small `r × r` transform `psoft_R` (its skew-symmetric or full matrix
//! and the `vector_a`/`vector_b` magnitudes). Its merge adds `scaling · B (R − I) A`, where
//! `A` and `B` are not saved (non-persistent buffers): `update_layer` rebuilds them when the
//! adapter is loaded from the base weight's top-`r` singular triplets, by
//! `torch.linalg.svd` (`psoft_svd: "full"`) or the randomised `torch.svd_lowrank`
//! (`"lowrank"`, seeded by `random_seed`). A merge that depends on an SVD of the base
//! computed at load time cannot be reproduced bit for bit, so lorastream refuses PSOFT.

/// Why PSOFT is refused: listed in [`super::NOT_MERGEABLE`], so opening such an adapter
/// fails with this reason before anything is read.
pub const REFUSED: (&str, &str) = (
    "PSOFT",
    "its merge is scaling·B(R−I)A and the adapter saves only R; PEFT rebuilds A and B when \
     loading, from an SVD of the base weight (torch.linalg.svd, or the randomised \
     torch.svd_lowrank for psoft_svd=\"lowrank\"), whose singular vectors (signs and round-off) \
     lorastream cannot reproduce bit for bit; merge with PEFT (merge_and_unload) instead",
);

#[cfg(test)]
mod tests {
    use crate::adapter::tuners::NOT_MERGEABLE;

    #[test]
    fn refused_with_the_reason() {
        let why = NOT_MERGEABLE
            .iter()
            .find(|(t, _)| *t == "PSOFT")
            .map(|(_, w)| *w);
        assert!(
            why.is_some_and(|w| w.contains("SVD") && w.contains("svd_lowrank")),
            "{why:?}"
        );
    }
}
