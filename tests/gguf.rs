//! GGUF end to end through the CLI, against the committed fixtures in `fixtures/gguf/`
//! (written by the `gguf` package's GGUFWriter, `fixtures/make_gguf_fixtures.py`): convert
//! to safetensors gives `gguf.quants.dequantize`'s values, a GGUF rewrite is the same file,
//! re-encoding round-trips through the reader, and bad requests fail with nothing written.

use lorastream::source;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gguf")
}

fn cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn gguf_to_safetensors_equals_the_reference_and_gguf_rewrites_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("m.safetensors");
    let src = fixtures().join("types.gguf");
    let o = cli(&[
        "convert".as_ref(),
        src.as_os_str(),
        st.as_os_str(),
        "-q".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = source::open(&st).unwrap();
    let want = source::open(&fixtures().join("types.expected.safetensors")).unwrap();
    assert_eq!(got.tensors.len(), want.tensors.len());
    for w in &want.tensors {
        let g = got.get(&w.name).unwrap();
        assert_eq!(g.shape, w.shape, "{}", w.name);
        if g.dtype == lorastream::Dtype::BF16 {
            let widened: Vec<u8> = g
                .bytes()
                .chunks_exact(2)
                .flat_map(|c| ((u16::from_le_bytes([c[0], c[1]]) as u32) << 16).to_le_bytes())
                .collect();
            assert_eq!(widened, &w.bytes()[..], "{}", w.name);
        } else {
            assert_eq!(g.bytes(), w.bytes(), "{}", w.name);
        }
    }
    for name in ["types.gguf", "aligned64.gguf"] {
        let src = fixtures().join(name);
        let out = dir.path().join(name);
        let o = cli(&[
            "convert".as_ref(),
            src.as_os_str(),
            out.as_os_str(),
            "-q".as_ref(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&src).unwrap(),
            "{name}"
        );
    }
}

/// F16 re-encoding of every 2-D tensor: the output parses, keeps 1-D tensors as stored and
/// holds each 2-D tensor's values rounded to f16.
#[test]
fn gguf_type_f16_reencodes_2d_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("types.gguf");
    let out = dir.path().join("f16.gguf");
    let o = cli(&[
        "convert".as_ref(),
        src.as_os_str(),
        out.as_os_str(),
        "--gguf-type".as_ref(),
        "F16".as_ref(),
        "-q".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = source::open(&src).unwrap();
    let b = source::open(&out).unwrap();
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!((x.name.as_str(), &x.shape), (y.name.as_str(), &y.shape));
        if x.shape.len() < 2 {
            assert_eq!(x.bytes(), y.bytes(), "{}", x.name);
            continue;
        }
        assert_eq!(y.dtype, lorastream::Dtype::F16, "{}", x.name);
        let mut want = Vec::new();
        lorastream::dtype::cast_float(x.dtype, lorastream::Dtype::F16, &x.bytes(), &mut want);
        assert_eq!(&y.bytes()[..], &want[..], "{}", x.name);
    }
}

#[test]
fn bad_gguf_requests_fail_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("types.gguf");
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let out = dir.path().join("o.safetensors");
    let o = cli(&["convert".as_ref(), cut.as_os_str(), out.as_os_str()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cut.gguf") && err.contains("x.iq4_xs"),
        "{err}"
    );
    let q = dir.path().join("q.gguf");
    let o = cli(&[
        "convert".as_ref(),
        src.as_os_str(),
        q.as_os_str(),
        "--gguf-type".as_ref(),
        "Q8_0".as_ref(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("plain.f32"));
    let o = cli(&[
        "convert".as_ref(),
        src.as_os_str(),
        q.as_os_str(),
        "--gguf-type".as_ref(),
        "IQ2_XXS".as_ref(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
