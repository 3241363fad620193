//! Sector ranges as sorted `(start, len)` lists: union and difference, for checking what
//! was captured against what changed.

/// Sort and merge overlapping or adjacent ranges; drops empty ones.
pub fn union(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.1 > 0).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, l) in v {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

/// The parts of `a` not covered by `b`.
pub fn difference(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (a, b) = (union(a.iter().copied()), union(b.iter().copied()));
    let mut out = Vec::new();
    let mut j = 0;
    for (s, l) in a {
        let (mut cur, end) = (s, s + l);
        while j < b.len() && b[j].0 + b[j].1 <= cur {
            j += 1;
        }
        let mut k = j;
        while cur < end {
            match b.get(k) {
                Some(&(bs, bl)) if bs < end => {
                    if bs > cur {
                        out.push((cur, bs - cur));
                    }
                    cur = cur.max(bs + bl);
                    k += 1;
                }
                _ => {
                    out.push((cur, end - cur));
                    cur = end;
                }
            }
        }
    }
    out
}

/// Total sectors in a merged list.
pub fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|r| r.1).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_and_difference() {
        assert_eq!(
            union([(10, 5), (0, 3), (3, 2), (14, 10), (40, 0)]),
            vec![(0, 5), (10, 14)]
        );
        assert_eq!(
            difference(&[(0, 100)], &[(10, 10), (50, 60)]),
            vec![(0, 10), (20, 30)]
        );
        assert_eq!(difference(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(difference(&[(5, 10), (30, 5)], &[]), vec![(5, 10), (30, 5)]);
        assert_eq!(
            difference(&[(0, 4), (6, 4)], &[(2, 6)]),
            vec![(0, 2), (8, 2)]
        );
    }
}
