//! Finds every tensor in a value the pickle reader built, wherever it sits, and names it by
//! its path: dict keys, list/tuple/set positions and the fields of opaque objects joined
//! with `.` (`state_dict.layer.weight`, `shadow_params.0`, `ema.buffer.0`). Everything
//! else is listed as skipped. Shared by the zip and the legacy torch readers.
//!
//! A container reached under several paths (shared through the memo) lists its entries
//! under every path, as `torch.load` shows them (tied weights stay tied: one storage).
//! Because a hostile pickle can share a container 40 levels deep (2^40 paths from 2 KB),
//! nest a million levels, or hold itself, the walk is two passes with their own stacks,
//! never recursion: the first visits each container once, by its arena identity, and
//! counts the names that would result, refusing a container that contains itself,
//! nesting past [`MAX_DEPTH`], and name counts past limits scaled to the pickle's size;
//! the second then builds the names and costs what it returns. Lists, tuples, sets and
//! objects that hold no tensor at any depth (an optimizer's parameter index lists, a
//! numpy array) are listed as one skipped entry, not element by element.

use super::pickle::{Arena, Id, Pickle, TensorRef, Value};
use std::rc::Rc;

/// Deepest nesting of containers walked into (a state dict nests a few levels; torch's
/// own loader overflows its stack near 1000).
pub(crate) const MAX_DEPTH: usize = 1000;
/// Most names (tensors plus skipped entries) a file may list, counting every path through
/// shared containers: 4 per byte of pickle (each entry of an unshared dict costs it
/// several bytes, so this only stops sharing that multiplies names), and at least this
/// many for small files.
pub(crate) const MIN_NAME_LIMIT: u64 = 1 << 20;
/// Most bytes all those names may take together: 16 per byte of pickle, at least this many.
pub(crate) const MIN_NAME_BYTES_LIMIT: u64 = 64 << 20;

/// The name limits for a pickle of `len` bytes: (names, bytes of names).
pub(crate) fn name_limits(len: usize) -> (u64, u64) {
    let len = len as u64;
    (
        len.saturating_mul(4).max(MIN_NAME_LIMIT),
        len.saturating_mul(16).max(MIN_NAME_BYTES_LIMIT),
    )
}

/// The tensors found (in pickle order, depth first) and the skipped entries.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub tensors: Vec<(String, Rc<TensorRef>)>,
    pub skipped: Vec<String>,
}

/// What the root of a checkpoint pickle is, when it cannot hold named tensors.
pub(crate) fn root_problem(root: &Value) -> Option<&'static str> {
    match root {
        Value::Dict(_) | Value::List(_) | Value::Tuple(_) | Value::Set(_) | Value::Object(_) => {
            None
        }
        Value::Tensor(_) => Some(
            "holds one bare tensor, not a dict of named tensors (torch.save(tensor)); save a dict \
             such as {\"weight\": tensor} instead",
        ),
        _ => Some("holds a plain value, not a dict of tensors"),
    }
}

/// Walks the pickle `p` of `pkl_len` bytes; `what` names it in errors (`data.pkl`). The
/// root's own entries get no prefix. Errors are whole messages, without the file.
pub(crate) fn tensors_in(p: &Pickle, pkl_len: usize, what: &str) -> Result<Found, String> {
    let w = Walk {
        arena: &p.arena,
        holders: tensor_holders(&p.arena, &p.root),
    };
    let mut found = Found::default();
    let root = match w.outcome(&p.root) {
        Out::Enter(id) => id,
        Out::Tensor(t) => {
            found.tensors.push((String::new(), Rc::clone(t)));
            return Ok(found);
        }
        Out::Skip(why) => {
            found.skipped.push(skip_text("", why));
            return Ok(found);
        }
    };
    let sizes = w.count(root, what)?;
    let (names, name_bytes) = sizes[root.0].unwrap_or((0, 0));
    let (max_names, max_bytes) = name_limits(pkl_len);
    if names > max_names || name_bytes > max_bytes {
        return Err(format!(
            "{what} would list {names} names ({name_bytes} bytes of names) through containers \
             shared under several keys; lorastream stops at {max_names} names and {max_bytes} \
             bytes of names for a pickle of this size (a corrupt or hostile file?)"
        ));
    }
    // (container, its edges, next edge, its path)
    let mut stack: Vec<(Vec<Edge>, usize, String)> = vec![(w.edges(root), 0, String::new())];
    while let Some((edges, i, path)) = stack.last_mut() {
        let Some(e) = edges.get(*i) else {
            stack.pop();
            continue;
        };
        *i += 1;
        let Some(seg) = e.seg.text() else {
            found.skipped.push(join(path, "<non-string key>"));
            continue;
        };
        let name = match &seg {
            Some(seg) => join(path, seg),
            None => path.clone(),
        };
        match w.outcome(e.val) {
            Out::Tensor(t) => found.tensors.push((name, Rc::clone(t))),
            Out::Skip(why) => found.skipped.push(skip_text(&name, why)),
            Out::Enter(c) => {
                // A container that lists nothing is not entered: sharing it costs nothing.
                if sizes[c.0].is_some_and(|(n, _)| n > 0) {
                    stack.push((w.edges(c), 0, name));
                }
            }
        }
    }
    Ok(found)
}

