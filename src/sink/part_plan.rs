//! The plan of a partitioned output (`--part K/N`): which part a run is, and the plan every
//! part computes alike. A sharded folder output is split into the same shards a single run
//! writes (`split_shards`: tensor order and shard boundaries follow from the plan and
//! `--shard-size` alone, since every tensor's size is its dtype × shape); the shards are then
//! dealt to the N parts by bytes, largest first to the part with the fewest bytes so far.
//! Nothing here depends on timing, the host or the other parts, so N processes on N machines
//! agree on who writes what without talking to each other. It lives with the sinks because
//! it is a shard layout: the part writer (`parts.rs`) and the sharded writer use it, and the
//! commands above (`crate::partition`, `stitch`) only read it.

use super::{OutTensor, split_shards};
use crate::error::{Error, Result};
use serde::Serialize;
use sha2::Digest;

/// Part `index` of `count` (0 ≤ index < count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Part {
    /// `K/N`, or `auto` (see [`Part::from_env`], read through `env`). Errors are usage errors.
    pub fn parse(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<Part> {
        if spec == "auto" {
            return Part::from_env(env);
        }
        let bad = || {
            Error::Usage(format!(
                "--part '{spec}': give K/N with 0 <= K < N (part K of N, counted from 0), or auto"
            ))
        };
        let (k, n) = spec.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Part { index, count })
    }

    /// `--part auto`: a Slurm job array (`SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`) or a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` of
    /// `LORASTREAM_PARTS`, which the Job's manifest sets to its `completions`). Slurm wins
    /// when both are set. Anything missing, unparsable or out of range is a usage error
    /// naming the variable: guessing a part would write the wrong shards.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Part> {
        let num = |var: &str| -> Result<Option<usize>> {
            match env(var) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Usage(format!("--part auto: {var}='{v}' is not a whole number"))
                }),
            }
        };
        let out_of_range = |what: String| {
            Error::Usage(format!(
                "--part auto: {what} does not name a part (0 <= K < N); give --part K/N"
            ))
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let count = num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                Error::Usage(
                    "--part auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; \
                     give --part K/N"
                        .into(),
                )
            })?;
            // With a step (--array=0-15:2) task ids are not 0..N after the offset.
            if let Some(step) = num("SLURM_ARRAY_TASK_STEP")?
                && step != 1
            {
                return Err(Error::Usage(format!(
                    "--part auto: the job array has step {step} (SLURM_ARRAY_TASK_STEP), so task \
                     ids are not consecutive parts; submit --array=0-{} or give --part K/N",
                    count.saturating_sub(1)
                )));
            }
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| {
                out_of_range(format!(
                    "SLURM_ARRAY_TASK_ID={id} below SLURM_ARRAY_TASK_MIN={min}"
                ))
            })?;
            if count == 0 || index >= count {
                return Err(out_of_range(format!(
                    "SLURM_ARRAY_TASK_ID={id} - SLURM_ARRAY_TASK_MIN={min} of \
                     SLURM_ARRAY_TASK_COUNT={count}"
                )));
            }
            return Ok(Part { index, count });
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("LORASTREAM_PARTS")?.ok_or_else(|| {
                Error::Usage(
                    "--part auto: JOB_COMPLETION_INDEX is set but LORASTREAM_PARTS is not; set \
                     it to the Job's completions (see contrib/k8s/), or give --part K/N"
                        .into(),
                )
            })?;
            if count == 0 || index >= count {
                return Err(out_of_range(format!(
                    "JOB_COMPLETION_INDEX={index} of LORASTREAM_PARTS={count}"
                )));
            }
            return Ok(Part { index, count });
        }
        Err(Error::Usage(
            "--part auto: neither a Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) \
             nor a Kubernetes Indexed Job (JOB_COMPLETION_INDEX with LORASTREAM_PARTS) is in the \
             environment; give --part K/N"
                .into(),
        ))
    }
}

/// One shard of the output, as every part plans it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    /// `model-0000i-of-0000n.safetensors`.
    pub name: String,
    /// Its tensors: a range of the output plan.
    pub tensors: std::ops::Range<usize>,
    /// Tensor bytes in it (its file adds a header).
    pub bytes: u64,
    /// The part that writes it.
    pub part: usize,
}

