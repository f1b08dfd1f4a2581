//! PyTorch zip checkpoints (`torch.save`, torch >= 1.6): `.pth`, `.pt`, `.bin`.
//!
//! The zip's central directory (read with the `zip` crate) gives each record's place; the
//! restricted pickle reader turns `data.pkl` into tensor descriptions; each tensor's bytes
//! are then a slice of the memory map at its record's offset. Records must be stored
//! uncompressed, which torch always does.

use super::pickle::{self, Id, Pickle, TensorRef, Value};
use super::{MappedFile, TensorData, TensorEntry, checked_nbytes};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// Deepest nesting of dicts accepted (a state dict nests a few levels; torch's own loader
/// overflows its stack near 1000).
pub(crate) const MAX_DEPTH: usize = 1000;
/// Most names (tensors plus skipped entries) a file may list, counting every key path
/// through shared dicts: 4 per byte of `data.pkl` (each entry of an unshared dict costs
/// it several bytes, so this only stops sharing that multiplies names), and at least
/// this many for small files.
pub(crate) const MIN_NAME_LIMIT: u64 = 1 << 20;
/// Most bytes all those names may take together: 16 per byte of `data.pkl`, at least
/// this many.
pub(crate) const MIN_NAME_BYTES_LIMIT: u64 = 64 << 20;

/// The name limits for a `data.pkl` of `len` bytes: (names, bytes of names).
fn name_limits(len: usize) -> (u64, u64) {
    let len = len as u64;
    (
        len.saturating_mul(4).max(MIN_NAME_LIMIT),
        len.saturating_mul(16).max(MIN_NAME_BYTES_LIMIT),
    )
}
/// Largest view that overlaps itself (stride 0, as `expand` makes) whose bytes lorastream
/// will gather: beyond the storage's own size, a size field alone would drive the
/// allocation.
pub(crate) const MAX_OVERLAPPING_VIEW_BYTES: usize = 1 << 30;

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
    let pickled = pickle::load(&bytes[pkl.start..pkl.start + pkl.len])
        .map_err(|e| Error::format(path, e.to_string()))?;
    let (leaves, skipped) = flatten(path, &pickled, name_limits(pkl.len))?;
    // The tensors hold what they need; the rest of the pickle can go before the entries
    // are made.
    drop(pickled);

    let mut tensors = Vec::with_capacity(leaves.len());
    for (name, t) in leaves {
        tensors.push(entry(file, &records, &prefix, name, &t)?);
    }
    Ok((tensors, skipped))
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

/// Named tensor leaves and the names of skipped non-tensor entries.
type Flat = (Vec<(String, Rc<TensorRef>)>, Vec<String>);

/// Tensor leaves and skipped names of a pickled state dict, nested dicts joined with `.`.
///
/// A dict reached under several keys (shared through the memo) lists its entries under
/// every key path, as `torch.load` shows them. A first pass visits each dict once (by
/// identity, iteratively) and counts the names that would result, so a dict holding
/// itself, dicts nested past [`MAX_DEPTH`], or sharing that multiplies the names past
/// `limits` (names, bytes of names; see [`name_limits`]: a "billion laughs" file) are
/// refused before any
/// name is built; the second pass then costs what it returns.
fn flatten(path: &Path, p: &Pickle, limits: (u64, u64)) -> Result<Flat> {
    let Value::Dict(root) = p.root else {
        return Err(Error::format(
            path,
            "data.pkl does not hold a dict of tensors (a whole pickled model or another object?)",
        ));
    };
    let sizes = count_names(path, p, root)?;
    let (names, name_bytes) = sizes[root.0].unwrap_or((0, 0));
    let (max_names, max_bytes) = limits;
    if names > max_names || name_bytes > max_bytes {
        return Err(Error::format(
            path,
            format!(
                "data.pkl would list {names} names ({name_bytes} bytes of names) through dicts \
                 shared under several keys; lorastream stops at {max_names} names and \
                 {max_bytes} bytes of names for a data.pkl of this size (a corrupt or \
                 hostile file?)"
            ),
        ));
    }
    let mut leaves = Vec::new();
    let mut skipped = Vec::new();
    // (dict, next entry, prefix of its names)
    let mut stack: Vec<(Id, usize, String)> = vec![(root, 0, String::new())];
    while let Some((id, i, prefix)) = stack.last_mut() {
        let items = p.arena.dict(*id).map(|d| d.items()).unwrap_or(&[]);
        let Some((k, val)) = items.get(*i) else {
            stack.pop();
            continue;
        };
        *i += 1;
        let Some(key) = key_text(k) else {
            skipped.push(format!("{prefix}<non-string key>"));
            continue;
        };
        let name = format!("{prefix}{key}");
        match val {
            Value::Tensor(t) => leaves.push((name, t.clone())),
            Value::Dict(c) => {
                // A dict that lists nothing is not entered: sharing it costs nothing.
                if sizes[c.0].is_some_and(|(n, _)| n > 0) {
                    stack.push((*c, 0, name + "."));
                }
            }
            _ => skipped.push(name),
        }
    }
    Ok((leaves, skipped))
}

