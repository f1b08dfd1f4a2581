//! Finds every tensor in a value the pickle reader built, wherever it sits, and names it by
//! its path: dict keys, list/tuple/set positions and the fields of opaque objects joined
//! with `.` (`state_dict.layer.weight`, `shadow_params.0`, `ema.buffer.0`). Everything
//! else is listed as skipped. Shared by the zip and the legacy torch readers.
//!
//! Why not recursion: a pickle is input, and a hostile one nests a million lists deep;
//! the walk keeps its own stack. Why a visited set: memo references make containers
//! shared and even cyclic (a list holding itself); each container is walked once, a second
//! path to it is listed as skipped, so the walk is linear in the pickle's size. Lists,
//! tuples, sets and objects that hold no tensor at any depth (an optimizer's parameter
//! index lists, a numpy array) are listed as one skipped entry, not element by element.

use super::pickle::{Object, TensorRef, Value};
use std::collections::HashSet;
use std::rc::Rc;

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

/// Walks `root`. The root's own entries get no prefix.
pub(crate) fn tensors_in(root: &Value) -> Found {
    let mut found = Found::default();
    let holders = tensor_holders(root);
    let mut seen: HashSet<usize> = HashSet::new();
    // (path, value); children are pushed in reverse so they pop in order.
    let mut stack: Vec<(String, Value)> = vec![(String::new(), root.clone())];
    while let Some((path, v)) = stack.pop() {
        if let Some(addr) = container_addr(&v)
            && !seen.insert(addr)
        {
            found.skipped.push(format!(
                "{} (a second reference to a container already read)",
                shown(&path)
            ));
            continue;
        }
        let mut children: Vec<(String, Value)> = Vec::new();
        let holds = container_addr(&v).is_some_and(|a| holders.contains(&a));
        match &v {
            Value::List(l) | Value::Set(l) if !holds => found.skipped.push(format!(
                "{} (a list of {} without tensors)",
                shown(&path),
                l.borrow().len()
            )),
            Value::Tuple(t) if !holds => found.skipped.push(format!(
                "{} (a tuple of {} without tensors)",
                shown(&path),
                t.len()
            )),
            Value::Object(o) if !holds => {
                found
                    .skipped
                    .push(format!("{} ({})", shown(&path), o.class))
            }
            Value::Tensor(t) => found.tensors.push((path, Rc::clone(t))),
            Value::Dict(d) => {
                for (k, val) in d.borrow().iter() {
                    match key_text(k) {
                        Some(key) => children.push((join(&path, &key), val.clone())),
                        None => found.skipped.push(join(&path, "<non-string key>")),
                    }
                }
            }
            Value::List(l) | Value::Set(l) => indexed(&path, l.borrow().iter(), &mut children),
            Value::Tuple(t) => indexed(&path, t.iter(), &mut children),
            Value::Object(o) => object(&path, o, &holders, &mut children, &mut found.skipped),
            _ => found.skipped.push(shown(&path)),
        }
        stack.extend(children.into_iter().rev());
    }
    found
}

/// An opaque object: its `__dict__` (BUILD's state, or the dict part of a
/// `(dict, slots)` pair) is walked as fields; the arguments of a plain class call (a
/// namedtuple's fields) as positions. Objects made by torch functions we do not know
/// (`_rebuild_qtensor`, `_rebuild_sparse_tensor`) are not taken apart: their pieces are
/// not tensors torch would show, so they are listed whole.
fn object(
    path: &str,
    o: &Rc<Object>,
    holders: &HashSet<usize>,
    children: &mut Vec<(String, Value)>,
    skipped: &mut Vec<String>,
) {
    let holds = |v: &Value| match v {
        Value::Tensor(_) => true,
        _ => container_addr(v).is_some_and(|a| holders.contains(&a)),
    };
    if o.class.starts_with("torch.") {
        skipped.push(format!("{} ({}, not read)", shown(path), o.class));
        return;
    }
    let before = children.len();
    match o.state.borrow().as_ref() {
        Some(Value::Dict(_)) | None => {}
        Some(state) => {
            if let Value::Tuple(t) = state
                && t.len() == 2
                && t.iter().all(|p| matches!(p, Value::Dict(_) | Value::None))
            {
                // (instance dict, slots dict)
                for part in t.iter() {
                    if let Value::Dict(d) = part {
                        dict_fields(path, d, children, skipped);
                    }
                }
            } else if holds(state) {
                children.push((path.to_string(), state.clone()));
            }
        }
    }
    if let Some(Value::Dict(d)) = o.state.borrow().as_ref() {
        dict_fields(path, d, children, skipped);
    }
    if let Value::Tuple(args) = &o.args
        && holds(&o.args)
    {
        indexed(path, args.iter(), children);
    }
    if children.len() == before {
        skipped.push(format!("{} ({})", shown(path), o.class));
    }
}

