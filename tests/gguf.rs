//! GGUF end to end through the CLI, against the committed fixtures in `fixtures/gguf/`
//! (written by the `gguf` package's GGUFWriter, `fixtures/make_gguf_fixtures.py`): convert
//! to safetensors gives `gguf.quants.dequantize`'s values, a GGUF rewrite is the same file,
//! re-encoding round-trips through the reader, and bad requests fail with nothing written;
//! a merge into a GGUF (`fixtures/gguf/merge/`, real transformers + PEFT) writes the
//! converted PEFT merge byte for byte and no temporary files, and refuses by name.

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

fn merge_dir() -> PathBuf {
    fixtures().join("merge")
}

/// Every file under `dir`, with its bytes.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// `merge` into a GGUF (fixtures/gguf/merge, made by real transformers/PEFT and the
/// compat tests' reduction of convert_hf_to_gguf.py) writes expected.gguf byte for byte,
/// and writes nothing else anywhere: no renamed copy of the adapter in TMPDIR or beside it.
#[test]
fn gguf_merge_writes_the_converted_peft_merge_and_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = dir.path().join("merged.gguf");
    let adapter = merge_dir().join("adapter");
    let before = tree(&merge_dir());
    let o = Command::new(env!("CARGO_BIN_EXE_lorastream"))
        .env("TMPDIR", &tmp)
        .args(["merge", "--device", "cpu", "-q", "--base"])
        .arg(merge_dir().join("base.gguf"))
        .arg("--lora")
        .arg(&adapter)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(merge_dir().join("expected.gguf")).unwrap(),
        "merged.gguf differs from expected.gguf"
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "TMPDIR used");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    assert!(tree(&merge_dir()) == before, "the fixture folder changed");
}

/// Byte-for-byte replacement of `from` by `to` (same length) in a copy of `src`.
fn patched(src: &Path, dst: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut b = std::fs::read(src).unwrap();
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= b.len() {
        if &b[i..i + from.len()] == from {
            b[i..i + from.len()].copy_from_slice(to);
            n += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(n > 0, "nothing to patch in {}", src.display());
    std::fs::write(dst, b).unwrap();
}

fn merge_gguf(base: &Path, adapter: &Path, out: &Path) -> (Option<i32>, String) {
    let o = cli(&[
        "merge".as_ref(),
        "--base".as_ref(),
        base.as_os_str(),
        "--lora".as_ref(),
        adapter.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Refusals before anything is written: an architecture outside the tested list (named,
/// with the supported ones), and an adapter module with no GGUF tensor (the HF module
/// named); a module whose GGUF tensor is missing names both.
#[test]
fn gguf_merge_refusals_name_the_architecture_module_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let adapter = merge_dir().join("adapter");
    // Every "llama" (general.architecture and the llama.* keys) made "mamba".
    let mamba = dir.path().join("mamba.gguf");
    patched(&merge_dir().join("base.gguf"), &mamba, b"llama", b"mamba");
    let (code, err) = merge_gguf(&mamba, &adapter, &out);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("'mamba'") && err.contains("llama, qwen2, qwen3, gemma, gemma2, gemma3"),
        "{err}"
    );
    // An HF module the table does not know.
    let odd = dir.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        odd.join("adapter_config.json"),
    )
    .unwrap();
    patched(
        &adapter.join("adapter_model.safetensors"),
        &odd.join("adapter_model.safetensors"),
        b"mlp.down_proj",
        b"mlp.down_prox",
    );
    let (code, err) = merge_gguf(&merge_dir().join("base.gguf"), &odd, &out);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("'model.layers.0.mlp.down_prox'") && err.contains("llama"),
        "{err}"
    );
    // A GGUF without the tensor a module maps to ("attn_v" renamed "attn_w").
    let no_v = dir.path().join("no_v.gguf");
    patched(
        &merge_dir().join("base.gguf"),
        &no_v,
        b"attn_v.",
        b"attn_w.",
    );
    let (code, err) = merge_gguf(&no_v, &adapter, &out);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("'model.layers.0.self_attn.v_proj'") && err.contains("'blk.0.attn_v.weight'"),
        "{err}"
    );
    assert!(!out.exists());
}
