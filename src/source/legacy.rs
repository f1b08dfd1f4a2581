//! Legacy PyTorch files (torch < 1.6, or `_use_new_zipfile_serialization=False`), read in
//! place. The layout, as torch's `_legacy_save` writes it and `_legacy_load` reads it:
//!
//! 1. a pickle of the magic number 0x1950a86a20f9469cfc6c,
//! 2. a pickle of the protocol version (1001),
//! 3. a pickle of `sys_info` (`little_endian`, type sizes),
//! 4. the main pickle; its persistent ids `('storage', class, key, location, numel, None)`
//!    name storages (any device tag, `cuda:0` too: the bytes are the same),
//! 5. a pickle of the storage keys, sorted,
//! 6. for each key in that order: the storage's element count (8 bytes, little-endian)
//!    and its `count · element size` bytes.
//!
//! Each storage then is a byte range of the memory map, just like a zip record, and the
//! tensors are made by the zip reader's code. The older tar layout (torch < 0.4) is refused.

use super::pickle::{self, StorageRef, Value};
use super::torch_zip::{self, Record};
use super::{MappedFile, TensorEntry, walk};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// `MAGIC_NUMBER` of torch/serialization.py, as LONG1's little-endian bytes.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
const PROTOCOL_VERSION: i64 = 1001;

/// Whether `b` starts like a legacy torch file: a pickle of the magic number, or a tar.
pub(super) fn looks_legacy(b: &[u8]) -> bool {
    is_tar(b)
        || (b.first() == Some(&0x80)
            && matches!(pickle::load_prefix(&b[..b.len().min(64)]),
                Ok(l) if matches!(&l.pickle.root, Value::BigInt(m) if **m == MAGIC)))
}

fn is_tar(b: &[u8]) -> bool {
    b.get(257..262) == Some(b"ustar")
}

/// The tensors of a legacy file, in pickle order, and the skipped entries.
pub(crate) fn read(file: &Arc<MappedFile>) -> Result<(Vec<TensorEntry>, Vec<String>)> {
    let path = file.path();
    let b = file.bytes();
    if is_tar(b) {
        return Err(Error::format(
            path,
            "this is a tar-format PyTorch file (torch < 0.4), which lorastream does not read; \
             re-save it once with torch: torch.save(torch.load(path, map_location=\"cpu\", \
             weights_only=False), new_path)",
        ));
    }
    let bad =
        |what: &str, e: String| Error::format(path, format!("legacy torch file: {what}: {e}"));
    let mut at = 0usize;
    let mut next = |what: &str| -> Result<pickle::Loaded> {
        let l = pickle::load_prefix(&b[at..]).map_err(|e| bad(what, e.to_string()))?;
        at += l.end;
        Ok(l)
    };
    let magic = next("the magic number pickle")?;
    if !matches!(&magic.pickle.root, Value::BigInt(m) if **m == MAGIC) {
        return Err(bad(
            "the first pickle",
            "is not torch's magic number".into(),
        ));
    }
    let version = next("the protocol version pickle")?;
    if !matches!(version.pickle.root, Value::Int(PROTOCOL_VERSION)) {
        return Err(bad(
            "the protocol version",
            format!(
                "is {:?}, torch writes {PROTOCOL_VERSION}",
                version.pickle.root
            ),
        ));
    }
    let sys_info = next("the sys_info pickle")?;
    if let Value::Dict(d) = sys_info.pickle.root
        && let Some(d) = sys_info.pickle.arena.dict(d)
        && matches!(d.get("little_endian"), Some(Value::Bool(false)))
    {
        return Err(Error::format(
            path,
            "legacy torch file saved on a big-endian machine (sys_info little_endian = False); \
             lorastream reads little-endian tensors only. Re-save it with torch: \
             torch.save(torch.load(path, map_location=\"cpu\"), new_path)",
        ));
    }
    let main = next("the main pickle")?;
    let keys = next("the storage key list")?;
    let Value::List(list) = keys.pickle.root else {
        return Err(bad("the storage key list", "is not a list".into()));
    };
    let keys: Vec<String> = keys
        .pickle
        .arena
        .seq(list)
        .iter()
        .map(|k| match k {
            Value::Str(s) => Ok(s.to_string()),
            other => Err(bad("the storage key list", format!("holds {other:?}"))),
        })
        .collect::<Result<_>>()?;

    // The first persistent id of each key says its element size (torch's too: the first
    // occurrence is what was written).
    let mut first: HashMap<&str, &Rc<StorageRef>> = HashMap::new();
    for s in &main.storages {
        first.entry(s.key.as_str()).or_insert(s);
    }
    let mut records: HashMap<String, Record> = HashMap::with_capacity(keys.len());
    for key in &keys {
        let s = first.get(key.as_str()).ok_or_else(|| {
            bad(
                "the storage key list",
                format!("names storage '{key}', which the main pickle never refers to"),
            )
        })?;
        let es = s.dtype.map_or(1, |d| d.size());
        let count = b
            .get(at..at + 8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .ok_or_else(|| {
                bad(
                    &format!("storage '{key}'"),
                    "the file ends before it (truncated?)".into(),
                )
            })?;
        if count != s.numel {
            return Err(bad(
                &format!("storage '{key}'"),
                format!("holds {count} elements but the pickle says {}", s.numel),
            ));
        }
        let start = at + 8;
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(es))
            .filter(|&l| start.checked_add(l).is_some_and(|e| e <= b.len()))
            .ok_or_else(|| {
                bad(
                    &format!("storage '{key}'"),
                    format!("its {count} elements run past the end of the file (truncated?)"),
                )
            })?;
        records.insert(
            format!("data/{key}"),
            Record {
                start,
                len,
                compressed: false,
            },
        );
        at = start + len;
    }

    if let Some(why) = walk::root_problem(&main.pickle.root) {
        return Err(Error::format(path, format!("the main pickle {why}")));
    }
    let found = walk::tensors_in(&main.pickle, main.end, "the main pickle")
        .map_err(|e| Error::format(path, e))?;
    // The tensors hold what they need; the rest of the pickle can go before the entries
    // are made.
    drop(main);
    let mut tensors = Vec::with_capacity(found.tensors.len());
    for (name, t) in found.tensors {
        tensors.push(torch_zip::entry(file, &records, "", name, &t)?);
    }
    Ok((tensors, found.skipped))
}
