//! GGUF reader (llama.cpp's single-file format): parses and validates the whole header up
//! front — magic, version, every metadata key/value (all thirteen value types, arrays
//! included), tensor infos, `general.alignment`, each tensor's offset and size — with the
//! rules of ggml's own `gguf.cpp` reader (offsets in the canonical packed layout, each one
//! aligned, every tensor inside the file), so nothing read later can fail or panic.
//!
//! Tensors are entries in PyTorch order (ggml's `ne` reversed: `ne[0]` is the innermost,
//! contiguous dimension). F32/F16/BF16/F64 and the integer types are plain contiguous
//! entries; the block-quantized types are [`TensorData::Decoded`] entries of dtype f32,
//! decoded a band at a time exactly as `gguf.quants.dequantize` does (see [`quants`]).
//! Names and row order are the file's: no renaming, no undoing of llama.cpp's q/k row
//! permutation.

#[rustfmt::skip]
mod iq_grids;
pub mod quants;

use super::{Decode, MappedFile, TensorData, TensorEntry};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use quants::GgmlType;
use std::sync::Arc;

/// "GGUF" read as a little-endian u32.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Used when the file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// A metadata value, as GGUF types it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type id and the elements (all of that type).
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// GGUF's name of a value type id (`GGUFValueType`).
    pub fn type_name(id: u32) -> &'static str {
        [
            "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING",
            "ARRAY", "UINT64", "INT64", "FLOAT64",
        ]
        .get(id as usize)
        .copied()
        .unwrap_or("?")
    }

    /// The value as JSON, for `inspect --json` (arrays longer than `max` are cut, with a
    /// count of the rest, so a 150 000-token vocabulary does not flood the terminal).
    pub fn to_json(&self, max: usize) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::U8(v) => json!(v),
            Value::I8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::I16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::I32(v) => json!(v),
            Value::F32(v) => json!(v),
            Value::Bool(v) => json!(v),
            Value::Str(v) => json!(v),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::F64(v) => json!(v),
            Value::Array(t, items) => {
                let mut shown: Vec<serde_json::Value> =
                    items.iter().take(max).map(|v| v.to_json(max)).collect();
                if items.len() > max {
                    shown.push(json!(format!(
                        "… {} more {}",
                        items.len() - max,
                        Value::type_name(*t)
                    )));
                }
                serde_json::Value::Array(shown)
            }
        }
    }
}

/// One metadata key/value pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Kv {
    pub key: String,
    /// Value type id.
    pub ty: u32,
    pub value: Value,
    /// Byte offset of the value in the file (after its type id).
    pub value_at: usize,
}

/// One tensor info.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` is the contiguous dimension.
    pub ne: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset in the file (data section start + the stored offset).
    pub start: usize,
    /// Stored bytes.
    pub nbytes: usize,
}

