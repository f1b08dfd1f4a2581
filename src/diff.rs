//! `diff`: compares two checkpoints of any readable formats tensor by tensor — keys only
//! in one of them, dtype and shape changes, and for tensors of the same shape the count
//! of differing elements, the largest absolute and ulp differences — streaming each pair
//! of tensors in pieces (bounded memory). Elements are compared by value (`+0 == -0`,
//! NaN equals NaN) or, with `exact`, by bits; see `compare` for the rules.

use crate::compare::{TensorDiff, Tolerance, compare_entries};
use crate::error::Result;
use crate::source;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// What `diff` found (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub a: String,
    pub b: String,
    /// True when both hold the same keys with equal dtypes, shapes and values.
    pub identical: bool,
    pub tolerance: String,
    pub tensors_a: usize,
    pub tensors_b: usize,
    /// Tensors in both, of the same shape, whose values were compared.
    pub compared: usize,
    pub elements_compared: u64,
    /// Tensors in both that differ (values, dtype or shape), in A's order.
    pub changed: Vec<TensorDiff>,
    pub only_in_a: Vec<String>,
    pub only_in_b: Vec<String>,
}

/// Compares checkpoints `a` and `b`.
pub fn diff(a: &Path, b: &Path, exact: bool) -> Result<DiffReport> {
    let ca = source::open(a)?;
    let cb = source::open(b)?;
    let tol = if exact {
        Tolerance::Exact
    } else {
        Tolerance::Values
    };
    let in_b: HashMap<&str, &source::TensorEntry> =
        cb.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let in_a: std::collections::HashSet<&str> =
        ca.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut changed = Vec::new();
    let mut only_in_a = Vec::new();
    let (mut compared, mut elements) = (0, 0);
    for ta in &ca.tensors {
        crate::cancel::check()?;
        let Some(tb) = in_b.get(ta.name.as_str()) else {
            only_in_a.push(ta.name.clone());
            continue;
        };
        let d = compare_entries(ta, tb, tol)?;
        if !d.shape_changed() {
            compared += 1;
            elements += d.stats.compared;
        }
        if d.differs() {
            changed.push(d);
        }
    }
    let only_in_b: Vec<String> = cb
        .tensors
        .iter()
        .filter(|t| !in_a.contains(t.name.as_str()))
        .map(|t| t.name.clone())
        .collect();
    Ok(DiffReport {
        a: a.display().to_string(),
        b: b.display().to_string(),
        identical: changed.is_empty() && only_in_a.is_empty() && only_in_b.is_empty(),
        tolerance: tol.describe(),
        tensors_a: ca.tensors.len(),
        tensors_b: cb.tensors.len(),
        compared,
        elements_compared: elements,
        changed,
        only_in_a,
        only_in_b,
    })
}

impl DiffReport {
    /// A table of changed tensors, the keys only in one side, and a summary line.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        if !self.changed.is_empty() {
            s.push_str(&crate::compare::table(&self.changed));
        }
        for (title, names) in [
            ("only in A", &self.only_in_a),
            ("only in B", &self.only_in_b),
        ] {
            if names.is_empty() {
                continue;
            }
            s.push_str(&format!("{title}: {}\n", names.len()));
            for n in names.iter().take(50) {
                s.push_str(&format!("  {n}\n"));
            }
            if names.len() > 50 {
                s.push_str(&format!("  … and {} more\n", names.len() - 50));
            }
        }
        if self.identical {
            s.push_str(&format!(
                "identical: {} tensors, {} elements ({})\n",
                self.compared, self.elements_compared, self.tolerance
            ));
        } else {
            s.push_str(&format!(
                "different: {} changed, {} only in A, {} only in B ({} of {} / {} tensors compared; A = {}, B = {})\n",
                self.changed.len(),
                self.only_in_a.len(),
                self.only_in_b.len(),
                self.compared,
                self.tensors_a,
                self.tensors_b,
                self.a,
                self.b
            ));
        }
        s
    }
}