fn dict_fields(
    path: &str,
    d: &std::cell::RefCell<Vec<(Value, Value)>>,
    children: &mut Vec<(String, Value)>,
    skipped: &mut Vec<String>,
) {
    for (k, val) in d.borrow().iter() {
        match key_text(k) {
            Some(key) => children.push((join(path, &key), val.clone())),
            None => skipped.push(join(path, "<non-string key>")),
        }
    }
}

/// The containers that hold a tensor at some depth, by address: one post-order pass with
/// its own stack, each container expanded once (a cycle's back edge counts as empty).
fn tensor_holders(root: &Value) -> HashSet<usize> {
    let mut holders = HashSet::new();
    let mut visited = HashSet::new();
    let mut stack: Vec<(Value, bool)> = vec![(root.clone(), false)];
    while let Some((v, expanded)) = stack.pop() {
        let Some(addr) = container_addr(&v) else {
            continue;
        };
        if expanded {
            let mut any = false;
            for_children(&v, |c| {
                any = any
                    || matches!(c, Value::Tensor(_))
                    || container_addr(c).is_some_and(|a| holders.contains(&a));
            });
            if any {
                holders.insert(addr);
            }
            continue;
        }
        if !visited.insert(addr) {
            continue;
        }
        stack.push((v.clone(), true));
        for_children(&v, |c| {
            if container_addr(c).is_some() {
                stack.push((c.clone(), false));
            }
        });
    }
    holders
}

/// Calls `f` on every value directly inside a container (an object's arguments and state).
fn for_children(v: &Value, mut f: impl FnMut(&Value)) {
    match v {
        Value::Dict(d) => d.borrow().iter().for_each(|(k, x)| {
            f(k);
            f(x)
        }),
        Value::List(l) | Value::Set(l) => l.borrow().iter().for_each(f),
        Value::Tuple(t) => t.iter().for_each(f),
        Value::Object(o) => {
            f(&o.args);
            if let Some(s) = o.state.borrow().as_ref() {
                f(s);
            }
        }
        _ => {}
    }
}

fn indexed<'a>(
    path: &str,
    items: impl Iterator<Item = &'a Value>,
    children: &mut Vec<(String, Value)>,
) {
    for (i, v) in items.enumerate() {
        children.push((join(path, &i.to_string()), v.clone()));
    }
}

fn key_text(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
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

fn shown(path: &str) -> String {
    if path.is_empty() {
        "<root>".into()
    } else {
        path.to_string()
    }
}

fn container_addr(v: &Value) -> Option<usize> {
    match v {
        Value::Dict(d) => Some(Rc::as_ptr(d) as *const u8 as usize),
        Value::List(l) | Value::Set(l) => Some(Rc::as_ptr(l) as *const u8 as usize),
        Value::Tuple(t) => Some(Rc::as_ptr(t) as *const u8 as usize),
        Value::Object(o) => Some(Rc::as_ptr(o) as *const u8 as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pickle::load;

    fn names(p: &[u8]) -> (Vec<String>, Vec<String>) {
        let f = tensors_in(&load(p).unwrap());
        (f.tensors.into_iter().map(|(n, _)| n).collect(), f.skipped)
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

    /// A list holding itself ends; a dict reached twice is read once.
    #[test]
    fn cycles_and_shared_containers_end() {
        // l = []; l.append(l)
        let (t, s) = names(b"\x80\x02]q\x00h\x00a.");
        assert!(t.is_empty());
        assert_eq!(s, ["<root> (a list of 1 without tensors)"]);
    }

    /// Deeply nested lists are walked with the walk's own stack. (Kept to a depth the
    /// values' own drop, which recurses, survives on a test thread.)
    #[test]
    fn deep_nesting_is_walked_without_recursion() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 5_000));
        p.extend(std::iter::repeat_n(b'a', 4_999));
        p.push(b'.');
        let (t, _) = names(&p);
        assert!(t.is_empty());
    }

    /// Objects without tensors (`Namespace(lr=1)`, `os.system("x")`) are listed whole, with
    /// their class.
    #[test]
    fn opaque_objects_show_their_class() {
        let (_, s) = names(b"\x80\x02}(X\x01\x00\x00\x00hcargparse\nNamespace\n)\x81}X\x02\x00\x00\x00lrK\x01sbX\x01\x00\x00\x00xcos\nsystem\nX\x01\x00\x00\x00x\x85Ru.");
        assert_eq!(s, ["h (argparse.Namespace)", "x (os.system)"]);
    }
}