impl TensorInfo {
    /// The PyTorch shape (`ne` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed, validated GGUF file.
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    pub kvs: Vec<Kv>,
    /// Where the key/value section is in the file: a writer copies it byte for byte.
    pub kv_bytes: std::ops::Range<usize>,
    pub tensors: Vec<TensorInfo>,
    /// Start of the data section (aligned).
    pub data_start: usize,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kvs.iter().find(|k| k.key == key).map(|k| &k.value)
    }

    /// `general.architecture`, when it is a string.
    pub fn architecture(&self) -> Option<&str> {
        match self.get("general.architecture") {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The metadata as a JSON object in file order (arrays cut after `max` items).
    pub fn metadata_json(&self, max: usize) -> serde_json::Value {
        serde_json::Value::Object(
            self.kvs
                .iter()
                .map(|k| (k.key.clone(), k.value.to_json(max)))
                .collect(),
        )
    }
}

/// A cursor over the header bytes; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        match self.at.checked_add(n).filter(|&e| e <= self.b.len()) {
            Some(end) => {
                let s = &self.b[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(format!(
                "{what} at byte {} runs past the end of the file ({} bytes; truncated?)",
                self.at,
                self.b.len()
            )),
        }
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn arr<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.left())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {} claims {n} bytes, more than the file holds (truncated or corrupt?)",
                    self.at
                )
            })?;
        let s = self.take(n, what)?;
        // GGUF strings are UTF-8; a vocabulary with stray bytes is still shown, lossily
        // (writers copy the original bytes).
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, in_array: bool) -> std::result::Result<Value, String> {
        let what = format!("value of '{key}'");
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(&what)?[0]),
            1 => Value::I8(self.arr::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.arr(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.arr(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(&what)?)),
            7 => Value::Bool(self.arr::<1>(&what)?[0] != 0),
            8 => Value::Str(self.string(&what)?),
            9 if in_array => {
                return Err(format!(
                    "'{key}' is an array of arrays, which GGUF readers (ggml's gguf.cpp) do not accept"
                ));
            }
            9 => {
                let et = self.u32(&what)?;
                let n = self.u64(&what)?;
                // Every element takes at least one byte (a string eight): a count the rest
                // of the file cannot hold is refused before anything is allocated.
                let min = match et {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| n.checked_mul(min).is_some_and(|b| b <= self.left()))
                    .ok_or_else(|| {
                        format!("'{key}' claims {n} array elements, more than the file holds (truncated or corrupt?)")
                    })?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(et, key, true)?);
                }
                Value::Array(et, items)
            }
            10 => Value::U64(u64::from_le_bytes(self.arr(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.arr(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(&what)?)),
            t => return Err(format!("'{key}' has unknown value type {t}")),
        })
    }
}

/// Whether the bytes start like a GGUF file.
pub fn looks_gguf(b: &[u8]) -> bool {
    b.starts_with(MAGIC)
}