/// How an entry's path continues into a container's child.
#[derive(Clone, Copy)]
enum Seg<'a> {
    /// A dict key (string or int; any other key is listed as `<non-string key>`).
    Key(&'a Value),
    /// A list, tuple or set position, or an object's argument.
    Index(usize),
    /// The same path: an object's state that is not a dict.
    Same,
}

impl Seg<'_> {
    /// Some(None) for [`Seg::Same`]; None for a key that is no string or int.
    fn text(&self) -> Option<Option<String>> {
        match self {
            Seg::Key(Value::Str(s)) => Some(Some(s.to_string())),
            Seg::Key(Value::Int(i)) => Some(Some(i.to_string())),
            Seg::Key(_) => None,
            Seg::Index(i) => Some(Some(i.to_string())),
            Seg::Same => Some(None),
        }
    }
    /// Bytes the segment adds to a name, separator included.
    fn len(&self) -> u64 {
        match self {
            Seg::Key(Value::Str(s)) => s.len() as u64 + 1,
            Seg::Key(Value::Int(i)) => i.to_string().len() as u64 + 1,
            Seg::Key(_) => "<non-string key>".len() as u64 + 1,
            Seg::Index(i) => i.to_string().len() as u64 + 1,
            Seg::Same => 0,
        }
    }
}

struct Edge<'a> {
    seg: Seg<'a>,
    val: &'a Value,
}

/// What a value is to the walk.
enum Out<'a> {
    Tensor(&'a Rc<TensorRef>),
    /// A container whose entries are named.
    Enter(Id),
    /// Listed as one skipped entry, with what follows its name.
    Skip(Option<String>),
}

struct Walk<'a> {
    arena: &'a Arena,
    /// By arena index: whether the container holds a tensor at some depth.
    holders: Vec<bool>,
}

impl<'a> Walk<'a> {
    fn holds(&self, v: &Value) -> bool {
        match v {
            Value::Tensor(_) => true,
            _ => container(v).is_some_and(|c| self.holders[c.0]),
        }
    }

