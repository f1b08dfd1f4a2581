//! PyTorch zip checkpoints (`torch.save`, torch >= 1.6): `.pth`, `.pt`, `.bin`.
//!
//! The zip's central directory (read with the `zip` crate) gives each record's place; the
//! restricted pickle reader turns `data.pkl` into tensor descriptions; each tensor's bytes
//! are then a slice of the memory map at its record's offset. Records must be stored
//! uncompressed, which torch always does.

use super::pickle::{self, TensorRef};
use super::walk;
use super::{MappedFile, TensorData, TensorEntry, checked_nbytes};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

/// Largest view that overlaps itself (stride 0, as `expand` makes) whose bytes lorastream
/// will gather: beyond the storage's own size, a size field alone would drive the
/// allocation.
pub(crate) const MAX_OVERLAPPING_VIEW_BYTES: usize = 1 << 30;

/// The tensors of a torch zip file, in pickle order, plus the names of skipped
/// non-tensor entries, named by path (see `walk`).
pub(crate) fn read(file: &Arc<MappedFile>) -> Result<(Vec<TensorEntry>, Vec<String>)> {
    let path = file.path();
    let bytes = file.bytes();
    let records = records(file)?;

    if records.keys().any(|k| k.ends_with("/constants.pkl")) {
        return Err(Error::format(
            path,
            "this is a TorchScript archive (it has constants.pkl), not a state dict; load it in \
             Python and torch.save(model.state_dict()) instead",
        ));
    }
    let prefix = records.prefix.clone();
    let pkl_name = format!("{prefix}data.pkl");
    let pkl = records.get(&pkl_name).ok_or_else(|| {
        Error::format(
            path,
            format!("zip file has no {pkl_name}: not a torch.save checkpoint"),
        )
    })?;
    check_byteorder(path, bytes, &records, &prefix)?;
    if pkl.compressed {
        return Err(Error::format(
            path,
            format!("record '{pkl_name}' is compressed"),
        ));
    }
    let pickled = pickle::load(&bytes[pkl.start..pkl.start + pkl.len])
        .map_err(|e| Error::format(path, e.to_string()))?;

    if let Some(why) = walk::root_problem(&pickled.root) {
        return Err(Error::format(path, format!("data.pkl {why}")));
    }
    let found =
        walk::tensors_in(&pickled, pkl.len, "data.pkl").map_err(|e| Error::format(path, e))?;
    // The tensors hold what they need; the rest of the pickle can go before the entries
    // are made.
    drop(pickled);
    let mut tensors = Vec::with_capacity(found.tensors.len());
    for (name, t) in found.tensors {
        tensors.push(entry(file, &records.by_name, &prefix, name, &t)?);
    }
    Ok((tensors, found.skipped))
}

/// Where a storage's bytes are: a zip record, or (legacy files) a range after the pickles.
pub(super) struct Record {
    pub start: usize,
    pub len: usize,
    pub compressed: bool,
}

/// A zip's records by name, and the folder they all sit in.
pub(super) struct Records {
    pub by_name: HashMap<String, Record>,
    /// `archive/`: the first record's folder, with its slash.
    pub prefix: String,
}

impl std::ops::Deref for Records {
    type Target = HashMap<String, Record>;
    fn deref(&self) -> &Self::Target {
        &self.by_name
    }
}

/// torch writes `byteorder` = `little` (or `big` on a big-endian machine, and nothing
/// before torch 2.1). A big-endian file would read as wrong values here, so it is refused.
fn check_byteorder(path: &Path, bytes: &[u8], records: &Records, prefix: &str) -> Result<()> {
    let name = format!("{prefix}byteorder");
    let Some(r) = records.get(&name) else {
        return Ok(());
    };
    let text = &bytes[r.start..r.start + r.len];
    match text {
        b"little" => Ok(()),
        b"big" if !r.compressed => Err(Error::format(
            path,
            format!(
                "record '{name}' says the file is big-endian (saved on a big-endian machine); \
                 lorastream reads little-endian tensors only. Re-save it with torch, which swaps \
                 the bytes on load: torch.save(torch.load(path, map_location=\"cpu\"), new_path)"
            ),
        )),
        _ => Err(Error::format(
            path,
            format!(
                "record '{name}' is neither 'little' nor 'big' ({:?}): corrupt file?",
                String::from_utf8_lossy(&text[..text.len().min(40)])
            ),
        )),
    }
}

