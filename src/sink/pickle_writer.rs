//! Writes the `data.pkl` of a PyTorch checkpoint: a protocol-2 pickle of an OrderedDict
//! of tensors, using only the opcodes and globals `torch.load(weights_only=True)` accepts.
//! Hand-written because it is ~100 lines and no crate emits torch's persistent-id form.

use crate::dtype::{Dtype, TorchStorage};

/// One tensor to describe: its name, dtype, shape, and the record key of its storage
/// (`data/<key>` in the zip). Each tensor owns its whole storage (offset 0, contiguous).
pub struct PickledTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub key: String,
}

const PROTO: u8 = 0x80;
const GLOBAL: u8 = b'c';
const BINUNICODE: u8 = b'X';
const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const EMPTY_TUPLE: u8 = b')';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const NEWFALSE: u8 = 0x89;
const SETITEMS: u8 = b'u';
const STOP: u8 = b'.';

/// Builds the pickle for `tensors`, in order.
pub fn state_dict_pickle(tensors: &[PickledTensor<'_>]) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + tensors.len() * 160);
    p.extend([PROTO, 2]);
    global(&mut p, "collections", "OrderedDict");
    p.extend([EMPTY_TUPLE, REDUCE]);
    // SETITEMS in batches, as Python's pickler does, keeps the unpickler's stack small.
    for chunk in tensors.chunks(1000) {
        p.push(MARK);
        for t in chunk {
            unicode(&mut p, t.name);
            tensor(&mut p, t);
        }
        p.push(SETITEMS);
    }
    p.push(STOP);
    p
}

fn tensor(p: &mut Vec<u8>, t: &PickledTensor<'_>) {
    let numel: usize = t.shape.iter().product();
    let storage = t.dtype.torch_storage();
    let v3 = matches!(storage, TorchStorage::Untyped(_));
    global(
        p,
        "torch._utils",
        if v3 {
            "_rebuild_tensor_v3"
        } else {
            "_rebuild_tensor_v2"
        },
    );
    p.push(MARK);
    // Persistent id: ('storage', StorageClass, key, 'cpu', numel)
    p.push(MARK);
    unicode(p, "storage");
    match storage {
        TorchStorage::Typed(class) => global(p, "torch", class),
        TorchStorage::Untyped(_) => global(p, "torch.storage", "UntypedStorage"),
    }
    unicode(p, &t.key);
    unicode(p, "cpu");
    // UntypedStorage counts bytes.
    int(p, if v3 { numel * t.dtype.size() } else { numel } as u64);
    p.push(TUPLE);
    p.push(BINPERSID);
    int(p, 0); // storage offset
    int_tuple(p, t.shape.iter().map(|&d| d as u64));
    int_tuple(p, contiguous_strides(t.shape).into_iter());
    p.push(NEWFALSE); // requires_grad
    global(p, "collections", "OrderedDict"); // backward hooks
    p.extend([EMPTY_TUPLE, REDUCE]);
    if let TorchStorage::Untyped(attr) = storage {
        global(p, "torch", attr);
    }
    p.push(TUPLE);
    p.push(REDUCE);
}

fn contiguous_strides(shape: &[usize]) -> Vec<u64> {
    let mut s = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for i in (0..shape.len()).rev() {
        s[i] = acc;
        acc = acc.saturating_mul(shape[i] as u64);
    }
    s
}

fn global(p: &mut Vec<u8>, module: &str, name: &str) {
    p.push(GLOBAL);
    p.extend(module.as_bytes());
    p.push(b'\n');
    p.extend(name.as_bytes());
    p.push(b'\n');
}

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(BINUNICODE);
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
}

fn int(p: &mut Vec<u8>, v: u64) {
    if v < 0x100 {
        p.extend([b'K', v as u8]);
    } else if v < 0x1_0000 {
        p.push(b'M');
        p.extend((v as u16).to_le_bytes());
    } else if v < 0x8000_0000 {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    } else {
        // LONG1: little-endian two's complement, with a zero byte if the top bit is set.
        let mut bytes = v.to_le_bytes().to_vec();
        while bytes.len() > 1 && bytes[bytes.len() - 1] == 0 && bytes[bytes.len() - 2] & 0x80 == 0 {
            bytes.pop();
        }
        if bytes[bytes.len() - 1] & 0x80 != 0 {
            bytes.push(0);
        }
        p.extend([0x8a, bytes.len() as u8]);
        p.extend(bytes);
    }
}

fn int_tuple(p: &mut Vec<u8>, it: impl Iterator<Item = u64>) {
    p.push(MARK);
    for v in it {
        int(p, v);
    }
    p.push(TUPLE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pickle::{Value, load};

    #[test]
    fn our_reader_reads_what_we_write() {
        let shape = [3usize, 70000];
        let big = [5_000_000_000usize];
        let ts = [
            PickledTensor {
                name: "a.weight",
                dtype: Dtype::BF16,
                shape: &shape,
                key: "0".into(),
            },
            PickledTensor {
                name: "f8",
                dtype: Dtype::F8E4M3,
                shape: &big,
                key: "1".into(),
            },
            PickledTensor {
                name: "scalar",
                dtype: Dtype::F32,
                shape: &[],
                key: "2".into(),
            },
        ];
        let pkl = state_dict_pickle(&ts);
        let p = load(&pkl).unwrap();
        let Value::Dict(d) = p.root else { panic!() };
        let d = p.arena.dict(d).unwrap().items();
        assert_eq!(d.len(), 3);
        let Value::Tensor(t) = &d[0].1 else { panic!() };
        assert_eq!(
            (t.dtype, t.shape.clone(), t.stride.clone()),
            (Dtype::BF16, vec![3, 70000], vec![70000, 1])
        );
        let Value::Tensor(t) = &d[1].1 else { panic!() };
        assert_eq!(
            (t.dtype, t.storage.numel, t.storage.dtype),
            (Dtype::F8E4M3, 5_000_000_000, None)
        );
        let Value::Tensor(t) = &d[2].1 else { panic!() };
        assert!(t.shape.is_empty());
    }
}
