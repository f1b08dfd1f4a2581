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
//! LONG4, sets, DICT, …).
//!
//! Containers live in an [`Arena`] and values name them by index, so memo references see
//! later mutations exactly as Python's would, while a hostile file cannot hurt the reader:
//! cycles (a dict holding itself) leak nothing, values 200,000 deep drop without recursion
//! (the arena is a flat list), and a memo fetch or DUP copies an index or an `Rc` — never
//! a string or a container — so memory stays a small multiple of the pickle's size. Dict
//! keys are indexed by hash, so building a dict of n entries costs O(n).

use crate::dtype::Dtype;
use std::collections::HashMap;
use std::rc::Rc;

/// A Python value as far as a state dict needs one. Containers are indices into the
/// [`Arena`] of the [`Pickle`] they came from.
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Id),
    List(Id),
    Dict(Id),
    Set(Id),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// An integer wider than 64 bits: its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    /// What a call of a global outside the allowlist would have made (never made); an
    /// [`Object`] in the arena, so that BUILD and memo references see one object.
    Object(Id),
}

/// An opaque object: `class(*args)` plus BUILD's state, recorded, never run.
#[derive(Debug)]
pub struct Object {
    /// `module.name` of the global called (`argparse.Namespace`, `os.system`), or
    /// `<call>` when the callable was itself an opaque value.
    pub class: String,
    pub args: Value,
    /// What BUILD (`__setstate__`) would have been given: usually the `__dict__`.
    pub state: Option<Value>,
}

/// A container's place in the [`Arena`]: its identity, as Python's `id()` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub usize);

/// Every container a pickle built. Values hold no containers, only indices, so dropping
/// the arena is a flat loop however deep or cyclic the values are.
#[derive(Debug, Default)]
pub struct Arena {
    nodes: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    /// A tuple, list or set (the [`Value`] naming it says which).
    Seq(Vec<Value>),
    /// Boxed: a node is then as small as a Vec (torch pickles make several per tensor).
    Dict(Box<Dict>),
    Object(Box<Object>),
}

/// A dict in insertion order, with a hash index on its string and int keys.
#[derive(Debug, Default)]
pub struct Dict {
    items: Vec<(Value, Value)>,
    index: HashMap<Key, usize>,
}

/// The dict keys the index knows; other keys (tuples, floats) are kept but never match,
/// as before (a state dict has string keys).
#[derive(Debug, PartialEq, Eq, Hash)]
enum Key {
    Str(Rc<str>),
    Int(i64),
}

impl Dict {
    /// Entries in insertion order.
    pub fn items(&self) -> &[(Value, Value)] {
        &self.items
    }
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// The value under the string key `k`.
    pub fn get(&self, k: &str) -> Option<&Value> {
        let i = *self.index.get(&Key::Str(Rc::from(k)))?;
        Some(&self.items[i].1)
    }
    /// Python dict semantics: a repeated key replaces the value in place.
    fn insert(&mut self, k: Value, v: Value) {
        let key = match &k {
            Value::Str(s) => Some(Key::Str(s.clone())),
            Value::Int(i) => Some(Key::Int(*i)),
            _ => None,
        };
        match key {
            Some(key) => match self.index.get(&key) {
                Some(&i) => self.items[i].1 = v,
                None => {
                    self.index.insert(key, self.items.len());
                    self.items.push((k, v));
                }
            },
            None => self.items.push((k, v)),
        }
    }
}

impl Arena {
    /// The items of a tuple, list or set; empty for an id that names a dict.
    pub fn seq(&self, id: Id) -> &[Value] {
        match self.nodes.get(id.0) {
            Some(Node::Seq(v)) => v,
            _ => &[],
        }
    }
    /// The dict `id`; None when it names no dict.
    pub fn dict(&self, id: Id) -> Option<&Dict> {
        match self.nodes.get(id.0) {
            Some(Node::Dict(d)) => Some(d),
            _ => None,
        }
    }
    /// The opaque object `id`; None when it names no object.
    pub fn object(&self, id: Id) -> Option<&Object> {
        match self.nodes.get(id.0) {
            Some(Node::Object(o)) => Some(o),
            _ => None,
        }
    }
    /// How many containers the pickle built.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
    fn add(&mut self, n: Node) -> Id {
        self.nodes.push(n);
        Id(self.nodes.len() - 1)
    }
    fn seq_mut(&mut self, id: Id) -> Option<&mut Vec<Value>> {
        match self.nodes.get_mut(id.0) {
            Some(Node::Seq(v)) => Some(v),
            _ => None,
        }
    }
    fn dict_mut(&mut self, id: Id) -> Option<&mut Dict> {
        match self.nodes.get_mut(id.0) {
            Some(Node::Dict(d)) => Some(d),
            _ => None,
        }
    }
    fn object_mut(&mut self, id: Id) -> Option<&mut Object> {
        match self.nodes.get_mut(id.0) {
            Some(Node::Object(o)) => Some(o),
            _ => None,
        }
    }
}

