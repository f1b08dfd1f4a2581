//! Natural order of names: digit runs compare as numbers, so `layers.2` comes before
//! `layers.10`. Used wherever names are listed for people (inspect's table, the
//! `checkpoint-*` folders a training run leaves).

use std::cmp::Ordering;

/// Compares names with digit runs taken as numbers, so `layers.2` sorts before
/// `layers.10` (plain string order puts 10 first); ties fall back to byte order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let run = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (n, m) = (run(x), run(y));
                let strip = |s: &[u8]| {
                    let z = s.iter().take_while(|&&c| c == b'0').count();
                    s[z..].to_vec()
                };
                let (p, q) = (strip(&x[..n]), strip(&y[..m]));
                let ord = p.len().cmp(&q.len()).then_with(|| p.cmp(&q));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[n..];
                y = &y[m..];
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}