/// The partitioned plan: the shards of the single run's layout and who writes each.
#[derive(Clone, Debug)]
pub struct PartPlan {
    pub part: Part,
    pub shards: Vec<ShardSpec>,
    /// Hex SHA-256 of everything the parts must agree on (see [`PartPlan::new`]).
    pub fingerprint: String,
}

/// What a part writes (`--json`'s `part`), known before any work: its shards, by name and
/// tensor bytes, so a driver can size its tasks (`merge --dry-run --part K/N --json`).
#[derive(Clone, Debug, Serialize)]
pub struct PartReport {
    pub part: usize,
    pub parts: usize,
    pub fingerprint: String,
    /// Tensor bytes of this part's shards.
    pub bytes: u64,
    pub tensors: usize,
    pub shards: Vec<PartShard>,
    /// Shards of the whole output.
    pub shards_total: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PartShard {
    pub name: String,
    pub tensors: usize,
    pub bytes: u64,
}

/// Deals shards (by bytes) to `n` parts: the biggest first, each to the part with the
/// fewest bytes so far (the lowest index on a tie), so parts differ by at most about one
/// shard. Returns each shard's part.
pub fn assign(bytes: &[u64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..bytes.len()).collect();
    order.sort_by(|&a, &b| bytes[b].cmp(&bytes[a]).then(a.cmp(&b)));
    let mut load = vec![0u64; n.max(1)];
    let mut owner = vec![0; bytes.len()];
    for s in order {
        let (k, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(k, l)| (*l, k))
            .unwrap_or((0, &0));
        owner[s] = k;
        load[k] += bytes[s];
    }
    owner
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl PartPlan {
    /// The plan of `part` for output tensors `plan` in shards of at most `shard_size`
    /// bytes. `what` describes what fills the tensors (inputs by file name, options that
    /// change values): it goes into the fingerprint with the tensors, the shard layout and
    /// the number of parts, so parts run with other inputs or options (or another
    /// lorastream version) do not stitch together.
    pub fn new(plan: &[OutTensor], shard_size: u64, part: Part, what: &str) -> Result<PartPlan> {
        if shard_size == 0 {
            return Err(Error::Usage("--shard-size must be at least 1 byte".into()));
        }
        let groups = split_shards(plan, shard_size);
        let n = groups.len();
        let bytes: Vec<u64> = groups
            .iter()
            .map(|g| g.iter().map(OutTensor::nbytes).sum())
            .collect();
        let owner = assign(&bytes, part.count);
        let mut at = 0;
        let shards: Vec<ShardSpec> = groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let s = ShardSpec {
                    name: shard_name(i, n),
                    tensors: at..at + g.len(),
                    bytes: bytes[i],
                    part: owner[i],
                };
                at += g.len();
                s
            })
            .collect();
        let tensors: Vec<serde_json::Value> = plan
            .iter()
            .map(|t| serde_json::json!([t.name, t.dtype.name(), t.shape]))
            .collect();
        let layout: Vec<serde_json::Value> = shards
            .iter()
            .map(|s| serde_json::json!([s.name, s.tensors.start, s.tensors.end, s.part]))
            .collect();
        let canon = serde_json::json!({
            "lorastream": env!("CARGO_PKG_VERSION"),
            "parts": part.count,
            "shard_size": shard_size,
            "what": what,
            "tensors": tensors,
            "shards": layout,
        });
        let fingerprint = hex(&sha2::Sha256::digest(canon.to_string().as_bytes()));
        Ok(PartPlan {
            part,
            shards,
            fingerprint,
        })
    }

    /// The shards this part writes, in output order.
    pub fn mine(&self) -> impl Iterator<Item = &ShardSpec> {
        self.shards.iter().filter(|s| s.part == self.part.index)
    }

    /// For each planned tensor, whether this part writes it.
    pub fn writes(&self, plan_len: usize) -> Vec<bool> {
        let mut w = vec![false; plan_len];
        for s in self.mine() {
            for i in s.tensors.clone() {
                if let Some(x) = w.get_mut(i) {
                    *x = true;
                }
            }
        }
        w
    }

    pub fn report(&self) -> PartReport {
        let shards: Vec<PartShard> = self
            .mine()
            .map(|s| PartShard {
                name: s.name.clone(),
                tensors: s.tensors.len(),
                bytes: s.bytes,
            })
            .collect();
        PartReport {
            part: self.part.index,
            parts: self.part.count,
            fingerprint: self.fingerprint.clone(),
            bytes: shards.iter().map(|s| s.bytes).sum(),
            tensors: shards.iter().map(|s| s.tensors).sum(),
            shards,
            shards_total: self.shards.len(),
        }
    }
}