/// Reads the central directory. Like torch's reader, every record must sit in the first
/// record's folder; unlike it, a name used twice is refused (torch then reads one
/// `data.pkl` and another `data/N` than one might expect, depending on the name).
fn records(file: &MappedFile) -> Result<Records> {
    let path = file.path();
    let bytes = file.bytes();
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        Error::format(
            path,
            format!("not a readable zip archive (truncated?): {e}"),
        )
    })?;
    // The zip crate keeps one entry per name, so a repeated name is found in the central
    // directory itself.
    if let Some(name) = repeated_name(bytes) {
        return Err(Error::format(
            path,
            format!(
                "zip record '{name}' appears twice; which one torch.load reads depends on the \
                 record, so the file is ambiguous (corrupt, or edited by a zip tool)"
            ),
        ));
    }
    let mut out = HashMap::with_capacity(zip.len());
    let mut prefix: Option<String> = None;
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| Error::format(path, format!("zip entry {i} is unreadable: {e}")))?;
        let name = f
            .name()
            .map_err(|e| Error::format(path, format!("zip entry {i} has a bad name: {e}")))?
            .into_owned();
        let folder = match name.find('/') {
            Some(p) => &name[..=p],
            None => {
                return Err(Error::format(
                    path,
                    format!(
                        "zip record '{name}' is not inside a folder; torch.save puts every record \
                         under one folder (archive/…): not a torch.save checkpoint"
                    ),
                ));
            }
        };
        let prefix = prefix.get_or_insert_with(|| folder.to_string());
        if folder != prefix.as_str() {
            return Err(Error::format(
                path,
                format!(
                    "zip record '{name}' is outside the folder '{prefix}' of the first record; a \
                     torch.save file has one top-level folder (torch.load refuses this file too)"
                ),
            ));
        }
        let header = f.header_start() as usize;
        let len = f.compressed_size();
        let compressed = f.compression() != zip::CompressionMethod::Stored;
        let start = local_data_start(bytes, header).ok_or_else(|| {
            Error::format(
                path,
                format!("zip record '{name}' has a bad local header (truncated?)"),
            )
        })?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| start.checked_add(l).is_some_and(|e| e <= bytes.len()));
        let len = len.ok_or_else(|| {
            Error::format(
                path,
                format!("zip record '{name}' runs past the end of the file (truncated?)"),
            )
        })?;
        let rec = Record {
            start,
            len,
            compressed,
        };
        if out.contains_key(&name) {
            return Err(Error::format(
                path,
                format!(
                    "zip record '{name}' appears twice; which one torch.load reads depends on the \
                     record, so the file is ambiguous (corrupt, or edited by a zip tool)"
                ),
            ));
        }
        out.insert(name, rec);
    }
    Ok(Records {
        by_name: out,
        prefix: prefix.ok_or_else(|| Error::format(path, "zip archive has no records"))?,
    })
}

/// The first name the central directory lists twice. None when there is none, or when the
/// directory cannot be walked (then the zip crate's own reading reports the damage).
fn repeated_name(b: &[u8]) -> Option<String> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    // End of central directory: the last signature in the final 64 KiB + 22 bytes.
    let lo = b.len().saturating_sub(65_557);
    let eocd = (lo..b.len().saturating_sub(21))
        .rev()
        .find(|&i| b[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])?;
    let (mut count, mut start) = (u64::from(u16_at(eocd + 10)?), u64::from(u32_at(eocd + 16)?));
    if count == 0xffff || start == 0xffff_ffff {
        // zip64: the locator just before the EOCD gives the zip64 EOCD record.
        let loc = eocd.checked_sub(20)?;
        if u32_at(loc)? != 0x0706_4b50 {
            return None;
        }
        let z = usize::try_from(u64_at(loc + 8)?).ok()?;
        if u32_at(z)? != 0x0606_4b50 {
            return None;
        }
        count = u64_at(z + 32)?;
        start = u64_at(z + 48)?;
    }
    let mut at = usize::try_from(start).ok()?;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..count {
        if u32_at(at)? != 0x0201_4b50 {
            return None;
        }
        let n = usize::from(u16_at(at + 28)?);
        let skip = n + usize::from(u16_at(at + 30)?) + usize::from(u16_at(at + 32)?);
        let name = b.get(at + 46..at + 46 + n)?;
        if !seen.insert(name) {
            return Some(String::from_utf8_lossy(name).into_owned());
        }
        at = at.checked_add(46 + skip)?;
    }
    None
}

