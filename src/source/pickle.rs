//! A restricted pickle reader for PyTorch's `data.pkl`.
//!
//! Why our own: no crate reads torch pickles right. serde-pickle has no BINPERSID and
//! drops the class names of globals; candle's reader is tied to candle and misses dtypes
//! and opcodes. Torch state dicts need only a small part of pickle, so this is a small
//! stack machine that builds plain values and **never executes anything**: every GLOBAL is
//! looked up in an allowlist of the tensor-related names torch writes, and anything else
//! (the classic `os.system`) is refused with an error naming it.
//!
//! Supported: protocol 2 (what torch writes) plus the protocol 0/1/4/5 opcodes that older
//! or hand-made files contain (STACK_GLOBAL, SHORT_BINUNICODE, MEMOIZE, FRAME, BINBYTES,
//! LONG4, sets, DICT, …). Containers are shared (`Rc<RefCell>`) so memo references see later
//! mutations exactly as Python's would.

use crate::dtype::Dtype;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A Python value as far as a state dict needs one.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Set(Rc<RefCell<Vec<Value>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

/// The globals a torch checkpoint may name. Anything else is refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// A typed storage class (`torch.FloatStorage`).
    TypedStorage(Dtype),
    /// `torch.storage.UntypedStorage`.
    UntypedStorage,
    /// A dtype object (`torch.bfloat16`).
    DtypeObj(Dtype),
    /// `torch.Size`: calling it returns its argument tuple.
    TorchSize,
    /// Tensor classes named by `_rebuild_from_type_v2` (`torch.nn.parameter.Parameter`,
    /// `torch.Tensor`); only used as markers.
    TensorClass(String),
}

/// A storage named by a persistent id: the zip record `data/<key>`.
#[derive(Debug)]
pub struct StorageRef {
    pub key: String,
    /// None for UntypedStorage (then the tensor's dtype comes from `_rebuild_tensor_v3`).
    pub dtype: Option<Dtype>,
    /// Elements of the whole storage (bytes for UntypedStorage).
    pub numel: u64,
}

/// A tensor view on a storage, as `_rebuild_tensor_v2/_v3` describes it.
#[derive(Debug)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub dtype: Dtype,
    /// In elements.
    pub storage_offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// What can go wrong while reading a pickle. The caller adds the file name.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error(
        "data.pkl names the global '{0}', which is not allowed (lorastream only accepts the \
         torch tensor and storage globals and never runs pickled code)"
    )]
    ForbiddenGlobal(String),
    #[error("data.pkl: unknown or unsupported pickle opcode 0x{op:02x} at byte {pos}")]
    UnknownOpcode { op: u8, pos: usize },
    #[error("data.pkl: stack underflow at opcode 0x{op:02x} (byte {pos})")]
    StackUnderflow { op: u8, pos: usize },
    #[error("data.pkl ends in the middle of an opcode (byte {0})")]
    Truncated(usize),
    #[error("data.pkl has no STOP opcode")]
    NoStop,
    #[error("data.pkl: {msg} (byte {pos})")]
    Invalid { msg: String, pos: usize },
}

type PResult<T> = std::result::Result<T, PickleError>;

fn resolve_global(module: &str, name: &str) -> PResult<Global> {
    let g = match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor_v3") => Global::RebuildTensorV3,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch.storage", "UntypedStorage") | ("torch", "UntypedStorage") => Global::UntypedStorage,
        ("torch", "Size") => Global::TorchSize,
        ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => {
            Global::TensorClass(format!("{module}.{name}"))
        }
        ("torch", attr) => {
            if let Some(d) = Dtype::from_torch_storage_class(attr) {
                Global::TypedStorage(d)
            } else if let Some(d) = Dtype::from_torch_attr(attr) {
                Global::DtypeObj(d)
            } else {
                return Err(PickleError::ForbiddenGlobal(format!("{module}.{name}")));
            }
        }
        _ => return Err(PickleError::ForbiddenGlobal(format!("{module}.{name}"))),
    };
    Ok(g)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    op: u8,
    op_pos: usize,
}

