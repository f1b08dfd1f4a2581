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
use std::sync::Arc;

/// The tensors of a torch zip file, in pickle order, plus the names of skipped
/// non-tensor entries. Nested dicts are flattened with `.` between keys.
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
    let pkl_name = records
        .keys()
        .filter(|k| k.ends_with("/data.pkl") && k.matches('/').count() == 1)
        .min()
        .cloned()
        .ok_or_else(|| {
            Error::format(
                path,
                "zip file has no <folder>/data.pkl: not a torch.save checkpoint",
            )
        })?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let pkl = &records[&pkl_name];
    if pkl.compressed {
        return Err(Error::format(
            path,
            format!("record '{pkl_name}' is compressed"),
        ));
    }
    let root = pickle::load(&bytes[pkl.start..pkl.start + pkl.len])
        .map_err(|e| Error::format(path, e.to_string()))?;

    if let Some(why) = walk::root_problem(&root) {
        return Err(Error::format(path, format!("data.pkl {why}")));
    }
    let found = walk::tensors_in(&root);
    let mut tensors = Vec::with_capacity(found.tensors.len());
    for (name, t) in found.tensors {
        tensors.push(entry(file, &records, &prefix, name, &t)?);
    }
    Ok((tensors, found.skipped))
}

struct Record {
    start: usize,
    len: usize,
    compressed: bool,
}

fn records(file: &MappedFile) -> Result<HashMap<String, Record>> {
    let path = file.path();
    let bytes = file.bytes();
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        Error::format(
            path,
            format!("not a readable zip archive (truncated?): {e}"),
        )
    })?;
    let mut out = HashMap::with_capacity(zip.len());
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| Error::format(path, format!("zip entry {i} is unreadable: {e}")))?;
        let name = f
            .name()
            .map_err(|e| Error::format(path, format!("zip entry {i} has a bad name: {e}")))?
            .into_owned();
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
        out.insert(
            name,
            Record {
                start,
                len,
                compressed,
            },
        );
    }
    Ok(out)
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

fn entry(
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