    fn outcome(&self, v: &'a Value) -> Out<'a> {
        match v {
            Value::Tensor(t) => Out::Tensor(t),
            Value::Dict(d) => Out::Enter(*d),
            Value::List(l) | Value::Set(l) if !self.holders[l.0] => Out::Skip(Some(format!(
                " (a list of {} without tensors)",
                self.arena.seq(*l).len()
            ))),
            Value::Tuple(t) if !self.holders[t.0] => Out::Skip(Some(format!(
                " (a tuple of {} without tensors)",
                self.arena.seq(*t).len()
            ))),
            Value::List(l) | Value::Set(l) | Value::Tuple(l) => Out::Enter(*l),
            Value::Object(o) => match self.arena.object(*o) {
                Some(obj) if !self.holders[o.0] => Out::Skip(Some(format!(" ({})", obj.class))),
                // Objects made by torch functions we do not know (`_rebuild_qtensor`,
                // `_rebuild_sparse_tensor`) are not taken apart: their pieces are not
                // tensors torch would show, so they are listed whole.
                Some(obj) if obj.class.starts_with("torch.") => {
                    Out::Skip(Some(format!(" ({}, not read)", obj.class)))
                }
                Some(_) if !self.edges(*o).is_empty() => Out::Enter(*o),
                Some(obj) => Out::Skip(Some(format!(" ({})", obj.class))),
                None => Out::Skip(None),
            },
            _ => Out::Skip(None),
        }
    }

    /// The named children of a container the walk enters. An opaque object's `__dict__`
    /// (BUILD's state, or the dict part of a `(dict, slots)` pair) gives fields; the
    /// arguments of a plain class call (a namedtuple's fields) give positions.
    fn edges(&self, id: Id) -> Vec<Edge<'a>> {
        let a = self.arena;
        if let Some(d) = a.dict(id) {
            return d
                .items()
                .iter()
                .map(|(k, v)| Edge {
                    seg: Seg::Key(k),
                    val: v,
                })
                .collect();
        }
        let Some(o) = a.object(id) else {
            return a
                .seq(id)
                .iter()
                .enumerate()
                .map(|(i, v)| Edge {
                    seg: Seg::Index(i),
                    val: v,
                })
                .collect();
        };
        let mut out = Vec::new();
        let fields = |d: Id, out: &mut Vec<Edge<'a>>| {
            if let Some(d) = a.dict(d) {
                out.extend(d.items().iter().map(|(k, v)| Edge {
                    seg: Seg::Key(k),
                    val: v,
                }));
            }
        };
        match &o.state {
            Some(Value::Dict(d)) => fields(*d, &mut out),
            None => {}
            Some(state) => {
                let pair = match state {
                    Value::Tuple(t) => match a.seq(*t) {
                        [x, y]
                            if [x, y]
                                .iter()
                                .all(|p| matches!(p, Value::Dict(_) | Value::None)) =>
                        {
                            Some([x, y])
                        }
                        _ => None,
                    },
                    _ => None,
                };
                match pair {
                    // (instance dict, slots dict)
                    Some(parts) => {
                        for part in parts {
                            if let Value::Dict(d) = part {
                                fields(*d, &mut out);
                            }
                        }
                    }
                    None if self.holds(state) => out.push(Edge {
                        seg: Seg::Same,
                        val: state,
                    }),
                    None => {}
                }
            }
        }
        if let Value::Tuple(args) = &o.args
            && self.holds(&o.args)
        {
            out.extend(a.seq(*args).iter().enumerate().map(|(i, v)| Edge {
                seg: Seg::Index(i),
                val: v,
            }));
        }
        out
    }

    /// For each container the walk enters from `root`: how many names it lists and how
    /// many bytes they take (saturating). Each container is visited once; a cycle or
    /// nesting past [`MAX_DEPTH`] is an error naming the path.
    fn count(&self, root: Id, what: &str) -> Result<Vec<Option<(u64, u64)>>, String> {
        let n = self.arena.len();
        let mut sizes: Vec<Option<(u64, u64)>> = vec![None; n];
        let mut on_path = vec![false; n];
        struct Frame<'a> {
            id: Id,
            edges: Vec<Edge<'a>>,
            next: usize,
            names: u64,
            bytes: u64,
        }
        let mut stack = vec![Frame {
            id: root,
            edges: self.edges(root),
            next: 0,
            names: 0,
            bytes: 0,
        }];
        on_path[root.0] = true;
        let path_of = |stack: &[Frame]| -> String {
            let segs: Vec<String> = stack
                .iter()
                .take(8)
                .filter_map(|f| {
                    let e = f.edges.get(f.next.checked_sub(1)?)?;
                    e.seg.text().map_or(Some("<non-string key>".into()), |s| s)
                })
                .collect();
            let more = if stack.len() > 9 { ".…" } else { "" };
            format!("{}{more}", segs.join("."))
        };
        while let Some(f) = stack.last_mut() {
            let Some(e) = f.edges.get(f.next) else {
                let (id, done) = (f.id, (f.names, f.bytes));
                sizes[id.0] = Some(done);
                on_path[id.0] = false;
                stack.pop();
                if let Some(p) = stack.last_mut() {
                    let seg = p.edges[p.next - 1].seg.len();
                    p.names = p.names.saturating_add(done.0);
                    p.bytes = p
                        .bytes
                        .saturating_add(done.0.saturating_mul(seg))
                        .saturating_add(done.1);
                }
                continue;
            };
            f.next += 1;
            let seg = e.seg.len();
            let out = if e.seg.text().is_none() {
                Out::Skip(None)
            } else {
                self.outcome(e.val)
            };
            match out {
                Out::Enter(c) => {
                    if on_path[c.0] {
                        let kind = match e.val {
                            Value::Dict(_) => "dict",
                            Value::Object(_) => "object",
                            Value::Tuple(_) => "tuple",
                            _ => "list",
                        };
                        return Err(format!(
                            "{what}: the {kind} at '{}' contains itself (a reference cycle); a \
                             state dict is a tree of dicts",
                            path_of(&stack)
                        ));
                    }
                    match sizes[c.0] {
                        Some(done) => {
                            f.names = f.names.saturating_add(done.0);
                            f.bytes = f
                                .bytes
                                .saturating_add(done.0.saturating_mul(seg))
                                .saturating_add(done.1);
                        }
                        None => {
                            if stack.len() >= MAX_DEPTH {
                                return Err(format!(
                                    "{what} nests dicts, lists or objects more than {MAX_DEPTH} \
                                     deep (at '{}'); a state dict nests a few levels (corrupt or \
                                     hostile file?)",
                                    path_of(&stack)
                                ));
                            }
                            on_path[c.0] = true;
                            stack.push(Frame {
                                id: c,
                                edges: self.edges(c),
                                next: 0,
                                names: 0,
                                bytes: 0,
                            });
                        }
                    }
                }
                Out::Tensor(_) => {
                    f.names = f.names.saturating_add(1);
                    f.bytes = f.bytes.saturating_add(seg);
                }
                Out::Skip(why) => {
                    let why = why.map_or(0, |w| w.len() as u64);
                    f.names = f.names.saturating_add(1);
                    f.bytes = f.bytes.saturating_add(seg + why);
                }
            }
        }
        Ok(sizes)
    }
}