/// What a pickle built: its root value and the containers it refers to.
#[derive(Debug)]
pub struct Pickle {
    pub arena: Arena,
    pub root: Value,
}

/// The globals a torch checkpoint may name; anything else is [`Global::Other`].
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

/// Most dimensions a tensor may have (torch itself stops at 64). Bounds the work of
/// reading a size tuple, which a file may share through the memo among many tensors.
pub const MAX_DIMS: usize = 64;
/// Longest storage key accepted: torch writes short decimal numbers, and a key shared
/// through the memo must not make each tensor cost its length.
pub const MAX_KEY_LEN: usize = 1024;

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
    arena: Arena,
    op: u8,
    op_pos: usize,
    /// Every storage a persistent id named, in pickle order.
    storages: Vec<Rc<StorageRef>>,
}

/// Reads a pickle and returns the value it builds.
pub fn load(data: &[u8]) -> PResult<Pickle> {
    Ok(load_prefix(data)?.pickle)
}

/// A pickle read from the start of a longer byte string (the legacy format holds several
/// one after another).
pub struct Loaded {
    pub pickle: Pickle,
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
        arena: Arena::default(),
        op: 0,
        op_pos: 0,
        storages: Vec::new(),
    };
    let root = m.run()?;
    Ok(Loaded {
        pickle: Pickle {
            arena: m.arena,
            root,
        },
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
    fn string(&mut self, n: usize) -> PResult<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| self.invalid("a string is not UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }
    fn push_seq(&mut self, items: Vec<Value>) -> Id {
        self.arena.add(Node::Seq(items))
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
                    self.stack.push(s);
                }
                0x8c => {
                    // SHORT_BINUNICODE
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8d => {
                    // BINUNICODE8
                    let n = self.len_u64()?;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b'T' => {
                    // BINSTRING (py2 str): bytes that are text in practice.
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(bytes_or_str(b));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(bytes_or_str(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                0x8e => {
                    let n = self.len_u64()?;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
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
                b')' => {
                    let id = self.push_seq(Vec::new());
                    self.stack.push(Value::Tuple(id));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let id = self.push_seq(items);
                    self.stack.push(Value::Tuple(id));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let id = self.push_seq(items);
                    self.stack.push(Value::Tuple(id));
                }
                b']' => {
                    let id = self.push_seq(Vec::new());
                    self.stack.push(Value::List(id));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let id = self.push_seq(items);
                    self.stack.push(Value::List(id));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(false, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(false, items)?;
                }
                b'}' => {
                    let id = self.arena.add(Node::Dict(Box::default()));
                    self.stack.push(Value::Dict(id));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items).ok_or_else(|| self.invalid("DICT with odd items"))?;
                    let id = self.arena.add(Node::Dict(Box::default()));
                    self.stack.push(Value::Dict(id));
                    self.set_items(pairs)?;
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
                0x8f => {
                    let id = self.push_seq(Vec::new());
                    self.stack.push(Value::Set(id));
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_top(true, items)?;
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    let id = self.push_seq(items);
                    self.stack.push(Value::Set(id));
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
                    if let Value::Object(o) = *self.top()? {
                        self.build(o, state);
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

    /// BUILD on an opaque object. A second BUILD updates the first's dict, as
    /// `__dict__.update` would; anything else replaces the state.
    fn build(&mut self, o: Id, state: Value) {
        let have = self.arena.object(o).and_then(|o| match &o.state {
            Some(Value::Dict(d)) => Some(*d),
            _ => None,
        });
        match (have, &state) {
            (Some(have), Value::Dict(more)) => {
                if have != *more {
                    let more = self
                        .arena
                        .dict(*more)
                        .map(|d| d.items().to_vec())
                        .unwrap_or_default();
                    if let Some(d) = self.arena.dict_mut(have) {
                        for (k, v) in more {
                            d.insert(k, v);
                        }
                    }
                }
            }
            _ => {
                if let Some(obj) = self.arena.object_mut(o) {
                    obj.state = Some(state);
                }
            }
        }
    }

    fn opaque(&mut self, class: String, args: Value) -> Value {
        Value::Object(self.arena.add(Node::Object(Box::new(Object {
            class,
            args,
            state: None,
        }))))
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> PResult<()> {
        let id = match self.top()? {
            Value::Dict(id) => *id,
            _ => return Err(self.invalid("SETITEM on a non-dict")),
        };
        let e = self.invalid("SETITEM on a non-dict");
        let d = self.arena.dict_mut(id).ok_or(e)?;
        for (k, v) in items {
            d.insert(k, v);
        }
        Ok(())
    }

    /// APPEND/APPENDS (`set` false: to a list) and ADDITEMS (`set` true: to a set).
    fn extend_top(&mut self, set: bool, items: Vec<Value>) -> PResult<()> {
        let id = match (set, self.top()?) {
            (false, Value::List(id)) | (true, Value::Set(id)) => *id,
            (false, _) => return Err(self.invalid("APPEND to a non-list")),
            (true, _) => return Err(self.invalid("ADDITEMS to a non-set")),
        };
        let e = self.invalid("APPEND to a non-list");
        self.arena.seq_mut(id).ok_or(e)?.extend(items);
        Ok(())
    }

    fn persistent_load(&self, pid: Value) -> PResult<StorageRef> {
        let Value::Tuple(t) = pid else {
            return Err(self.invalid("persistent id is not a tuple"));
        };
        match self.arena.seq(t) {
            [
                Value::Str(tag),
                Value::Global(class),
                Value::Str(key),
                _location,
                numel,
                ..,
            ] if &**tag == "storage" => {
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
                if let Some(view) = self
                    .arena
                    .seq(t)
                    .get(5)
                    .filter(|v| !matches!(v, Value::None))
                {
                    return Err(self.invalid(format!(
                        "storage '{key}' is a view into another storage ({view:?}), which only \
                         pre-1.0 torch wrote; load it with torch and save it again"
                    )));
                }
                let numel =
                    as_u64(numel).ok_or_else(|| self.invalid("storage size is not a count"))?;
                if key.len() > MAX_KEY_LEN {
                    return Err(self.invalid(format!(
                        "storage key is {} bytes long (torch writes short numbers; at most {MAX_KEY_LEN})",
                        key.len()
                    )));
                }
                Ok(StorageRef {
                    key: key.to_string(),
                    dtype,
                    numel,
                })
            }
            _ => Err(self.invalid("persistent id is not ('storage', class, key, location, numel)")),
        }
    }

    fn call(&mut self, mut func: Value, mut args: Value) -> PResult<Value> {
        // A loop, not recursion: `_rebuild_from_type_v2` may wrap itself any number of times.
        loop {
            let g = match func {
                Value::Global(Global::Other(class)) => return Ok(self.opaque(class, args)),
                Value::Global(g) => g,
                // Calling what a call returned (`getattr(x, "f")(…)`): opaque as well.
                _ => return Ok(self.opaque("<call>".into(), args)),
            };
            let Value::Tuple(args_id) = args else {
                return Err(self.invalid("REDUCE arguments are not a tuple"));
            };
            let a = self.arena.seq(args_id);
            return match g {
                Global::OrderedDict => {
                    // OrderedDict() as torch pickles it, or OrderedDict([(k, v), …]).
                    let mut d = Dict::default();
                    if let Some(Value::List(l)) = a.first() {
                        for kv in self.arena.seq(*l) {
                            match kv {
                                Value::Tuple(t) => match self.arena.seq(*t) {
                                    [k, v] => d.insert(k.clone(), v.clone()),
                                    _ => {
                                        return Err(self.invalid("OrderedDict items are not pairs"));
                                    }
                                },
                                _ => return Err(self.invalid("OrderedDict items are not pairs")),
                            }
                        }
                    }
                    Ok(Value::Dict(self.arena.add(Node::Dict(Box::new(d)))))
                }
                Global::TorchSize => match a.first() {
                    Some(v) => Ok(v.clone()),
                    None => Ok(Value::Tuple(self.push_seq(Vec::new()))),
                },
                Global::RebuildTensorV2 | Global::RebuildTensorV3 => self.rebuild_tensor(&g, a),
                Global::RebuildParameter | Global::RebuildParameterWithState => a
                    .first()
                    .cloned()
                    .ok_or_else(|| self.invalid("_rebuild_parameter without data")),
                Global::RebuildFromTypeV2 => {
                    // _rebuild_from_type_v2(func, new_type, args, state) = func(*args)
                    match a {
                        [f, _new_type, inner, ..] => {
                            (func, args) = (f.clone(), inner.clone());
                            continue;
                        }
                        _ => {
                            Err(self
                                .invalid("_rebuild_from_type_v2 needs (func, type, args, state)"))
                        }
                    }
                }
                other => Err(self.invalid(format!("{other:?} cannot be called"))),
            };
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
        let shape = int_tuple(&self.arena, size)
            .ok_or_else(|| self.invalid("tensor size is not a tuple of counts"))?;
        let stride = int_tuple(&self.arena, stride)
            .ok_or_else(|| self.invalid("tensor stride is not a tuple of counts"))?;
        if shape.len() > MAX_DIMS {
            return Err(self.invalid(format!("tensor has more than {MAX_DIMS} dimensions")));
        }
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

/// LONG1/LONG4: an `Int` when it fits 64 bits, else a `BigInt` (a step count or a magic
/// number; nothing a tensor needs).
fn long_value(b: &[u8]) -> Value {
    match long_le(b) {
        Some(v) => Value::Int(v),
        None => Value::BigInt(Rc::from(b)),
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
    Some(Value::BigInt(Rc::from(mag)))
}

fn bytes_or_str(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::Str(Rc::from(s)),
        Err(_) => Value::Bytes(Rc::from(b)),
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

/// The counts of a size or stride tuple; None past [`MAX_DIMS`] + 1 items (the caller
/// says how many is too many), so a huge shared tuple costs nothing per tensor.
fn int_tuple(arena: &Arena, v: &Value) -> Option<Vec<u64>> {
    let items = match v {
        Value::Tuple(t) | Value::List(t) => arena.seq(*t),
        _ => return None,
    };
    items.iter().take(MAX_DIMS + 1).map(as_u64).collect()
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
        let p = load(&torch_like()).unwrap();
        let Value::Dict(d) = p.root else {
            panic!("not a dict")
        };
        let d = p.arena.dict(d).unwrap().items();
        assert_eq!(d.len(), 1);
        let (Value::Str(k), Value::Tensor(t)) = &d[0] else {
            panic!("bad entry")
        };
        assert_eq!(&**k, "w");
        assert_eq!(t.dtype, Dtype::BF16);
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.numel, 6);
    }

    /// `os.system("ls")` is recorded as an opaque object, never run.
    #[test]
    fn os_system_becomes_an_opaque_object() {
        let p = load(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap();
        let Value::Object(o) = p.root else {
            panic!("not an object")
        };
        let o = p.arena.object(o).unwrap();
        assert_eq!(o.class, "os.system");
        let Value::Tuple(args) = &o.args else {
            panic!("args")
        };
        assert!(matches!(&p.arena.seq(*args)[0], Value::Str(s) if &**s == "ls"));
    }

    #[test]
    fn stack_global_to_builtins_is_only_a_name() {
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        let v = load(p).unwrap().root;
        assert!(matches!(v, Value::Global(Global::Other(n)) if n == "builtins.eval"));
    }

    /// NEWOBJ then BUILD (how `argparse.Namespace(lr=…)` or any plain class is pickled):
    /// the state dict lands in the object; a second BUILD updates it.
    #[test]
    fn build_gives_an_opaque_object_its_state() {
        let mut p = b"\x80\x02cargparse\nNamespace\n)\x81}X\x02\x00\x00\x00lrK\x01sb".to_vec();
        p.extend(b"}X\x01\x00\x00\x00bK\x02sb.");
        let p = load(&p).unwrap();
        let Value::Object(o) = p.root else {
            panic!("not an object")
        };
        let o = p.arena.object(o).unwrap();
        assert_eq!(o.class, "argparse.Namespace");
        let Some(Value::Dict(d)) = &o.state else {
            panic!("no state")
        };
        assert_eq!(p.arena.dict(*d).unwrap().len(), 2);
    }

    /// `OrderedDict([("a", 1), ("b", 2)])`, as some writers pickle a dict with items.
    #[test]
    fn ordered_dict_with_items() {
        let p = b"\x80\x02ccollections\nOrderedDict\n]((X\x01\x00\x00\x00aK\x01tX\x01\x00\x00\x00bK\x02\x86e\x85R.";
        let p = load(p).unwrap();
        let Value::Dict(d) = p.root else { panic!() };
        let d = p.arena.dict(d).unwrap();
        assert_eq!(d.len(), 2);
        assert!(matches!(d.get("b"), Some(Value::Int(2))));
    }

    #[test]
    fn wide_ints_are_kept_as_bytes() {
        // LONG1 of 10 bytes: torch's legacy magic number.
        let mut p = vec![0x80, 2, 0x8a, 10];
        p.extend([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
        p.push(b'.');
        let Value::BigInt(b) = load(&p).unwrap().root else {
            panic!("not a big int")
        };
        assert_eq!(b.len(), 10);
        // Protocol 0 text form: 2**64 = 0x1_0000_0000_0000_0000.
        let Value::BigInt(b) = load(b"L18446744073709551616L\n.").unwrap().root else {
            panic!("not a big int")
        };
        assert_eq!(&*b, &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let Value::BigInt(b) = load(b"L-18446744073709551617L\n.").unwrap().root else {
            panic!("not a big int")
        };
        assert_eq!(
            &*b,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0xff]
        );
    }

    #[test]
    fn load_prefix_stops_at_the_first_stop() {
        let l = load_prefix(b"\x80\x02K\x05.\x80\x02K\x06.").unwrap();
        assert_eq!(l.end, 5);
        assert!(matches!(l.pickle.root, Value::Int(5)));
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
        let p = load(p).unwrap();
        let Value::List(l) = p.root else { panic!() };
        let Value::Dict(d) = &p.arena.seq(l)[0] else {
            panic!()
        };
        assert_eq!(p.arena.dict(*d).unwrap().len(), 1);
    }

    /// Regression: dropping values nested 200,000 deep overflowed the stack (recursive drop
    /// of `Rc<RefCell<..>>`); the arena drops flat. Lists via APPEND, tuples via TUPLE1,
    /// and `_rebuild_from_type_v2` wrapping itself (which recursed in `call`).
    #[test]
    fn values_200000_deep_load_and_drop() {
        const N: usize = 200_000;
        // ] x N, then APPEND x (N-1): each list goes into the one below it.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', N));
        p.extend(std::iter::repeat_n(b'a', N - 1));
        p.push(b'.');
        let v = load(&p).unwrap();
        let mut depth = 1;
        let Value::List(mut id) = v.root else {
            panic!()
        };
        while let [Value::List(inner)] = v.arena.seq(id) {
            id = *inner;
            depth += 1;
        }
        assert_eq!(depth, N);
        drop(v);

        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, N));
        p.push(b'.');
        assert_eq!(load(&p).unwrap().arena.len(), N + 1);

        // f(A_N) with A_k = (f, None, A_{k-1}, None) and A_0 = (OrderedDict, None, (), None):
        // `_rebuild_from_type_v2` unwraps N times before it reaches OrderedDict().
        let mut p = b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\nq\x00".to_vec();
        for _ in 0..N {
            p.extend(b"(h\x00N");
        }
        p.extend(b"(ccollections\nOrderedDict\nN)Nt");
        for _ in 0..N {
            p.extend(b"Nt");
        }
        p.extend(b"R.");
        let v = load(&p).unwrap();
        assert!(matches!(v.root, Value::Dict(_)));
    }

    /// Regression: memo fetches and DUP copied strings and bytes (a 220 kB file peaked at
    /// 5.9 GB). Now they share one allocation.
    #[test]
    fn memo_and_dup_share_strings_and_bytes() {
        const COPIES: usize = 50_000;
        let big = vec![b'x'; 100_000];
        let mut p = vec![0x80, 2, b']', b'X'];
        p.extend((big.len() as u32).to_le_bytes());
        p.extend(&big);
        p.extend(b"q\x000B");
        p.extend((big.len() as u32).to_le_bytes());
        p.extend(&big);
        p.extend(b"q\x010(");
        // stack: [list] MARK
        for _ in 0..COPIES {
            p.extend(b"h\x00h\x01");
        }
        p.extend(b"2e.");
        let v = load(&p).unwrap();
        let Value::List(l) = v.root else { panic!() };
        let items = v.arena.seq(l);
        assert_eq!(items.len(), 2 * COPIES + 1);
        let (Value::Str(s0), Value::Bytes(b0)) = (&items[0], &items[1]) else {
            panic!()
        };
        assert!(
            matches!(&items[2 * COPIES], Value::Bytes(b) if Rc::ptr_eq(b, b0)),
            "DUP"
        );
        for pair in items[..2 * COPIES].chunks(2) {
            let (Value::Str(s), Value::Bytes(b)) = (&pair[0], &pair[1]) else {
                panic!()
            };
            assert!(Rc::ptr_eq(s, s0) && Rc::ptr_eq(b, b0));
        }
        // The list's copies are the only owners (the memo went with the machine).
        assert_eq!(Rc::strong_count(s0), COPIES);
    }

    /// Regression: dict inserts searched linearly (a 140,000-tensor file took minutes).
    /// 300,000 distinct keys, one repeated key replacing its value in place.
    #[test]
    fn dict_inserts_are_hashed_and_keep_python_semantics() {
        const N: u32 = 300_000;
        let mut p = vec![0x80, 2, b'}', b'('];
        for i in 0..N {
            let k = format!("layer.{i}.weight");
            p.push(0x8c);
            p.push(k.len() as u8);
            p.extend(k.as_bytes());
            p.push(b'J');
            p.extend((i as i32).to_le_bytes());
        }
        p.extend(b"u\x8c\x0elayer.7.weightK\x63s.");
        let v = load(&p).unwrap();
        let Value::Dict(d) = v.root else { panic!() };
        let d = v.arena.dict(d).unwrap();
        assert_eq!(d.len(), N as usize);
        assert!(matches!(d.get("layer.7.weight"), Some(Value::Int(0x63))));
        assert!(matches!(d.items()[7].1, Value::Int(0x63)));
        assert!(matches!(
            d.get("layer.299999.weight"),
            Some(Value::Int(299_999))
        ));
        assert!(d.get("nope").is_none());
    }

    /// Regression: Rc cycles (a dict holding itself) leaked. In the arena a cycle is two
    /// indices; everything it holds is freed with the pickle.
    #[test]
    fn cycles_free_what_they_hold() {
        // d = {}; d["self"] = d; d["s"] = "payload"
        let p = b"\x80\x02}q\x00X\x04\x00\x00\x00selfh\x00sX\x01\x00\x00\x00sX\x07\x00\x00\x00payloads.";
        let v = load(p).unwrap();
        let Value::Dict(d) = v.root else { panic!() };
        let dict = v.arena.dict(d).unwrap();
        assert!(matches!(dict.get("self"), Some(Value::Dict(x)) if *x == d));
        let Some(Value::Str(s)) = dict.get("s") else {
            panic!()
        };
        let s = s.clone();
        drop(v);
        assert_eq!(Rc::strong_count(&s), 1, "the cycle kept its contents alive");
    }

    #[test]
    fn huge_shared_size_tuples_are_refused() {
        // A 100-element size tuple: more dimensions than a tensor may have.
        let mut p = torch_like();
        let at = p.windows(4).position(|w| w == b"K\x02K\x03").unwrap();
        let mut dims = vec![b'('];
        for _ in 0..100 {
            dims.extend(b"K\x01");
        }
        dims.push(b't');
        p.splice(at..at + 5, dims.clone());
        let at = p.windows(4).position(|w| w == b"K\x03K\x01").unwrap();
        p.splice(at..at + 5, dims);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("more than 64 dimensions"), "{e}");
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
