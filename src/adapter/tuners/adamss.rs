//! AdaMSS, adaptive multi-subspace tuning (`peft_type: "ADAMSS"`, PEFT 0.21 `tuners/adamss/`):
//! refused by name, because its merge cannot be reproduced from the files.
//!
//! PEFT's layers do implement `merge()`: `W += scatter(B_i · A_i · newB)`, each subspace's
//! product written to the rows `scatter_index` lists. The adapter file holds `adamss_A`,
//! `adamss_B` and the projection `adamss_newB`, but not `scatter_index` (nor the subspace
//! segmentation behind it): `update_layer` recomputes it when the adapter is loaded, from a
//! randomised SVD of the base weight and bias (`torch.svd_lowrank` under `torch.manual_seed`)
//! whose left singular vectors are clustered by scikit-learn's `KMeans(init="random",
//! random_state=123456789)`. Which output row each part of the update lands on thus depends on
//! torch's RNG stream, LAPACK's SVD round-off and scikit-learn's clustering of those values — a
//! single flipped assignment moves whole rows of ΔW elsewhere — so lorastream refuses AdaMSS
//! rather than guess the rows.

/// Why AdaMSS is refused: listed in [`super::NOT_MERGEABLE`], so opening such an adapter
/// fails with this reason before anything is read.
pub const REFUSED: (&str, &str) = (
    "ADAMSS",
    "AdaMSS's merge writes each subspace's update to the rows its scatter_index lists, which the \
     adapter does not save: PEFT recomputes it when loading, from a randomised SVD of the base \
     weight (torch.svd_lowrank under torch's RNG) clustered by scikit-learn's KMeans, which \
     lorastream cannot reproduce (one different cluster moves whole rows of the update); merge \
     with PEFT (merge_and_unload) instead",
);

#[cfg(test)]
mod tests {
    use crate::adapter::tuners::NOT_MERGEABLE;

    #[test]
    fn refused_with_the_reason() {
        let why = NOT_MERGEABLE
            .iter()
            .find(|(t, _)| t.eq_ignore_ascii_case("adamss"))
            .map(|(_, w)| *w);
        assert!(
            why.is_some_and(|w| w.contains("scatter_index") && w.contains("KMeans")),
            "{why:?}"
        );
    }
}
