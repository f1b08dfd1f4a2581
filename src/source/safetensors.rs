//! safetensors reader: parses and validates the JSON header up front, then hands out
//! zero-copy views into the memory map.
//!
//! The checks are the reference implementation's (offsets contiguous from 0, no gaps or
//! overlaps, each size = numel × dtype size, file length = 8 + N + data length, header at
//! most 100 MB), done here rather than through `safetensors::SafeTensors::read_metadata`
//! so that every error can name the offending tensor.

use super::{MappedFile, TensorData, TensorEntry, checked_nbytes};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use std::sync::Arc;

const MAX_HEADER: u64 = 100_000_000;

/// Reads the tensors of one safetensors file, in data order.
pub(crate) fn read(file: &Arc<MappedFile>) -> Result<Vec<TensorEntry>> {
    let path = file.path();
    let bytes = file.bytes();
    let fail = |msg: String| Error::format(path, msg);
    if bytes.len() < 8 {
        return Err(fail(format!(
            "file is {} bytes long, too short for a safetensors header (truncated?)",
            bytes.len()
        )));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER {
        return Err(fail(format!(
            "safetensors header length {n} is over the 100,000,000-byte limit (not a safetensors file, or corrupt)"
        )));
    }
    let header_end = 8 + n as usize;
    if header_end > bytes.len() {
        return Err(fail(format!(
            "safetensors header length {n} runs past the end of the file ({} bytes; truncated?)",
            bytes.len()
        )));
    }
    let text = std::str::from_utf8(&bytes[8..header_end])
        .map_err(|e| fail(format!("safetensors header is not valid UTF-8: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| fail(format!("safetensors header is not valid JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| fail("safetensors header is not a JSON object".into()))?;

    let data_start = header_end;
    let data_len = bytes.len() - data_start;
    let mut entries: Vec<(usize, usize, TensorEntry)> = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |msg: String| Error::tensor(path, name.as_str(), msg);
        let dtype_name = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("header entry has no \"dtype\" string".into()))?;
        let dtype = Dtype::from_name(dtype_name)
            .ok_or_else(|| bad(format!("unknown or unsupported dtype \"{dtype_name}\"")))?;
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("\"shape\" is not a list of sizes".into()))?;
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("\"data_offsets\" is not [begin, end]".into()))?;
        let (begin, end) = offsets;
        if end < begin {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] end before they begin"
            )));
        }
        if end > data_len as u64 {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes; truncated?)"
            )));
        }
        let (begin, end) = (begin as usize, end as usize);
        let nbytes = checked_nbytes(&shape, dtype)
            .ok_or_else(|| bad(format!("shape {shape:?} is too large to address")))?;
        if nbytes != end - begin {
            return Err(bad(format!(
                "shape {shape:?} × {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] hold {}",
                end - begin
            )));
        }
        let entry = TensorEntry {
            name: name.clone(),
            dtype,
            shape,
            file: Arc::clone(file),
            data: TensorData::Contiguous {
                start: data_start + begin,
                len: nbytes,
            },
        };
        entries.push((begin, end, entry));
    }
    entries.sort_by_key(|(b, e, _)| (*b, *e));
    let mut expect = 0usize;
    for (b, e, t) in &entries {
        if *b < expect {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "data_offsets [{b}, {e}] overlap the previous tensor (which ends at {expect})"
                ),
            ));
        }
        if *b > expect {
            return Err(Error::tensor(
                path,
                &t.name,
                format!("data_offsets [{b}, {e}] leave a gap after byte {expect}"),
            ));
        }
        expect = *e;
    }
    if expect != data_len {
        return Err(fail(format!(
            "the tensors cover {expect} bytes of data but the file holds {data_len} after the header"
        )));
    }
    Ok(entries.into_iter().map(|(_, _, t)| t).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_file(
        dir: &std::path::Path,
        name: &str,
        header: &str,
        data: &[u8],
    ) -> std::path::PathBuf {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(data).unwrap();
        p
    }

    fn read_path(p: &std::path::Path) -> Result<Vec<TensorEntry>> {
        read(&MappedFile::open(p)?)
    }

    #[test]
    fn reads_in_offset_order_zero_copy() {
        let dir = tempfile::tempdir().unwrap();
        let h = r#"{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"I16","shape":[1],"data_offsets":[0,2]},"__metadata__":{"format":"pt"}}"#;
        let p = write_file(dir.path(), "x.safetensors", h, &[1, 2, 3, 4]);
        let t = read_path(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "a");
        assert_eq!(&*t[1].bytes(), &[3, 4]);
    }

    #[test]
    fn rejects_bad_headers_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "needs 8 bytes",
            ),
            (
                r#"{"w":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}"#,
                "unknown",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"v":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
                "overlap",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
                "past the end",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[1000000000000,1000000000000],"data_offsets":[0,4]}}"#,
                "too large",
            ),
        ];
        for (h, want) in cases {
            let p = write_file(dir.path(), "bad.safetensors", h, &[0; 4]);
            let e = read_path(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("bad.safetensors"), "{e}");
        }
    }

    #[test]
    fn rejects_header_past_eof_and_short_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short.safetensors");
        std::fs::write(&p, [1, 2, 3]).unwrap();
        assert!(read_path(&p).unwrap_err().to_string().contains("too short"));
        let mut b = 1000u64.to_le_bytes().to_vec();
        b.extend(b"{}");
        std::fs::write(&p, b).unwrap();
        assert!(
            read_path(&p)
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
    }
}