/// Where a record's data starts: after its 30-byte local header, name and extra field.
fn local_data_start(bytes: &[u8], header: usize) -> Option<usize> {
    let h = bytes.get(header..header.checked_add(30)?)?;
    if h[..4] != [0x50, 0x4b, 0x03, 0x04] {
        return None;
    }
    let name_len = u16::from_le_bytes([h[26], h[27]]) as usize;
    let extra_len = u16::from_le_bytes([h[28], h[29]]) as usize;
    let start = header + 30 + name_len + extra_len;
    (start <= bytes.len()).then_some(start)
}

pub(super) fn entry(
    file: &Arc<MappedFile>,
    records: &HashMap<String, Record>,
    prefix: &str,
    name: String,
    t: &TensorRef,
) -> Result<TensorEntry> {
    let path = file.path();
    let bad = |msg: String| Error::tensor(path, name.as_str(), msg);
    let rec_name = format!("{prefix}data/{}", t.storage.key);
    let rec = records.get(&rec_name).ok_or_else(|| {
        bad(format!(
            "its storage record '{rec_name}' is missing from the zip"
        ))
    })?;
    if rec.compressed {
        return Err(bad(format!(
            "its storage record '{rec_name}' is compressed; lorastream reads records in place and \
             needs them stored (torch.save never compresses: re-save the file with torch.save)"
        )));
    }
    let es = t.dtype.size();
    let to_usize = |v: u64, what: &str| {
        usize::try_from(v).map_err(|_| bad(format!("{what} {v} is too large")))
    };
    let shape = t
        .shape
        .iter()
        .map(|&d| to_usize(d, "size"))
        .collect::<Result<Vec<_>>>()?;
    let strides = t
        .stride
        .iter()
        .map(|&d| to_usize(d, "stride"))
        .collect::<Result<Vec<_>>>()?;
    let offset = to_usize(t.storage_offset, "storage offset")?;
    let nbytes = checked_nbytes(&shape, t.dtype)
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let storage_elems = rec.len / es;
    if nbytes == 0 {
        return Ok(TensorEntry {
            name,
            dtype: t.dtype,
            shape,
            file: Arc::clone(file),
            data: TensorData::Contiguous {
                start: rec.start,
                len: 0,
            },
        });
    }
    // The last element the view touches must lie inside the record.
    let last = shape
        .iter()
        .zip(&strides)
        .try_fold(offset, |acc, (&n, &s)| {
            acc.checked_add((n - 1).checked_mul(s)?)
        })
        .ok_or_else(|| bad("strides overflow".into()))?;
    if last >= storage_elems {
        return Err(bad(format!(
            "the view (offset {offset}, shape {shape:?}, stride {strides:?}) reaches element {last} but \
             record '{rec_name}' holds {storage_elems} elements of {} (truncated or corrupt)",
            t.dtype
        )));
    }
    // Elements of a view that fits in its storage are distinct storage elements, so a view
    // bigger than its storage overlaps itself; only its size fields say how big it is.
    if nbytes > rec.len && nbytes > MAX_OVERLAPPING_VIEW_BYTES {
        return Err(bad(format!(
            "the view (shape {shape:?}, stride {strides:?}) repeats the {} bytes of record \
             '{rec_name}' as {nbytes} bytes, more than lorastream expands ({MAX_OVERLAPPING_VIEW_BYTES}); \
             save it with .contiguous() (or .clone()) if it is meant",
            rec.len
        )));
    }
    let contiguous = is_contiguous(&shape, &strides);
    let data = if contiguous {
        TensorData::Contiguous {
            start: rec.start + offset * es,
            len: nbytes,
        }
    } else {
        TensorData::Strided {
            base: rec.start,
            offset,
            strides,
        }
    };
    Ok(TensorEntry {
        name,
        dtype: t.dtype,
        shape,
        file: Arc::clone(file),
        data,
    })
}

/// Row-major contiguity; dimensions of size 1 may have any stride (as in torch).
fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_unit_dims() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[], &[]));
    }
}