/// The name `save_pretrained` gives shard `i` (from 0) of `n`.
pub fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// The file name of a path, for fingerprints: the same inputs mounted at other paths on
/// other machines are still the same inputs.
pub fn file_name_of(p: &std::path::Path) -> String {
    p.components()
        .next_back()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parts_parse_from_the_flag_and_the_schedulers_variables() {
        assert_eq!(
            Part::parse("2/4", env(&[])).unwrap(),
            Part { index: 2, count: 4 }
        );
        for bad in ["4/4", "1/0", "x/2", "3", "-1/2", ""] {
            assert!(Part::parse(bad, env(&[])).unwrap_err().is_usage(), "{bad}");
        }
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("JOB_COMPLETION_INDEX", "0"),
            ("LORASTREAM_PARTS", "9"),
        ]);
        assert_eq!(
            Part::parse("auto", slurm).unwrap(),
            Part { index: 2, count: 4 }
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3"), ("LORASTREAM_PARTS", "4")]);
        assert_eq!(
            Part::parse("auto", k8s).unwrap(),
            Part { index: 3, count: 4 }
        );
        for vars in [
            vec![],
            vec![("JOB_COMPLETION_INDEX", "3")],
            vec![("JOB_COMPLETION_INDEX", "4"), ("LORASTREAM_PARTS", "4")],
            vec![("SLURM_ARRAY_TASK_ID", "1")],
            vec![
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            vec![
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_STEP", "2"),
            ],
            vec![
                ("SLURM_ARRAY_TASK_ID", "x"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
        ] {
            let e = Part::from_env(env(&vars)).unwrap_err();
            assert!(e.is_usage(), "{vars:?}: {e}");
        }
        let e = Part::from_env(env(&[])).unwrap_err().to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"));
    }

    #[test]
    fn shards_are_dealt_by_bytes_biggest_first() {
        assert_eq!(assign(&[10, 10, 10, 10], 2), vec![0, 1, 0, 1]);
        // The big shard alone on one part, the small ones on the other.
        assert_eq!(assign(&[3, 9, 3, 3], 2), vec![1, 0, 1, 1]);
        // More parts than shards: the rest write nothing.
        assert_eq!(assign(&[5], 3), vec![0]);
    }

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![n],
        }
    }

    #[test]
    fn every_part_plans_the_same_layout_and_fingerprint() {
        let plan: Vec<OutTensor> = (0..10).map(|i| t(&format!("w{i}"), 4 + i)).collect();
        let plans: Vec<PartPlan> = (0..3)
            .map(|k| PartPlan::new(&plan, 20, Part { index: k, count: 3 }, "x").unwrap())
            .collect();
        for p in &plans[1..] {
            assert_eq!(p.shards, plans[0].shards);
            assert_eq!(p.fingerprint, plans[0].fingerprint);
        }
        // The shards cover the plan once, in order, as the single run splits it.
        let single = split_shards(&plan, 20);
        assert_eq!(plans[0].shards.len(), single.len());
        let mut covered = vec![0; plan.len()];
        for p in &plans {
            for i in p.writes(plan.len()).iter().enumerate().filter(|(_, w)| **w) {
                covered[i.0] += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
        // 4+5+6 | 7+8 | 9+10 | 11 | 12 | 13
        assert_eq!(plans[1].shards[0].name, "model-00001-of-00006.safetensors");
        assert_eq!(plans[1].shards[1].tensors, 3..5);
        // Other inputs, another count of parts: another fingerprint.
        let other = PartPlan::new(&plan, 20, Part { index: 0, count: 3 }, "y").unwrap();
        assert_ne!(other.fingerprint, plans[0].fingerprint);
        let two = PartPlan::new(&plan, 20, Part { index: 0, count: 2 }, "x").unwrap();
        assert_ne!(two.fingerprint, plans[0].fingerprint);
        let r = plans[2].report();
        assert_eq!(r.bytes, plans[2].mine().map(|s| s.bytes).sum::<u64>());
        assert_eq!(r.shards_total, 6);
    }
}