/// Reads a pickle and returns the value it builds.
pub fn load(data: &[u8]) -> PResult<Value> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        op: 0,
        op_pos: 0,
    }
    .run()
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.op_pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn len_u64(&mut self) -> PResult<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| PickleError::Truncated(self.op_pos))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.op_pos))?;
        self.pos += nl + 1;
        std::str::from_utf8(&rest[..nl]).map_err(|_| self.invalid("a text line is not UTF-8"))
    }
    fn string(&mut self, n: usize) -> PResult<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid("a string is not UTF-8"))
    }

    fn invalid(&self, msg: impl Into<String>) -> PickleError {
        PickleError::Invalid {
            msg: msg.into(),
            pos: self.op_pos,
        }
    }
    fn underflow(&self) -> PickleError {
        PickleError::StackUnderflow {
            op: self.op,
            pos: self.op_pos,
        }
    }
    fn pop(&mut self) -> PResult<Value> {
        // A MARK boundary is also a floor: popping below it is an underflow.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.underflow());
        }
        self.stack.pop().ok_or_else(|| self.underflow())
    }
    fn top(&mut self) -> PResult<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.underflow());
        }
        let e = self.underflow();
        self.stack.last_mut().ok_or(e)
    }
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| self.underflow())?;
        if m > self.stack.len() {
            return Err(self.underflow());
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&self, idx: u32) -> PResult<Value> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.invalid(format!("memo slot {idx} was never stored")))
    }
    fn memo_put(&mut self, idx: u32) -> PResult<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            self.op_pos = self.pos;
            let op = match self.data.get(self.pos) {
                Some(&b) => b,
                None => return Err(PickleError::NoStop),
            };
            self.pos += 1;
            self.op = op;
            match op {
                0x80 => {
                    // PROTO
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.invalid(format!("pickle protocol {v} is unknown")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    return self.pop();
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = resolve_global(module, name)?;
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = resolve_global(&m, &n)?;
                            self.stack.push(Value::Global(g));
                        }
                        _ => return Err(self.invalid("STACK_GLOBAL needs two strings")),
                    }
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    // SHORT_BINUNICODE
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    // BINUNICODE8
                    let n = self.len_u64()?;
                    let s = self.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'T' => {
                    // BINSTRING (py2 str): bytes that are text in practice.
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(bytes_or_str(b));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(bytes_or_str(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                0x8e => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'J' => {
                    let b = self.take(4)?;
                    let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = long_le(b).ok_or_else(|| self.invalid("integer wider than 64 bits"))?;
                    self.stack.push(Value::Int(v));
                }
                0x8b => {
                    // LONG4
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let v = long_le(b).ok_or_else(|| self.invalid("integer wider than 64 bits"))?;
                    self.stack.push(Value::Int(v));
                }
                b'I' => {
                    // INT (protocol 0): "01"/"00" are bools.
                    let l = self.line()?;
                    let v = match l {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => Value::Int(l.parse().map_err(|_| self.invalid("bad INT"))?),
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let l = self.line()?.trim_end_matches('L');
                    let v = l.parse().map_err(|_| self.invalid("bad LONG"))?;
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    // BINFLOAT is the one big-endian field in pickle.
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self.stack.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        _ => return Err(self.invalid("APPEND to a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        _ => return Err(self.invalid("APPENDS to a non-list")),
                    }
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items).ok_or_else(|| self.invalid("DICT with odd items"))?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items).ok_or_else(|| self.invalid("SETITEMS with odd items"))?;
                    self.set_items(p)?;
                }
                0x8f => self.stack.push(Value::Set(Rc::default())),
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::Set(s) => s.borrow_mut().extend(items),
                        _ => return Err(self.invalid("ADDITEMS to a non-set")),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Set(Rc::new(RefCell::new(items))));
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'g' => {
                    let i = self.line()?.parse().map_err(|_| self.invalid("bad GET"))?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                b'p' => {
                    let i = self.line()?.parse().map_err(|_| self.invalid("bad PUT"))?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    // MEMOIZE
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.stack.push(Value::Storage(Rc::new(s)));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args) — only for allowed classes.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: state for the object below. Tensors and dicts ignore it (it
                    // carries `_metadata` / hooks, which a state dict does not need).
                    let _state = self.pop()?;
                    self.top()?;
                }
                _ => {
                    return Err(PickleError::UnknownOpcode {
                        op,
                        pos: self.op_pos,
                    });
                }
            }
        }
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> PResult<()> {
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                for (k, v) in items {
                    // Python dict semantics: a repeated key replaces the value in place.
                    if let Some(slot) = d.iter_mut().find(|(ek, _)| key_eq(ek, &k)) {
                        slot.1 = v;
                    } else {
                        d.push((k, v));
                    }
                }
                Ok(())
            }
            _ => Err(self.invalid("SETITEM on a non-dict")),
        }
    }

    fn persistent_load(&self, pid: Value) -> PResult<StorageRef> {
        let Value::Tuple(t) = pid else {
            return Err(self.invalid("persistent id is not a tuple"));
        };
        match t.as_slice() {
            [
                Value::Str(tag),
                Value::Global(class),
                Value::Str(key),
                _location,
                numel,
                ..,
            ] if tag == "storage" => {
                let dtype = match class {
                    Global::TypedStorage(d) => Some(*d),
                    Global::UntypedStorage => None,
                    _ => return Err(self.invalid("persistent id names no storage class")),
                };
                let numel =
                    as_u64(numel).ok_or_else(|| self.invalid("storage size is not a count"))?;
                Ok(StorageRef {
                    key: key.clone(),
                    dtype,
                    numel,
                })
            }
            _ => Err(self.invalid("persistent id is not ('storage', class, key, location, numel)")),
        }
    }

    fn call(&self, func: Value, args: Value) -> PResult<Value> {
        let Value::Global(g) = func else {
            return Err(self.invalid("REDUCE on something that is not an allowed global"));
        };
        let Value::Tuple(args) = args else {
            return Err(self.invalid("REDUCE arguments are not a tuple"));
        };
        let args = args.as_slice();
        match g {
            Global::OrderedDict => Ok(Value::Dict(Rc::default())),
            Global::TorchSize => Ok(args.first().cloned().unwrap_or(Value::Tuple(Rc::default()))),
            Global::RebuildTensorV2 | Global::RebuildTensorV3 => self.rebuild_tensor(&g, args),
            Global::RebuildParameter | Global::RebuildParameterWithState => args
                .first()
                .cloned()
                .ok_or_else(|| self.invalid("_rebuild_parameter without data")),
            Global::RebuildFromTypeV2 => {
                // _rebuild_from_type_v2(func, new_type, args, state) = func(*args)
                match args {
                    [func, _new_type, inner, ..] => self.call(func.clone(), inner.clone()),
                    _ => Err(self.invalid("_rebuild_from_type_v2 needs (func, type, args, state)")),
                }
            }
            other => Err(self.invalid(format!("{other:?} cannot be called"))),
        }
    }

    fn rebuild_tensor(&self, g: &Global, args: &[Value]) -> PResult<Value> {
        let (storage, offset, size, stride) = match args {
            [Value::Storage(s), off, size, stride, ..] => (s.clone(), off, size, stride),
            _ => return Err(self.invalid("_rebuild_tensor without a storage")),
        };
        let dtype = match (g, storage.dtype) {
            (Global::RebuildTensorV3, _) => match args.get(6) {
                Some(Value::Global(Global::DtypeObj(d))) => *d,
                _ => return Err(self.invalid("_rebuild_tensor_v3 without a dtype")),
            },
            (_, Some(d)) => d,
            (_, None) => return Err(self.invalid("untyped storage without a dtype")),
        };
        let storage_offset = as_u64(offset).ok_or_else(|| self.invalid("bad storage offset"))?;
        let shape =
            int_tuple(size).ok_or_else(|| self.invalid("tensor size is not a tuple of counts"))?;
        let stride = int_tuple(stride)
            .ok_or_else(|| self.invalid("tensor stride is not a tuple of counts"))?;
        if shape.len() != stride.len() {
            return Err(self.invalid("tensor size and stride differ in length"));
        }
        Ok(Value::Tensor(Rc::new(TensorRef {
            storage,
            dtype,
            storage_offset,
            shape,
            stride,
        })))
    }
}

