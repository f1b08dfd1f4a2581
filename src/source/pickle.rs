//! A restricted pickle reader for PyTorch's `data.pkl`.
//!
//! Why our own: no crate reads torch pickles right. serde-pickle has no BINPERSID and
//! drops the class names of globals; candle's reader is tied to candle and misses dtypes
//! and opcodes. Torch state dicts need only a small part of pickle, so this is a small
//! stack machine that builds plain values and **never executes anything**: every GLOBAL is
//! looked up in an allowlist of the tensor-related names torch writes; anything else (a
//! training script's `argparse.Namespace`, numpy arrays, `torch.device`, the classic
//! `os.system`) becomes an [`Object`]: an opaque record of the class name, the arguments it
//! would have been called with and the state BUILD would have set. Nothing is imported or
//! called, so an opaque value is as harmless as a string; the tensors inside it (an
//! object's `__dict__`, a namedtuple's fields) are still found by the caller.
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
    /// An integer wider than 64 bits: its little-endian two's-complement bytes.
    BigInt(Rc<Vec<u8>>),
    /// What a call of a global outside the allowlist would have made (never made).
    Object(Rc<Object>),
}

/// An opaque object: `class(*args)` plus BUILD's state, recorded, never run.
#[derive(Debug)]
pub struct Object {
    /// `module.name` of the global called (`argparse.Namespace`, `os.system`), or
    /// `<call>` when the callable was itself an opaque value.
    pub class: String,
    pub args: Value,
    /// What BUILD (`__setstate__`) would have been given: usually the `__dict__`.
    pub state: RefCell<Option<Value>>,
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
    /// Any other `module.name`: never imported; calling it makes an [`Object`].
    Other(String),
}

impl Global {
    /// The name a skipped-entry report shows for the global itself.
    pub fn describe(&self) -> String {
        match self {
            Global::Other(n) | Global::TensorClass(n) => n.clone(),
            Global::DtypeObj(d) => format!("torch dtype {d}"),
            other => format!("{other:?}"),
        }
    }
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

fn resolve_global(module: &str, name: &str) -> Global {
    match (module, name) {
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
                Global::Other(format!("{module}.{name}"))
            }
        }
        _ => Global::Other(format!("{module}.{name}")),
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    op: u8,
    op_pos: usize,
    /// Every storage a persistent id named, in pickle order.
    storages: Vec<Rc<StorageRef>>,
}

/// Reads a pickle and returns the value it builds.
pub fn load(data: &[u8]) -> PResult<Value> {
    Ok(load_prefix(data)?.value)
}

/// A pickle read from the start of a longer byte string (the legacy format holds several
/// one after another).
pub struct Loaded {
    pub value: Value,
    /// Bytes the pickle took, STOP included: where the next one starts.
    pub end: usize,
    /// The storages its persistent ids named, in the order they came.
    pub storages: Vec<Rc<StorageRef>>,
}

