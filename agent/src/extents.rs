//! A set of sector ranges that coalesces overlapping and adjacent extents.
//!
//! The agent's dirty set: every changed range goes in; the readback (next stage) takes
//! ranges out. Sizes are in 512-byte sectors; an extent is the half-open `[start, end)`.

use std::collections::BTreeMap;

/// Coalescing set of half-open sector ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentSet {
    /// start -> end, non-overlapping and non-adjacent.
    map: BTreeMap<u64, u64>,
    sectors: u64,
}

impl ExtentSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `[start, start + len)`. Empty ranges are ignored; the end saturates at u64::MAX.
    pub fn insert(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut lo = start;
        let mut hi = start.saturating_add(len);
        // An extent starting at or before `lo` may overlap or touch it.
        if let Some((&s, &e)) = self.map.range(..=lo).next_back()
            && e >= lo
        {
            lo = s;
            hi = hi.max(e);
            self.map.remove(&s);
            self.sectors -= e - s;
        }
        // Extents starting inside (or touching) [lo, hi] are absorbed.
        while let Some((&s, &e)) = self.map.range(lo..=hi).next() {
            hi = hi.max(e);
            self.map.remove(&s);
            self.sectors -= e - s;
        }
        self.map.insert(lo, hi);
        self.sectors += hi - lo;
    }

    /// Remove `[start, start + len)`, splitting extents as needed.
    pub fn remove(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        let mut keep = Vec::new();
        let first = match self.map.range(..start).next_back() {
            Some((&s, &e)) if e > start => s,
            _ => start,
        };
        let hit: Vec<(u64, u64)> = self.map.range(first..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in hit {
            self.map.remove(&s);
            self.sectors -= e - s;
            if s < start {
                keep.push((s, start));
            }
            if e > end {
                keep.push((end, e));
            }
        }
        for (s, e) in keep {
            self.map.insert(s, e);
            self.sectors += e - s;
        }
    }

    /// True if `sector` is in the set.
    pub fn contains(&self, sector: u64) -> bool {
        self.map
            .range(..=sector)
            .next_back()
            .is_some_and(|(_, &e)| e > sector)
    }

    /// Extents as `(start, len)`, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e - s))
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total sectors covered.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Remove and return extents from the start, up to `max` sectors in total (the last
    /// one may be split).
    pub fn take_up_to(&mut self, max: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut budget = max;
        while budget > 0 {
            let Some((&s, &e)) = self.map.iter().next() else {
                break;
            };
            let len = (e - s).min(budget);
            self.remove(s, len);
            out.push((s, len));
            budget -= len;
        }
        out
    }

    /// Remove and return everything.
    pub fn take(&mut self) -> ExtentSet {
        std::mem::take(self)
    }
}

impl FromIterator<(u64, u64)> for ExtentSet {
    fn from_iter<I: IntoIterator<Item = (u64, u64)>>(iter: I) -> Self {
        let mut set = ExtentSet::new();
        for (s, l) in iter {
            set.insert(s, l);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn coalesces_adjacent_and_overlapping() {
        let mut s = ExtentSet::new();
        s.insert(10, 5);
        s.insert(20, 5);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 5), (20, 5)]);
        s.insert(15, 5); // touches both
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(10, 15)]);
        s.insert(0, 100);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 100)]);
        assert_eq!(s.sectors(), 100);
        s.remove(40, 10);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 40), (50, 50)]);
        assert!(s.contains(39) && !s.contains(40) && !s.contains(49) && s.contains(50));
        assert_eq!(s.sectors(), 90);
    }

    #[test]
    fn take_up_to_splits_the_last_extent() {
        let mut s: ExtentSet = [(0, 10), (20, 10), (40, 10)].into_iter().collect();
        assert_eq!(s.take_up_to(15), vec![(0, 10), (20, 5)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(25, 5), (40, 10)]);
        assert_eq!(s.take_up_to(100), vec![(25, 5), (40, 10)]);
        assert!(s.is_empty() && s.take_up_to(5).is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..200, 0u64..40).prop_map(|(s, l)| Op::Insert(s, l)),
            1 => (0u64..200, 0u64..40).prop_map(|(s, l)| Op::Remove(s, l)),
        ]
    }

    proptest! {
        /// The set behaves like a plain set of sectors, and stays canonical.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(op(), 0..60)) {
            let mut set = ExtentSet::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(s, l) => { set.insert(s, l); model.extend(s..s + l); }
                    Op::Remove(s, l) => { set.remove(s, l); for x in s..s + l { model.remove(&x); } }
                }
                let got: BTreeSet<u64> = set.iter().flat_map(|(s, l)| s..s + l).collect();
                prop_assert_eq!(&got, &model);
                prop_assert_eq!(set.sectors(), model.len() as u64);
                for x in 0..250 {
                    prop_assert_eq!(set.contains(x), model.contains(&x));
                }
                // Canonical: extents are non-empty, ordered, and neither overlap nor touch.
                let v: Vec<_> = set.iter().collect();
                for w in v.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0, "not coalesced: {:?}", v);
                }
                prop_assert!(v.iter().all(|&(_, l)| l > 0));
            }
        }
    }
}