/// The containers that hold a tensor at some depth, by arena index: one post-order pass
/// with its own stack, each container expanded once (a cycle's back edge counts as empty).
fn tensor_holders(arena: &Arena, root: &Value) -> Vec<bool> {
    let n = arena.len();
    let mut holds = vec![false; n];
    let mut visited = vec![false; n];
    let mut stack: Vec<(Id, bool)> = container(root).map(|r| (r, false)).into_iter().collect();
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            let mut any = false;
            for_children(arena, id, |c| {
                any = any
                    || matches!(c, Value::Tensor(_))
                    || container(c).is_some_and(|c| holds[c.0]);
            });
            holds[id.0] = any;
            continue;
        }
        if visited[id.0] {
            continue;
        }
        visited[id.0] = true;
        stack.push((id, true));
        for_children(arena, id, |c| {
            if let Some(c) = container(c)
                && !visited[c.0]
            {
                stack.push((c, false));
            }
        });
    }
    holds
}

/// Calls `f` on every value directly inside a container (an object's arguments and state).
fn for_children(arena: &Arena, id: Id, mut f: impl FnMut(&Value)) {
    if let Some(d) = arena.dict(id) {
        for (k, v) in d.items() {
            f(k);
            f(v);
        }
    } else if let Some(o) = arena.object(id) {
        f(&o.args);
        if let Some(s) = &o.state {
            f(s);
        }
    } else {
        arena.seq(id).iter().for_each(f);
    }
}