/// Parses and validates the header of a GGUF file held in `b` (errors name `path`).
pub fn parse(b: &[u8], path: &std::path::Path) -> Result<GgufFile> {
    let fail = |m: String| Error::format(path, m);
    let mut r = Reader { b, at: 0 };
    let magic = r.take(4, "GGUF magic").map_err(fail)?;
    if magic != MAGIC {
        return Err(fail("not a GGUF file (no GGUF magic)".into()));
    }
    let version = r.u32("GGUF version").map_err(fail)?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(fail(
                "GGUF version 1 (32-bit counts, from 2023) is not supported: re-save it with a current llama.cpp".into(),
            ));
        }
        v if v.swap_bytes() <= 3 => {
            return Err(fail(format!(
                "a big-endian GGUF (version {}): only little-endian GGUF files are supported",
                v.swap_bytes()
            )));
        }
        v => {
            return Err(fail(format!(
                "unknown GGUF version {v} (2 and 3 are supported)"
            )));
        }
    }
    let n_tensors = r.u64("tensor count").map_err(fail)?;
    let n_kv = r.u64("metadata count").map_err(fail)?;
    // A key/value pair takes at least 13 bytes, a tensor info at least 24.
    if n_kv.checked_mul(13).is_none_or(|b| b > r.left() as u64) {
        return Err(fail(format!(
            "header claims {n_kv} metadata entries, more than the file can hold (corrupt?)"
        )));
    }
    if n_tensors
        .checked_mul(24)
        .is_none_or(|b| b > r.left() as u64)
    {
        return Err(fail(format!(
            "header claims {n_tensors} tensors, more than the file can hold (corrupt?)"
        )));
    }
    let kv_start = r.at;
    let mut kvs: Vec<Kv> = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r
            .string(&format!("key of metadata entry {i}"))
            .map_err(fail)?;
        if kvs.iter().any(|k| k.key == key) {
            return Err(fail(format!("metadata key '{key}' appears twice")));
        }
        let ty = r.u32(&format!("type of '{key}'")).map_err(fail)?;
        let value_at = r.at;
        let value = r.value(ty, &key, false).map_err(fail)?;
        kvs.push(Kv {
            key,
            ty,
            value,
            value_at,
        });
    }
    let kv_bytes = kv_start..r.at;
    let alignment = match kvs.iter().find(|k| k.key == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Kv {
            value: Value::U32(a),
            ..
        }) if a.is_power_of_two() => *a as u64,
        Some(k) => {
            return Err(fail(format!(
                "general.alignment must be a UINT32 power of two, not {:?}",
                k.value
            )));
        }
    };
    struct Raw {
        name: String,
        ne: Vec<u64>,
        ty: GgmlType,
        offset: u64,
    }
    let mut raws: Vec<Raw> = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("name of tensor {i}")).map_err(fail)?;
        let bad = |m: String| Error::tensor(path, &name, m);
        if !names.insert(name.clone()) {
            return Err(bad("appears twice in the tensor infos".into()));
        }
        let nd = r.u32("dimension count").map_err(bad)?;
        if nd > MAX_DIMS {
            return Err(bad(format!(
                "has {nd} dimensions; ggml tensors have at most {MAX_DIMS}"
            )));
        }
        let mut ne = Vec::with_capacity(nd as usize);
        for _ in 0..nd {
            let d = r.u64("dimension").map_err(bad)?;
            if d > i64::MAX as u64 {
                return Err(bad(format!("dimension {d} is negative as ggml's int64")));
            }
            ne.push(d);
        }
        let tid = r.u32("tensor type").map_err(bad)?;
        let ty =
            GgmlType::from_id(tid).ok_or_else(|| bad(format!("unknown ggml tensor type {tid}")))?;
        let offset = r.u64("tensor offset").map_err(bad)?;
        raws.push(Raw {
            name,
            ne,
            ty,
            offset,
        });
    }
    let data_start = (r.at as u64)
        .checked_next_multiple_of(alignment)
        .filter(|&s| s <= b.len() as u64)
        .ok_or_else(|| {
            fail(format!(
                "the data section (after the header's {} bytes, aligned to {alignment}) starts past the end of the file (truncated?)",
                r.at
            ))
        })? as usize;
    let mut tensors = Vec::with_capacity(raws.len());
    // ggml's rule: tensor data is packed in info order, each start aligned.
    let mut expect = 0u64;
    for t in raws {
        let bad = |m: String| Error::tensor(path, &t.name, m);
        let bs = t.ty.block_size() as u64;
        let ne0 = t.ne.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(bs) {
            return Err(bad(format!(
                "row length {ne0} is not a multiple of the {} block size {bs}",
                t.ty
            )));
        }
        let nbytes =
            t.ne.iter()
                .skip(1)
                .try_fold(
                    (ne0 / bs).checked_mul(t.ty.type_size() as u64),
                    |acc, &d| Some(acc?.checked_mul(d)),
                )
                .flatten()
                .ok_or_else(|| bad(format!("shape {:?} is too large to address", t.ne)))?;
        if t.offset != expect {
            return Err(bad(format!(
                "data offset {} is not where the previous tensor's data ends ({expect}, aligned to {alignment}) as GGUF requires",
                t.offset
            )));
        }
        let start = (data_start as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(nbytes));
        if end.is_none_or(|e| e > b.len() as u64) {
            return Err(bad(format!(
                "data [{}, +{nbytes}) runs past the end of the file ({} bytes; truncated?)",
                t.offset,
                b.len()
            )));
        }
        expect = (t.offset + nbytes)
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| bad("data offset overflows".into()))?;
        tensors.push(TensorInfo {
            name: t.name,
            ne: t.ne,
            ty: t.ty,
            start: start.unwrap_or(0) as usize,
            nbytes: nbytes as usize,
        });
    }
    Ok(GgufFile {
        version,
        alignment,
        kvs,
        kv_bytes,
        tensors,
        data_start,
    })
}

/// The dtype of a plain (one element per block) ggml type.
fn plain_dtype(ty: GgmlType) -> Option<Dtype> {
    Some(match ty {
        GgmlType::F32 => Dtype::F32,
        GgmlType::F16 => Dtype::F16,
        GgmlType::BF16 => Dtype::BF16,
        GgmlType::F64 => Dtype::F64,
        GgmlType::I8 => Dtype::I8,
        GgmlType::I16 => Dtype::I16,
        GgmlType::I32 => Dtype::I32,
        GgmlType::I64 => Dtype::I64,
        _ => return None,
    })
}