fn key_text(k: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match k {
        Value::Str(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Int(i) => Some(std::borrow::Cow::Owned(i.to_string())),
        _ => None,
    }
}

/// For each dict reachable from `root` through dict values: how many names it lists and
/// how many bytes they take (saturating). Each dict is visited once; a cycle or nesting
/// past [`MAX_DEPTH`] is an error naming the key path.
fn count_names(path: &Path, p: &Pickle, root: Id) -> Result<Vec<Option<(u64, u64)>>> {
    let mut sizes: Vec<Option<(u64, u64)>> = vec![None; p.arena.len()];
    let mut on_path = vec![false; p.arena.len()];
    // (dict, next entry, names so far, bytes so far)
    let mut stack: Vec<(Id, usize, u64, u64)> = vec![(root, 0, 0, 0)];
    on_path[root.0] = true;
    let key_path = |stack: &[(Id, usize, u64, u64)]| -> String {
        let keys: Vec<String> = stack
            .iter()
            .take(8)
            .filter_map(|(id, i, ..)| {
                let (k, _) = p.arena.dict(*id)?.items().get(i.checked_sub(1)?)?;
                Some(key_text(k).map_or("<non-string key>".into(), |k| k.into_owned()))
            })
            .collect();
        let more = if stack.len() > 9 { ".…" } else { "" };
        format!("{}{more}", keys.join("."))
    };
    while let Some(&mut (id, ref mut i, ref mut names, ref mut bytes)) = stack.last_mut() {
        let items = p.arena.dict(id).map(|d| d.items()).unwrap_or(&[]);
        let Some((k, val)) = items.get(*i) else {
            let done = (*names, *bytes);
            sizes[id.0] = Some(done);
            on_path[id.0] = false;
            stack.pop();
            if let Some((pid, pi, pn, pb)) = stack.last_mut() {
                let key_len = p
                    .arena
                    .dict(*pid)
                    .and_then(|d| d.items().get(*pi - 1))
                    .and_then(|(k, _)| key_text(k))
                    .map_or(0, |k| k.len() as u64);
                *pn = pn.saturating_add(done.0);
                *pb = pb
                    .saturating_add(done.0.saturating_mul(key_len + 1))
                    .saturating_add(done.1);
            }
            continue;
        };
        *i += 1;
        let key_len = key_text(k).map_or("<non-string key>".len(), |k| k.len()) as u64;
        match val {
            Value::Dict(c) if key_text(k).is_some() => {
                if on_path[c.0] {
                    return Err(Error::format(
                        path,
                        format!(
                            "data.pkl: the dict at '{}' contains itself (a reference cycle); a \
                             state dict is a tree of dicts",
                            key_path(&stack)
                        ),
                    ));
                }
                match sizes[c.0] {
                    Some(done) => {
                        *names = names.saturating_add(done.0);
                        *bytes = bytes
                            .saturating_add(done.0.saturating_mul(key_len + 1))
                            .saturating_add(done.1);
                    }
                    None => {
                        if stack.len() >= MAX_DEPTH {
                            return Err(Error::format(
                                path,
                                format!(
                                    "data.pkl nests dicts more than {MAX_DEPTH} deep (at '{}'); \
                                     a state dict nests a few levels (corrupt or hostile file?)",
                                    key_path(&stack)
                                ),
                            ));
                        }
                        on_path[c.0] = true;
                        stack.push((*c, 0, 0, 0));
                    }
                }
            }
            _ => {
                *names = names.saturating_add(1);
                *bytes = bytes.saturating_add(key_len);
            }
        }
    }
    Ok(sizes)
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

    const FILE: &str = "/models/evil.pth";

    fn flat(body: &[u8]) -> Result<Flat> {
        let mut p = vec![0x80, 2];
        p.extend(body);
        p.push(b'.');
        flatten(
            Path::new(FILE),
            &pickle::load(&p).unwrap(),
            name_limits(p.len()),
        )
    }

    fn s(text: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((text.len() as u32).to_le_bytes());
        v.extend(text.as_bytes());
        v
    }

    /// Pushes a float tensor of one element on storage `key`.
    fn tensor(key: &str) -> Vec<u8> {
        let mut v = b"ctorch._utils\n_rebuild_tensor_v2\n((".to_vec();
        v.extend(s("storage"));
        v.extend(b"ctorch\nFloatStorage\n");
        v.extend(s(key));
        v.extend(s("cpu"));
        v.extend(b"K\x01tQK\x00K\x01\x85K\x01\x85\x89)tR");
        v
    }

    fn err(r: Result<Flat>) -> String {
        let e = r.expect_err("must be refused").to_string();
        assert!(e.contains(FILE), "{e}");
        e
    }

    /// Regression: a dict holding itself overflowed the stack in flatten.
    #[test]
    fn a_dict_that_contains_itself_is_refused() {
        let mut b = b"}q\x00".to_vec();
        b.extend(s("a"));
        b.extend(b"}q\x01");
        b.extend(s("b"));
        b.extend(b"h\x00ss"); // d0["a"] = d1, d1["b"] = d0
        let e = err(flat(&b));
        assert!(e.contains("the dict at 'a.b' contains itself"), "{e}");
        let mut b = b"}q\x00".to_vec();
        b.extend(s("me"));
        b.extend(b"h\x00s");
        assert!(err(flat(&b)).contains("at 'me' contains itself"));
    }

    /// Regression: dicts nested 40,000 deep overflowed the stack in flatten.
    #[test]
    fn dicts_nested_40000_deep_are_refused() {
        let mut b = Vec::new();
        for _ in 0..40_000 {
            b.push(b'}');
            b.extend(s("k"));
        }
        b.push(b'}');
        b.extend(std::iter::repeat_n(b's', 40_000));
        let e = err(flat(&b));
        assert!(
            e.contains("nests dicts more than 1000 deep (at 'k.k.k.k.k.k.k.k.…')"),
            "{e}"
        );
        // 999 levels are fine.
        let mut b = Vec::new();
        for _ in 0..999 {
            b.push(b'}');
            b.extend(s("k"));
        }
        b.extend(tensor("0"));
        b.extend(std::iter::repeat_n(b's', 999));
        let (leaves, _) = flat(&b).unwrap();
        assert_eq!(leaves.len(), 1);
        assert_eq!(leaves[0].0.len(), 999 * 2 - 1);
    }

    /// d0 = {"x": leaf}; d_i = {"a": d_{i-1}, "b": d_{i-1}} for i in 1..=levels.
    fn laughs(leaf: &[u8], levels: u8) -> Vec<u8> {
        let mut b = b"}".to_vec();
        b.extend(s("x"));
        b.extend(leaf);
        b.extend(b"sq\x00");
        for i in 1..=levels {
            b.extend(b"}(");
            b.extend(s("a"));
            b.extend([b'h', i - 1]);
            b.extend(s("b"));
            b.extend([b'h', i - 1]);
            b.extend([b'u', b'q', i]);
        }
        b
    }

    /// Regression: a dict reached twice through the memo was walked once per path; 40
    /// levels of sharing (2^40 paths) hung, and with a non-tensor leaf the skipped-names
    /// list ate all memory. Now each dict is counted once and the file refused.
    #[test]
    fn billion_laughs_are_refused_without_walking_the_paths() {
        for leaf in [b"K\x01".to_vec(), tensor("0")] {
            let e = err(flat(&laughs(&leaf, 40)));
            assert!(e.contains("would list 1099511627776 names"), "{e}");
            assert!(e.contains("through dicts shared under several keys"), "{e}");
        }
        // Shared dicts that list nothing cost nothing, however often they are shared.
        let mut b = b"}q\x00".to_vec();
        for i in 1..=60u8 {
            b.extend(b"}(");
            b.extend(s("a"));
            b.extend([b'h', i - 1]);
            b.extend(s("b"));
            b.extend([b'h', i - 1]);
            b.extend([b'u', b'q', i]);
        }
        let (leaves, skipped) = flat(&b).unwrap();
        assert!(leaves.is_empty() && skipped.is_empty());
        // 2^20 names from a tiny file is the least a file may list; one more level is not.
        assert_eq!(flat(&laughs(b"N", 20)).unwrap().1.len(), 1 << 20);
        let e = err(flat(&laughs(b"N", 21)));
        assert!(e.contains("would list 2097152 names"), "{e}");
        assert!(
            e.contains("stops at 1048576 names and 67108864 bytes of names"),
            "{e}"
        );
    }

    /// A dict shared under two keys lists its tensors under both paths, as torch.load shows
    /// them (tied weights stay tied: one storage).
    #[test]
    fn shared_dicts_list_every_key_path() {
        let (leaves, skipped) = flat(&laughs(&tensor("0"), 2)).unwrap();
        let names: Vec<&str> = leaves.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.a.x", "a.b.x", "b.a.x", "b.b.x"]);
        assert!(leaves.iter().all(|(_, t)| Rc::ptr_eq(t, &leaves[0].1)));
        assert!(skipped.is_empty());
        let (leaves, skipped) = flat(&laughs(b"N", 3)).unwrap();
        assert!(leaves.is_empty());
        assert_eq!(skipped.len(), 8);
        assert_eq!(skipped[7], "b.b.b.x");
        // Non-string keys are named as such; int keys become text.
        let mut b = b"}".to_vec();
        b.extend(b"K\x07");
        b.extend(tensor("0"));
        b.extend(b"s)N");
        b.extend(b"s");
        let (leaves, skipped) = flat(&b).unwrap();
        assert_eq!(leaves[0].0, "7");
        assert_eq!(skipped, ["<non-string key>"]);
    }

    #[test]
    fn contiguity_ignores_unit_dims() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[], &[]));
    }
}