fn container(v: &Value) -> Option<Id> {
    match v {
        Value::Dict(i) | Value::List(i) | Value::Tuple(i) | Value::Set(i) | Value::Object(i) => {
            Some(*i)
        }
        _ => None,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn skip_text(path: &str, why: Option<String>) -> String {
    let shown = if path.is_empty() { "<root>" } else { path };
    match why {
        Some(why) => format!("{shown}{why}"),
        None => shown.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pickle::load;

    fn walk(p: &[u8]) -> Result<Found, String> {
        tensors_in(&load(p).unwrap(), p.len(), "data.pkl")
    }

    fn names(p: &[u8]) -> (Vec<String>, Vec<String>) {
        let f = walk(p).unwrap();
        (f.tensors.into_iter().map(|(n, _)| n).collect(), f.skipped)
    }

    /// A protocol-2 pickle of `body` then STOP.
    fn pk(body: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(body);
        p.push(b'.');
        p
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

    /// `{"a": [t, {"b": t}], "n": 3}` with one tensor pickled once and memo-referenced.
    #[test]
    fn names_tensors_in_lists_and_dicts_by_path() {
        let mut p = b"\x80\x02}(X\x01\x00\x00\x00a]".to_vec();
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage");
        p.extend(b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ");
        p.extend(b"K\x00K\x02\x85K\x01\x85\x89)tRq\x01a}X\x01\x00\x00\x00bh\x01sa");
        p.extend(b"X\x01\x00\x00\x00nK\x03u.");
        let (t, s) = names(&p);
        assert_eq!(t, ["a.0", "a.1.b"]);
        assert_eq!(s, ["n"]);
    }

    /// A tensor-free list holding itself is one skipped entry.
    #[test]
    fn a_tensor_free_cycle_is_one_entry() {
        // l = []; l.append(l)
        let (t, s) = names(b"\x80\x02]q\x00h\x00a.");
        assert!(t.is_empty());
        assert_eq!(s, ["<root> (a list of 1 without tensors)"]);
    }

    /// Lists 200,000 deep are looked through with the walk's own stack (they hold no
    /// tensor, so they are one entry); lists holding a tensor 2,000 deep are refused.
    #[test]
    fn deep_nesting_is_walked_without_recursion() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 200_000));
        p.extend(std::iter::repeat_n(b'a', 199_999));
        p.push(b'.');
        let (t, s) = names(&p);
        assert!(t.is_empty());
        assert_eq!(s, ["<root> (a list of 1 without tensors)"]);
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 2_000));
        p.extend(tensor("0"));
        p.extend(std::iter::repeat_n(b'a', 2_000));
        p.push(b'.');
        let e = walk(&p).unwrap_err();
        assert!(
            e.contains("more than 1000 deep (at '0.0.0.0.0.0.0.0.…')"),
            "{e}"
        );
    }

    /// Objects without tensors (`Namespace(lr=1)`, `os.system("x")`) are listed whole, with
    /// their class.
    #[test]
    fn opaque_objects_show_their_class() {
        let (_, s) = names(b"\x80\x02}(X\x01\x00\x00\x00hcargparse\nNamespace\n)\x81}X\x02\x00\x00\x00lrK\x01sbX\x01\x00\x00\x00xcos\nsystem\nX\x01\x00\x00\x00x\x85Ru.");
        assert_eq!(s, ["h (argparse.Namespace)", "x (os.system)"]);
    }

    /// An object's `__dict__` (BUILD state) and a namedtuple-like call's arguments name
    /// the tensors inside; a torch object we do not know is listed whole.
    #[test]
    fn tensors_in_objects_are_named_by_field_and_position() {
        let mut b = b"}(".to_vec();
        b.extend(s("ema"));
        b.extend(b"cmy\nEMA\n)\x81}");
        b.extend(s("shadow"));
        b.extend(tensor("0"));
        b.extend(b"sb");
        b.extend(s("nt"));
        b.extend(b"cmy\nPair\n(");
        b.extend(tensor("1"));
        b.extend(b"K\x01tR");
        b.extend(s("q"));
        b.extend(b"ctorch._utils\n_rebuild_qtensor\n(");
        b.extend(tensor("2"));
        b.extend(b"tRu");
        let (t, sk) = names(&pk(&b));
        assert_eq!(t, ["ema.shadow", "nt.0"]);
        assert_eq!(sk, ["nt.1", "q (torch._utils._rebuild_qtensor, not read)"]);
    }

    fn err(r: Result<Found, String>) -> String {
        r.expect_err("must be refused")
    }

    /// Regression: a dict holding itself overflowed the stack in flatten.
    #[test]
    fn a_dict_that_contains_itself_is_refused() {
        let mut b = b"}q\x00".to_vec();
        b.extend(s("a"));
        b.extend(b"}q\x01");
        b.extend(s("b"));
        b.extend(b"h\x00ss"); // d0["a"] = d1, d1["b"] = d0
        let e = err(walk(&pk(&b)));
        assert!(
            e.contains("data.pkl: the dict at 'a.b' contains itself"),
            "{e}"
        );
        let mut b = b"}q\x00".to_vec();
        b.extend(s("me"));
        b.extend(b"h\x00s");
        assert!(err(walk(&pk(&b))).contains("at 'me' contains itself"));
        // A list holding a tensor and itself: torch would name it forever.
        let mut b = b"]q\x00(".to_vec();
        b.extend(tensor("0"));
        b.extend(b"h\x00e");
        assert!(err(walk(&pk(&b))).contains("the list at '1' contains itself"));
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
        let e = err(walk(&pk(&b)));
        assert!(
            e.contains(
                "nests dicts, lists or objects more than 1000 deep (at 'k.k.k.k.k.k.k.k.…')"
            ),
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
        let f = walk(&pk(&b)).unwrap();
        assert_eq!(f.tensors.len(), 1);
        assert_eq!(f.tensors[0].0.len(), 999 * 2 - 1);
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
        pk(&b)
    }

    /// Regression: a dict reached twice through the memo was walked once per path; 40
    /// levels of sharing (2^40 paths) hung, and with a non-tensor leaf the skipped-names
    /// list ate all memory. Now each container is counted once and the file refused.
    #[test]
    fn billion_laughs_are_refused_without_walking_the_paths() {
        for leaf in [b"K\x01".to_vec(), tensor("0")] {
            let e = err(walk(&laughs(&leaf, 40)));
            assert!(e.contains("would list 1099511627776 names"), "{e}");
            assert!(
                e.contains("through containers shared under several keys"),
                "{e}"
            );
        }
        // The same through lists: [t] shared 40 levels deep.
        let mut b = b"]".to_vec();
        b.extend(tensor("0"));
        b.extend(b"aq\x00");
        for i in 1..=40u8 {
            b.extend([b'(', b'h', i - 1, b'h', i - 1, b'l', b'q', i]);
        }
        assert!(err(walk(&pk(&b))).contains("would list 1099511627776 names"));
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
        let f = walk(&pk(&b)).unwrap();
        assert!(f.tensors.is_empty() && f.skipped.is_empty());
        // 2^20 names from a tiny file is the least a file may list; one more level is not.
        assert_eq!(walk(&laughs(b"N", 20)).unwrap().skipped.len(), 1 << 20);
        let e = err(walk(&laughs(b"N", 21)));
        assert!(e.contains("would list 2097152 names"), "{e}");
        assert!(
            e.contains("stops at 1048576 names and 67108864 bytes of names"),
            "{e}"
        );
    }

    /// A container shared under two paths lists its tensors under both, as torch.load shows
    /// them (tied weights stay tied: one storage).
    #[test]
    fn shared_containers_list_every_path() {
        let f = walk(&laughs(&tensor("0"), 2)).unwrap();
        let got: Vec<&str> = f.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(got, ["a.a.x", "a.b.x", "b.a.x", "b.b.x"]);
        assert!(
            f.tensors
                .iter()
                .all(|(_, t)| Rc::ptr_eq(t, &f.tensors[0].1))
        );
        assert!(f.skipped.is_empty());
        let f = walk(&laughs(b"N", 3)).unwrap();
        assert!(f.tensors.is_empty());
        assert_eq!(f.skipped.len(), 8);
        assert_eq!(f.skipped[7], "b.b.b.x");
        // A list of tensors under two keys.
        let mut b = b"}(".to_vec();
        b.extend(s("p"));
        b.push(b']');
        b.extend(tensor("0"));
        b.extend(b"aq\x00");
        b.extend(s("q"));
        b.extend(b"h\x00u");
        let (t, _) = names(&pk(&b));
        assert_eq!(t, ["p.0", "q.0"]);
        // Non-string keys are named as such; int keys become text.
        let mut b = b"}".to_vec();
        b.extend(b"K\x07");
        b.extend(tensor("0"));
        b.extend(b"s)N");
        b.extend(b"s");
        let f = walk(&pk(&b)).unwrap();
        assert_eq!(f.tensors[0].0, "7");
        assert_eq!(f.skipped, ["<non-string key>"]);
    }
}