fn bytes_or_str(b: Vec<u8>) -> Value {
    match String::from_utf8(b) {
        Ok(s) => Value::Str(s),
        Err(e) => Value::Bytes(e.into_bytes()),
    }
}

fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

fn key_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

/// A little-endian two's-complement integer of up to 8 bytes.
fn long_le(b: &[u8]) -> Option<i64> {
    if b.is_empty() {
        return Some(0);
    }
    if b.len() > 8 {
        // Accept wider encodings whose extra bytes are pure sign extension.
        let (low, high) = b.split_at(8);
        let neg = low[7] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        if high.iter().any(|&x| x != fill) {
            return None;
        }
        return long_le(low);
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let mut a = [if neg { 0xff } else { 0 }; 8];
    a[..b.len()].copy_from_slice(b);
    Some(i64::from_le_bytes(a))
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn int_tuple(v: &Value) -> Option<Vec<u64>> {
    let items: Vec<Value> = match v {
        Value::Tuple(t) => t.as_ref().clone(),
        Value::List(l) => l.borrow().clone(),
        _ => return None,
    };
    items.iter().map(as_u64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `{"w": tensor}` the way torch writes it.
    fn torch_like() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nBFloat16Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
        p.extend(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89h\x00)Rtq\x03Ru.");
        p
    }

    #[test]
    fn reads_a_torch_state_dict() {
        let v = load(&torch_like()).unwrap();
        let Value::Dict(d) = v else {
            panic!("not a dict")
        };
        let d = d.borrow();
        assert_eq!(d.len(), 1);
        let (Value::Str(k), Value::Tensor(t)) = &d[0] else {
            panic!("bad entry")
        };
        assert_eq!(k, "w");
        assert_eq!(t.dtype, Dtype::BF16);
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
    }

    #[test]
    fn refuses_os_system() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let e = load(p).unwrap_err();
        assert!(e.to_string().contains("os.system"), "{e}");
    }

    #[test]
    fn refuses_stack_global_to_builtins() {
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        let e = load(p).unwrap_err();
        assert!(e.to_string().contains("builtins.eval"), "{e}");
    }

    #[test]
    fn underflow_and_unknown_opcodes_are_errors() {
        assert!(matches!(
            load(b"\x80\x02R."),
            Err(PickleError::StackUnderflow { .. })
        ));
        assert!(matches!(
            load(b"\x80\x02(t\x86."),
            Err(PickleError::StackUnderflow { .. })
        ));
        assert!(matches!(
            load(b"\x80\x02\xff."),
            Err(PickleError::UnknownOpcode { op: 0xff, .. })
        ));
        assert!(matches!(
            load(b"\x80\x02X\xff\xff\xff\xff"),
            Err(PickleError::Truncated(_))
        ));
        assert!(matches!(load(b"\x80\x02N"), Err(PickleError::NoStop)));
    }

    #[test]
    fn memo_sees_later_mutation() {
        // d = {}; memo[0] = d; d["a"] = 1; return [memo[0]]
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s0]h\x00a.";
        let Value::List(l) = load(p).unwrap() else {
            panic!()
        };
        let Value::Dict(d) = &l.borrow()[0] else {
            panic!()
        };
        assert_eq!(d.borrow().len(), 1);
    }

    #[test]
    fn long1_handles_sign_and_width() {
        assert_eq!(long_le(&[0xff]), Some(-1));
        assert_eq!(long_le(&[0x00, 0x01]), Some(256));
        assert_eq!(
            long_le(&[0, 0, 0, 0, 0, 0, 0, 0x40, 0]),
            Some(0x4000_0000_0000_0000)
        );
        assert_eq!(long_le(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }
}
