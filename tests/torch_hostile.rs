//! End-to-end regressions for hostile or broken PyTorch zip checkpoints found by fuzzing:
//! each file is built here (a stored zip around a hand-written pickle) and the real binary
//! must refuse it with an error naming the file, or read it in bounded memory — never
//! crash, hang, or leave a half-written output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lorastream")
}

/// A zip of stored records, as torch.save writes them (no compression, no data descriptors).
fn zip(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in records {
        let crc = crc32fast::hash(data);
        let at = out.len() as u32;
        let fixed = |v: &mut Vec<u8>| {
            v.extend(20u16.to_le_bytes()); // version needed
            v.extend(0u16.to_le_bytes()); // flags
            v.extend(0u16.to_le_bytes()); // stored
            v.extend(0u32.to_le_bytes()); // time, date
            v.extend(crc.to_le_bytes());
            v.extend((data.len() as u32).to_le_bytes());
            v.extend((data.len() as u32).to_le_bytes());
            v.extend((name.len() as u16).to_le_bytes());
            v.extend(0u16.to_le_bytes()); // extra
        };
        out.extend(0x04034b50u32.to_le_bytes());
        fixed(&mut out);
        out.extend(name.as_bytes());
        out.extend(*data);
        central.extend(0x02014b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // made by
        fixed(&mut central);
        central.extend([0u8; 6]); // comment len, disk, internal attrs
        central.extend(0u32.to_le_bytes()); // external attrs
        central.extend(at.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let cd_at = out.len() as u32;
    out.extend(&central);
    out.extend(0x06054b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_at.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

fn s(text: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((text.len() as u32).to_le_bytes());
    v.extend(text.as_bytes());
    v
}

/// `{"w": view}`: a float view of storage "0" (one element) with the given shape and strides.
fn view_pickle(shape: &[u32], stride: &[u32]) -> Vec<u8> {
    let ints = |v: &[u32]| {
        let mut b = vec![b'('];
        for &x in v {
            b.push(b'J');
            b.extend(x.to_le_bytes());
        }
        b.push(b't');
        b
    };
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01".to_vec();
    p.extend(s("w"));
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(s("storage"));
    p.extend(b"ctorch\nFloatStorage\n");
    p.extend(s("0"));
    p.extend(s("cpu"));
    p.extend(b"K\x01tQK\x00");
    p.extend(ints(shape));
    p.extend(ints(stride));
    p.extend(b"\x89h\x00)RtRs.");
    p
}

fn write_pth(dir: &Path, name: &str, pkl: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let bytes = zip(&[
        ("archive/data.pkl", pkl),
        ("archive/data/0", &1.5f32.to_le_bytes()),
    ]);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(bin());
    for a in args {
        c.arg(a);
    }
    c.output().expect("run lorastream")
}

/// Refused with exit 1 and a message naming the file and containing `want`.
fn refused(o: &Output, file: &Path, want: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&*file.to_string_lossy()), "{err}");
    assert!(err.contains(want), "{err}");
}

/// Regression: a stride-0 view of a 4-byte storage claiming 2^40 elements made `convert`
/// allocate 4 TiB and abort, leaving its temp file.
#[test]
fn a_broadcast_view_claiming_4_tib_is_refused_and_nothing_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let pth = write_pth(
        dir.path(),
        "evil.pth",
        &view_pickle(&[1 << 20, 1 << 20], &[0, 0]),
    );
    let want = "repeats the 4 bytes of record 'archive/data/0' as 4398046511104 bytes";
    refused(&run(&[&"inspect", &pth]), &pth, want);
    let out = dir.path().join("out.safetensors");
    refused(&run(&[&"convert", &pth, &out]), &pth, want);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["evil.pth"], "convert left files behind");
}

/// A broadcast view of reasonable size (64 MiB from 4 bytes) converts, gathered a band at a
/// time: the output holds the repeated value and the run stays far below the view's size.
#[test]
fn a_broadcast_view_converts_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let pth = write_pth(dir.path(), "bc.pth", &view_pickle(&[4096, 4096], &[0, 0]));
    let out = dir.path().join("out.safetensors");
    let o = run(&[&"convert", &"--json", &pth, &out]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = &bytes[8 + n..];
    assert_eq!(data.len(), 4096 * 4096 * 4);
    assert!(data.chunks(4).all(|c| c == 1.5f32.to_le_bytes()));
    let rss = report["peak_rss_bytes"].as_u64().unwrap_or(0);
    assert!(
        rss < 64 << 20,
        "peak RSS {rss} bytes: the view was materialised"
    );
}

/// Regression: a dict containing itself overflowed the stack.
#[test]
fn a_self_containing_dict_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = b"\x80\x02}q\x00".to_vec();
    p.extend(s("loop"));
    p.extend(b"h\x00s.");
    let pth = write_pth(dir.path(), "cycle.pth", &p);
    refused(
        &run(&[&"inspect", &pth]),
        &pth,
        "the dict at 'loop' contains itself",
    );
}

/// Regression: a 2 KB "billion laughs" file (40 levels of a dict shared twice) hung.
#[test]
fn a_billion_laughs_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = b"\x80\x02}".to_vec();
    p.extend(s("x"));
    p.extend(b"K\x01sq\x00");
    for i in 1..=40u8 {
        p.extend(b"}(");
        p.extend(s("a"));
        p.extend([b'h', i - 1]);
        p.extend(s("b"));
        p.extend([b'h', i - 1]);
        p.extend([b'u', b'q', i]);
    }
    p.push(b'.');
    let pth = write_pth(dir.path(), "laughs.pth", &p);
    assert!(std::fs::metadata(&pth).unwrap().len() < 2048);
    refused(
        &run(&[&"inspect", &"--json", &pth]),
        &pth,
        "would list 1099511627776 names",
    );
}
