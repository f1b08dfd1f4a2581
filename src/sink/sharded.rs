//! `ShardedSafetensorsWriter`: an HF-style folder of `model-0000i-of-0000n.safetensors`
//! shards plus `model.safetensors.index.json`, as `save_pretrained` writes it. Shards are
//! filled greedily in plan order up to the shard size; a tensor larger than the limit gets
//! a shard of its own. The whole folder is written under a temp name and renamed at the end.

use super::atomic::TempOutput;
use super::safetensors::SafetensorsWriter;
use super::{OutTensor, PlanCursor, SharedBytes, TensorSink};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

pub struct ShardedSafetensorsWriter {
    temp: TempOutput,
    shards: Vec<(String, Vec<OutTensor>)>,
    current: Option<(usize, SafetensorsWriter)>,
    direct: bool,
    /// Which shard each plan index belongs to.
    shard_of: Vec<usize>,
    cursor: PlanCursor,
}

/// Splits `plan` into shards of at most `limit` bytes each (a tensor over the limit alone).
pub fn split(plan: &[OutTensor], limit: u64) -> Vec<Vec<OutTensor>> {
    let mut shards: Vec<Vec<OutTensor>> = Vec::new();
    let mut size = 0u64;
    for t in plan {
        let n = t.nbytes();
        if shards.is_empty() || (size + n > limit && !shards.last().is_none_or(|s| s.is_empty())) {
            shards.push(Vec::new());
            size = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(t.clone());
        }
        size += n;
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

impl ShardedSafetensorsWriter {
    pub fn create(dest: &Path, plan: &[OutTensor], shard_size: u64, direct: bool) -> Result<Self> {
        if dest.is_dir() {
            let mut rd = std::fs::read_dir(dest).map_err(|e| Error::io(dest, e))?;
            if rd.next().is_some() {
                return Err(Error::format(
                    dest,
                    "output folder is not empty; remove it or name a new folder (sharded outputs replace the whole folder)",
                ));
            }
        }
        if shard_size == 0 {
            return Err(Error::Usage("--shard-size must be at least 1 byte".into()));
        }
        let temp = TempOutput::new(dest)?;
        std::fs::create_dir(temp.path()).map_err(|e| Error::io(dest, e))?;
        let parts = split(plan, shard_size);
        let n = parts.len();
        let mut shard_of = Vec::with_capacity(plan.len());
        let shards = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                shard_of.extend(std::iter::repeat_n(i, p.len()));
                (format!("model-{:05}-of-{:05}.safetensors", i + 1, n), p)
            })
            .collect();
        Ok(ShardedSafetensorsWriter {
            temp,
            shards,
            current: None,
            direct,
            shard_of,
            cursor: PlanCursor::new(plan),
        })
    }

    fn open_shard(&mut self, i: usize) -> Result<()> {
        if let Some((_, w)) = self.current.take() {
            w.close()?;
        }
        let (name, plan) = &self.shards[i];
        let w = SafetensorsWriter::create_at(&self.temp.path().join(name), plan, self.direct)?;
        self.current = Some((i, w));
        Ok(())
    }

    fn writer(&mut self) -> Result<&mut SafetensorsWriter> {
        match &mut self.current {
            Some((_, w)) => Ok(w),
            None => Err(Error::Internal("no shard open".into())),
        }
    }
}

impl TensorSink for ShardedSafetensorsWriter {
    fn begin(&mut self, t: &OutTensor) -> Result<()> {
        let i = self.cursor.begin(t)?;
        let shard = self.shard_of[i];
        if self.current.as_ref().map(|(s, _)| *s) != Some(shard) {
            // Shards without tensors in between (impossible by construction) are skipped.
            self.open_shard(shard)?;
        }
        self.writer()?.begin(t)
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.cursor.write(bytes.len())?;
        self.writer()?.write(bytes)
    }
    fn write_shared(&mut self, src: &Arc<dyn SharedBytes>, start: usize, len: usize) -> Result<()> {
        self.cursor.write(len)?;
        self.writer()?.write_shared(src, start, len)
    }
    fn end(&mut self) -> Result<()> {
        self.cursor.end()?;
        self.writer()?.end()
    }
    fn finish(mut self: Box<Self>) -> Result<()> {
        self.cursor.check_complete()?;
        // An empty plan still gets its (empty) shard so the folder loads.
        if self.current.is_none() {
            self.open_shard(0)?;
        }
        if let Some((_, w)) = self.current.take() {
            w.close()?;
        }
        let mut weight_map = serde_json::Map::new();
        for (name, plan) in &self.shards {
            for t in plan {
                weight_map.insert(t.name.clone(), name.clone().into());
            }
        }
        let total: u64 = self.cursor.plan().iter().map(|t| t.nbytes()).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let index_path = self.temp.path().join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::format(&index_path, e.to_string()))?;
        std::fs::write(&index_path, text + "\n").map_err(|e| Error::io(&index_path, e))?;
        self.temp.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    fn t(name: &str, n: usize) -> OutTensor {
        OutTensor {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![n],
        }
    }

    #[test]
    fn greedy_split_gives_big_tensors_their_own_shard() {
        let plan = [t("a", 4), t("b", 4), t("c", 20), t("d", 1)];
        let s = split(&plan, 10);
        let names: Vec<Vec<&str>> = s
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
    }
}