/// Reads the pickle at the start of `data`, stopping at its STOP.
pub fn load_prefix(data: &[u8]) -> PResult<Loaded> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        op: 0,
        op_pos: 0,
        storages: Vec::new(),
    };
    let value = m.run()?;
    Ok(Loaded {
        value,
        end: m.pos,
        storages: m.storages,
    })
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

    fn run(&mut self) -> PResult<Value> {
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
                    let g = resolve_global(module, name);
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = resolve_global(&m, &n);
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
                    self.stack.push(long_value(b));
                }
                0x8b => {
                    // LONG4
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(long_value(b));
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
                    let v = match l.parse() {
                        Ok(v) => Value::Int(v),
                        Err(_) => decimal_bigint(l).ok_or_else(|| self.invalid("bad LONG"))?,
                    };
                    self.stack.push(v);
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
                    let s = Rc::new(self.persistent_load(pid)?);
                    self.storages.push(Rc::clone(&s));
                    self.stack.push(Value::Storage(s));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args), recorded as the call would be.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                0x92 => {
                    // NEWOBJ_EX: cls.__new__(cls, *args, **kwargs); keyword arguments only
                    // ever reach opaque classes, which keep nothing of them.
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: state for the object below. An opaque object keeps it (its
                    // `__dict__` may hold tensors); tensors and dicts ignore it (it carries
                    // `_metadata` / hooks, which a state dict does not need).
                    let state = self.pop()?;
                    if let Value::Object(o) = self.top()? {
                        let mut slot = o.state.borrow_mut();
                        match slot.as_mut() {
                            // A second BUILD updates the first's dict, as __dict__.update would.
                            Some(Value::Dict(have)) => {
                                if let Value::Dict(more) = &state {
                                    if !Rc::ptr_eq(have, more) {
                                        let more = more.borrow().clone();
                                        have.borrow_mut().extend(more);
                                    }
                                } else {
                                    *slot = Some(state);
                                }
                            }
                            _ => *slot = Some(state),
                        }
                    }
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
                    other => {
                        return Err(self.invalid(format!(
                            "persistent id names '{}', which is not a torch storage class",
                            other.describe()
                        )));
                    }
                };
                // The legacy format's sixth item describes a view into another storage
                // (pre-1.0 files); torch has written None there since.
                if let Some(view) = t.get(5).filter(|v| !matches!(v, Value::None)) {
                    return Err(self.invalid(format!(
                        "storage '{key}' is a view into another storage ({view:?}), which only \
                         pre-1.0 torch wrote; load it with torch and save it again"
                    )));
                }
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
        let g = match func {
            Value::Global(Global::Other(class)) => return Ok(opaque(class, args)),
            Value::Global(g) => g,
            // Calling what a call returned (`getattr(x, "f")(…)`): opaque as well.
            _ => return Ok(opaque("<call>".into(), args)),
        };
        let Value::Tuple(args) = args else {
            return Err(self.invalid("REDUCE arguments are not a tuple"));
        };
        let args = args.as_slice();
        match g {
            Global::OrderedDict => {
                // OrderedDict() as torch pickles it, or OrderedDict([(k, v), …]).
                let mut items = Vec::new();
                if let Some(Value::List(l)) = args.first() {
                    for kv in l.borrow().iter() {
                        match kv {
                            Value::Tuple(t) if t.len() == 2 => {
                                items.push((t[0].clone(), t[1].clone()))
                            }
                            _ => return Err(self.invalid("OrderedDict items are not pairs")),
                        }
                    }
                }
                Ok(Value::Dict(Rc::new(RefCell::new(items))))
            }
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

fn opaque(class: String, args: Value) -> Value {
    Value::Object(Rc::new(Object {
        class,
        args,
        state: RefCell::new(None),
    }))
}

/// LONG1/LONG4: an `Int` when it fits 64 bits, else a `BigInt` (a step count or a magic
/// number; nothing a tensor needs).
fn long_value(b: &[u8]) -> Value {
    match long_le(b) {
        Some(v) => Value::Int(v),
        None => Value::BigInt(Rc::new(b.to_vec())),
    }
}

/// A protocol-0 decimal LONG too wide for i64, as little-endian two's-complement bytes.
fn decimal_bigint(s: &str) -> Option<Value> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Magnitude, little-endian base 256.
    let mut mag: Vec<u8> = vec![0];
    for c in digits.bytes() {
        let mut carry = u32::from(c - b'0');
        for byte in mag.iter_mut() {
            let v = u32::from(*byte) * 10 + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
        if carry > 0 {
            mag.push(carry as u8);
        }
    }
    mag.push(0); // room for the sign bit
    if neg {
        // Two's complement: invert and add one.
        let mut carry = 1u16;
        for byte in mag.iter_mut() {
            let v = u16::from(!*byte) + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
    }
    Some(Value::BigInt(Rc::new(mag)))
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

    /// `os.system("ls")` is recorded as an opaque object, never run.
    #[test]
    fn os_system_becomes_an_opaque_object() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let Value::Object(o) = load(p).unwrap() else {
            panic!("not an object")
        };
        assert_eq!(o.class, "os.system");
        let Value::Tuple(args) = &o.args else {
            panic!("args")
        };
        assert!(matches!(&args[0], Value::Str(s) if s == "ls"));
    }

    #[test]
    fn stack_global_to_builtins_is_only_a_name() {
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        let v = load(p).unwrap();
        assert!(matches!(v, Value::Global(Global::Other(n)) if n == "builtins.eval"));
    }

    /// NEWOBJ then BUILD (how `argparse.Namespace(lr=…)` or any plain class is pickled):
    /// the state dict lands in the object; a second BUILD updates it.
    #[test]
    fn build_gives_an_opaque_object_its_state() {
        let mut p = b"\x80\x02cargparse\nNamespace\n)\x81}X\x02\x00\x00\x00lrK\x01sb".to_vec();
        p.extend(b"}X\x01\x00\x00\x00bK\x02sb.");
        let Value::Object(o) = load(&p).unwrap() else {
            panic!("not an object")
        };
        assert_eq!(o.class, "argparse.Namespace");
        let state = o.state.borrow();
        let Some(Value::Dict(d)) = state.as_ref() else {
            panic!("no state")
        };
        assert_eq!(d.borrow().len(), 2);
    }

    #[test]
    fn wide_ints_are_kept_as_bytes() {
        // LONG1 of 10 bytes: torch's legacy magic number.
        let mut p = vec![0x80, 2, 0x8a, 10];
        p.extend([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
        p.push(b'.');
        let Value::BigInt(b) = load(&p).unwrap() else {
            panic!("not a big int")
        };
        assert_eq!(b.len(), 10);
        // Protocol 0 text form: 2**64 = 0x1_0000_0000_0000_0000.
        let Value::BigInt(b) = load(b"L18446744073709551616L\n.").unwrap() else {
            panic!("not a big int")
        };
        assert_eq!(b.as_slice(), &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let Value::BigInt(b) = load(b"L-18446744073709551617L\n.").unwrap() else {
            panic!("not a big int")
        };
        assert_eq!(
            b.as_slice(),
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xff]
        );
    }

    #[test]
    fn load_prefix_stops_at_the_first_stop() {
        let l = load_prefix(b"\x80\x02K\x05.\x80\x02K\x06.").unwrap();
        assert_eq!(l.end, 5);
        assert!(matches!(l.value, Value::Int(5)));
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