/// Decodes a block-quantized tensor to f32, a band of blocks at a time.
#[derive(Debug)]
pub struct Blocks {
    file: Arc<MappedFile>,
    start: usize,
    nbytes: usize,
    ty: GgmlType,
}

impl Blocks {
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }
}

impl Decode for Blocks {
    fn decode_into(&self, from: usize, out: &mut [u8]) {
        let (bs, ts) = (self.ty.block_size(), self.ty.type_size());
        let n = out.len() / 4;
        let data = &self.file.bytes()[self.start..self.start + self.nbytes];
        let mut block = [0f32; quants::QK_K];
        let mut at = from;
        let mut o = 0;
        while o < n {
            let b = at / bs;
            let within = at % bs;
            let Some(src) = data.get(b * ts..(b + 1) * ts) else {
                return;
            };
            quants::decode_block(self.ty, src, &mut block[..bs]);
            let take = (bs - within).min(n - o);
            for (k, v) in block[within..within + take].iter().enumerate() {
                out[(o + k) * 4..(o + k) * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            o += take;
            at += take;
        }
    }
    fn stored_form(&self) -> String {
        self.ty.name().to_string()
    }
    fn stored_bytes(&self) -> u64 {
        self.nbytes as u64
    }
    fn stored_ranges(&self) -> Vec<(Arc<MappedFile>, usize, usize)> {
        vec![(self.file.clone(), self.start, self.nbytes)]
    }
}

/// The dtype a tensor of type `ty` reads as: its own for the plain types, else f32 (the
/// dequantized values).
pub fn value_dtype(ty: GgmlType) -> Dtype {
    plain_dtype(ty).unwrap_or(Dtype::F32)
}

/// The dtype a tensor of type `ty` is read as, if lorastream reads its values at all.
pub fn reads_as(ty: GgmlType) -> Option<Dtype> {
    plain_dtype(ty).or(ty.decodes().then_some(Dtype::F32))
}

/// The entry of one validated tensor info.
pub fn entry(file: &Arc<MappedFile>, t: &TensorInfo) -> Result<TensorEntry> {
    let data = if plain_dtype(t.ty).is_some() {
        TensorData::Contiguous {
            start: t.start,
            len: t.nbytes,
        }
    } else if t.ty.decodes() {
        TensorData::Decoded {
            decoder: Arc::new(Blocks {
                file: file.clone(),
                start: t.start,
                nbytes: t.nbytes,
                ty: t.ty,
            }),
            offset: 0,
        }
    } else {
        return Err(Error::tensor(
            file.path(),
            &t.name,
            format!(
                "ggml type {} cannot be dequantized by lorastream (gguf.quants has no dequantizer \
                 for it; supported: F32, F16, BF16, F64, I8-I64, {}); only `convert` to a .gguf \
                 (which copies it as stored) and `inspect` read this file",
                t.ty,
                GgmlType::decodable_names()
            ),
        ));
    };
    let shape = t.shape();
    if super::checked_nbytes(&shape, plain_dtype(t.ty).unwrap_or(Dtype::F32)).is_none() {
        return Err(Error::tensor(
            file.path(),
            &t.name,
            "dequantized size is too large to address",
        ));
    }
    Ok(TensorEntry {
        name: t.name.clone(),
        dtype: plain_dtype(t.ty).unwrap_or(Dtype::F32),
        shape,
        file: file.clone(),
        data,
    })
}

/// Reads the tensors of one GGUF file, in file order.
pub(crate) fn read(file: &Arc<MappedFile>) -> Result<Vec<TensorEntry>> {
    let g = parse(file.bytes(), file.path())?;
    g.tensors.iter().map(|t| entry(file, t)).collect()
}

/// Opens and parses a GGUF file (for `inspect` and the GGUF writer's jobs).
pub fn open(path: &std::path::Path) -> Result<(Arc<MappedFile>, GgufFile)> {
    let file = MappedFile::open(path)?;
    let g = parse(file.bytes(), path)?;
    Ok((file, g))
}

#[cfg(test)]
mod quant_tests;
#[cfg(test)]
mod tests;
